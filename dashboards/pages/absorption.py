"""The absorption page (`/absorption?hook=H&sae=VARIANT&label=L`): what `saelab absorption` wrote into the run.
The SAE's scores, absorption against L0 and width over every SAE of the run that has a result (a sweep, drawn by
`saelab.plots.absorption_sweep_figure`), a table per label, and the label's absorption cases with their absorbing
latents linked to their feature pages."""

from __future__ import annotations

from typing import Any

from dash import dcc, html

from saelab.absorption import AbsorptionResult, Case, LabelScore
from saelab.dashboards import components as c
from saelab.dashboards import params as p
from saelab.dashboards.data import SaeInfo, absorption_keys, load_absorption, sae_info
from saelab.errors import RunError, SaelabError
from saelab.plots import absorption_sweep_figure

TITLE = "Absorption"
NAV = True
MAX_CASES = 200  # cases listed for one label (the strongest first)


def _readable(run: str, hook: str, variant: str) -> AbsorptionResult | None:
    try:
        return load_absorption(run, hook, variant)
    except SaelabError:  # a broken result has its own page saying so; the sweep leaves it out
        return None


def _info(run: str, result: AbsorptionResult) -> SaeInfo | None:
    """The SAE's entry in the run (for feature links); None when the SAE is not one of the run's."""
    try:
        return sae_info(run, result.hook, result.variant)
    except RunError:
        return None


def _latent(info: SaeInfo | None, index: int, label: str | None = None) -> Any:
    return c.feature_link(info, index, label) if info else html.Span(label or f"#{index}")


def label_table(result: AbsorptionResult, info: SaeInfo | None) -> html.Table:
    """One row per label: probe F1, split latents, true positives, absorption, cases, IG absorption."""
    head = html.Tr(
        [
            html.Th(h)
            for h in (
                "label",
                "probe F1",
                "scored",
                "split latents",
                "true positives",
                "absorption fraction",
                "full absorption",
                "cases",
                "IG absorption",
            )
        ]
    )
    rows = [head]
    for lab in result.labels:
        link = dcc.Link(lab.label, href=c.page_url("absorption", hook=result.hook, sae=result.variant, label=lab.label))
        split = html.Span([_latent(info, i) for i in lab.split_latents], className="chips")
        rows.append(
            html.Tr(
                [
                    html.Td(link),
                    html.Td(c.fmt(lab.probe_f1), className="num"),
                    html.Td("yes" if lab.scored else "no"),
                    html.Td(split),
                    html.Td(str(lab.true_positives), className="num"),
                    html.Td(c.fmt(lab.mean_absorption_fraction), className="num"),
                    html.Td(c.fmt(lab.full_absorption_rate), className="num"),
                    html.Td(str(len(lab.cases)), className="num"),
                    html.Td(
                        c.fmt(lab.ig.get("absorption_rate")) if lab.ig else "",
                        className="num",
                        title=(lab.ig or {}).get("error", ""),
                    ),
                ]
            )
        )
    return html.Table(rows, className="tbl", id="absorption-labels")


def absorbing(case: Case) -> list[list[float]]:
    """The latents that absorb a case: its absorbers, or for full absorption without any, the top latent."""
    return case.absorbers or (case.top[:1] if case.full_absorption else [])


def case_table(result: AbsorptionResult, lab: LabelScore, info: SaeInfo | None) -> Any:
    """The label's absorption cases, strongest first, with their absorbing latents."""
    if not lab.cases:
        return html.Div(
            f"No absorption among the {lab.true_positives} true positives of {lab.label!r}.",
            className="muted",
            id="absorption-cases",
        )
    head = html.Tr(
        [html.Th(h) for h in ("word", "probe projection", "split activations", "absorbing latents", "fraction", "full")]
    )
    rows = [head]
    cases = sorted(lab.cases, key=lambda x: (-x.absorption_fraction, -x.probe_projection))[:MAX_CASES]
    for case in cases:
        absorbers = [
            html.Span([_latent(info, int(i)), f" act {a:.3g}, cos {cs:.2f}"], className="chip absorber")
            for i, a, cs, _ in absorbing(case)
        ]
        rows.append(
            html.Tr(
                [
                    html.Td(repr(case.word)),
                    html.Td(c.fmt(case.probe_projection), className="num"),
                    html.Td(", ".join(f"{a:.3g}" for a in case.split_acts)),
                    html.Td(html.Span(absorbers, className="chips")),
                    html.Td(c.fmt(case.absorption_fraction), className="num"),
                    html.Td("yes" if case.full_absorption else ""),
                ]
            )
        )
    shown = "" if len(lab.cases) <= MAX_CASES else f" (the first {MAX_CASES} of {len(lab.cases)})"
    return html.Div(
        [
            html.Div(f"{len(lab.cases)} of {lab.true_positives} true positives absorbed{shown}.", className="muted"),
            html.Table(rows, className="tbl"),
        ],
        id="absorption-cases",
    )


