"""The run page (`/`): the activation store, the hook points, the SAEs with their metrics, the sweep's Pareto
plot if there is one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dash import dcc, html

from saelab.dashboards import components as c
from saelab.dashboards.data import analysis_problem, list_saes, made_by, open_store
from saelab.dashboards.params import Params
from saelab.run import RunDir
from saelab.train.sweep import pareto_figure, read_results

TITLE = "Run"
NAV = True


@c.guarded
def layout(run: str, params: Params) -> Any:
    """The run: its store, its SAEs with their metrics, and the sweep's Pareto plot if there is one. A broken SAE
    (or analysis) shows its error in its own row; the others' rows link to their pages as usual."""
    store = open_store(run)
    saes = list_saes(run)
    analyses = {(s.hook, s.variant): analysis_problem(run, s) for s in saes if s.error is None}
    hooks = html.Table(
        [
            html.Thead(
                html.Tr([html.Th("hook point"), html.Th("d", className="num"), html.Th("SAEs", className="num")])
            ),
            html.Tbody(
                [
                    html.Tr(
                        [
                            html.Td(h),
                            html.Td(str(store.d(h)), className="num"),
                            html.Td(str(sum(h in (s.reads or (s.hook,)) for s in saes)), className="num"),
                        ]
                    )
                    for h in store.hooks
                ]
            ),
        ],
        className="tbl",
    )
    parts = [
        html.H2(f"Run: {Path(run).name}"),
        c.card(
            None,
            html.Div(
                [
                    c.stat("model", store.model or "?"),
                    c.stat("tokens", f"{store.n_tokens:,}"),
                    c.stat("hook points", str(len(store.hooks))),
                    c.stat("SAEs", str(len(saes))),
                ],
                className="stats",
            ),
            html.Div(run, className="muted", style={"marginTop": "8px"}),
        ),
        c.card("Hook points", hooks),
        c.card("SAEs", c.metrics_table(saes, {(s.hook, s.variant): made_by(run, s) for s in saes}, analyses)),
    ]
    results = RunDir(run).sweep_table
    if results.is_file():
        parts.append(
            c.card(
                "Sweep: sparsity against fidelity", dcc.Graph(figure=pareto_figure(read_results(results)), id="pareto")
            )
        )
    return html.Div(parts)
