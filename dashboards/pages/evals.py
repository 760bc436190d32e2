"""The Evals page (`/evals`): what `saelab eval` wrote into the run, every dictionary x eval.

A table of each dictionary's core metrics (its `metrics.json`) and each eval's headline (`saelab.evals.table`), every
headline linked to the feature page of the latent it comes from (the 1-sparse probe's latent, the most hedging
latent, the largest family's parent) with the next ones as chips; the same grouped by config across seeds, each
number with its 95% t-interval, or saying that a config with one seed has none; and for each headline its Pareto
fronts against L0 and width (`saelab.plots.eval_front_figure`)."""

from __future__ import annotations

from typing import Any

from dash import dcc, html

from saelab.dashboards import components as c
from saelab.dashboards import params as p
from saelab.errors import RunError
from saelab.evals.intervals import ONE_SEED, ConfigGroup
from saelab.evals.table import CORE, DictionaryEvals, Headline, by_config, headline_names, run_table
from saelab.plots import eval_front_figure

TITLE = "Evals"
NAV = True


def _latent_link(d: DictionaryEvals, index: int, label: str | None = None) -> dcc.Link:
    return dcc.Link(label or f"#{index}", href=c.page_url("feature", hook=d.hook, sae=d.variant, id=index))


def _headline_cell(d: DictionaryEvals, h: Headline | None) -> html.Td:
    """The number, linked to its first latent's feature page, and chips for the others it comes from."""
    if h is None:
        return html.Td("", className="num")
    number = _latent_link(d, h.latents[0], c.fmt(h.value)) if h.latents else html.Span(c.fmt(h.value))
    chips = html.Span([_latent_link(d, i) for i in h.latents[1:]], className="chips")
    return html.Td([number, chips] if h.latents[1:] else number, className="num")


def dictionary_table(table: list[DictionaryEvals], names: list[str]) -> html.Table:
    """One row per dictionary: its config, core metrics and headlines."""
    head = html.Tr([html.Th(h) for h in ("dictionary", "seed", *CORE, *names)])
    rows = [head]
    for d in table:
        rows.append(
            html.Tr(
                [
                    html.Td(f"{d.hook}/{d.variant}", title="; ".join(d.problems)),
                    html.Td(str(d.row.get("seed", ""))),
                    *[html.Td(c.fmt(d.row.get(m)), className="num") for m in CORE],
                    *[_headline_cell(d, d.headlines.get(n)) for n in names],
                ],
                className="row-error" if d.problems else None,
            )
        )
    return html.Table(rows, className="tbl", id="evals-table")


def _interval_cell(g: ConfigGroup, metric: str) -> html.Td:
    iv = g.intervals.get(metric)
    if iv is None:
        return html.Td("", className="num")
    if iv.low is None or iv.high is None:
        return html.Td(c.fmt(iv.mean), className="num", title=ONE_SEED)
    return html.Td(
        [c.fmt(iv.mean), html.Span(f" [{iv.low:.4g}, {iv.high:.4g}]", className="muted interval")], className="num"
    )


def config_table(groups: list[ConfigGroup], names: list[str]) -> html.Div:
    """One row per config (every setting but the seed): each number's mean and 95% t-interval across seeds."""
    keys = ("hook", "arch", "k", "width", "lr")
    head = html.Tr([html.Th(h) for h in (*keys, "seeds", *[m for m in CORE if m != "width"], *names)])
    rows = [head]
    for g in groups:
        n = len(g.rows)
        rows.append(
            html.Tr(
                [
                    *[html.Td(c.fmt(g.config[k]) if k == "lr" else g.config[k]) for k in keys],
                    html.Td(str(n) if n > 1 else ONE_SEED, className="num"),
                    *[_interval_cell(g, m) for m in CORE if m != "width"],
                    *[_interval_cell(g, m) for m in names],
                ]
            )
        )
    single = sum(len(g.rows) == 1 for g in groups)
    note = (
        f"{single} of {len(groups)} configs were trained with one seed: they show their value and no interval. "
        "Train several seeds (`grid.seed: [0, 1, 2]`) for intervals."
        if single
        else "Every config has several seeds; intervals are 95% Student-t intervals of the mean over them."
    )
    return html.Div(
        [html.Div(note, className="muted", id="seed-note"), html.Table(rows, className="tbl")], id="configs"
    )


@c.guarded
def layout(run: str, params: p.Params) -> Any:
    """Every dictionary x eval of the run, across seeds, and each eval's Pareto fronts."""
    table = run_table(run)
    if not table:
        raise RunError(f"No SAEs in the run {run}. Train some with `saelab train` or `saelab sweep`.")
    names = headline_names(table)
    if not names:
        raise RunError(
            f"No eval results in the run {run} yet. Compute them with `saelab eval {run}` "
            "(`--only sparse_probing,hedging,families`)."
        )
    groups = by_config(table)
    fronts = [
        c.card(
            name,
            html.Div(
                [
                    dcc.Graph(
                        figure=eval_front_figure(groups, name, x),
                        id=f"front-{name.replace(':', '-')}-{x}",
                        config={"displayModeBar": False},
                    )
                    for x in ("l0", "width")
                ],
                style={"display": "grid", "gridTemplateColumns": "1fr 1fr", "gap": "16px"},
            ),
        )
        for name in names
    ]
    explain = html.Div(
        "probing:TASK: mean test accuracy of the 1-sparse probes over the task's labels (each number links to the "
        "latent of its first label's probe, the chips to the others'); hedging: the SAE's hedging rate (links: the "
        "most hedging latents); families: parent->child links (links: the largest families' parents).",
        className="muted",
    )
    return html.Div(
        [
            html.H2("Evals"),
            c.card("Dictionaries", explain, dictionary_table(table, names)),
            c.card("Across seeds", config_table(groups, names)),
            *fronts,
        ],
        id="evals-page",
    )
