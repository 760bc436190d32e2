"""Tasks with known attributes for the supervised-dictionary eval (`saelab.evals.supervised`, after Makelov et al.
2024): planted attributes read by a known linear model, and the induction model's layer-1 head output.

- `planted_attributes`: each activation is the sum of one planted vector per attribute (its value's) plus noise, and a
  matched-filter readout answers the value of the first attribute. The planted vectors of an attribute sum to zero
  and the values are uniform and independent, so `E[a | attr_i = v] - E[a]` is the planted vector itself: the
  supervised dictionary must recover it, and swapping it must move the readout's answer.
- `induction_attributes`: the induction model (`saelab.toys.induction`) on BOS + R + R, at `blocks.1.attn.hook_z` on
  the positions of the repeated half that induction predicts. The layer-1 head attends from position `p` to the
  position after the earlier occurrence of the current token and copies what it reads there: that position's own
  token (the token to be copied, `copied`, the model's answer) and, through the layer-0 previous-token head, its
  previous token, which is the current token (`current`). Attention is one-hot and the values linear in the residual,
  so the head's output is close to a sum of one vector per `copied` and one per `current`, and the answer is read from
  the `copied` part alone. Positions carry nothing here (rotary positions never enter the residual stream), so no
  position attribute: its conditional means would be noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor

from saelab.circuits.tasks import repeated_tokens
from saelab.errors import ConfigError
from saelab.evals.supervised import AttributeLabels, Counterfactuals, SupervisedTask, attribute_labels
from saelab.models import Model

INDUCTION_SITE = "blocks.1.attn.hook_z"
"""Where `induction_attributes` reads: the induction head's output (heads flattened, as the store holds it)."""
FORWARD_BATCH = 1024
"""Sequences per forward pass of the induction readout."""


@dataclass
class PlantedAttributes:
    """A planted-attribute task and what was planted."""

    task: SupervisedTask
    """The examples, their labels (`a0`, `a1`, ...), the readout's answers and the readout."""
    vectors: list[Tensor]
    """Per attribute `[n_values, d]`: the planted value vectors (each attribute's sum to zero)."""
    noise: Tensor
    """`[n, d]`: each example's noise (a counterfactual input keeps it)."""


def planted_attributes(
    n: int = 4000,
    n_attributes: int = 3,
    n_values: int = 4,
    *,
    d: int = 32,
    noise: float = 0.1,
    seed: int = 0,
) -> PlantedAttributes:
    """`n` activations `sum_i w_{i, v_i} + noise` (values uniform and independent, `w` random unit-norm vectors of
    each attribute, centred so they sum to zero, then rescaled to norm 1), read by the matched filter of attribute
    `a0`: logits `[n, n_values]` = `a @ w_0.T`, whose argmax is the example's `a0` value while the other attributes'
    vectors and the noise stay small against the filter's margin (a `d` well above `n_attributes * n_values`)."""
    if n_values < 2 or n_attributes < 1:
        raise ConfigError(f"{n_attributes} attributes of {n_values} values: give at least one attribute of two values")
    g = torch.Generator().manual_seed(seed)
    vectors = []
    for _ in range(n_attributes):
        w = torch.randn(n_values, d, generator=g)
        w = w - w.mean(0)
        vectors.append(w / w.norm(dim=1, keepdim=True))
    index = torch.randint(0, n_values, (n, n_attributes), generator=g)
    eps = noise * torch.randn(n, d, generator=g)
    x = sum((w[index[:, i]] for i, w in enumerate(vectors)), eps)
    readout_w = vectors[0].clone()

    def readout(acts: Tensor, rows: Tensor) -> Tensor:
        return acts.float() @ readout_w.T

    labels = attribute_labels({f"a{i}": index[:, i] for i in range(n_attributes)})
    answer = readout(x, torch.arange(n)).argmax(1)
    return PlantedAttributes(SupervisedTask(x, labels, answer, readout), vectors, eps)


def planted_counterfactuals(
    planted: PlantedAttributes, rows: Tensor, *, attribute: str = "a0", seed: int = 0
) -> Counterfactuals:
    """Edits of `attribute` on examples `rows`: each moves to another value drawn at random; the counterfactual input
    is the example with that attribute's planted vector swapped (its other attributes and its noise kept), and its
    answer is the readout's on it."""
    task = planted.task
    i = task.labels.column(attribute)
    n_values = len(task.labels.values[i])
    g = torch.Generator().manual_seed(seed)
    now = task.labels.index[rows, i]
    to = (now + torch.randint(1, n_values, (len(rows),), generator=g)) % n_values
    w = planted.vectors[i]
    x_cf = task.x[rows] - w[now] + w[to]
    answer = task.readout(x_cf, rows).argmax(1)
    return Counterfactuals(attribute, rows, to, x_cf, answer)


