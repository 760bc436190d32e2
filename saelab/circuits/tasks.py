"""What a circuit explains: a `Task` (clean tokens, an optional patch input, a metric per example), the metrics,
the builtin `induction` task and tasks made from `Prompt`s."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from saelab.circuits.splice import spliced_output
from saelab.config import StrictModel
from saelab.errors import CircuitError
from saelab.models import Model, device_of, is_encoder, tokenizer_of
from saelab.text import SpecialTokens

Metric = Callable[[Tensor], Tensor]
MetricName = Literal["logit", "logit_diff", "loss", "similarity"]
INDUCTION_VOCAB = 64
"""The random tokens of `repeated_tokens` by default: ids `0..63`, with BOS the next id (the induction toy's)."""


@dataclass
class Task:
    """What a circuit explains: clean `tokens`, an optional `patch` input of the same shape, and a `metric`.

    The metric receives the examples tiled along the batch (row r is example r % batch), as effects are
    computed for many interventions in one pass."""

    tokens: Tensor
    """The clean input [batch, pos]."""
    metric: Metric
    """The model's output (tiled examples) -> one number per row."""
    patch: Tensor | None = None
    """The patch input [batch, pos], the `patch` baseline."""
    labels: list[str] = field(default_factory=list)
    """The token at each position of the first example."""
    roles: list[str] = field(default_factory=list)
    """The role of each position, the same in every example (e.g. `current token`), for grouping nodes by
    position role (`saelab.circuits.groups`); empty when the task names none."""


def token_metric(
    kind: Literal["logit", "logit_diff", "loss"], position: Tensor, target: Tensor, *, distractor: Tensor | None = None
) -> Metric:
    """A decoder metric at `position` [batch]: the `target` token's logit, its logit minus the `distractor`'s,
    or its cross-entropy loss."""
    if kind == "logit_diff" and distractor is None:
        raise CircuitError("metric logit_diff needs a distractor token for every example")

    def metric(logits: Tensor) -> Tensor:
        reps = len(logits) // len(position)
        rows = logits[torch.arange(len(logits), device=logits.device), position.repeat(reps)].float()
        pick = rows.gather(-1, target.repeat(reps)[:, None])[:, 0]
        if kind == "logit":
            return pick
        if kind == "loss":
            return rows.logsumexp(-1) - pick
        assert distractor is not None  # checked above
        return pick - rows.gather(-1, distractor.repeat(reps)[:, None])[:, 0]

    return metric


def similarity_metric(reference: Tensor) -> Metric:
    """An encoder metric: cosine similarity of the mean-pooled output embeddings to `reference` [batch, d_model]."""

    def metric(hidden: Tensor) -> Tensor:
        reps = len(hidden) // len(reference)
        return torch.cosine_similarity(hidden.float().mean(1), reference.repeat(reps, 1), dim=-1)

    return metric


# ------------------------------------------------------------------------------------------ induction


def repeated_tokens(n: int, length: int, seed: int = 0, *, vocab: int = INDUCTION_VOCAB) -> Tensor:
    """`n` sequences BOS + R + R of random tokens R (ids below `vocab`; BOS is `vocab`) [n, 2 * length + 1]."""
    r = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.full((n, 1), vocab), r, r], 1)


def induction_task(
    model: Model,
    n: int = 8,
    length: int = 10,
    *,
    position: int | None = None,
    seed: int = 0,
    metric: Literal["logit", "loss"] = "logit",
) -> Task:
    """`n` sequences BOS + R + R (R: `length` random tokens); the metric reads `position` in the second R
    (default its middle), where the next token is predictable only by induction. The patch input replaces the
    first R by other random tokens, so the earlier occurrence of the current token is gone."""
    if 2 * length + 1 > model.cfg.n_ctx:
        raise CircuitError(
            f"induction length {length} needs {2 * length + 1} positions; the model has {model.cfg.n_ctx}"
        )
    vocab = model.cfg.d_vocab - 1
    position = length + length // 2 if position is None else position
    if not length + 1 <= position < 2 * length:
        raise CircuitError(
            f"induction position {position} is outside the repeated half; use {length + 1}..{2 * length - 1}"
        )
    tokens = repeated_tokens(n, length, seed, vocab=vocab)
    patch = tokens.clone()
    patch[:, 1 : length + 1] = repeated_tokens(n, length, seed + 1_000_003, vocab=vocab)[:, 1 : length + 1]
    device = device_of(model)
    pos = torch.full((n,), position, device=device)
    task_metric = token_metric(metric, pos, tokens[:, position + 1].to(device))
    roles = induction_roles(length, position)
    return Task(tokens.to(device), task_metric, patch.to(device), _labels(model, tokens[0]), roles)


