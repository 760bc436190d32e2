"""Faithfulness and completeness with their spread over examples (`Spread`): the figure of the whole set, a
percentile-bootstrap 95% interval over resampled examples, and the range of the per-example figures; measured on
the examples a circuit was found on and on held-out ones, so a circuit that only fits its own examples shows it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple, TypedDict

import torch
from torch import Tensor

from saelab.circuits.faithfulness import Ablation, ablated_metrics, check_scale
from saelab.circuits.splice import Nodes, check_saes, spliced_output
from saelab.circuits.tasks import Task
from saelab.dictionaries import SAE
from saelab.errors import CircuitError
from saelab.models import Model

RESAMPLES = 1000
"""Bootstrap resamples of the examples for the 95% intervals."""


class Spread(TypedDict):
    """Faithfulness and completeness by circuit size on one set of examples, with their spread."""

    examples: int
    """The number of examples."""
    n: list[int]
    """The circuit sizes (nodes, or group nodes, kept)."""
    faithfulness: list[float]
    """`(m(C) - m(empty)) / (m(M) - m(empty))` with means over the examples, for each size."""
    faithfulness_ci: list[list[float]]
    """Its percentile-bootstrap 95% interval `[low, high]` over resampled examples, for each size."""
    faithfulness_range: list[list[float]]
    """The lowest and highest per-example faithfulness `[min, max]` (examples whose own `m(M) - m(empty)` is 0
    left out), for each size."""
    completeness: list[float]
    """The same with the circuit's own nodes ablated and the rest kept."""
    completeness_ci: list[list[float]]
    """Its bootstrap 95% interval, for each size."""
    completeness_range: list[list[float]]
    """The per-example range of completeness, for each size."""
    metric_full: float
    """The metric of the whole model, m(M) (mean over the examples)."""
    metric_empty: float
    """The metric with every node ablated (set to its mean, or to zero), m(empty)."""


def default_sizes(n_nodes: int) -> list[int]:
    """0, the powers of two below `n_nodes`, and `n_nodes`."""
    sizes = [2**i for i in range(int(math.log2(max(n_nodes, 1))) + 1)]
    return sorted({0, *sizes, n_nodes})


def at_size(spread: Spread, n: int) -> int:
    """The index of size `n` in `spread["n"]`; `CircuitError` when it was not measured."""
    if n not in spread["n"]:
        raise CircuitError(f"size {n} was not measured (sizes {spread['n']}); add it to curve_sizes")
    return spread["n"].index(n)


def check_held_out(task: Task, held_out: Task, *, per_position: bool) -> None:
    """`CircuitError` when nodes keyed by position cannot carry over to `held_out` (another sequence length)."""
    if per_position and held_out.tokens.shape[1] != task.tokens.shape[1]:
        raise CircuitError(
            f"the held-out examples have {held_out.tokens.shape[1]} positions and the circuit's {task.tokens.shape[1]}; "
            "nodes are kept by position, so give held-out examples of the same length (or aggregation 'sum')"
        )


def _ratios(m: Tensor, empty: Tensor, full: Tensor) -> Tensor:
    """`(mean m - mean empty) / (mean full - mean empty)` over the last axis."""
    return (m.mean(-1) - empty.mean(-1)) / (full.mean(-1) - empty.mean(-1))


class _Summary(NamedTuple):
    value: list[float]
    ci: list[list[float]]
    range: list[list[float]]


def _summary(m: Tensor, empty: Tensor, full: Tensor, *, resamples: int, seed: int) -> _Summary:
    """For per-example metrics `m [sizes, batch]`: the figures, bootstrap intervals and per-example ranges."""
    batch = m.shape[1]
    value = _ratios(m, empty, full)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, batch, (resamples, batch), generator=g).to(m.device)
    boot = _ratios(m[:, idx], empty[idx], full[idx])  # [sizes, resamples]
    boot = torch.where(boot.isfinite(), boot, torch.nan)
    low, high = boot.nanquantile(0.025, dim=1), boot.nanquantile(0.975, dim=1)
    scale = full - empty
    counted = scale.abs() > 1e-6 * full.abs().clamp_min(1.0)
    per_example = ((m - empty) / scale)[:, counted]
    if per_example.shape[1]:
        ranges = torch.stack([per_example.min(1).values, per_example.max(1).values], 1).tolist()
    else:
        ranges = [[math.nan, math.nan]] * len(m)
    return _Summary(value.tolist(), torch.stack([low, high], 1).tolist(), ranges)


@torch.no_grad()
def spread_curve(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    *,
    keeps: Sequence[dict[str, Tensor]],
    sizes: list[int],
    resamples: int = RESAMPLES,
    seed: int = 0,
    chunk: int = 16,
    ablation: Ablation = "mean",
    states: dict[str, Nodes] | None = None,
) -> Spread:
    """Faithfulness and completeness on `task`'s examples of the circuits `keeps` (one node mask per hook point,
    `[pos, d_sae + 1]` or `[1, d_sae + 1]`, for each size in `sizes`), with bootstrap intervals (`resamples`
    resamples of the examples, from `seed`) and per-example ranges. Nodes outside a circuit are set to their mean
    over these examples (the means of the set being measured), as in `faithfulness_curve`, or to zero (`ablation`
    "zero"). `states`: the clean states of `task.tokens` (`clean_states`) when the caller has them already."""
    if len(keeps) != len(sizes):
        raise CircuitError(f"{len(keeps)} circuits for {len(sizes)} sizes; give one node mask per size")
    hooks = check_saes(model, saes)
    device = task.tokens.device
    shapes = {h: tuple(keeps[0][h].shape) if keeps else (1, saes[h].cfg.d_sae + 1) for h in hooks}
    nothing = {h: torch.zeros(shapes[h], dtype=torch.bool, device=device) for h in hooks}
    runs = [nothing, *keeps, *[{h: ~k[h] for h in hooks} for k in keeps]]
    m = ablated_metrics(model, saes, task, keeps=runs, chunk=chunk, ablation=ablation, states=states).float().cpu()
    empty, circuits, without = m[0], m[1 : 1 + len(keeps)], m[1 + len(keeps) :]
    full = task.metric(spliced_output(model, task.tokens, {})).float().cpu()
    check_scale(float(full.mean()), float(empty.mean()))
    faith = _summary(circuits, empty, full, resamples=resamples, seed=seed)
    complete = _summary(without, empty, full, resamples=resamples, seed=seed)
    return Spread(
        examples=len(full),
        n=list(sizes),
        faithfulness=faith.value,
        faithfulness_ci=faith.ci,
        faithfulness_range=faith.range,
        completeness=complete.value,
        completeness_ci=complete.ci,
        completeness_range=complete.range,
        metric_full=float(full.mean()),
        metric_empty=float(empty.mean()),
    )