@dataclass
class InductionAttributes:
    """The induction model's layer-1 head output on the predictable positions of BOS + R + R."""

    task: SupervisedTask
    """Examples (sequence, position), labels `copied` and `current`, the model's answers and the patched readout."""
    tokens: Tensor
    """`[n_sequences, 2 * length + 1]`: the sequences."""
    sequence: Tensor
    """`[n]` long: each example's sequence."""
    position: Tensor
    """`[n]` long: each example's position (it predicts the token after it)."""
    model: Model
    """The model."""
    length: int
    """The length of R."""


def _site(model: Model, tokens: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """The flattened `INDUCTION_SITE` activation `[m, d]` at `positions` of `tokens` `[m, ctx]`, and the logits there."""
    acts, logits = [], []
    with torch.no_grad():
        for start in range(0, len(tokens), FORWARD_BATCH):
            part = slice(start, start + FORWARD_BATCH)
            raw, cache = model.run_with_cache(tokens[part], names_filter=INDUCTION_SITE)
            out = cast(Tensor, raw)
            idx = torch.arange(len(out))
            z: Tensor = cache[INDUCTION_SITE]
            acts.append(z[idx, positions[part]].flatten(1))
            logits.append(out[idx, positions[part]])
    return torch.cat(acts), torch.cat(logits)


def _patched_logits(model: Model, tokens: Tensor, positions: Tensor, acts: Tensor) -> Tensor:
    """The logits at `positions` of `tokens` `[m, ctx]` with `INDUCTION_SITE` there replaced by `acts` `[m, d]`."""
    heads, d_head = model.cfg.n_heads, model.cfg.d_head
    logits = []
    with torch.no_grad():
        for start in range(0, len(tokens), FORWARD_BATCH):
            part = slice(start, start + FORWARD_BATCH)
            pos, new = positions[part], acts[part].view(-1, heads, d_head)
            idx = torch.arange(len(pos))

            def hook(z: Tensor, hook: object, pos: Tensor = pos, new: Tensor = new, idx: Tensor = idx) -> Tensor:
                z = z.clone()
                z[idx, pos] = new.to(z.dtype)
                return z

            out = model.run_with_hooks(tokens[part], fwd_hooks=[(INDUCTION_SITE, hook)])
            logits.append(out[idx, pos])
    return torch.cat(logits)


def induction_attributes(
    model: Model, n_sequences: int = 1000, length: int = 10, *, seed: int = 0
) -> InductionAttributes:
    """The supervised-dictionary task on the induction model (see the module's docstring): `n_sequences` sequences
    BOS + R + R (tokens below the BOS id), every position `p` of the repeated half whose next token is a copy
    (`length + 1 <= p < 2 * length`), labelled `copied` (the token after `p`, `R`'s token the head copies) and
    `current` (the token at `p`); the answer is the model's prediction at `p`."""
    vocab = model.cfg.d_vocab - 1  # the last id is BOS
    tokens = repeated_tokens(n_sequences, length, seed, vocab=vocab).to(model.cfg.device)
    if tokens.shape[1] > model.cfg.n_ctx:
        raise ConfigError(f"sequences of {tokens.shape[1]} tokens exceed the model's context {model.cfg.n_ctx}")
    per = torch.arange(length + 1, 2 * length)
    sequence = torch.arange(n_sequences).repeat_interleave(len(per))
    position = per.repeat(n_sequences)
    x, logits = _site(model, tokens[sequence], position)
    labels: AttributeLabels = attribute_labels(
        {"copied": tokens[sequence, position + 1], "current": tokens[sequence, position]}
    )

    def readout(acts: Tensor, rows: Tensor) -> Tensor:
        return _patched_logits(model, tokens[sequence[rows]], position[rows], acts)

    task = SupervisedTask(x, labels, logits.argmax(1), readout)
    return InductionAttributes(task, tokens, sequence, position, model, length)


def induction_counterfactuals(ind: InductionAttributes, rows: Tensor, *, seed: int = 0) -> Counterfactuals:
    """Edits of `copied` on examples `rows`: the token the head copies (at `p + 1 - length` in the first R) becomes a
    token drawn at random among those the sequence does not hold (so no other occurrence can draw the head), and the
    counterfactual input is the sequence with that token changed, run through the model."""
    g = torch.Generator().manual_seed(seed)
    seqs = ind.tokens[ind.sequence[rows]].clone()
    pos = ind.position[rows]
    vocab = ind.model.cfg.d_vocab - 1
    present = torch.zeros(len(rows), vocab, dtype=torch.bool).scatter_(1, seqs[:, 1 : ind.length + 1], True)
    weights = (~present).float()
    new = torch.multinomial(weights, 1, generator=g)[:, 0]
    seqs[torch.arange(len(rows)), pos + 1 - ind.length] = new
    x_cf, logits = _site(ind.model, seqs, pos)
    col = ind.task.labels.column("copied")
    values = torch.tensor(ind.task.labels.values[col])
    to = torch.searchsorted(values, new)
    if (to >= len(values)).any() or (values[to.clamp_max(len(values) - 1)] != new).any():
        raise ConfigError("a counterfactual token is not among the labelled `copied` values; give more sequences")
    return Counterfactuals("copied", rows, to, x_cf, logits.argmax(1))
