"""Pieces of the app's pages: the CSS, element dicts, tables, links, SAE pickers, and the error box
that every `SaelabError` a page or a callback meets is shown in (`guarded`, `guarded_callback`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ParamSpec
from urllib.parse import urlencode

import dash
import numpy as np
from dash import Input, Output, State, dcc, html
from dash.exceptions import PreventUpdate

from saelab.circuits.spread import Spread
from saelab.dashboards.data import NO_ANALYSIS, SaeInfo, finite, list_saes, token_text
from saelab.errors import SaelabError
from saelab.plots import decoder_norms_figure, histogram_figure

log = logging.getLogger(__name__)
P = ParamSpec("P")

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #1f2328;
       background: #f6f8fa; font-size: 14px; }
a { color: #0a58ca; text-decoration: none; } a:hover { text-decoration: underline; }
.nav { background: #24292f; color: #fff; padding: 10px 24px; display: flex; gap: 20px; align-items: baseline; }
.nav a { color: #f0f3f6; font-weight: 500; } .nav .brand { font-weight: 700; font-size: 16px; margin-right: 12px; }
.page { max-width: 1280px; margin: 0 auto; padding: 16px 24px 48px; }
.card { background: #fff; border: 1px solid #d0d7de; border-radius: 6px; padding: 12px 16px; margin-bottom: 16px; }
.card h3 { margin: 0 0 8px; font-size: 15px; }
.muted { color: #656d76; }
.row-error { color: #a8071a; }
.error { background: #fff1f0; border: 1px solid #ffa39e; color: #a8071a; border-radius: 6px; padding: 12px 16px;
         margin: 16px 0; font-size: 15px; }
.grid { display: grid; grid-template-columns: minmax(0, 3fr) minmax(0, 2fr); gap: 16px; }
.stats { display: flex; gap: 28px; flex-wrap: wrap; }
.stat .label { color: #656d76; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
.stat .value { font-size: 18px; font-weight: 600; font-variant-numeric: tabular-nums; }
table.tbl { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
table.tbl th, table.tbl td { padding: 4px 8px; border-bottom: 1px solid #eaeef2; text-align: left; vertical-align: top; }
table.tbl th { font-size: 12px; color: #656d76; font-weight: 600; }
table.tbl .num { text-align: right; }
.example { display: flex; gap: 10px; align-items: baseline; padding: 3px 0; border-bottom: 1px solid #f0f2f4; }
.example .act { flex: 0 0 52px; text-align: right; color: #656d76; font-family: ui-monospace, monospace; font-size: 12px; }
.context { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 13px; line-height: 1.9;
           white-space: pre-wrap; word-break: break-word; }
.tok { border-radius: 3px; padding: 1px 0; }
.tok.centre { outline: 1.5px solid #c2410c; font-weight: 700; }
.bin { margin-top: 10px; } .bin h4 { margin: 4px 0; font-size: 13px; color: #656d76; font-weight: 600; }
.chips { display: flex; flex-wrap: wrap; gap: 6px; }
.chip { border: 1px solid #d0d7de; border-radius: 12px; padding: 1px 9px; font-size: 12px; background: #fff;
        font-variant-numeric: tabular-nums; white-space: nowrap; }
.form { display: flex; gap: 10px; align-items: center; flex-wrap: wrap; margin-bottom: 8px; }
.form input, .form textarea, .form button { font-size: 14px; padding: 6px 8px; border: 1px solid #d0d7de; border-radius: 6px; }
.form button.go { background: #1f883d; color: #fff; border-color: #1a7f37; cursor: pointer; }
.sae-select { min-width: 420px; }
.form .field { width: 320px; }
.pager { float: right; display: flex; gap: 16px; }
"""


def page_url(page: str, **params: Any) -> str:
    """A shareable URL of a page, e.g. `/feature?hook=...&sae=...&id=3`."""
    return f"/{page}?{urlencode({k: v for k, v in params.items() if v is not None})}"


def feature_url(info: SaeInfo, index: int) -> str:
    return _feature_urls(info.hook, info.variant) + str(index)


