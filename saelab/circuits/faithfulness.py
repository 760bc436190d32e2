"""Faithfulness and completeness of a circuit: the metric with every node outside it (or inside it) mean-ablated,
relative to the whole model and to everything ablated."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict

import torch
from torch import Tensor

from saelab.circuits.nodes import Aggregation
from saelab.circuits.splice import (
    Edit,
    Nodes,
    check_saes,
    chunks,
    clean_states,
    encode_nodes,
    fit_replicas,
    metric_total,
    output,
    splice,
    spliced_output,
    where_nodes,
)
from saelab.circuits.tasks import Task
from saelab.dictionaries import SAE
from saelab.errors import CircuitError
from saelab.models import Model

Ablation = Literal["mean", "zero"]
"""What a node outside a circuit is set to: its mean over the examples (per position; Marks et al.) or zero
(circuit-tracer's ablation of a transcoder latent)."""


class Curves(TypedDict):
    """Faithfulness and completeness by circuit size (the `curves` of a `Circuit`)."""

    n: list[int]
    """The circuit sizes: the first n nodes of the ranking."""
    faithfulness: list[float]
    """`(m(C) - m(empty)) / (m(M) - m(empty))` for each size, every node outside C mean-ablated."""
    completeness: list[float]
    """The same with C's own nodes ablated and the rest kept."""


class Faithfulness(Curves):
    """`Curves` and the two ends of their scale (means over the examples)."""

    metric_full: float
    """The metric of the whole model, m(M)."""
    metric_empty: float
    """The metric with every node mean-ablated, m(empty)."""


def _zero(states: Nodes) -> Nodes:
    return Nodes(torch.zeros_like(states.f[:1]), torch.zeros_like(states.err[:1]))


def _ablation(sae: SAE, keep: Tensor, mean: Nodes, reps: int, batch: int) -> Edit:
    """An edit that keeps the nodes of `keep` ([reps, pos, d_sae + 1]) and sets the others to `mean`."""

    def edit(x: Tensor, x_in: Tensor) -> Tensor:
        nodes = where_nodes(keep, encode_nodes(sae, x, x_in), mean, reps=reps, batch=batch)
        return output(sae, nodes.f, x_in) + nodes.err

    return splice(sae, edit)


@torch.no_grad()
def ablated_metrics(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    *,
    keeps: Sequence[dict[str, Tensor]],
    chunk: int = 16,
    ablation: Ablation = "mean",
    states: dict[str, Nodes] | None = None,
) -> Tensor:
    """Each example's metric `[len(keeps), batch]` with the nodes of `keeps[k]` (per hook point a mask
    `[pos, d_sae + 1]`, or `[1, d_sae + 1]` for every position) running normally and every other node set to its
    mean over the examples (per position; `ablation` "mean") or to zero ("zero": a latent off, an error node
    removed). `states`: the clean states of `task.tokens` (`clean_states`) when the caller has them already, so the
    model is not run for them again."""
    hooks = check_saes(model, saes)
    clean = clean_states(model, saes, task.tokens) if states is None else states
    means = {h: s.mean() if ablation == "mean" else _zero(s) for h, s in clean.items()}
    batch = len(task.tokens)
    rows: list[Tensor] = []
    for group in chunks(list(keeps), fit_replicas(chunk, task, saes)):
        edits = {h: _ablation(saes[h], torch.stack([k[h] for k in group]), means[h], len(group), batch) for h in hooks}
        rows.append(metric_total(model, task, edits, len(group)).view(len(group), -1))
    return torch.cat(rows) if rows else torch.zeros(0, batch)


def check_scale(m_full: float, m_empty: float) -> float:
    """`m_full - m_empty`, the scale of faithfulness; `CircuitError` when ablating every node leaves the metric
    unchanged."""
    scale = m_full - m_empty
    if abs(scale) < 1e-6 * max(1.0, abs(m_full)):
        raise CircuitError(
            "ablating every node leaves the metric unchanged, so faithfulness is undefined; "
            "choose a metric that these hook points matter for"
        )
    return scale


@torch.no_grad()
def faithfulness_curve(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    *,
    ranking: Sequence[tuple[str, int, int]],
    sizes: list[int],
    aggregation: Aggregation = "none",
    chunk: int = 16,
) -> Faithfulness:
    """Faithfulness and completeness of the first n nodes of `ranking` (`NodeKey`s, strongest first), for each n
    in `sizes`.

    Every node outside the circuit C is set to its mean over the examples (per position) while C's nodes run
    normally: faithfulness = (m(C) - m(empty)) / (m(M) - m(empty)), with M the whole model and `empty` every
    node ablated. Completeness ablates C's own nodes and keeps the rest: (m(M without C) - m(empty)) / (...)."""
    hooks = check_saes(model, saes)
    n_pos = 1 if aggregation == "sum" else task.tokens.shape[1]
    shapes = {h: (n_pos, saes[h].cfg.d_sae + 1) for h in hooks}
    m_full = float(task.metric(spliced_output(model, task.tokens, {})).mean())

    def keep_first(n: int) -> dict[str, Tensor]:
        keep = {h: torch.zeros(shapes[h], dtype=torch.bool, device=task.tokens.device) for h in hooks}
        for hook, p, i in ranking[:n]:
            keep[hook][p, i] = True
        return keep

    def run(keeps: list[dict[str, Tensor]]) -> list[float]:
        return ablated_metrics(model, saes, task, keeps=keeps, chunk=chunk).mean(1).tolist()

    kept = [keep_first(n) for n in sizes]
    m_empty, *m_circuit = run([keep_first(0)] + kept)
    m_without = run([{h: ~k[h] for h in hooks} for k in kept])
    scale = check_scale(m_full, m_empty)
    return Faithfulness(
        n=list(sizes),
        faithfulness=[(m - m_empty) / scale for m in m_circuit],
        completeness=[(m - m_empty) / scale for m in m_without],
        metric_full=m_full,
        metric_empty=m_empty,
    )
