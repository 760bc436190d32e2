"""The graph page (`/graph?name=NAME`): an attribution graph that `saelab graph` wrote into the run, drawn as a layer x
position graph (tokens at the bottom, logits at the top), edges coloured by sign with their width by weight, and a
table of the kept edges with the heads that carry them (`saelab.circuits.attribution_graph`), and the graph's
faithfulness by intervention on its prompt and on held-out prompts (`saelab.circuits.graph_faithfulness`)."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from dash import dcc, html

from saelab.circuits.graph_file import GraphFile
from saelab.dashboards import components as c
from saelab.dashboards import params as p
from saelab.errors import MissingError
from saelab.run import RunDir

TITLE = "Graph"
NAV = True
TOP_EDGES = 30
"""Edges listed in the table, largest |weight| first."""
KIND_SYMBOL = {"latent": "circle", "error": "diamond", "token": "square", "logit": "star"}


def graph_figure(found: GraphFile) -> go.Figure:
    """Kept nodes at (position, layer), kept edges as lines."""
    where = {n.node: (n.pos, n.layer) for n in found.nodes}
    fig = go.Figure()
    for sign, colour in ((1, "rgba(33,102,172,0.6)"), (-1, "rgba(178,24,43,0.6)")):
        xs: list[float | None] = []
        ys: list[float | None] = []
        for e in found.edges:
            if (e.weight >= 0) == (sign > 0) and e.source in where and e.target in where:
                (x0, y0), (x1, y1) = where[e.source], where[e.target]
                xs += [x0, x1, None]
                ys += [y0, y1, None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"color": colour, "width": 1.5}, hoverinfo="skip"))
    for kind, symbol in KIND_SYMBOL.items():
        nodes = [n for n in found.nodes if n.kind == kind]
        fig.add_trace(
            go.Scatter(
                x=[n.pos for n in nodes],
                y=[n.layer for n in nodes],
                mode="markers",
                name=kind,
                marker={"symbol": symbol, "size": [8 + 20 * min(1.0, abs(n.influence)) for n in nodes]},
                text=[f"{n.label}<br>influence {n.influence:.3g}" for n in nodes],
                hoverinfo="text",
            )
        )
    fig.update_layout(
        height=420,
        margin={"l": 40, "r": 10, "t": 10, "b": 40},
        xaxis_title="position",
        yaxis={"title": "layer (tokens -1, logits top)", "dtick": 1},
        showlegend=True,
    )
    return fig


def _heads(heads: dict[str, float], weight: float) -> str:
    shares = sorted(heads.items(), key=lambda kv: -abs(kv[1]))
    return ", ".join(f"{h} {v / weight:.0%}" for h, v in shares) if weight else ""


def faithfulness_card(found: GraphFile) -> html.Div:
    """The graph's faithfulness and completeness on its prompt and on the held-out prompts, with 95% bootstrap
    intervals and per-example ranges; a note for a file written before saelab measured them."""
    checked = found.faithfulness
    if checked is None:
        body: list[Any] = [
            html.Div(
                "This graph was saved without its faithfulness; compute it again with `saelab graph` to see it.",
                className="muted",
            )
        ]
    else:
        rows = [c.spread_row("on its prompt", checked.found_on, checked.found_on["n"][0])]
        if checked.held_out is not None:
            rows.append(c.spread_row("held out", checked.held_out, checked.held_out["n"][0]))
        metric = f"logit {checked.target}" + ("" if checked.distractor is None else f" - logit {checked.distractor}")
        silent = checked.found_on_silent + checked.held_out_silent
        note = (
            f"The graph's latent and error nodes kept, every other one zero-ablated in the replacement model; metric "
            f"{metric} at the last position; nodes kept by {checked.granularity}. "
            + (f"{silent} nodes that never fire on a set are not counted there. " if silent else "")
            + ("" if checked.held_out is not None else "No held-out prompts: give them with `saelab graph --held-out`.")
        )
        body = [
            html.Table([html.Thead(c.spread_head("prompts")), html.Tbody(rows)], className="tbl"),
            html.Div(note, className="muted"),
        ]
    return c.card("Faithfulness", *body, id="graph-faithfulness")


@c.guarded
def layout(run: str, params: p.Params) -> Any:
    """A graph of the run: picker, scores, the layer x position graph, the edges with their heads."""
    run_dir = RunDir(run)
    names = run_dir.graphs()
    name = p.name(params.get("name"), "graph name") or (names[0] if names else None)
    if name is None:
        raise MissingError("this run has no attribution graphs yet; compute one with `saelab graph RUN --prompt TEXT`")
    found = GraphFile.load(run_dir.graph(name))
    labels = {n.node: n.label for n in found.nodes}
    picker = html.Div(
        ["Graphs: ", *[html.Span(dcc.Link(n, href=c.page_url("graph", name=n)), className="chip") for n in names]],
        className="chips",
    )
    stats = html.Div(
        [
            c.stat("replacement", f"{found.replacement:.3f}"),
            c.stat("completeness", f"{found.completeness:.3f}"),
            c.stat("nodes kept", str(len(found.nodes))),
            c.stat("edges kept", str(len(found.edges))),
        ],
        className="stats",
        style={"marginTop": "10px"},
    )
    shown = sorted(found.edges, key=lambda e: -abs(e.weight))[:TOP_EDGES]
    table = html.Table(
        [
            html.Thead(html.Tr([html.Th(h) for h in ("source", "target", "weight", "carried by")])),
            html.Tbody(
                [
                    html.Tr(
                        [
                            html.Td(labels.get(e.source, str(e.source))),
                            html.Td(labels.get(e.target, str(e.target))),
                            html.Td(f"{e.weight:.3f}"),
                            html.Td(_heads(e.heads, e.weight)),
                        ]
                    )
                    for e in shown
                ]
            ),
        ],
        id="graph-edges",
    )
    return html.Div(
        [
            html.H2(f"Attribution graph: {found.name}"),
            c.card(None, picker, html.Div(f"prompt: {found.prompt}", className="muted"), stats),
            faithfulness_card(found),
            c.card(
                "Layer x position",
                dcc.Graph(figure=graph_figure(found), id="graph-figure", config={"displayModeBar": False}),
                html.Div(
                    "Nodes kept by influence pruning (circuit-tracer's thresholds): latents (circles), error nodes "
                    "(diamonds), tokens (squares, bottom) and logits (stars, top); size by influence on the logits. "
                    "Blue edges excite, red inhibit.",
                    className="muted",
                ),
            ),
            c.card(
                f"Strongest {len(shown)} edges",
                table,
                html.Div(
                    "Carried by: each edge's share through the lowest attention head its paths pass through (the head "
                    "that reads the source's position); resid is the residual-stream path.",
                    className="muted",
                ),
            ),
        ],
        id="graph-page",
    )
