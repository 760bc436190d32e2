"""The absorption page (`/absorption?hook=H&sae=VARIANT&label=L`): what `saelab absorption` wrote to
RUN/absorption/<hook>/<variant>.json. The SAE's scores, absorption against L0 and width over every SAE of the
run that has a result (a sweep), a table per label, and the label's absorption cases with their absorbing
latents linked to their feature pages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dash import dcc, html

from saelab.absorption import ABSORPTION_DIR, AbsorptionResult, Case, LabelScore
from saelab.dashboards import components as c
from saelab.dashboards.data import RunError, SaeInfo, cached_result, sae_info
from saelab.dashboards.pages import Params, guarded

MAX_CASES = 200  # cases listed for one label (the strongest first)


def result_keys(run_dir: str) -> list[tuple[str, str]]:
    """(hook, variant) of every absorption result of the run."""
    return sorted((p.parent.name, p.stem) for p in (Path(run_dir) / ABSORPTION_DIR).glob("*/*.json"))


def load_result(run_dir: str, hook: str | None, variant: str | None) -> AbsorptionResult:
    """The result for hook/variant (default: the first); `RunError` naming the command or the results there are."""
    keys = result_keys(run_dir)
    if not keys:
        raise RunError(
            f"No absorption results in {Path(run_dir) / ABSORPTION_DIR}. Compute them with "
            f"`saelab absorption CONFIG.yaml` (set `run: {run_dir}`; see configs/absorption_minilm.yaml)."
        )
    if not hook and not variant:
        hook, variant = keys[0]
    if (hook, variant) not in keys:
        raise RunError(
            f"The run has no absorption result for {hook}/{variant}. It has: {', '.join(f'{h}/{v}' for h, v in keys)}."
        )
    path = Path(run_dir) / ABSORPTION_DIR / hook / f"{variant}.json"
    return cached_result(AbsorptionResult.load, path)


def _readable(run_dir: str, hook: str, variant: str) -> AbsorptionResult | None:
    try:
        return load_result(run_dir, hook, variant)
    except RunError:  # a broken result has its own page saying so; the sweep leaves it out
        return None


def _info(run_dir: str, result: AbsorptionResult) -> SaeInfo | None:
    """The SAE's entry in the run (for feature links); None when it lives outside the run's saes/."""
    try:
        return sae_info(run_dir, result.hook, result.variant)
    except RunError:
        return None


def _latent(info: SaeInfo | None, index: int, label: str | None = None) -> Any:
    return c.feature_link(info, index, label) if info else html.Span(label or f"#{index}")


def sweep_figure(results: list[AbsorptionResult], x: str) -> dict[str, Any]:
    """Mean absorption fraction and full-absorption rate of each SAE against its L0 (`x="l0"`) or width."""
    scored = [r for r in results if r.mean_absorption_fraction is not None]
    data = [
        {
            "type": "scatter",
            "mode": "markers",
            "name": name,
            "x": [getattr(r, "l0" if x == "l0" else "d_sae") for r in scored],
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
    return {
        "data": data,
        "layout": {
            "height": 300,
            "margin": {"l": 48, "r": 8, "t": 8, "b": 44},
            "template": "plotly_white",
            "xaxis": {
                "title": {"text": "L0 (active latents at the word tokens)" if x == "l0" else "width (latents)"},
                "type": "linear" if x == "l0" else "log",
            },
            "yaxis": {"title": {"text": "mean over scored labels"}, "rangemode": "tozero"},
            "legend": {"orientation": "h", "y": -0.3},
        },
    }


def label_table(result: AbsorptionResult, info: SaeInfo | None) -> html.Table:
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


@guarded
def absorption_page(run_dir: str, params: Params) -> Any:
    result = load_result(run_dir, params.get("hook"), params.get("sae"))
    info = _info(run_dir, result)
    names = {lab.label: lab for lab in result.labels}
    chosen = params.get("label")
    if chosen and chosen not in names:
        raise RunError(f"{result.hook}/{result.variant} has no label {chosen!r}. Labels: {', '.join(names)}.")
    lab = names[chosen] if chosen else max(result.labels, key=lambda x: (len(x.cases), x.true_positives))
    picker = html.Div(
        [
            "Results: ",
            *[
                html.Span(dcc.Link(f"{h}/{v}", href=c.page_url("absorption", hook=h, sae=v)), className="chip")
                for h, v in result_keys(run_dir)
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
    results = [
        r for r in map(lambda key: _readable(run_dir, *key), result_keys(run_dir)) if r and r.task == result.task
    ]
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
                dcc.Graph(figure=sweep_figure(results, "l0"), id="absorption-l0", config={"displayModeBar": False}),
                dcc.Graph(
                    figure=sweep_figure(results, "width"), id="absorption-width", config={"displayModeBar": False}
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
