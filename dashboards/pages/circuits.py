"""The circuits page (`/circuits?name=NAME`): a circuit that `saelab circuit` wrote into the run, drawn as a hook
point x position graph with threshold sliders (`saelab.plots.graph_figure`), beside its faithfulness curve.
Clicking a latent opens its feature page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dash import Dash, Input, Output, State, dcc, html
from dash.exceptions import PreventUpdate

from saelab.circuits import Circuit
from saelab.dashboards import components as c
from saelab.dashboards import params as p
from saelab.dashboards.data import circuit_names, load_circuit, sae_info
from saelab.errors import RequestError, RunError
from saelab.plots import curve_figure, graph_figure
from saelab.run import RunDir

TITLE = "Circuits"
NAV = True


def node_link(run: str, circuit: Circuit, hook: str, latent: int | str) -> str:
    """The feature page of a circuit's latent; `RunError` for error nodes and SAEs outside the run, and the SAE's
    own error (`sae_info`: what is wrong with it, the fix) for a broken one that is in the run."""
    if latent == "err":
        raise RunError(
            f"That is the error node of {hook}: what its SAE does not reconstruct, so it has no feature page."
        )
    run_dir = RunDir(run)
    variant = Path(circuit.saes.get(hook, "")).name
    if not variant or not run_dir.sae(hook, variant).is_dir():
        raise RunError(
            f"The SAE of {hook} ({circuit.saes.get(hook) or 'not recorded'}) is not in this run's "
            f"{run_dir.saes_dir.name}/ folder, so its latents have no feature page here."
        )
    return c.feature_url(sae_info(run, hook, variant), int(latent))


def _slider(component_id: str, top: float) -> dcc.Slider:
    top = top if top > 0 else 1.0
    return dcc.Slider(0, top, top / 100, value=0, id=component_id, marks={0: "0", top: f"{top:.3g}"}, updatemode="drag")


def _count(nodes: int, edges: int, circuit: Circuit) -> str:
    return f"showing {nodes} of {len(circuit.nodes)} nodes and {edges} of {len(circuit.edges)} edges"


def transfer_table(circuit: Circuit) -> html.Div:
    """Faithfulness where the circuit was found and on held-out examples, for its latents and for its grouped
    circuit, with 95% bootstrap intervals and per-example ranges."""
    rows = []
    if circuit.found_on is not None:
        rows.append(c.spread_row("latents, found on", circuit.found_on, len(circuit.nodes)))
    if circuit.held_out is not None:
        rows.append(c.spread_row("latents, held out", circuit.held_out, len(circuit.nodes)))
    grouped = circuit.grouped
    if grouped is not None:
        rows.append(c.spread_row(f"grouped ({grouped.grouping}), found on", grouped.found_on, len(grouped.nodes)))
        if grouped.held_out is not None:
            rows.append(c.spread_row(f"grouped ({grouped.grouping}), held out", grouped.held_out, len(grouped.nodes)))
    if not rows:
        return html.Div(
            "This circuit was saved without per-example spread; compute it again with `saelab circuit` to see it.",
            className="muted",
            id="circuit-transfer",
        )
    head = c.spread_head("circuit")
    notes = f"{circuit.silent} nodes with an effect never fire on the clean examples and are not counted."
    if circuit.agreement:
        notes += " Agreement with exact patching: " + "; ".join(
            f"{k} Pearson {a.pearson:.3f}, Spearman {a.spearman:.3f}" for k, a in circuit.agreement.items()
        )
    return html.Div(
        [
            html.Table([html.Thead(head), html.Tbody(rows)], className="tbl", id="circuit-transfer-table"),
            html.Div(notes, className="muted"),
        ],
        id="circuit-transfer",
    )


@c.guarded
def layout(run: str, params: p.Params) -> Any:
    """A circuit of the run: picker, numbers, the graph with threshold sliders, the faithfulness curve."""
    circuit = load_circuit(run, p.name(params.get("name"), "circuit name"))
    figure, n_nodes, n_edges = graph_figure(circuit, 0.0, 0.0)
    picker = html.Div(
        [
            "Circuits: ",
            *[
                html.Span(dcc.Link(n, href=c.page_url("circuits", name=n)), className="chip")
                for n in circuit_names(run)
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
            c.card(
                "Found on and held out",
                transfer_table(circuit),
                html.Div(
                    "Faithfulness of the circuit on the examples it was found on and on held-out ones (its nodes "
                    "kept at the same positions), at its size: the figure over all examples, a bootstrap 95% "
                    "interval over resampled examples, and the lowest and highest per-example figure. Latents "
                    "that are specific to the found-on tokens do not transfer; grouped nodes (every latent that "
                    "one head writes at one position or role) can.",
                    className="muted",
                ),
            ),
        ],
        id="circuits-page",
    )


def _clicked_node(click: Any) -> tuple[str, int | str]:
    """The (hook, latent) of the node a graph click names (the `customdata` of its point)."""
    points = click.get("points") if isinstance(click, dict) else None
    point = points[0] if isinstance(points, list) and points else None
    if not isinstance(point, dict) or "customdata" not in point:
        raise PreventUpdate  # a click beside the nodes, or on an edge
    node = point["customdata"]
    if isinstance(node, list) and len(node) == 2 and isinstance(node[0], str):
        hook, latent = node
        if latent == "err" or (isinstance(latent, int) and not isinstance(latent, bool) and latent >= 0):
            return hook, latent
    raise RequestError(f"The clicked point {str(node)[:60]!r} names no node: give [hook point, latent index].")


def register(app: Dash, run: str) -> None:
    """The page's callbacks: sliders filter the graph; a click on a latent opens its feature page."""

    @app.callback(
        Output("circuit-graph", "figure"),
        Output("circuit-count", "children"),
        Input("circuit-node-threshold", "value"),
        Input("circuit-edge-threshold", "value"),
        State("circuit-name", "data"),
        prevent_initial_call=True,
    )
    @c.guarded_callback(outputs=2, message=1)
    def filter_graph(node_min: Any, edge_min: Any, name: Any) -> tuple[Any, str]:
        node_min = p.number(node_min, "node threshold", default=0.0, low=0.0)
        edge_min = p.number(edge_min, "edge threshold", default=0.0, low=0.0)
        circuit = load_circuit(run, p.name(name, "circuit name"))
        figure, n_nodes, n_edges = graph_figure(circuit, node_min, edge_min)
        return figure, _count(n_nodes, n_edges, circuit)

    @c.navigation(app, "circuit-click", Input("circuit-graph", "clickData"), State("circuit-name", "data"))
    def open_node(click: Any, name: Any) -> str:
        hook, latent = _clicked_node(click)
        return node_link(run, load_circuit(run, p.name(name, "circuit name")), hook, latent)
