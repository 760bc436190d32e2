"""Figure builders shared by the app and the notebooks: plotly figures as plain dicts.

A plain dict (not a `plotly.graph_objects.Figure`) skips plotly's validation, which costs more than building the
figure; `dcc.Graph(figure=...)` takes it as it is, and a notebook shows it with `go.Figure(figure)`.

- `histogram_figure`: a latent's activation histogram (the feature page);
- `graph_figure`, `curve_figure`: a sparse feature circuit's graph and its faithfulness curve;
- `absorption_sweep_figure`: absorption against L0 or width over a run's SAEs;
- `eval_front_figure`: an eval's headline against L0 or width over a run's configs, with seed intervals and the
  Pareto front;
- `composition_figure`, `channel_figure`: composition scores between attention heads, and one channel's energy per
  pair of singular components;
- `dfa_figure`: one latent's direct feature attribution over destination and source positions.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import numpy as np

if TYPE_CHECKING:
    from saelab.absorption import AbsorptionResult
    from saelab.circuits import Circuit, Node
    from saelab.evals.intervals import ConfigGroup
    from saelab.heads import Attribution, Channel, CompositionScores, Mode

Figure = dict[str, Any]
HIGHLIGHT = "255, 140, 0"  # RGB of activation highlights (the app's token shading uses it too)
NEGATIVE = "37, 99, 235"  # RGB of negative values where the app shades signed ones (DFA's source tokens)
SPREAD = 0.38  # circuit nodes sharing a hook point and position are stacked within ± this of the hook's row
EDGE_WIDTHS = (1.0, 2.5, 4.5)  # circuit edges are drawn in three widths by |weight|


def histogram_figure(counts: np.ndarray, edges: np.ndarray) -> Figure:
    """The activation histogram (`counts` per bin, `edges` one longer) as a bar chart."""
    centres = ((edges[:-1] + edges[1:]) / 2).tolist()
    return {
        "data": [
            {
                "type": "bar",
                "x": centres,
                "y": counts.tolist(),
                "width": float(np.diff(edges).mean()) if len(edges) > 1 else 1,
                "marker": {"color": f"rgb({HIGHLIGHT})"},
                "hovertemplate": "act %{x:.3g}: %{y} tokens<extra></extra>",
            }
        ],
        "layout": {
            "height": 220,
            "margin": {"l": 48, "r": 8, "t": 8, "b": 36},
            "bargap": 0.05,
            "xaxis": {"title": {"text": "activation (nonzero)"}},
            "yaxis": {"title": {"text": "tokens"}},
            "template": "plotly_white",
        },
    }


def decoder_norms_figure(sources: list[str], norms: np.ndarray) -> Figure:
    """A crosscoder latent's decoder norm in each of its `sources` (`norms [S]`, normalised units; they sum to 1) as a
    bar chart."""
    return {
        "data": [
            {
                "type": "bar",
                "x": list(sources),
                "y": norms.tolist(),
                "marker": {"color": f"rgb({HIGHLIGHT})"},
                "hovertemplate": "%{x}: %{y:.3f}<extra></extra>",
            }
        ],
        "layout": {
            "height": 220,
            "margin": {"l": 48, "r": 8, "t": 8, "b": 60},
            "yaxis": {"title": {"text": "decoder norm"}, "range": [0, 1]},
            "template": "plotly_white",
        },
    }


# ------------------------------------------------------------------------------------------------ circuits
class CircuitFigure(NamedTuple):
    """A circuit's graph as `graph_figure` draws it."""

    figure: Figure
    """The plotly figure (a plain dict)."""
    nodes: int
    """How many nodes it shows."""
    edges: int
    """How many edges it shows."""


def _coordinates(circuit: Circuit, nodes: list[Node]) -> dict[str, tuple[float, float]]:
    """(x, y) of the nodes shown: x the position (or the rank in the hook point when aggregated), y the hook
    point's row, the nodes of one cell stacked strongest first."""
    row = {h: i for i, h in enumerate(circuit.hooks)}
    cells: dict[tuple[str, Any], list[Node]] = {}
    for n in nodes:
        cells.setdefault((n.hook, n.position), []).append(n)
    coords = {}
    for (hook, position), cell in cells.items():
        for i, n in enumerate(cell):
            if position is None:
                coords[n.key] = (float(i), float(row[hook]))
            else:
                offset = 0.0 if len(cell) == 1 else SPREAD * (1 - 2 * i / (len(cell) - 1))
                coords[n.key] = (float(position), row[hook] + offset)
    return coords