@functools.lru_cache(maxsize=256)
def _feature_urls(hook: str, variant: str) -> str:
    """The URL of the SAE's feature pages up to the latent's id (a feature page links to ~20 others)."""
    return page_url("feature", hook=hook, sae=variant) + "&id="


def feature_link(info: SaeInfo, index: int, label: str | None = None) -> dcc.Link:
    return dcc.Link(label or f"#{index}", href=feature_url(info, index))


def error_box(message: str) -> html.Div:
    """A clear, visible message in place of a page or panel that cannot be shown."""
    return html.Div(message, className="error", role="alert")


def _failure(err: Exception, where: str, what: str) -> html.Div:
    """The error box for an exception: a `SaelabError`'s own message; for anything else (a bug, not bad input,
    which the pages and callbacks refuse before it gets this far) its type, with the traceback in the log."""
    if isinstance(err, SaelabError):
        return error_box(str(err))
    log.exception("%s failed", where)
    return error_box(f"This {what} could not be built: {type(err).__name__}: {err}")


def guarded(page: Callable[P, Any]) -> Callable[P, Any]:
    """A page (or a panel of one) that shows its errors in an error box instead of raising them."""

    @functools.wraps(page)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
        try:
            return page(*args, **kwargs)
        except Exception as err:
            return _failure(err, page.__name__, "page")

    return wrapper


def guarded_callback(outputs: int, message: int) -> Callable[[Callable[P, Any]], Callable[P, Any]]:
    """A callback of `outputs` outputs that, on an error, leaves them as they are except output `message`, which
    shows the error box. `PreventUpdate` (a callback declining to act) passes through."""

    def decorate(callback: Callable[P, Any]) -> Callable[P, Any]:
        @functools.wraps(callback)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Any:
            try:
                return callback(*args, **kwargs)
            except PreventUpdate:
                raise
            except Exception as err:
                answer: list[Any] = [dash.no_update] * outputs
                answer[message] = _failure(err, callback.__name__, "request")
                return tuple(answer)

        return wrapper

    return decorate


def data(**values: str) -> dict[str, Any]:
    """HTML `data-*` attributes for a component (`**data(doc="3")` gives `data-doc="3"`); their dash-case names
    are no Python keywords."""
    return {f"data-{key}": value for key, value in values.items()}


def card(title: str | None, *children: Any, **kwargs: Any) -> html.Div:
    return html.Div([html.H3(title) if title else None, *children], className="card", **kwargs)


def stat(label: str, value: str) -> html.Div:
    return html.Div([html.Div(label, className="label"), html.Div(value, className="value")], className="stat")


def fmt(x: Any) -> str:
    """A number for a table cell: 4 significant digits, blank when missing."""
    value = finite(x)
    return "" if value is None else f"{value:.4g}"


def spread_row(label: str, spread: Spread, size: int) -> html.Tr:
    """A row of a faithfulness table (`spread_head`): `spread` at the largest measured size up to `size`."""
    i = max((k for k, n in enumerate(spread["n"]) if n <= size), key=lambda k: spread["n"][k], default=0)
    low, high = spread["faithfulness_ci"][i]
    lo, hi = spread["faithfulness_range"][i]
    c_low, c_high = spread["completeness_ci"][i]
    cells = [
        str(spread["examples"]),
        str(spread["n"][i]),
        fmt(spread["faithfulness"][i]),
        f"[{fmt(low)}, {fmt(high)}]",
        f"{fmt(lo)} to {fmt(hi)}",
        f"{fmt(spread['completeness'][i])} [{fmt(c_low)}, {fmt(c_high)}]",
    ]
    return html.Tr([html.Td(label), *[html.Td(x, className="num") for x in cells]])


def spread_head(first: str) -> html.Tr:
    """The header of a faithfulness table whose rows are `spread_row`s, `first` naming its first column."""
    columns = ("examples", "nodes", "faithfulness", "95% CI", "per example", "completeness [95% CI]")
    return html.Tr([html.Th(first), *[html.Th(t, className="num") for t in columns]])