def induction_roles(length: int, position: int) -> list[str]:
    """The role of each position of BOS + R + R read at `position`: `BOS`, `earlier occurrence` (the first copy of
    the current token), `after earlier occurrence` (where induction attends: its previous token is the current
    one), `current token` (where the metric reads), and the rest of the `first copy`, `second copy` or `after the
    metric`."""
    roles = ["BOS"] + ["first copy"] * length + ["second copy"] * length
    roles[position + 1 :] = ["after the metric"] * (2 * length - position)
    roles[position - length] = "earlier occurrence"
    roles[position - length + 1] = "after earlier occurrence"
    roles[position] = "current token"
    return roles


# -------------------------------------------------------------------------------------------- prompts


def _labels(model: Model, tokens: Tensor) -> list[str]:
    if model.tokenizer is None:
        return [str(t) for t in tokens.tolist()]
    return [str(model.tokenizer.decode([t])) for t in tokens.tolist()]


def _single_token(tokenizer: Any, text: str, what: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise CircuitError(f"{what} {text!r} is {len(ids)} tokens {ids}; give text that is exactly one token")
    return ids[0]


class Prompt(StrictModel):
    """One example: `clean` text, an optional `patch` text of the same token length, and what the metric reads:
    decoders score `target` (and `distractor`, for logit_diff) as the next token at `position` (default: last);
    encoders compare the output embedding with that of the `target` text."""

    clean: str
    patch: str | None = None
    target: str | None = None
    distractor: str | None = None
    position: int = -1


def prompt_task(model: Model, prompts: list[Prompt], metric: MetricName) -> Task:
    """A task from prompts; every prompt (and patch) must have the same number of tokens."""
    if not prompts:
        raise CircuitError("no prompts: give at least one")
    encoder = is_encoder(model)
    if (metric == "similarity") != encoder:
        raise CircuitError(
            f"metric {metric!r} does not suit this {'encoder' if encoder else 'decoder'}; use "
            f"{'similarity' if encoder else 'logit, logit_diff or loss'}"
        )
    tokenizer = tokenizer_of(model, CircuitError)
    special = SpecialTokens.for_tokenizer(tokenizer, encoder)

    def encode(text: str) -> list[int]:
        return special.frame(tokenizer(text, add_special_tokens=False)["input_ids"])

    clean = [encode(p.clean) for p in prompts]
    patches = [p.patch for p in prompts]
    if any(p is not None for p in patches) and any(p is None for p in patches):
        raise CircuitError("give a patch text for every prompt or for none")
    patch = [encode(p) for p in patches if p is not None] or None
    lengths = {len(t) for t in clean + (patch or [])}
    if len(lengths) != 1:
        raise CircuitError(
            f"prompts (and patches) tokenize to different lengths {sorted(lengths)}; circuits compare "
            "positions across examples, so make them the same length"
        )
    device = device_of(model)
    tokens = torch.tensor(clean, device=device)
    patch_t = torch.tensor(patch, device=device) if patch else None
    targets = [p.target for p in prompts]
    if any(t is None for t in targets):
        raise CircuitError(f"metric {metric!r} needs a target for every prompt")
    targets = [t for t in targets if t is not None]
    if encoder:
        with torch.no_grad():
            ref = torch.stack(
                [spliced_output(model, torch.tensor([encode(t)], device=device), {})[0].mean(0) for t in targets]
            )
        return Task(tokens, similarity_metric(ref), patch_t, _labels(model, tokens[0]))
    assert metric != "similarity"  # it suits encoders only, checked above
    position = torch.tensor([p.position % tokens.shape[1] for p in prompts], device=device)
    target = torch.tensor([_single_token(tokenizer, t, "target") for t in targets], device=device)
    distractor = None
    if metric == "logit_diff":
        distractors = [p.distractor for p in prompts]
        if any(d is None for d in distractors):
            raise CircuitError("metric logit_diff needs a distractor for every prompt")
        ids = [_single_token(tokenizer, d, "distractor") for d in distractors if d is not None]
        distractor = torch.tensor(ids, device=device)
    task_metric = token_metric(metric, position, target, distractor=distractor)
    return Task(tokens, task_metric, patch_t, _labels(model, tokens[0]))
