"""The prompt page (`/prompt?hook=H&sae=VARIANT&text=TEXT`): the model and the SAE run live on a prompt, and each
token's strongest latents are listed, each with its contrastive label (`saelab.analysis.labels`)."""

from __future__ import annotations

from typing import Any

from dash import Dash, Input, State, dcc, html
from dash.exceptions import PreventUpdate

from saelab.analysis.features import FeatureStore
from saelab.analysis.labels import label_text
from saelab.dashboards import components as c
from saelab.dashboards import params as p
from saelab.dashboards.data import SaeInfo, chosen_sae, feature_store
from saelab.dashboards.live import prompt_latents
from saelab.errors import SaelabError

TITLE = "Prompt"
NAV = True
MAX_TOP = 20  # latents listed per token at most


def _top(value: Any) -> int:
    return p.integer(5 if value in (None, "") else value, "number of latents per token", low=1, high=MAX_TOP)


@c.guarded
def layout(run: str, params: p.Params) -> Any:
    """Type text; the model and SAE run live and show each token's strongest latents."""
    info = chosen_sae(run, params)
    top = _top(params.get("top"))
    form = c.card(
        None,
        html.Div(["SAE", c.sae_dropdown(run, info, "prompt-sae")], className="form"),
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
                dcc.Input(id="prompt-top", type="number", min=1, max=MAX_TOP, value=top, style={"width": "70px"}),
                html.Button("Run", id="prompt-go", className="go"),
            ],
            className="form",
        ),
        html.Div(id="prompt-error"),
    )
    results = prompt_results(run, info, p.text(params["text"], "prompt"), top=top) if "text" in params else None
    return html.Div([html.H2("Prompt"), form, html.Div(results, id="prompt-results")])


@c.guarded
def prompt_results(run: str, info: SaeInfo, text: str, *, top: int) -> Any:
    """Each token of `text` with its `top` strongest latents."""
    rows = prompt_latents(run, info, text, top=top)
    labels, unlabelled = _labels(feature_store(run, info))
    body = [
        html.Tr(
            [
                html.Td(html.Code(repr(r.token))),
                html.Td(
                    _labelled_chips(info, labels, r.latents) if r.latents else html.Span("none", className="muted")
                ),
            ]
        )
        for r in rows
    ]
    table = html.Table(
        [html.Thead(html.Tr([html.Th("token"), html.Th("latents (activation)")])), html.Tbody(body)], className="tbl"
    )
    note = [] if unlabelled is None else [html.P(unlabelled, className="muted")]
    return c.card(f"Top latents per token ({info.hook} · {info.variant})", html.Div([*note, table]))


def _labels(fs: FeatureStore) -> tuple[list[str] | None, str | None]:
    """Each latent's contrastive label's first n-gram, or None and why not (an analysis written before labels, or
    one whose labels cannot be read: the latents are shown all the same, and their feature pages show the damage)."""
    try:
        tokens = fs.column("label_tokens")
    except SaelabError as err:
        return None, f"labels not shown: {err}"
    return [label_text(t[:1], fs.vocab) for t in tokens], None


def _labelled_chips(info: SaeInfo, labels: list[str] | None, pairs: list[tuple[int, float]]) -> html.Div:
    """Links to the latents' pages, each with its contrastive label's first n-gram (where the analysis has labels)
    and its activation."""
    links = []
    for i, v in pairs:
        label = "" if labels is None else labels[i]
        links.append(
            c.element(
                "Span", c.link_element(info, i, " ".join(filter(None, [f"#{i}", label, f"{v:.2f}"]))), className="chip"
            )
        )
    return html.Div(links, className="chips")  # pyright: ignore[reportArgumentType]  (`element`s)


def register(app: Dash, run: str) -> None:
    """The form navigates to the URL of its result, so a prompt's latents can be shared."""

    @c.navigation(
        app,
        "prompt-error",
        Input("prompt-go", "n_clicks"),
        State("prompt-text", "value"),
        State("prompt-sae", "value"),
        State("prompt-top", "value"),
    )
    def run_prompt(clicks: Any, text: Any, sae: Any, top: Any) -> str:
        if not p.clicks(clicks):
            raise PreventUpdate
        return c.page_url("prompt", **p.sae_choice(sae), top=_top(top), text=p.text(text, "prompt"))
