"""A model with a known circuit: a two-layer attention-only decoder trained until it does induction (a
previous-token head in layer 0 feeding an induction head in layer 1), its character tokenizer, and
`induction_run`, a whole run over it (harvest, a TopK SAE per layer, feature analysis) for the circuits, the
steering tests and the notebooks. Its data comes from the circuits' builtin task (`repeated_tokens`)."""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

from saelab.absorption.probes import single_thread
from saelab.analysis import AnalysisConfig, analyze
from saelab.circuits.tasks import repeated_tokens
from saelab.config import HarvestConfig, TextConfig
from saelab.errors import CircuitError
from saelab.harvest import harvest
from saelab.models import save_model
from saelab.run import RunDir
from saelab.train import Grid, TrainConfig, train

ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"  # token i is ALPHABET[i]
BOS = "<s>"
INDUCTION_HOOKS = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
MODEL = "model"
"""The induction model's folder in an `induction_run`."""
TEXT = "induction.txt"
"""The documents an `induction_run` harvests."""
TARGET_ACCURACY = 0.98
"""The accuracy on the repeated half of BOS + R + R sequences that the induction model trains until it reaches."""
ARCHITECTURE: dict[str, Any] = {
    "n_layers": 2,
    "attn_only": True,
    "d_model": 64,
    "n_heads": 1,
    "d_head": 32,
    "d_vocab": len(ALPHABET) + 1,
    "normalization_type": None,
    "positional_embedding_type": "rotary",
    "model_name": "induction-2l",
}
"""The induction model's `HookedTransformerConfig` fields besides its context and seed: one head per layer, rotary
positions and no LayerNorm."""


def induction_tokenizer(folder: str | Path) -> Any:
    """A character tokenizer over `ALPHABET` (ids 0..63) with BOS `<s>` (id 64), saved to and loaded from `folder`."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(ALPHABET)} | {BOS: len(ALPHABET)}, unk_token=BOS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS, unk_token=BOS
    ).save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def char_decoder(folder: str | Path, *, n_ctx: int, seed: int = 0, **changes: Any) -> HookedTransformer:
    """An untrained decoder over the character tokenizer (saved to `folder`): the induction model's `ARCHITECTURE`
    with a context of `n_ctx` tokens, initialised from `seed`, and `changes` to its other fields."""
    cfg = HookedTransformerConfig(**(ARCHITECTURE | changes), n_ctx=n_ctx, seed=seed)
    return HookedTransformer(cfg, tokenizer=induction_tokenizer(folder), move_to_device=False)


def _copy_batch(n: int, n_ctx: int, max_length: int, vocab: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random tokens after BOS in which a random segment (3..max_length long) is copied to a random later
    place; returns tokens and the mask of next-token targets that only induction can predict."""
    toks = torch.randint(0, vocab, (n, n_ctx), generator=g)
    toks[:, 0] = vocab
    length = torch.randint(3, max_length + 1, (n,), generator=g)
    first = 1 + (torch.rand(n, generator=g) * (n_ctx - 2 * length)).long()
    second = first + length + (torch.rand(n, generator=g) * (n_ctx - 2 * length - first + 1)).long()
    pos = torch.arange(n_ctx)
    inside = (pos >= second[:, None]) & (pos < (second + length)[:, None])
    toks = toks.gather(1, torch.where(inside, pos - (second - first)[:, None], pos))
    return toks, inside[:, 1:] & (pos[None, 1:] > second[:, None])


def induction_accuracy(model: HookedTransformer, length: int, *, n: int = 512, seed: int = 1) -> float:
    """Next-token accuracy on the repeated half of fresh BOS + R + R sequences (positions that can be predicted)."""
    toks = repeated_tokens(n, length, seed, vocab=len(ALPHABET)).to(model.cfg.device)
    with torch.no_grad():
        pred = model(toks)[:, length + 1 : 2 * length].argmax(-1)
    return float((pred == toks[:, length + 2 :]).float().mean())


