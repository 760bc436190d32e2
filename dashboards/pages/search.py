"""The search page (`/search?hook=H&sae=VARIANT&q=TEXT`): find latents by token or by their contrastive label
(`saelab.analysis.labels`), or open one by its id."""

from __future__ import annotations

from typing import Any

from dash import Dash, Input, State, dcc, html
from dash.exceptions import PreventUpdate

from saelab.analysis.labels import label_text, search_labels
from saelab.dashboards import components as c
from saelab.dashboards import params as p
from saelab.dashboards.data import SaeInfo, check_model, chosen_sae, feature_store
from saelab.dashboards.live import search_token
from saelab.errors import SaelabError

TITLE = "Find features"
NAV = True
MAX_LABELLED = 100  # latents listed by label (the best matching first)


@c.guarded
def layout(run: str, params: p.Params) -> Any:
    """Find latents by index or by token."""
    info = chosen_sae(run, params)
    form = c.card(
        None,
        html.Div(["SAE", c.sae_dropdown(run, info, "search-sae")], className="form"),
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
                    placeholder="a token, some text or a label's words, e.g. return",
                    className="field",
                ),
                html.Button("Search by token and label", id="search-token-go", className="go"),
            ],
            className="form",
        ),
        html.Div(id="search-error"),
    )
    text = p.text(params["q"], "search text") if "q" in params else None
    results = None if text is None else [token_results(run, info, text), label_results(run, info, text)]
    return html.Div([html.H2("Find features"), form, html.Div(results, id="search-results")])


@c.guarded
def label_results(run: str, info: SaeInfo, text: str) -> Any:
    """The latents whose contrastive label holds `text` as whole words, each with its label, best score first."""
    fs = feature_store(run, info)
    try:
        tokens, scores = fs.column("label_tokens"), fs.column("label_scores")
    except SaelabError as err:
        return c.card("Latents by label", html.P(f"labels not searched: {err}", className="muted"), id="label-results")
    found = search_labels(tokens, scores, fs.vocab, text) if text.strip() else []
    chips = [
        html.Span(c.feature_link(info, i, f"#{i} {label_text(tokens[i], fs.vocab)}"), className="chip")
        for i in found[:MAX_LABELLED]
    ]
    shown = f" (the best {MAX_LABELLED} of {len(found)})" if len(found) > MAX_LABELLED else f" ({len(found)})"
    body = html.Span(chips, className="chips") if chips else html.P(f"no label holds {text!r}", className="muted")
    return c.card(f"Latents by label{shown}", body, id="label-results")


@c.guarded
def token_results(run: str, info: SaeInfo, text: str) -> Any:
    """The latents that involve each token of `text`."""
    check_model(run, info)
    rows = []
    for token_id, string, latents in search_token(run, info, text):
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


def _field(name: str) -> list[Input | State]:
    """A form field `name` with its button `name-go`: a click or Enter submits its value, with the chosen SAE."""
    return [
        Input(f"{name}-go", "n_clicks"),
        Input(name, "n_submit"),
        State(name, "value"),
        State("search-sae", "value"),
    ]


def register(app: Dash, run: str) -> None:
    """The forms navigate to the URL of their result (a feature page, a search), so results can be shared."""

    @c.navigation(app, "search-error", *_field("search-id"))
    def open_feature(clicks: Any, submits: Any, index: Any, sae: Any) -> str:
        if not p.clicks(clicks, submits):
            raise PreventUpdate
        return c.page_url("feature", **p.sae_choice(sae), id=p.text(index, "feature id").strip())

    @c.navigation(app, "search-error", *_field("search-token"))
    def search(clicks: Any, submits: Any, text: Any, sae: Any) -> str:
        if not p.clicks(clicks, submits):
            raise PreventUpdate
        return c.page_url("search", **p.sae_choice(sae), q=p.text(text, "search text"))
