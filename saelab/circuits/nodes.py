"""Node effects: the change of the metric when a node moves from its clean value to the baseline, estimated by
attribution patching (`atp`) or integrated gradients (`ig`), and computed exactly one node at a time
(`exact_patching`, for checking).

Effects live in "node tensors" `[..., pos, d_sae + 1]` per hook point, the last column being the error node;
aggregated over positions they keep a position axis of length 1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.circuits.splice import (
    Baseline,
    Edit,
    Nodes,
    baseline_states,
    check_saes,
    chunks,
    clean_states,
    fit_replicas,
    metric_total,
    node_masks,
    output,
    set_nodes,
    splice,
    spliced_output,
    where_nodes,
)
from saelab.circuits.tasks import Task
from saelab.dictionaries import SAE
from saelab.errors import CircuitError
from saelab.models import Model

Method = Literal["atp", "ig"]
Aggregation = Literal["none", "sum"]


class NodeKey(NamedTuple):
    """Where a node is in the node tensors of a circuit's hook points."""

    hook: str
    """The hook point."""
    position: int
    """Its position (0 when aggregated over positions)."""
    index: int
    """The latent's index; `d_sae` for the error node."""


@dataclass
class NodeEffects:
    """What `node_effects` finds, per hook point."""

    effects: dict[str, Tensor]
    """The effects [batch, pos, d_sae + 1] (last column: the error node)."""
    grads: dict[str, Nodes]
    """The metric's gradient with respect to the nodes."""
    deltas: dict[str, Nodes]
    """The nodes' change from clean to baseline."""
    clean: dict[str, Nodes]
    """The nodes' clean values."""


def node_effects(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    *,
    method: Method = "ig",
    ig_steps: int = 10,
    baseline: Baseline = "patch",
    progress: bool = True,
) -> NodeEffects:
    """Effect of moving each node from its clean value to the baseline, on each example's metric.

    `atp`: one backward pass, `effect = delta * grad` at the clean point (downstream SAEs respond to their
    inputs). `ig`: for one hook point at a time, the gradient averaged over `ig_steps` points (midpoints)
    on the line from clean to baseline; the other hook points run unmodified."""
    order = check_saes(model, saes)
    clean = clean_states(model, saes, task.tokens)
    base = baseline_states(model, saes, task, baseline=baseline, clean=clean)
    deltas = {h: s - clean[h] for h, s in base.items()}
    if method == "atp":
        grads = _atp_grads(model, saes, task, clean)
    else:
        grads = _ig_grads(model, saes, task, clean=clean, deltas=deltas, steps=ig_steps, order=order, progress=progress)
    effects = {h: deltas[h].dot(grads[h]) for h in order}
    return NodeEffects(effects, grads, deltas, clean)


def _transparent(sae: SAE, leaves: Nodes) -> Edit:
    """Value x, gradient to x (upstream nodes see downstream SAEs respond), and to this hook's nodes (a skip
    transcoder's skip held at its input's value: upstream, its input reaches `x` through the real MLP already)."""

    def edit(x: Tensor, x_in: Tensor) -> Tensor:
        y = output(sae, leaves.f, x_in.detach()) + leaves.err
        return x + (y - y.detach())

    return splice(sae, edit)


def _atp_grads(model: Model, saes: dict[str, SAE], task: Task, clean: dict[str, Nodes]) -> dict[str, Nodes]:
    leaves = {h: s.with_grad() for h, s in clean.items()}
    metric = metric_total(model, task, {h: _transparent(saes[h], leaves[h]) for h in saes})
    values = [t for n in leaves.values() for t in (n.f, n.err)]
    g = torch.autograd.grad(metric.sum(), values, allow_unused=True)
    g = [torch.zeros_like(v) if gi is None else gi for v, gi in zip(values, g)]
    return {h: Nodes(g[2 * i], g[2 * i + 1]) for i, h in enumerate(leaves)}


def _ig_grads(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    *,
    clean: dict[str, Nodes],
    deltas: dict[str, Nodes],
    steps: int,
    order: list[str],
    progress: bool,
) -> dict[str, Nodes]:
    if steps < 1:
        raise CircuitError(f"ig_steps must be at least 1 (got {steps})")
    grads = {}
    with tqdm(total=len(order) * steps, desc="integrated gradients", disable=not progress) as bar:
        for hook in order:
            total = Nodes(torch.zeros_like(clean[hook].f), torch.zeros_like(clean[hook].err))
            for i in range(steps):
                alpha = (i + 0.5) / steps
                point = clean[hook].lerp(deltas[hook], alpha).with_grad()
                metric = metric_total(model, task, {hook: set_nodes(saes[hook], point)})
                gf, ge = torch.autograd.grad(metric.sum(), [point.f, point.err])
                total = Nodes(total.f + gf / steps, total.err + ge / steps)
                bar.update()
            grads[hook] = total
    return grads


def aggregate(effects: Tensor, aggregation: Aggregation) -> Tensor:
    """Mean over examples [batch, pos, n] -> [pos, n]; with `sum`, summed over positions too -> [1, n]."""
    mean = effects.mean(0)
    return mean.sum(0, keepdim=True) if aggregation == "sum" else mean


@torch.no_grad()
def exact_patching(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    *,
    chunk: int = 64,
    baseline: Baseline = "patch",
    aggregation: Aggregation = "none",
    progress: bool = True,
) -> dict[str, Tensor]:
    """Exact effects `mean_examples(m(node at baseline) - m(clean))`, one node at a time (for checking).

    Only nodes that the baseline moves are run (the others have no effect), up to `chunk` of them per forward
    pass; returns per hook point [pos, d_sae + 1], or [1, d_sae + 1] with `sum` (the latent patched at every
    position at once)."""
    order = check_saes(model, saes)
    clean = clean_states(model, saes, task.tokens)
    base = baseline_states(model, saes, task, baseline=baseline, clean=clean)
    m_clean = task.metric(spliced_output(model, task.tokens, {}))
    out = {}
    for hook in order:
        moved = torch.cat(
            [(clean[hook].f != base[hook].f), (clean[hook].err != base[hook].err).any(-1, keepdim=True)], -1
        )
        moved = moved.any(0)
        if aggregation == "sum":
            moved = moved.any(0, keepdim=True)
        nodes = [(p, i) for p, i in moved.nonzero().tolist()]
        effects = torch.zeros(moved.shape, device=moved.device)
        groups = list(chunks(nodes, fit_replicas(chunk, task, saes)))
        for group in tqdm(groups, desc=f"exact patching {hook}", disable=not progress):
            mask = node_masks(group, tuple(moved.shape), moved.device)
            values = where_nodes(mask, base[hook], clean[hook], reps=len(group), batch=len(task.tokens))
            m = metric_total(model, task, {hook: set_nodes(saes[hook], values)}, reps=len(group))
            delta = (m.view(len(group), -1) - m_clean).mean(1)
            idx = torch.tensor(group, device=moved.device)
            effects[idx[:, 0], idx[:, 1]] = delta
        out[hook] = effects
    return out
