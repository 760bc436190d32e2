"""Attribution graphs in a run: `graph_run` loads the run's model and its transcoders (one per layer, read from
`saes/blocks.L.hook_mlp_in/<variant>/`), builds the graph of a prompt (`saelab.circuits.attribution_graph`) and
writes its pruned subgraph to `RUN/graphs/<name>.json` (`RunDir.graph`) with its faithfulness and completeness by
intervention, on its prompt and on held-out prompts (`saelab.circuits.graph_faithfulness`); `GraphFile` is what the
file holds and what the app's graph page reads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.circuits.attribution_graph import AttributionGraph, GraphConfig, attribute, graph_scores, node_influence
from saelab.circuits.graph_faithfulness import (
    Granularity,
    GraphCheckConfig,
    GraphFaithfulness,
    check_held_out_lengths,
    graph_faithfulness,
)
from saelab.errors import MissingError, RunError
from saelab.run import RunDir


@dataclass
class GraphNode:
    """One kept node."""

    node: int
    """Its index in the full graph."""
    kind: str
    """`latent`, `error`, `token` or `logit`."""
    label: str
    """`AttributionGraph.node_label`."""
    layer: int
    """Its layer (tokens -1, logits `n_layers`)."""
    pos: int
    """Its position."""
    influence: float
    """Its influence on the logits (a logit's: its probability)."""


@dataclass
class GraphEdge:
    """One kept edge, source to target."""

    source: int
    """The source node's index."""
    target: int
    """The target node's index."""
    weight: float
    """The direct effect."""
    heads: dict[str, float]
    """Its split over the heads its paths pass through lowest (`resid`: the rest), entries of at least 1% of
    `|weight|`."""


@dataclass
class GraphFile:
    """A pruned attribution graph as `saelab graph` writes it."""

    name: str
    """The graph's name in the run."""
    prompt: str
    """The prompt."""
    token_strs: list[str]
    """Its tokens as text."""
    n_layers: int
    """Layers of the model."""
    replacement: float
    """circuit-tracer's replacement score of the whole graph."""
    completeness: float
    """Its completeness score."""
    nodes: list[GraphNode]
    """The kept nodes."""
    edges: list[GraphEdge]
    """The kept edges."""
    config: dict[str, Any] = field(default_factory=dict)
    """The `GraphConfig`, model and transcoders that made it."""
    faithfulness: GraphFaithfulness | None = None
    """Its circuit's faithfulness and completeness by zero-ablation in the replacement model, on its prompt and on
    the held-out prompts (`None` in a file written before saelab measured it)."""
    held_out: list[str] = field(default_factory=list)
    """The held-out prompts it was measured on."""

    def save(self, path: str | Path) -> Path:
        """Write it as JSON at `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = asdict(self) | {"faithfulness": None if self.faithfulness is None else self.faithfulness._asdict()}
        path.write_text(json.dumps(data, indent=1))
        return path

    @staticmethod
    def load(path: str | Path) -> GraphFile:
        """Read one; `MissingError` naming the command that writes it, `RunError` for a file that is not one."""
        path = Path(path)
        if not path.is_file():
            raise MissingError(f"no attribution graph at {path}; compute one with `saelab graph RUN --prompt TEXT`")
        try:
            data = json.loads(path.read_text())
            data["nodes"] = [GraphNode(**n) for n in data["nodes"]]
            data["edges"] = [GraphEdge(**e) for e in data["edges"]]
            if data.get("faithfulness") is not None:
                data["faithfulness"] = GraphFaithfulness(**data["faithfulness"])
            return GraphFile(**data)
        except (ValueError, TypeError, KeyError) as err:
            raise RunError(f"{path} is not a saelab attribution graph ({err}); compute it again") from None


def graph_file(graph: AttributionGraph, *, name: str, prompt: str, token_strs: list[str]) -> GraphFile:
    """The kept subgraph of a pruned `graph`."""
    influence = node_influence(graph)
    logit0 = graph.n_nodes - len(graph.logit_tokens)
    influence[logit0:] = graph.logit_probs
    nodes = []
    for i in graph.node_mask.nonzero()[:, 0].tolist():
        layer, pos = graph.node_layer_pos(i)
        nodes.append(GraphNode(i, graph.node_kind(i), graph.node_label(i), layer, pos, float(influence[i])))
    edges = [GraphEdge(*edge) for edge in graph.kept_edges()]
    scores = graph_scores(graph)
    return GraphFile(name, prompt, token_strs, graph.n_layers, scores.replacement, scores.completeness, nodes, edges)


def run_transcoders(run: RunDir, n_layers: int, variant: str | None) -> dict[int, Path]:
    """The folder of each layer's transcoder in the run (`saes/blocks.L.hook_mlp_in/<variant>/`); with several
    variants for a layer, `variant` picks one. `MissingError` naming what the run has otherwise."""
    found: dict[int, Path] = {}
    for layer in range(n_layers):
        hook = f"blocks.{layer}.hook_mlp_in"
        entries = [s for s in run.saes() if s.hook == hook and (variant is None or s.variant == variant)]
        if len(entries) != 1:
            known = ", ".join(f"{s.hook}/{s.variant}" for s in run.saes()) or "none"
            why = "no transcoder" if not entries else f"{len(entries)} transcoders (give --variant)"
            raise MissingError(
                f"the run {run.root} has {why} for layer {layer} ({hook}{'/' + variant if variant else ''}); an "
                f"attribution graph needs one transcoder per MLP. It has: {known}"
            )
        found[layer] = entries[0].path
    return found


def held_out_tokens(lm: Any, prompts: Sequence[str], n_pos: int, *, granularity: Granularity) -> Tensor | None:
    """The held-out prompts as token ids `[n, pos]` (BOS prepended; `None` for none); `CircuitError` naming the
    lengths when they differ from one another, or, with nodes kept by position, from the graph's `n_pos`
    (`check_held_out_lengths`, naming the CLI's `--granularity feature`)."""
    if not prompts:
        return None
    rows = [lm.to_tokens(text)[0].cpu() for text in prompts]
    check_held_out_lengths(n_pos, [len(r) for r in rows], granularity, fix="--granularity feature")
    return torch.stack(rows)


def graph_run(
    run: str | Path,
    prompt: str,
    *,
    model: str | None = None,
    name: str = "graph",
    variant: str | None = None,
    cfg: GraphConfig | None = None,
    held_out: Sequence[str] = (),
    check: GraphCheckConfig | None = None,
) -> Path:
    """The attribution graph of `prompt` (BOS prepended) over the run's transcoders, with its faithfulness on the
    prompt and on the `held_out` prompts (measured as `check` says), written to `RUN/graphs/<name>.json`; `model`
    defaults to the run's `model/` folder. `CircuitError` before the graph is built for held-out prompts that
    tokenize to different lengths, or, with nodes kept by position, to another length than `prompt`."""
    from saelab.dictionaries import SAE
    from saelab.models import load_model

    run_dir = RunDir(run)
    path = run_dir.graph(name)  # checks the name before anything loads
    cfg = cfg or GraphConfig()
    model_path = model or str(run_dir.root / "model")
    if model is None and not Path(model_path).is_dir():
        raise MissingError(f"the run {run_dir.root} has no model/ folder; give the model with --model")
    lm: Any = load_model(model_path, device="cpu")
    folders = run_transcoders(run_dir, lm.cfg.n_layers, variant)
    tcs = {layer: SAE.load(f, device="cpu").eval() for layer, f in folders.items()}
    tokens = lm.to_tokens(prompt)[0].cpu()
    check = check or GraphCheckConfig()
    others = held_out_tokens(lm, held_out, len(tokens), granularity=check.granularity)
    graph = attribute(lm, tcs, tokens, cfg)
    out = graph_file(graph, name=name, prompt=prompt, token_strs=[str(t) for t in lm.to_str_tokens(tokens)])
    out.faithfulness = graph_faithfulness(lm, tcs, graph, others, cfg=check)
    out.held_out = list(held_out)
    out.config = asdict(cfg) | {
        "model": model_path,
        "transcoders": {k: run_dir.relative(v) for k, v in folders.items()},
    }
    run_dir.prepare()
    return out.save(path)
