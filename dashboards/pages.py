"""The browser's pages, each a function of the run directory and the URL's query parameters.

Every page is built server-side from what its URL says, so any view can be shared as a link. A page
that cannot be shown returns a clear message instead (see `guarded`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dash import dcc, html

from saelab.dashboards import components as c
from saelab.dashboards.data import (
    RunError,
    SaeInfo,
    analysis_path,
    check_model,
    context_vocab,
    default_sae,
    feature_store,
    list_saes,
    open_store,
    parse_feature_id,
    prompt_latents,
    sae_info,
    search_token,
    valid_ids,
)
from saelab.sweep import pareto_figure, read_results

log = logging.getLogger(__name__)
Params = dict[str, str]


def guarded(page: Callable[..., Any]) -> Callable[..., Any]:
    """Show `RunError`s as a message in the page, and any other error as a short one (traceback in the log)."""

    @functools.wraps(page)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return page(*args, **kwargs)
        except RunError as err:
            return c.error_box(str(err))
        except Exception as err:
            log.exception("page %s failed", page.__name__)
            return c.error_box(f"This page could not be built: {type(err).__name__}: {err}")

    return wrapper


@guarded
def overview_page(run_dir: str) -> Any:
    """The run: its store, its SAEs with their metrics, and the sweep's Pareto plot if there is one."""
    store = open_store(run_dir)
    saes = list_saes(run_dir)
    analysed = {(s.hook, s.variant) for s in saes if analysis_path(run_dir, s).is_dir()}
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
                            html.Td(str(sum(s.hook == h for s in saes)), className="num"),
                        ]
                    )
                    for h in store.hooks
                ]
            ),
        ],
        className="tbl",
    )
    parts = [
        html.H2(f"Run: {Path(run_dir).name}"),
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
            html.Div(run_dir, className="muted", style={"marginTop": "8px"}),
        ),
        c.card("Hook points", hooks),
        c.card("SAEs", c.metrics_table(saes, store.model, analysed)),
    ]
    results = Path(run_dir) / "results.csv"
    if results.is_file():
        parts.append(
            c.card(
                "Sweep: sparsity against fidelity", dcc.Graph(figure=pareto_figure(read_results(results)), id="pareto")
            )
        )
    return html.Div(parts)


@guarded
def feature_page(run_dir: str, hook: str | None, variant: str | None, raw_id: str | None) -> Any:
    """Everything the analysis knows about one latent; reads only that latent's slices of the analysis."""
    info = sae_info(run_dir, hook, variant)
    check_model(run_dir, info)
    fs = feature_store(run_dir, info)
    index = parse_feature_id(raw_id, fs.n_features)
    f = fs.feature(index)
    vocab, scale = context_vocab(fs), float(f["max_act"])
    centre = f["top_tokens"].shape[-1] // 2  # contexts are ±window around the example's own token
    nav = html.Span(
        [
            c.feature_link(info, index - 1, "← previous") if index > 0 else None,
            c.feature_link(info, index + 1, "next →") if index + 1 < fs.n_features else None,
        ],
        className="pager",
    )
    header = c.card(
        None,
        nav,
        html.H2(f"Feature #{index}", style={"margin": "0 0 2px"}),
        html.Div(f"{info.hook} · {info.variant} · {fs.n_features:,} latents", className="muted"),
        html.Div(
            [
                c.stat("fires on", f"{f['count']:,} tokens"),
                c.stat("density", f"{f['density']:.3%}"),
                c.stat("mean act", c.fmt(f["mean_act"])),
                c.stat("max act", c.fmt(f["max_act"])),
            ],
            className="stats",
            style={"marginTop": "10px"},
        ),
    )
    if f["count"] == 0:
        return html.Div(
            [
                header,
                c.error_box(
                    f"Feature {index} never fired on the {int(fs.attrs.get('n_tokens', 0)):,} "
                    "analysed tokens: it is dead, so there is nothing to show."
                ),
            ]
        )
    bins = [
        html.Div(
            [
                html.H4(f"{f['quantile_edges'][b]:.3g} – {f['quantile_edges'][b + 1]:.3g}"),
                c.examples(
                    vocab,
                    f["quantile_acts"][b],
                    f["quantile_tokens"][b],
                    f["quantile_token_acts"][b],
                    centre,
                    scale,
                    f"quantile-{b}",
                ),
            ],
            className="bin",
        )
        for b in reversed(range(len(f["quantile_acts"])))
    ]
    left = [
        c.card(
            "Top activations",
            c.examples(vocab, f["top_acts"], f["top_tokens"], f["top_token_acts"], centre, scale, "top-examples"),
        ),
        c.card("Examples across the activation range", *bins),
    ]
    right = [
        c.card("Activation histogram", c.histogram(f["hist_counts"], f["hist_edges"])),
        _logit_card(fs.attrs.get("logit_kind", "unembedding"), fs.vocab, f),
        c.card("Decoder neighbours", c.latent_chips(info, valid_ids(f["neighbour_ids"], f["neighbour_cos"]), "cos")),
        c.card("Co-occurring latents", _cooc(info, f)),
    ]
    return html.Div([header, html.Div([html.Div(left), html.Div(right)], className="grid")], id="feature-page")


