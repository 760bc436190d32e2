"""Edges between the nodes of consecutive SAE hook points: `grad_d . (d d / d u) . delta_u`, the Jacobian of the
downstream node with respect to the upstream one through the model between them (direct paths: no other SAE
hook point lies between), at the clean input or averaged along the line from clean to baseline."""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.circuits.nodes import Aggregation, NodeEffects, aggregate
from saelab.circuits.splice import (
    Edit,
    Nodes,
    chunks,
    encode_nodes,
    fit_replicas,
    node_masks,
    set_nodes,
    splice,
    spliced_output,
)
from saelab.circuits.tasks import Task
from saelab.dictionaries import SAE
from saelab.models import Model


def _reader(sae: SAE, grad: Nodes, mask: Tensor, reps: int, read: list[Tensor]) -> Edit:
    """An edit that leaves its input alone and appends to `read` the downstream nodes of `mask` ([reps, 1, pos,
    d_sae + 1]), weighted by the metric's gradient `grad`, summed."""

    def edit(x: Tensor, x_in: Tensor) -> Tensor:
        nodes = encode_nodes(sae, x, x_in)
        f = nodes.f.view(reps, -1, *nodes.f.shape[1:]) * grad.f
        err = (nodes.err.view(reps, -1, *nodes.err.shape[1:]) * grad.err).sum(-1, keepdim=True)
        read.append((torch.cat([f, err], -1) * mask).sum())
        return x

    return splice(sae, edit)


def edge_effects(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    *,
    effects: NodeEffects,
    up: str,
    down: str,
    up_nodes: list[tuple[int, int]],
    down_nodes: list[tuple[int, int]],
    aggregation: Aggregation = "none",
    steps: int = 1,
    chunk: int = 32,
) -> Tensor:
    """Edge weights [len(down_nodes), len(up_nodes)] from nodes (position, index) at hook `up` to nodes at the
    next SAE hook `down`: mean over examples of `grad_d . (d d / d u) . delta_u`, with `grad_d` the metric's
    gradient from `effects`.

    The Jacobian is taken with `up`'s nodes as inputs and `down`'s nodes as outputs, so only paths that avoid
    other SAE hook points count (give consecutive hook points). With `steps` 1 it is taken at the clean input;
    with more, averaged over that many points on the line from clean to baseline of `up`'s nodes (as
    integrated gradients are), which sees through saturated attention. With `sum` aggregation a node is a
    latent at every position (position 0 in the lists)."""
    clean, delta, grad = effects.clean[up], effects.deltas[up], effects.grads[down]
    shape = tuple(aggregate(effects.effects[down], aggregation).shape)
    up_idx = torch.tensor(up_nodes, device=task.tokens.device).reshape(-1, 2)
    alphas = [0.0] if steps == 1 else [(i + 0.5) / steps for i in range(steps)]
    rows = []
    for group in chunks(down_nodes, fit_replicas(chunk, task, saes)):
        reps = len(group)
        mask = node_masks(group, shape, task.tokens.device)[:, None]
        weights = torch.zeros(reps, *aggregate(effects.effects[up], aggregation).shape, device=mask.device)
        for alpha in alphas:
            leaves = clean.lerp(delta, alpha).tile(reps).with_grad()
            read: list[Tensor] = []
            edits = {up: set_nodes(saes[up], leaves), down: _reader(saes[down], grad, mask, reps, read)}
            spliced_output(model, task.tokens.repeat(reps, 1), edits)
            gf, ge = torch.autograd.grad(read[0], [leaves.f, leaves.err])
            contrib = Nodes(gf.view(reps, -1, *gf.shape[1:]), ge.view(reps, -1, *ge.shape[1:])).dot(delta).mean(1)
            weights += (contrib.sum(1, keepdim=True) if aggregation == "sum" else contrib) / len(alphas)
        rows.append(weights[:, up_idx[:, 0], up_idx[:, 1]])
    return torch.cat(rows) if rows else torch.zeros(0, len(up_nodes), device=task.tokens.device)