def train_induction_model(
    folder: str | Path,
    length: int = 10,
    steps: int = 2000,
    *,
    target_accuracy: float = TARGET_ACCURACY,
    seed: int = 0,
    progress: bool = True,
) -> HookedTransformer:
    """Train a two-layer attention-only decoder that does induction, save it to `folder`, and return it.

    It learns on random tokens with one segment copied to a random offset (so no positional shortcut
    works), and stops once fresh BOS + R + R sequences (R of `length` tokens) get `target_accuracy` on
    their repeated half (checked every 100 steps). One head per layer, rotary positions and no LayerNorm make
    it learn the textbook circuit within a few hundred steps: a previous-token head in layer 0 whose output
    the induction head in layer 1 reads as keys (K-composition). It trains on one CPU thread (the same steps
    as on two, measured: about 25 s of CPU for the 1,200 steps to 0.98, against 300 s on two threads of a busy
    2-core machine).
    """
    folder = Path(folder)
    vocab = len(ALPHABET)
    torch.manual_seed(seed)
    model = char_decoder(folder / "tokenizer", n_ctx=2 * length + 4, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    accuracy = 0.0
    bar = tqdm(range(steps), desc="train induction model", disable=not progress)
    with single_thread():  # its products are tiny: a second thread only waits (ten times slower on a busy CPU)
        for step in bar:
            toks, mask = _copy_batch(64, model.cfg.n_ctx, length, vocab, g)
            logp = model(toks)[:, :-1].log_softmax(-1).gather(-1, toks[:, 1:, None])[..., 0]
            loss = -(logp * mask).sum() / mask.sum()
            loss.backward()
            opt.step()
            opt.zero_grad()
            if (step + 1) % 100 == 0:
                accuracy = induction_accuracy(model, length)
                bar.set_postfix(loss=f"{loss.item():.3f}", accuracy=f"{accuracy:.3f}")
                if accuracy >= target_accuracy:
                    break
    bar.close()
    if accuracy < target_accuracy:
        raise CircuitError(
            f"the induction model reached accuracy {accuracy:.3f} < {target_accuracy} in {steps} steps; give more steps"
        )
    save_model(model.eval(), folder)
    return model


def induction_texts(n: int, length: int, seed: int = 0) -> list[str]:
    """`n` documents R + R (R random characters of `ALPHABET`), for harvesting the induction model's activations."""
    return [
        "".join(ALPHABET[t] for t in row[1:]) for row in repeated_tokens(n, length, seed, vocab=len(ALPHABET)).tolist()
    ]


def harvest_and_train(store: HarvestConfig, run: str | Path, *, progress: bool = True, **train_options: Any) -> None:
    """A run's first two stages: harvest `store` (its `out` the run's store), then train SAEs on it into `run`,
    `train_options` giving the other `TrainConfig` fields (the toys' runs, and the tests' smaller ones)."""
    harvest(store, progress=progress)
    train(TrainConfig(store=store.out, run=str(run), **train_options), progress=progress)


def induction_run(
    run: str | Path,
    length: int = 10,
    documents: int = 2000,
    *,
    sae_tokens: int = 600_000,
    seed: int = 0,
    progress: bool = True,
    target_accuracy: float = TARGET_ACCURACY,
) -> Path:
    """A run directory with a known circuit: the induction model (`run/model`, trained to `target_accuracy`), its
    `attn.hook_z` activations on `documents` texts R + R, a TopK SAE per layer (k=2, 128 latents) and their feature
    analysis."""
    root = Path(run).resolve()
    run_dir = RunDir(root)
    train_induction_model(root / MODEL, length, target_accuracy=target_accuracy, seed=seed, progress=progress)
    text = root / TEXT
    text.write_text("\n".join(induction_texts(documents, length, seed)) + "\n")
    harvest_and_train(
        HarvestConfig(
            model=str(root / MODEL),
            hooks=INDUCTION_HOOKS,
            out=str(run_dir.store),
            text=TextConfig(source="files", path=str(text), txt_sample_by="line"),
            context_length=2 * length + 2,
            batch_size=128,
            drop_special_tokens=False,
            dtype="float32",
            shard_rows=8192,
            chunk_rows=1024,
        ),
        root,
        tokens=sae_tokens,
        batch_size=512,
        eval_rows=4096,
        warmup_steps=10,
        grid=Grid(k=[2], expansion=[4]),
        seed=seed,
        progress=progress,
    )
    analyze(root, AnalysisConfig(), progress=progress)
    return root