def _edge_traces(circuit: Circuit, coords: dict[str, tuple[float, float]], edge_min: float) -> tuple[list, int]:
    """Line traces of the edges between shown nodes with |weight| >= `edge_min`, by sign and width; their count."""
    edges = [e for e in circuit.edges if abs(e.weight) >= edge_min and e.src in coords and e.dst in coords]
    top_edge = max((abs(e.weight) for e in edges), default=1.0) or 1.0
    data = []
    for sign, colour in ((1, "rgba(5, 113, 176, 0.45)"), (-1, "rgba(202, 0, 32, 0.45)")):  # as the nodes' colour scale
        for b, width in enumerate(EDGE_WIDTHS):
            x: list[float | None] = []
            y: list[float | None] = []
            for e in edges:
                if (e.weight > 0) == (sign > 0) and min(int(3 * abs(e.weight) / top_edge), 2) == b:
                    (x0, y0), (x1, y1) = coords[e.src], coords[e.dst]
                    x += [x0, x1, None]
                    y += [y0, y1, None]
            if x:
                data.append(
                    {
                        "type": "scatter",
                        "mode": "lines",
                        "x": x,
                        "y": y,
                        "hoverinfo": "skip",
                        "showlegend": False,
                        "line": {"color": colour, "width": width},
                    }
                )
    return data, len(edges)


def _node_traces(circuit: Circuit, nodes: list[Node], coords: dict[str, tuple[float, float]]) -> list:
    """Marker traces of the nodes shown: latents (circles, with the colour bar) and error nodes (diamonds)."""
    top_node = max((abs(n.effect) for n in circuit.nodes), default=1.0) or 1.0
    bound = max((abs(n.effect) for n in nodes), default=1.0)
    data = []
    for error in (False, True):
        group = [n for n in nodes if (n.latent == "err") == error]
        if not group:
            continue
        data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": "error nodes" if error else "latents",
                "x": [coords[n.key][0] for n in group],
                "y": [coords[n.key][1] for n in group],
                "customdata": [[n.hook, n.latent] for n in group],
                "text": [
                    f"{n.key}<br>effect {n.effect:+.3g}" + ("" if error else "<br>click: feature page") for n in group
                ],
                "hovertemplate": "%{text}<extra></extra>",
                "marker": {
                    "size": [8 + 26 * math.sqrt(abs(n.effect) / top_node) for n in group],
                    "color": [n.effect for n in group],
                    "colorscale": "RdBu",
                    "reversescale": True,
                    "cmin": -bound,
                    "cmax": bound,
                    "symbol": "diamond" if error else "circle",
                    "line": {"width": 1, "color": "#444"},
                    "showscale": not error,
                    "colorbar": {"title": {"text": "effect"}, "thickness": 12},
                },
            }
        )
    return data


def graph_figure(circuit: Circuit, node_min: float, edge_min: float) -> CircuitFigure:
    """The circuit's nodes with |effect| >= `node_min` and the edges between them with |weight| >= `edge_min`,
    on a hook point x position grid; with how many nodes and edges it shows."""
    nodes = [n for n in circuit.nodes if abs(n.effect) >= node_min]
    coords = _coordinates(circuit, nodes)
    edges, n_edges = _edge_traces(circuit, coords, edge_min)
    aggregated = any(n.position is None for n in circuit.nodes)
    positions = sorted({n.position for n in circuit.nodes if n.position is not None})
    xaxis: dict[str, Any] = {
        "title": {
            "text": "latents (summed over positions)" if aggregated else "position (tokens of the first example)"
        },
        "zeroline": False,
    }
    if not aggregated:
        xaxis |= {"tickvals": positions, "ticktext": [_position_label(circuit, p) for p in positions]}
    figure = {
        "data": edges + _node_traces(circuit, nodes, coords),
        "layout": {
            "height": 140 + 150 * len(circuit.hooks),
            "margin": {"l": 170, "r": 10, "t": 10, "b": 50},
            "template": "plotly_white",
            "hovermode": "closest",
            "legend": {"orientation": "h", "y": -0.15},
            "xaxis": xaxis,
            "yaxis": {
                "tickvals": list(range(len(circuit.hooks))),
                "ticktext": circuit.hooks,
                "zeroline": False,
                "range": [-0.6, len(circuit.hooks) - 0.4],
            },
        },
    }
    return CircuitFigure(figure, len(nodes), n_edges)


