"""The model-diff page (`/model_diff?hook=H&sae=VARIANT`): what `saelab diff` wrote for a crosscoder over the same
hook point in two models. How many latents are shared and how many exclusive to each model, by decoder norms alone
and once latent scaling has been read (Minder et al. 2025), the distribution of the relative decoder norm, and the
latents exclusive to each model with the evidence for each (linked to their feature pages where the run has them)."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from dash import dcc, html

from saelab.dashboards import components as c
from saelab.dashboards import params as p
from saelab.dashboards.data import SaeInfo, load_model_diff, model_diff_keys, sae_info
from saelab.errors import SaelabError
from saelab.evals.diff_run import ModelDiffResult

TITLE = "Model diff"
NAV = True
MAX_ROWS = 200  # exclusive latents listed per model


def _info(run: str, result: ModelDiffResult) -> SaeInfo | None:
    """The crosscoder's entry in the run (for feature links); None when the app cannot show its features."""
    try:
        return sae_info(run, result.hook, result.variant)
    except SaelabError:
        return None


def norm_figure(result: ModelDiffResult) -> go.Figure:
    """The relative decoder norm `|d_B| / (|d_A| + |d_B|)` of every latent, coloured by its class after scaling."""
    fig = go.Figure()
    for name, colour in (("a_only", "#1f77b4"), ("shared", "#999999"), ("b_only", "#d62728")):
        values = [d for d, cls in zip(result.delta_norm, result.scaling_class, strict=True) if cls == name]
        fig.add_trace(
            go.Histogram(x=values, name=name, marker_color=colour, xbins={"start": 0, "end": 1, "size": 0.02})
        )
    cut = float(result.config.get("exclusive", 0.1))
    for x in (cut, 1 - cut):
        fig.add_vline(x=x, line_dash="dot", line_color="#555")
    fig.update_layout(
        barmode="stack",
        height=300,
        margin={"l": 40, "r": 10, "t": 30, "b": 40},
        xaxis_title=f"relative decoder norm ({result.sources[1]} over both)",
        yaxis_title="latents",
        title="Relative decoder norm, by class after latent scaling",
    )
    return fig


def exclusive_table(result: ModelDiffResult, side: str, info: SaeInfo | None) -> html.Div:
    """The latents exclusive to `side` (`a_only` or `b_only`) after latent scaling, most exclusive first."""
    latents = result.exclusive(side)
    model = result.sources[0 if side == "a_only" else 1]
    if not latents:
        return html.Div(f"No latent is exclusive to {model}.", className="muted", id=f"diff-{side}")
    head = html.Tr([html.Th(h) for h in ("latent", "relative norm", "nu error", "nu recon", "rows fired", "by norm")])
    rows = [head]
    for j in latents[:MAX_ROWS]:
        link = c.feature_link(info, j) if info else html.Span(f"#{j}")
        rows.append(
            html.Tr(
                [
                    html.Td(link),
                    html.Td(c.fmt(result.delta_norm[j]), className="num"),
                    html.Td(c.fmt(result.nu_error[j]), className="num"),
                    html.Td(c.fmt(result.nu_recon[j]), className="num"),
                    html.Td(str(result.fired[j]), className="num"),
                    html.Td(result.norm_class[j]),
                ]
            )
        )
    shown = "" if len(latents) <= MAX_ROWS else f" (the first {MAX_ROWS})"
    return html.Div(
        [
            html.Div(f"{len(latents)} latents exclusive to {model}{shown}.", className="muted"),
            html.Table(rows, className="tbl"),
        ],
        id=f"diff-{side}",
    )


def _enrichment(result: ModelDiffResult) -> str:
    """Each class's firing rate on the tuned documents over elsewhere (`saelab diff --tuned-on`); "no latents" where
    a class has none (or they never fire off those documents)."""
    return ", ".join(
        f"{name} {c.fmt(v)}x" if v is not None else f"{name} no latents" for name, v in result.enrichment.items()
    )


@c.guarded
def layout(run: str, params: p.Params) -> Any:
    """A model diff of the run: class counts, the relative-norm histogram, each model's exclusive latents."""
    result = load_model_diff(run, p.name(params.get("hook"), "hook point"), p.name(params.get("sae"), "SAE variant"))
    info = _info(run, result)
    picker = html.Div(
        [
            "Crosscoders: ",
            *[
                html.Span(dcc.Link(f"{h}/{v}", href=c.page_url("model_diff", hook=h, sae=v)), className="chip")
                for h, v in model_diff_keys(run)
            ],
        ],
        className="chips",
    )
    by_norm, scaled = result.counts(scaled=False), result.counts()
    a, b = result.sources
    stats = html.Div(
        [
            c.stat("shared", f"{scaled['shared']} ({by_norm['shared']} by norm)"),
            c.stat(f"only {a}", f"{scaled['a_only']} ({by_norm['a_only']} by norm)"),
            c.stat(f"only {b}", f"{scaled['b_only']} ({by_norm['b_only']} by norm)"),
            c.stat("rows", f"{result.rows[0]:,} to {result.rows[1]:,}"),
            *(
                [c.stat(f"firing on {result.tuned_on}'s documents", _enrichment(result))]
                if result.tuned_on is not None
                else []
            ),
        ],
        className="stats",
        id="diff-counts",
    )
    explain = html.Div(
        "A latent is exclusive to a model when its decoder norm there is at least "
        f"{1 - float(result.config.get('exclusive', 0.1)):.0%} of the total; latent scaling then moves back to shared "
        "each exclusive latent whose direction the other model's activations still carry (nu error) or reconstruct "
        f"through other latents (nu recon) at {result.config.get('nu_threshold', 0.3)} or more.",
        className="muted",
    )
    return html.Div(
        [
            html.H2(f"Model diff: {result.hook}/{result.variant}"),
            picker,
            stats,
            explain,
            c.card(None, dcc.Graph(figure=norm_figure(result), id="diff-norms", config={"displayModeBar": False})),
            html.Div(
                [
                    c.card(f"Only in {a}", exclusive_table(result, "a_only", info)),
                    c.card(f"Only in {b}", exclusive_table(result, "b_only", info)),
                ],
                style={"display": "grid", "gridTemplateColumns": "1fr 1fr", "gap": "16px"},
            ),
        ]
    )
