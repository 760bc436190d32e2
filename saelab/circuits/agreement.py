"""How well the cheap node-effect estimates (attribution patching, integrated gradients) agree with exact patching:
Pearson correlation (do the sizes agree?) and Spearman rank correlation (do the orders agree? what a circuit's
node ranking depends on), over the nodes that the baseline moves. Marks et al. (2024, appendix) and Syed et al.
("Attribution Patching Outperforms Automated Circuit Discovery") compare estimates with patching this way."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from saelab.circuits.nodes import Aggregation, aggregate, exact_patching, node_effects
from saelab.circuits.splice import Baseline, check_saes
from saelab.circuits.tasks import Task
from saelab.dictionaries import SAE
from saelab.errors import CircuitError
from saelab.models import Model


class Agreement(NamedTuple):
    """The agreement of an estimate of node effects with exact patching."""

    pearson: float
    """Pearson correlation of the effects."""
    spearman: float
    """Spearman rank correlation (ties get their average rank)."""


def ranks(x: Tensor) -> Tensor:
    """The ranks `1..n` of the values of `x` (1-D), ties given their average rank (as `scipy.stats.rankdata`)."""
    order = x.argsort(stable=True)
    sorted_x = x[order]
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2
    out = torch.empty_like(x, dtype=torch.float64)
    out[order] = average[inverse]
    return out


def pearson(x: Tensor, y: Tensor) -> float:
    """The Pearson correlation of two 1-D tensors; `CircuitError` for fewer than two values or a constant one."""
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise CircuitError(
            f"correlations need two 1-D tensors of at least 2 values, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    norm = float(x.norm() * y.norm())
    if norm == 0:
        raise CircuitError("one set of effects is constant, so its correlation is undefined")
    return float((x * y).sum()) / norm


def agreement(estimate: Tensor, exact: Tensor) -> Agreement:
    """Pearson and Spearman correlation of two sets of effects (any shape, flattened alike)."""
    x, y = estimate.flatten().cpu(), exact.flatten().cpu()
    return Agreement(pearson(x, y), pearson(ranks(x), ranks(y)))


def effect_agreement(estimate: dict[str, Tensor], exact: dict[str, Tensor]) -> Agreement:
    """The agreement of node tensors (per hook point `[pos, d_sae + 1]`) over the nodes where either is nonzero."""
    x = torch.cat([estimate[h].flatten().cpu() for h in exact])
    y = torch.cat([exact[h].flatten().cpu() for h in exact])
    moved = (x != 0) | (y != 0)
    return agreement(x[moved], y[moved])


def estimate_agreement(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    *,
    baseline: Baseline = "patch",
    ig_steps: int = 10,
    aggregation: Aggregation = "none",
) -> dict[str, Agreement]:
    """`{"atp": ..., "ig": ...}`: each estimate's agreement with exact patching (mean effects over the examples,
    aggregated as `aggregation`) over the nodes that the baseline moves."""
    order = check_saes(model, saes)
    exact = exact_patching(model, saes, task, baseline=baseline, aggregation=aggregation, progress=False)
    out = {}
    for method in ("atp", "ig"):
        effects = node_effects(model, saes, task, method=method, ig_steps=ig_steps, baseline=baseline, progress=False)
        out[method] = effect_agreement({h: aggregate(effects.effects[h], aggregation) for h in order}, exact)
    return out