def _position_label(circuit: Circuit, position: int) -> str:
    label = circuit.labels[position] if position < len(circuit.labels) else ""
    return f"{position} {label!r}" if label else str(position)


def curve_figure(circuit: Circuit) -> Figure:
    """Faithfulness and completeness against the number of nodes kept (log scale; n = 0 left out)."""
    n = circuit.curves["n"]
    data = [
        {
            "type": "scatter",
            "mode": "lines+markers",
            "name": name,
            "x": [k for k in n if k > 0],
            "y": [v for k, v in zip(n, circuit.curves[name]) if k > 0],
        }
        for name in ("faithfulness", "completeness")
    ]
    return _chart(
        data,
        height=320,
        xaxis={"type": "log", "title": {"text": "nodes kept (top by |effect|)"}},
        yaxis={"title": {"text": "metric recovered"}},
    )


def _chart(data: list[dict[str, Any]], *, height: int, xaxis: dict[str, Any], yaxis: dict[str, Any]) -> Figure:
    """A chart of series against one axis with the legend below it (the faithfulness curve, the sweeps)."""
    return {
        "data": data,
        "layout": {
            "height": height,
            "margin": {"l": 48, "r": 8, "t": 8, "b": 44},
            "template": "plotly_white",
            "xaxis": xaxis,
            "yaxis": yaxis,
            "legend": {"orientation": "h", "y": -0.3},
        },
    }


# ---------------------------------------------------------------------------------------------- absorption
def absorption_sweep_figure(results: list[AbsorptionResult], x: Literal["l0", "width"]) -> Figure:
    """Mean absorption fraction and full-absorption rate of each SAE against its L0 (`x="l0"`) or width."""
    scored = [r for r in results if r.mean_absorption_fraction is not None]
    data = [
        {
            "type": "scatter",
            "mode": "markers",
            "name": name,
            "x": [r.l0 if x == "l0" else r.d_sae for r in scored],
            "y": [getattr(r, key) for r in scored],
            "text": [f"{r.hook}/{r.variant}" for r in scored],
            "hovertemplate": "%{text}<br>%{x}: %{y:.3f}<extra></extra>",
            "marker": {"size": 10},
        }
        for name, key in (
            ("absorption fraction", "mean_absorption_fraction"),
            ("full-absorption rate", "mean_full_absorption_rate"),
        )
    ]
    return _chart(
        data,
        height=300,
        xaxis={
            "title": {"text": "L0 (active latents at the word tokens)" if x == "l0" else "width (latents)"},
            "type": "linear" if x == "l0" else "log",
        },
        yaxis={"title": {"text": "mean over scored labels"}, "rangemode": "tozero"},
    )


# --------------------------------------------------------------------------------------------------- evals
def eval_front_figure(groups: list[ConfigGroup], metric: str, x: Literal["l0", "width"]) -> Figure:
    """`metric`'s mean over seeds of each config (`saelab.evals.table.by_config`) against its mean `x`: configs of
    several seeds with their t-interval as error bars, those of one seed without (a trace of their own, named so),
    and the Pareto front through the means (`saelab.evals.table.pareto_front`)."""
    from saelab.evals.intervals import ONE_SEED
    from saelab.evals.table import LOWER_IS_BETTER, pareto_front

    points = [g for g in groups if metric in g.intervals and x in g.intervals]
    data: list[dict[str, Any]] = []
    for name, members in (
        ("across seeds (95% t-interval)", [g for g in points if g.intervals[metric].n > 1]),
        (ONE_SEED, [g for g in points if g.intervals[metric].n == 1]),
    ):
        if not members:
            continue
        ivs = [g.intervals[metric] for g in members]
        trace: dict[str, Any] = {
            "type": "scatter",
            "mode": "markers",
            "name": name,
            "x": [g.intervals[x].mean for g in members],
            "y": [iv.mean for iv in ivs],
            "text": [f"{g.config['hook']} {g.config['arch']} k={g.config['k']} w={g.config['width']}" for g in members],
            "hovertemplate": "%{text}<br>%{x:.4g}: %{y:.4g}<extra>" + name + "</extra>",
            "marker": {"size": 10},
        }
        if name != ONE_SEED:
            trace["error_y"] = {
                "type": "data",
                "symmetric": False,
                "array": [iv.high - iv.mean for iv in ivs if iv.high is not None],
                "arrayminus": [iv.mean - iv.low for iv in ivs if iv.low is not None],
            }
        data.append(trace)
    xs, ys = [g.intervals[x].mean for g in points], [g.intervals[metric].mean for g in points]
    front = pareto_front(xs, ys, lower_is_better=metric in LOWER_IS_BETTER)
    if len(front) > 1:
        data.append(
            {
                "type": "scatter",
                "mode": "lines",
                "name": "Pareto front",
                "x": [xs[i] for i in front],
                "y": [ys[i] for i in front],
                "line": {"dash": "dot", "color": "#888"},
                "hoverinfo": "skip",
            }
        )
    return _chart(
        data,
        height=300,
        xaxis={"title": {"text": "L0" if x == "l0" else "width (latents)"}, "type": "linear" if x == "l0" else "log"},
        yaxis={"title": {"text": metric}},
    )


