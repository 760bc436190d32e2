"""A sparse feature circuit: its nodes (`Node`) and edges (`Edge`) as a `Circuit` that saves to JSON, and
`find_circuit`, which computes node effects, keeps the strong nodes, joins them by their edges and measures
faithfulness."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.circuits.edges import edge_effects
from saelab.circuits.faithfulness import Curves, faithfulness_curve
from saelab.circuits.nodes import Aggregation, Method, NodeKey, aggregate, node_effects
from saelab.circuits.splice import Baseline, check_saes, spliced_output
from saelab.circuits.tasks import Task
from saelab.dictionaries import SAE
from saelab.errors import CircuitError
from saelab.models import Model
from saelab.resultfile import JsonResult


@dataclass
class Node:
    """A latent or an error node of the SAE at one hook point, with its effect on the metric."""

    hook: str
    """The hook point."""
    latent: int | Literal["err"]
    """The latent's index, or "err" for the error node."""
    position: int | None
    """Its position; None when aggregated over positions."""
    effect: float
    """Its effect on the metric (mean over examples)."""

    @property
    def key(self) -> str:
        """`hook/latent@position` (without `@position` when aggregated), how edges name it."""
        where = "" if self.position is None else f"@{self.position}"
        return f"{self.hook}/{self.latent}{where}"


@dataclass
class Edge:
    """An edge between nodes of consecutive SAE hook points."""

    src: str
    """The upstream node's key."""
    dst: str
    """The downstream node's key."""
    weight: float
    """Its weight (mean over examples)."""


@dataclass
class Circuit(JsonResult):
    """A sparse feature circuit, as `find_circuit` finds it and `saelab circuit` writes it."""

    what: ClassVar[str] = "circuit"
    command: ClassVar[str] = "saelab circuit CONFIG.yaml"
    error: ClassVar[type[Exception]] = CircuitError

    name: str
    """Its name (the file name under the run's circuits)."""
    hooks: list[str]
    """The SAE hook points in model order."""
    saes: dict[str, str]
    """Each hook point's SAE folder ("" when not given)."""
    labels: list[str]
    """The first example's token at each position."""
    nodes: list[Node]
    """Its nodes, strongest first."""
    edges: list[Edge]
    """Its edges."""
    curves: Curves
    """Faithfulness and completeness by node count (see `faithfulness_curve`)."""
    metric: dict[str, float]
    """The metric's mean over the examples for the whole model (`clean`), everything mean-ablated (`empty`) and
    the patch input (`patch`)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The `CircuitConfig` it was made with (when made by `run_circuit`)."""

    def summary(self) -> str:
        """A few lines for the terminal: size, metric values, the faithfulness curve."""
        metric = ", ".join(f"{k} {v:.4g}" for k, v in self.metric.items())
        curve = ", ".join(f"{n}: {f:.2f}" for n, f in zip(self.curves["n"], self.curves["faithfulness"]))
        return (
            f"circuit {self.name}: {len(self.nodes)} nodes, {len(self.edges)} edges over {', '.join(self.hooks)}\n"
            f"metric: {metric}\nfaithfulness by node count: {curve}"
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Circuit:
        """The result from its parsed JSON."""
        return Circuit(
            **(data | {"nodes": [Node(**n) for n in data["nodes"]], "edges": [Edge(**e) for e in data["edges"]]})
        )


def _default_sizes(n_nodes: int) -> list[int]:
    sizes = [2**i for i in range(int(math.log2(max(n_nodes, 1))) + 1)]
    return sorted({0, *sizes, n_nodes})


def _ranking(agg: dict[str, Tensor], order: list[str]) -> tuple[list[NodeKey], Tensor]:
    """The nodes with a nonzero effect by |effect| descending, and their |effect|s."""
    values = torch.cat([agg[h].abs().flatten() for h in order])
    ranked = values.argsort(descending=True, stable=True)
    ranked = ranked[values[ranked] > 0]
    ends = torch.tensor([agg[h].numel() for h in order], device=values.device).cumsum(0)
    hooks = torch.bucketize(ranked, ends, right=True)
    local = ranked - torch.cat([ends.new_zeros(1), ends])[hooks]
    widths = torch.tensor([agg[h].shape[1] for h in order], device=values.device)[hooks]
    positions, indices = (local // widths).tolist(), (local % widths).tolist()
    keys = [NodeKey(order[h], p, i) for h, p, i in zip(hooks.tolist(), positions, indices)]
    return keys, values[ranked]


def find_circuit(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    *,
    name: str = "circuit",
    method: Method = "ig",
    baseline: Baseline = "patch",
    ig_steps: int = 10,
    aggregation: Aggregation = "none",
    node_threshold: float = 0.05,
    edge_threshold: float = 0.02,
    max_nodes: int = 100,
    curve_sizes: list[int] | None = None,
    sae_paths: dict[str, str] | None = None,
    progress: bool = True,
) -> Circuit:
    """Node effects, the nodes with |effect| >= `node_threshold` (at most `max_nodes`), the edges between them
    with |weight| >= `edge_threshold`, and faithfulness/completeness curves over nodes ranked by |effect|."""
    order = check_saes(model, saes)
    effects = node_effects(model, saes, task, method=method, ig_steps=ig_steps, baseline=baseline, progress=progress)
    agg = {h: aggregate(effects.effects[h], aggregation) for h in order}
    ranking, strength = _ranking(agg, order)
    circuit = ranking[: min(max_nodes, int((strength >= node_threshold).sum()))]

    def node(key: NodeKey) -> Node:
        hook, p, i = key
        latent = "err" if i == saes[hook].cfg.d_sae else i
        return Node(hook, latent, None if aggregation == "sum" else p, float(agg[hook][p, i]))

    edges = []
    for up, down in tqdm(list(zip(order, order[1:])), desc="edges", disable=not progress):
        ups = [(p, i) for h, p, i in circuit if h == up]
        downs = [(p, i) for h, p, i in circuit if h == down]
        if not ups or not downs:
            continue
        weights = edge_effects(
            model,
            saes,
            task,
            effects=effects,
            up=up,
            down=down,
            up_nodes=ups,
            down_nodes=downs,
            aggregation=aggregation,
            steps=ig_steps if method == "ig" else 1,
        )
        for d, u in (weights.abs() >= edge_threshold).nonzero().tolist():
            src, dst = node(NodeKey(up, *ups[u])), node(NodeKey(down, *downs[d]))
            edges.append(Edge(src.key, dst.key, float(weights[d, u])))
    sizes = curve_sizes if curve_sizes is not None else _default_sizes(len(ranking))
    found = faithfulness_curve(model, saes, task, ranking=ranking, sizes=sizes, aggregation=aggregation)
    metric = {"clean": found["metric_full"], "empty": found["metric_empty"]}
    if task.patch is not None:
        with torch.no_grad():
            metric["patch"] = float(task.metric(spliced_output(model, task.patch, {})).mean())
    paths = sae_paths or {}
    return Circuit(
        name=name,
        hooks=order,
        saes={h: paths.get(h, "") for h in order},
        labels=task.labels,
        nodes=[node(k) for k in circuit],
        edges=edges,
        curves=Curves(n=found["n"], faithfulness=found["faithfulness"], completeness=found["completeness"]),
        metric=metric,
    )