def _logit_card(kind: str, vocab: list[str], f: dict[str, Any]) -> html.Div:
    if "logit_top_ids" not in f:
        return c.card(
            "Logit effects",
            html.Div("Not computed: the run's store records no model to take them from.", className="muted"),
            id="logit-effects",
        )
    if kind == "unembedding":
        title, high, low = "Logit effects (decoder direction · unembedding)", "promoted", "suppressed"
    else:
        title, high, low = "Token embeddings by cosine with the decoder direction", "closest", "most opposite"
    top = c.token_value_table(vocab, valid_ids(f["logit_top_ids"], f["logit_top_vals"]), high)
    bottom = c.token_value_table(vocab, valid_ids(f["logit_bottom_ids"], f["logit_bottom_vals"]), low)
    return c.card(
        title,
        html.Div([top, bottom], style={"display": "grid", "gridTemplateColumns": "1fr 1fr", "gap": "12px"}),
        id="logit-effects",
    )


def _cooc(info: SaeInfo, f: dict[str, Any]) -> Any:
    pairs = valid_ids(f["cooc_ids"], f["cooc_jaccard"])
    if not pairs:
        return html.Div("This latent fires too rarely for co-occurrence statistics.", className="muted")
    return c.latent_chips(info, pairs, "J")


def sae_options(run_dir: str) -> list[dict[str, str]]:
    """Dropdown options: one per SAE, valued `hook|variant`."""
    return [{"label": f"{s.hook} · {s.variant}", "value": f"{s.hook}|{s.variant}"} for s in list_saes(run_dir)]


def chosen_sae(run_dir: str, params: Params) -> SaeInfo:
    """The SAE the URL names, or the run's first SAE of its own model."""
    if "hook" in params or "sae" in params:
        return sae_info(run_dir, params.get("hook"), params.get("sae"))
    return default_sae(run_dir)


def _sae_dropdown(run_dir: str, info: SaeInfo, component_id: str) -> dcc.Dropdown:
    return dcc.Dropdown(
        sae_options(run_dir), f"{info.hook}|{info.variant}", id=component_id, clearable=False, className="sae-select"
    )


@guarded
def search_page(run_dir: str, params: Params) -> Any:
    """Find latents by index or by token."""
    info = chosen_sae(run_dir, params)
    form = c.card(
        None,
        html.Div(["SAE", _sae_dropdown(run_dir, info, "search-sae")], className="form"),
        html.Div(
            [
                dcc.Input(id="search-id", type="text", placeholder="feature id, e.g. 12", className="field"),
                html.Button("Open feature", id="search-id-go", className="go"),
            ],
            className="form",
        ),
        html.Div(
            [
                dcc.Input(
                    id="search-token",
                    type="text",
                    value=params.get("q", ""),
                    placeholder="a token or some text, e.g. return",
                    className="field",
                ),
                html.Button("Search by token", id="search-token-go", className="go"),
            ],
            className="form",
        ),
    )
    results = token_results(run_dir, info, params["q"]) if "q" in params else None
    return html.Div([html.H2("Find features"), form, html.Div(results, id="search-results")])


@guarded
def token_results(run_dir: str, info: SaeInfo, text: str) -> Any:
    check_model(run_dir, info)
    rows = []
    for token_id, string, latents in search_token(run_dir, info, text):
        found = (
            html.Span([html.Span(c.feature_link(info, i), className="chip") for i in latents], className="chips")
            if latents
            else html.Span("no latent has it among its top examples or logit effects", className="muted")
        )
        rows.append(
            html.Tr([html.Td(html.Code(repr(string))), html.Td(str(token_id), className="num"), html.Td(found)])
        )
    return c.card(
        "Latents by token",
        html.Table(
            [
                html.Thead(html.Tr([html.Th("token"), html.Th("id", className="num"), html.Th("latents")])),
                html.Tbody(rows),
            ],
            className="tbl",
        ),
    )


@guarded
def prompt_page(run_dir: str, params: Params) -> Any:
    """Type text; the model and SAE run live and show each token's strongest latents."""
    info = chosen_sae(run_dir, params)
    top = int(params["top"]) if params.get("top", "").isdigit() else 5
    form = c.card(
        None,
        html.Div(["SAE", _sae_dropdown(run_dir, info, "prompt-sae")], className="form"),
        html.Div(
            [
                dcc.Textarea(
                    id="prompt-text",
                    value=params.get("text", ""),
                    placeholder="Type a prompt…",
                    style={"width": "100%", "height": "80px"},
                )
            ],
            className="form",
        ),
        html.Div(
            [
                "latents per token",
                dcc.Input(id="prompt-top", type="number", min=1, max=20, value=top, style={"width": "70px"}),
                html.Button("Run", id="prompt-go", className="go"),
            ],
            className="form",
        ),
    )
    results = prompt_results(run_dir, info, params["text"], top) if "text" in params else None
    return html.Div([html.H2("Prompt"), form, html.Div(results, id="prompt-results")])


@guarded
def prompt_results(run_dir: str, info: SaeInfo, text: str, top: int) -> Any:
    rows = prompt_latents(run_dir, info, text, max(1, min(top, 20)))
    body = [
        html.Tr(
            [
                html.Td(html.Code(repr(r.token))),
                html.Td(c.latent_chips(info, r.latents, "") if r.latents else html.Span("none", className="muted")),
            ]
        )
        for r in rows
    ]
    return c.card(
        f"Top latents per token ({info.hook} · {info.variant})",
        html.Table(
            [html.Thead(html.Tr([html.Th("token"), html.Th("latents (activation)")])), html.Tbody(body)],
            className="tbl",
        ),
    )