# --------------------------------------------------------------------------------------------------- heads
def _heatmap(
    z: list[list[float]],
    x: list[str],
    y: list[str],
    *,
    title: str,
    colorbar: str,
    axes: tuple[str, str] = ("reader", "writer"),
) -> Figure:
    """A heatmap of `z` (rows `y`, columns `x`, the axes titled `axes`: x, then y), the first row at the top."""
    return {
        "data": [{"type": "heatmap", "z": z, "x": x, "y": y, "colorscale": "Viridis", "colorbar": {"title": colorbar}}],
        "layout": {
            "height": 140 + 18 * len(y),
            "margin": {"l": 64, "r": 8, "t": 36, "b": 56},
            "template": "plotly_white",
            "title": {"text": title},
            "xaxis": {"title": {"text": axes[0]}, "type": "category"},
            "yaxis": {"title": {"text": axes[1]}, "type": "category", "autorange": "reversed"},
        },
    }


def composition_figure(scores: CompositionScores, mode: Mode) -> Figure:
    """The `mode` composition score of every writer head (rows) into every reader head (columns)."""
    labels = scores.labels
    return _heatmap(
        scores.matrix(mode).tolist(), labels, labels, title=f"{mode}-composition ({scores.model})", colorbar="score"
    )


def channel_figure(channel: Channel, rank: int = 8) -> Figure:
    """A channel's share of the composition carried by each pair of the top `rank` writer (rows) and reader (columns)
    singular components."""
    energy = channel.energy[:rank, :rank].tolist()
    return _heatmap(
        energy,
        [f"{channel.reader.label}.{j}" for j in range(len(energy[0]))],
        [f"{channel.writer.label}.{i}" for i in range(len(energy))],
        title=f"{channel.mode}-composition {channel.writer.label} -> {channel.reader.label}: share per component pair",
        colorbar="share",
    )


def dfa_figure(attribution: Attribution, latent: int, example: int = 0, tokens: list[str] | None = None) -> Figure:
    """Latent `latent`'s (an index into `attribution.latents`) direct feature attribution on input row `example`: the
    term of each source position (columns) in its pre-activation at each destination position (rows), summed over
    the heads; `tokens` label the positions (their indices when `None`)."""
    terms = attribution.by_source()[example, :, :, latent]
    labels = tokens or [str(p) for p in range(terms.shape[0])]
    name = int(attribution.latents[latent])
    return _heatmap(
        terms.tolist(),
        labels,
        labels,
        title=f"latent {name} of {attribution.hook}: attribution by source position",
        colorbar="term",
        axes=("source position", "destination position"),
    )


def dfa_heads_figure(heads: list[str], top: np.ndarray, mean: np.ndarray) -> Figure:
    """A latent's direct feature attribution to each of `heads` (labels) as a bar chart: its top example's term of
    each head (`top [n_heads]`) next to the mean over its top examples (`mean [n_heads]`)."""
    bars = [("top example", top, f"rgb({HIGHLIGHT})"), ("mean over top examples", mean, "rgb(160, 160, 160)")]
    return {
        "data": [
            {
                "type": "bar",
                "name": name,
                "x": list(heads),
                "y": values.tolist(),
                "marker": {"color": colour},
                "hovertemplate": "%{x}: %{y:.3f}<extra>" + name + "</extra>",
            }
            for name, values, colour in bars
        ],
        "layout": {
            "height": 240,
            "margin": {"l": 48, "r": 8, "t": 8, "b": 44},
            "barmode": "group",
            "xaxis": {"title": {"text": "head"}, "type": "category"},
            "yaxis": {"title": {"text": "term in the pre-activation"}},
            "legend": {"orientation": "h", "y": -0.35},
            "template": "plotly_white",
        },
    }