Element = dict[str, Any]
"""A component in the form Dash sends it to the browser (`element`)."""
DCC = "dash_core_components"
"""The `namespace` of `dcc` components' `element`s."""


def element(tag: str, children: Any = None, *, namespace: str = "dash_html_components", **props: Any) -> Element:
    """The component `html.<tag>(children, **props)` (`dcc.<tag>` with `namespace=DCC`) as Dash sends it to the
    browser, its `to_plotly_json()`, built directly (no `children` prop when they are None). For pages of many
    small pieces (a feature page has ~700: token spans, table cells, links, the cards around them): a Dash
    component object costs ~20 µs to build and as much again to serialise, this dict ~1 µs, and the browser renders
    the same. (Dash's types know only component objects, so a component given `element`s as children says
    `pyright: ignore`.)"""
    return {
        "type": tag,
        "namespace": namespace,
        "props": props if children is None else {"children": children, **props},
    }


def card_element(title: str | None, *children: Any, **props: Any) -> Element:
    """`card` as an `element`."""
    return element("Div", [element("H3", title) if title else None, *children], className="card", **props)


def stat_element(label: str, value: str) -> Element:
    """`stat` as an `element`."""
    return element(
        "Div", [element("Div", label, className="label"), element("Div", value, className="value")], className="stat"
    )


def link_element(info: SaeInfo, index: int, label: str | None = None) -> Element:
    """`feature_link` as an `element`."""
    return element("Link", label or f"#{index}", namespace=DCC, href=feature_url(info, index))


def histogram(counts: np.ndarray, edges: np.ndarray) -> Element:
    """The activation histogram as a bar chart (`saelab.plots.histogram_figure`)."""
    return element(
        "Graph",
        namespace=DCC,
        figure=histogram_figure(counts, edges),
        config={"displayModeBar": False},
        id="feature-histogram",
    )


def decoder_norm_bars(sources: list[str], norms: np.ndarray) -> Element:
    """A crosscoder latent's decoder norm per source as a bar chart (`saelab.plots.decoder_norms_figure`)."""
    return element(
        "Graph",
        namespace=DCC,
        figure=decoder_norms_figure(sources, norms),
        config={"displayModeBar": False},
        id="decoder-norms",
    )


def token_value_table(vocab: list[str], pairs: Sequence[tuple[int, float]], header: str) -> Element:
    body = [
        element(
            "Tr",
            [element("Td", element("Code", repr(token_text(vocab, t)))), element("Td", f"{v:+.3f}", className="num")],
        )
        for t, v in pairs
    ]
    head = element("Tr", [element("Th", header), element("Th", "value", className="num")])
    return element("Table", [element("Thead", head), element("Tbody", body)], className="tbl")


def _chip_links(info: SaeInfo, pairs: Sequence[tuple[int, float]], label: str) -> list[Element]:
    return [
        element("Span", link_element(info, i, " ".join(filter(None, [f"#{i}", label, f"{v:.2f}"]))), className="chip")
        for i, v in pairs
    ]


def chips(info: SaeInfo, pairs: Sequence[tuple[int, float]], label: str) -> Element:
    """Links to other latents' pages, each with a score (cosine, Jaccard or activation)."""
    return element("Div", _chip_links(info, pairs, label), className="chips")


def latent_chips(info: SaeInfo, pairs: Sequence[tuple[int, float]], label: str) -> html.Div:
    """`chips` as a Dash component."""
    return html.Div(_chip_links(info, pairs, label), className="chips")  # pyright: ignore[reportArgumentType]  (`element`s)


def navigation(app: dash.Dash, error: str, *dependencies: Input | State) -> Callable[[Callable[..., str]], Any]:
    """Register a form's callback on `app`: it reads `dependencies` and returns the URL of the form's result, which
    the app navigates to (so results are pages, shareable, and the back button works); its errors show in an
    error box in component `error` instead."""

    def decorate(make_url: Callable[..., str]) -> Any:
        @app.callback(
            Output("url", "href", allow_duplicate=True),
            Output(error, "children", allow_duplicate=True),
            *dependencies,
            prevent_initial_call=True,
        )
        @guarded_callback(outputs=2, message=1)
        @functools.wraps(make_url)
        def navigate(*values: Any) -> tuple[str, None]:
            return make_url(*values), None

        return navigate

    return decorate


