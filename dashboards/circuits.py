"""The circuits page (`/circuits?name=NAME`): a circuit that `saelab circuit` wrote to RUN/circuits/NAME.json,
drawn as a hook point x position graph with threshold sliders, beside its faithfulness curve. Clicking a
latent opens its feature page."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import dash
from dash import Dash, Input, Output, State, dcc, html
from dash.exceptions import PreventUpdate

from saelab.circuits import CIRCUITS_DIR, Circuit, Node
from saelab.dashboards import components as c
from saelab.dashboards.data import RunError, cached_result, sae_info
from saelab.dashboards.pages import Params, guarded

SPREAD = 0.38  # nodes sharing a hook point and position are stacked within ± this of the hook's row
EDGE_WIDTHS = (1.0, 2.5, 4.5)  # edges drawn in three widths by |weight|


def circuit_names(run_dir: str) -> list[str]:
    """The circuits of the run, by name."""
    return sorted(p.stem for p in (Path(run_dir) / CIRCUITS_DIR).glob("*.json"))


def load_circuit(run_dir: str, name: str | None) -> Circuit:
    """The circuit `name` (default: the first); `RunError` naming the command or the circuits there are."""
    names = circuit_names(run_dir)
    if not names:
        raise RunError(
            f"No circuits in {Path(run_dir) / CIRCUITS_DIR}. Compute one with `saelab circuit CONFIG.yaml` "
            f"(set `out: {run_dir}`; see configs/circuit_induction.yaml)."
        )
    name = name or names[0]
    if name not in names:
        raise RunError(f"The run has no circuit {name!r}. It has: {', '.join(names)}.")
    path = Path(run_dir) / CIRCUITS_DIR / f"{name}.json"
    return cached_result(Circuit.load, path)


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


def graph_figure(circuit: Circuit, node_min: float, edge_min: float) -> tuple[dict[str, Any], int, int]:
    """The circuit's nodes with |effect| >= node_min and the edges between them with |weight| >= edge_min, as a
    plotly figure (a plain dict); also how many nodes and edges it shows."""
    nodes = [n for n in circuit.nodes if abs(n.effect) >= node_min]
    coords = _coordinates(circuit, nodes)
    shown = {n.key for n in nodes}
    edges = [e for e in circuit.edges if abs(e.weight) >= edge_min and e.src in shown and e.dst in shown]
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
    top_node = max((abs(n.effect) for n in circuit.nodes), default=1.0) or 1.0
    bound = max((abs(n.effect) for n in nodes), default=1.0)
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
        "data": data,
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
    return figure, len(nodes), len(edges)


def _position_label(circuit: Circuit, position: int) -> str:
    label = circuit.labels[position] if position < len(circuit.labels) else ""
    return f"{position} {label!r}" if label else str(position)


def curve_figure(circuit: Circuit) -> dict[str, Any]:
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
    return {
        "data": data,
        "layout": {
            "height": 320,
            "margin": {"l": 48, "r": 8, "t": 8, "b": 44},
            "template": "plotly_white",
            "xaxis": {"type": "log", "title": {"text": "nodes kept (top by |effect|)"}},
            "yaxis": {"title": {"text": "metric recovered"}},
            "legend": {"orientation": "h", "y": -0.3},
        },
    }


def node_link(run_dir: str, circuit: Circuit, hook: str, latent: int | str) -> str:
    """The feature page of a circuit's latent; `RunError` for error nodes and SAEs outside the run."""
    if latent == "err":
        raise RunError(
            f"That is the error node of {hook}: what its SAE does not reconstruct, so it has no feature page."
        )
    variant = Path(circuit.saes.get(hook, "")).name
    try:
        info = sae_info(run_dir, hook, variant)
    except RunError:
        raise RunError(
            f"The SAE of {hook} ({circuit.saes.get(hook) or 'not recorded'}) is not in this run's saes/ "
            "folder, so its latents have no feature page here."
        ) from None
    return c.feature_url(info, int(latent))


def _slider(component_id: str, top: float) -> dcc.Slider:
    top = top if top > 0 else 1.0
    return dcc.Slider(0, top, top / 100, value=0, id=component_id, marks={0: "0", top: f"{top:.3g}"}, updatemode="drag")


def _count(nodes: int, edges: int, circuit: Circuit) -> str:
    return f"showing {nodes} of {len(circuit.nodes)} nodes and {edges} of {len(circuit.edges)} edges"


