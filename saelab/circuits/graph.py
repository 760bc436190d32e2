"""A sparse feature circuit: its nodes (`Node`) and edges (`Edge`) as a `Circuit` that saves to JSON, and
`find_circuit`, which computes node effects, keeps the strong nodes, joins them by their edges and measures
faithfulness."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.circuits.agreement import Agreement, estimate_agreement
from saelab.circuits.edges import edge_effects
from saelab.circuits.faithfulness import Curves
from saelab.circuits.groups import GroupedCircuit, Grouping, fires, grouped_circuit
from saelab.circuits.nodes import Aggregation, Method, NodeKey, aggregate, node_effects
from saelab.circuits.splice import Baseline, check_saes, spliced_output
from saelab.circuits.spread import Spread, check_held_out, default_sizes, spread_curve
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
    found_on: Spread | None = None
    """`curves` with their spread over the examples it was found on (bootstrap intervals, per-example ranges)."""
    held_out: Spread | None = None
    """The same nodes' faithfulness and completeness on held-out examples (None when none were given)."""
    silent: int = 0
    """Nodes with a nonzero effect that never fire on the clean examples, not counted as circuit nodes."""
    grouped: GroupedCircuit | None = None
    """The circuit of group nodes (by head, position role or feature family), when a grouping was given."""
    agreement: dict[str, Agreement] = field(default_factory=dict)
    """Each effect estimate's (`atp`, `ig`) agreement with exact patching, when checked."""

    def summary(self) -> str:
        """A few lines for the terminal: size, metric values, the faithfulness curve."""
        metric = ", ".join(f"{k} {v:.4g}" for k, v in self.metric.items())
        curve = ", ".join(f"{n}: {f:.2f}" for n, f in zip(self.curves["n"], self.curves["faithfulness"]))
        lines = [
            f"circuit {self.name}: {len(self.nodes)} nodes, {len(self.edges)} edges over {', '.join(self.hooks)}",
            f"metric: {metric}",
            f"faithfulness by node count: {curve}",
        ]
        if self.held_out is not None:
            held = ", ".join(f"{n}: {f:.2f}" for n, f in zip(self.held_out["n"], self.held_out["faithfulness"]))
            lines.append(f"held out ({self.held_out['examples']} examples): {held}")
        if self.grouped is not None:
            g = self.grouped
            found = g.found_on["faithfulness"][g.found_on["n"].index(len(g.nodes))]
            where = f"faithfulness {found:.2f} found on"
            if g.held_out is not None:
                where += f", {g.held_out['faithfulness'][g.held_out['n'].index(len(g.nodes))]:.2f} held out"
            lines.append(f"grouped ({g.grouping}): {len(g.nodes)} group nodes, {where}")
        if self.silent:
            lines.append(f"{self.silent} nodes with an effect never fire on the clean examples (not counted)")
        return "\n".join(lines)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Circuit:
        """The result from its parsed JSON."""
        grouped = data.get("grouped")
        return Circuit(
            **(
                data
                | {
                    "nodes": [Node(**n) for n in data["nodes"]],
                    "edges": [Edge(**e) for e in data["edges"]],
                    "grouped": None if grouped is None else GroupedCircuit.from_json(grouped),
                    "agreement": {k: Agreement(*v) for k, v in data.get("agreement", {}).items()},
                }
            )
        )


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
    held_out: Task | None = None,
    groups: Grouping | None = None,
    max_groups: int = 32,
    check_estimates: bool = False,
    progress: bool = True,
) -> Circuit:
    """Node effects, the nodes with |effect| >= `node_threshold` (at most `max_nodes`) that fire on the clean
    examples, the edges between them with |weight| >= `edge_threshold`, and faithfulness/completeness curves over
    nodes ranked by |effect|, with their spread (`Spread`) on `task` and on `held_out` examples.

    With `groups` (`saelab.circuits.groups.grouping`) it also finds the circuit of at most `max_groups` group nodes
    (`Circuit.grouped`), measured on both sets; with `check_estimates` it reports how well attribution patching and
    integrated gradients agree with exact patching (`Circuit.agreement`)."""
    order = check_saes(model, saes)
    if held_out is not None:
        check_held_out(task, held_out, per_position=aggregation == "none")
    effects = node_effects(model, saes, task, method=method, ig_steps=ig_steps, baseline=baseline, progress=progress)
    agg = {h: aggregate(effects.effects[h], aggregation) for h in order}
    live = {h: f.any(0, keepdim=True) if aggregation == "sum" else f for h, f in fires(effects.clean).items()}
    silent = sum(int(((agg[h] != 0) & ~live[h]).sum()) for h in order)
    agg = {h: torch.where(live[h], agg[h], 0.0) for h in order}
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
    sizes = curve_sizes if curve_sizes is not None else default_sizes(len(ranking))
    masks = _masks(ranking, sizes, {h: tuple(agg[h].shape) for h in order}, task.tokens.device)
    found = spread_curve(model, saes, task, keeps=masks, sizes=sizes)
    other = None if held_out is None else spread_curve(model, saes, held_out, keeps=masks, sizes=sizes)
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
        found_on=found,
        held_out=other,
        silent=silent,
        grouped=None
        if groups is None
        else grouped_circuit(
            model,
            saes,
            task,
            effects=effects,
            groups=groups,
            held_out=held_out,
            node_threshold=node_threshold,
            max_nodes=max_groups,
        ),
        agreement={}
        if not check_estimates
        else estimate_agreement(model, saes, task, baseline=baseline, ig_steps=ig_steps, aggregation=aggregation),
    )


def _masks(
    ranking: list[NodeKey], sizes: list[int], shapes: dict[str, tuple[int, ...]], device: torch.device
) -> list[dict[str, Tensor]]:
    """The node masks of the first n nodes of `ranking`, for each n in `sizes`."""
    masks = []
    for n in sizes:
        keep = {h: torch.zeros(s, dtype=torch.bool, device=device) for h, s in shapes.items()}
        for hook, p, i in ranking[:n]:
            keep[hook][p, i] = True
        masks.append(keep)
    return masks