def sae_options(run: str) -> list[dict[str, Any]]:
    """SAE dropdown options: one per SAE of the run, valued `hook|variant`; a broken SAE's is disabled and says
    so (its page, if opened by URL, shows why)."""
    return [
        {"label": f"{s.hook} · {s.variant}", "value": f"{s.hook}|{s.variant}"}
        if s.error is None
        else {"label": f"{s.hook} · {s.variant} (cannot be read)", "value": f"{s.hook}|{s.variant}", "disabled": True}
        for s in list_saes(run)
    ]


def sae_dropdown(run: str, info: SaeInfo, component_id: str) -> dcc.Dropdown:
    """A dropdown of the run's SAEs with `info` chosen."""
    return dcc.Dropdown(
        sae_options(run), f"{info.hook}|{info.variant}", id=component_id, clearable=False, className="sae-select"
    )


def _browse(info: SaeInfo, store_model: str, analysis: str | None) -> Any:
    """An SAE's links into its features, search and prompt, or why they cannot be followed: the SAE cannot be
    read, was trained on another model than `store_model` (the one that made its arrays, `made_by`), its analysis is
    missing (`NO_ANALYSIS`) or cannot be read (`analysis`)."""
    prompt = dcc.Link("prompt", href=page_url("prompt", hook=info.hook, sae=info.variant))
    if info.error is not None:
        return html.Span(info.error, className="row-error")
    if info.model_name and store_model and info.model_name != store_model:
        return html.Span(f"trained on {info.model_name!r}, not {store_model!r}", className="muted")
    if analysis == NO_ANALYSIS:
        return html.Span([html.Span(NO_ANALYSIS, className="muted"), " · ", prompt])
    if analysis is not None:
        return html.Span([html.Span(analysis, className="row-error"), " · ", prompt])
    return html.Span(
        [
            feature_link(info, 0, "features"),
            " · ",
            dcc.Link("search", href=page_url("search", hook=info.hook, sae=info.variant)),
            " · ",
            prompt,
        ]
    )


def metrics_table(
    run_saes: list[SaeInfo], made_by: Mapping[tuple[str, str], str], analyses: Mapping[tuple[str, str], str | None]
) -> html.Table:
    """One row per SAE: its training metrics and links into its features; `made_by` holds, per (hook, variant), the
    model that made the arrays it reads (`saelab.dashboards.data.made_by`), and `analyses` why its features cannot
    be browsed (`saelab.dashboards.data.analysis_problem`; None: they can). A broken SAE's row shows its error."""
    cols = [("fvu", "FVU"), ("l0", "L0"), ("dead_frac", "dead"), ("dense_frac", "dense"), ("ce_loss_score", "CE score")]
    head = html.Tr(
        [
            html.Th("hook"),
            html.Th("variant"),
            html.Th("arch"),
            html.Th("k", className="num"),
            html.Th("width", className="num"),
            *[html.Th(t, className="num") for _, t in cols],
            html.Th("browse"),
        ]
    )
    rows = []
    for s in run_saes:
        m = s.metrics
        browse = _browse(s, made_by.get((s.hook, s.variant), ""), analyses.get((s.hook, s.variant)))
        rows.append(
            html.Tr(
                [
                    html.Td(s.hook),
                    html.Td(s.variant),
                    html.Td(str(m.get("arch", ""))),
                    html.Td(str(m.get("k", "")), className="num"),
                    html.Td(str(m.get("width", "")), className="num"),
                    *[html.Td(fmt(m.get(key)) if "stopped" not in m else "", className="num") for key, _ in cols],
                    html.Td(html.Span(str(m["stopped"]), className="muted") if "stopped" in m else browse),
                ]
            )
        )
    return html.Table([html.Thead(head), html.Tbody(rows)], className="tbl", id="sae-table")