@c.guarded
def layout(run: str, params: p.Params) -> Any:
    """An absorption result of the run: scores, the sweep over the run's SAEs, labels, one label's cases."""
    result = load_absorption(run, p.name(params.get("hook"), "hook point"), p.name(params.get("sae"), "SAE variant"))
    info = _info(run, result)
    names = {lab.label: lab for lab in result.labels}
    chosen = p.name(params.get("label"), "label")
    if chosen and chosen not in names:
        raise RunError(f"{result.hook}/{result.variant} has no label {chosen!r}. Labels: {', '.join(names)}.")
    lab = names[chosen] if chosen else max(result.labels, key=lambda x: (len(x.cases), x.true_positives))
    picker = html.Div(
        [
            "Results: ",
            *[
                html.Span(dcc.Link(f"{h}/{v}", href=c.page_url("absorption", hook=h, sae=v)), className="chip")
                for h, v in absorption_keys(run)
            ],
        ],
        className="chips",
    )
    stats = html.Div(
        [
            c.stat("absorption fraction", c.fmt(result.mean_absorption_fraction) or "n/a"),
            c.stat("full-absorption rate", c.fmt(result.mean_full_absorption_rate) or "n/a"),
            c.stat("split latents", c.fmt(result.mean_num_split_features) or "n/a"),
            c.stat("scored labels", f"{result.n_scored} of {len(result.labels)}"),
            c.stat("L0", c.fmt(result.l0)),
            c.stat("width", str(result.d_sae)),
            c.stat("task", result.task),
            c.stat("words", f"{result.n_train} train, {result.n_test} test"),
        ],
        className="stats",
        style={"marginTop": "10px"},
    )
    warning = (
        None
        if result.enough_labels
        else html.Div(
            "Too few labels pass the probe-F1 bar (0.6) for SAEBench to score this SAE; the means cover the labels that do.",
            className="muted",
        )
    )
    results = [r for r in map(lambda key: _readable(run, *key), absorption_keys(run)) if r and r.task == result.task]
    unscored = (
        ""
        if any(r.mean_absorption_fraction is not None for r in results)
        else (
            "No SAE of this task has a scored label yet (probe F1 > 0.6 with true positives), so there is nothing to plot."
        )
    )
    sweep = c.card(
        "Across the run's SAEs",
        html.Div(unscored, className="muted"),
        html.Div(
            [
                dcc.Graph(
                    figure=absorption_sweep_figure(results, "l0"), id="absorption-l0", config={"displayModeBar": False}
                ),
                dcc.Graph(
                    figure=absorption_sweep_figure(results, "width"),
                    id="absorption-width",
                    config={"displayModeBar": False},
                ),
            ],
            style={"display": "grid", "gridTemplateColumns": "1fr 1fr", "gap": "16px"},
        ),
    )
    explain = html.Div(
        "A label's probe true positives are absorbed when latents outside its split latents carry the "
        "probe direction instead (decoder cosine >= 0.1, positive projection, together at least 40% of "
        "the activation's projection). Absorption fraction: the share of the projection they carry; "
        "full absorption: no split latent fires and one latent carries it.",
        className="muted",
    )
    return html.Div(
        [
            html.H2(f"Absorption: {result.hook}/{result.variant}"),
            c.card(None, picker, stats, warning),
            sweep,
            c.card("Labels", explain, label_table(result, info)),
            c.card(
                f"Cases of {lab.label!r} (split latents: {', '.join(map(str, lab.split_latents)) or 'none'})",
                case_table(result, lab, info),
            ),
        ],
        id="absorption-page",
    )