@guarded
def circuits_page(run_dir: str, params: Params) -> Any:
    """A circuit of the run: picker, numbers, the graph with threshold sliders, the faithfulness curve."""
    circuit = load_circuit(run_dir, params.get("name"))
    figure, n_nodes, n_edges = graph_figure(circuit, 0.0, 0.0)
    picker = html.Div(
        [
            "Circuits: ",
            *[
                html.Span(dcc.Link(n, href=c.page_url("circuits", name=n)), className="chip")
                for n in circuit_names(run_dir)
            ],
        ],
        className="chips",
    )
    cfg = circuit.config
    stats = html.Div(
        [c.stat(f"metric ({k})", c.fmt(v)) for k, v in circuit.metric.items()]
        + [c.stat("nodes", str(len(circuit.nodes))), c.stat("edges", str(len(circuit.edges)))]
        + [c.stat(k, str(cfg[k])) for k in ("metric", "method", "baseline", "aggregation") if k in cfg],
        className="stats",
        style={"marginTop": "10px"},
    )
    sliders = html.Div(
        [
            html.Div(
                [
                    "|effect| of nodes at least",
                    _slider("circuit-node-threshold", max((abs(n.effect) for n in circuit.nodes), default=1.0)),
                ]
            ),
            html.Div(
                [
                    "|weight| of edges at least",
                    _slider("circuit-edge-threshold", max((abs(e.weight) for e in circuit.edges), default=1.0)),
                ]
            ),
        ],
        style={"display": "grid", "gridTemplateColumns": "1fr 1fr", "gap": "16px"},
    )
    graph = c.card(
        "Nodes and edges",
        sliders,
        html.Div(_count(n_nodes, n_edges, circuit), id="circuit-count", className="muted"),
        dcc.Graph(figure=figure, id="circuit-graph", config={"displayModeBar": False}),
        html.Div(id="circuit-click", className="muted"),
        html.Div(
            "Node size and colour: the effect on the metric of moving the node from its clean value to "
            "the baseline (mean over examples); diamonds are error nodes. An edge's weight is the part of "
            "the downstream node's effect that flows from the upstream node, coloured the same way.",
            className="muted",
        ),
    )
    curve = c.card(
        "Faithfulness",
        dcc.Graph(figure=curve_figure(circuit), id="circuit-curve", config={"displayModeBar": False}),
        html.Div(
            "Faithfulness: the metric with every node outside the top n mean-ablated, as a fraction of "
            "the way from all nodes ablated to the full model. Completeness: the same with the top n "
            "themselves ablated.",
            className="muted",
        ),
    )
    return html.Div(
        [
            html.H2(f"Circuit: {circuit.name}"),
            c.card(None, picker, stats),
            dcc.Store(id="circuit-name", data=circuit.name),
            html.Div([html.Div(graph), html.Div(curve)], className="grid"),
        ],
        id="circuits-page",
    )


def register(app: Dash, run_dir: str) -> None:
    """The page's callbacks: sliders filter the graph; a click on a latent opens its feature page."""

    @app.callback(
        Output("circuit-graph", "figure"),
        Output("circuit-count", "children"),
        Input("circuit-node-threshold", "value"),
        Input("circuit-edge-threshold", "value"),
        State("circuit-name", "data"),
        prevent_initial_call=True,
    )
    def filter_graph(node_min: float | None, edge_min: float | None, name: str | None) -> tuple[Any, str]:
        try:
            circuit = load_circuit(run_dir, name)
        except RunError as err:
            return dash.no_update, str(err)
        figure, n_nodes, n_edges = graph_figure(circuit, node_min or 0.0, edge_min or 0.0)
        return figure, _count(n_nodes, n_edges, circuit)

    @app.callback(
        Output("url", "href", allow_duplicate=True),
        Output("circuit-click", "children"),
        Input("circuit-graph", "clickData"),
        State("circuit-name", "data"),
        prevent_initial_call=True,
    )
    def open_node(click: dict[str, Any] | None, name: str | None) -> tuple[Any, str]:
        points = (click or {}).get("points") or []
        if not points or "customdata" not in points[0]:
            raise PreventUpdate
        hook, latent = points[0]["customdata"]
        try:
            return node_link(run_dir, load_circuit(run_dir, name), hook, latent), ""
        except RunError as err:
            return dash.no_update, str(err)
