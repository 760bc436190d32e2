"""The steering page (`/steering?hook=H&sae=V&latent=N&mode=add&coef=4&scope=all&text=PROMPT`): steer the run's
model with one SAE latent and see what changes. Decoders: the prompt continued without and with steering, side by
side, with KL and perplexity. Encoders: a query's nearest documents of the run's corpus before and after steering
its sentence embedding, and the latent's activation on each."""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import Any, Literal, get_args

import torch
from dash import Dash, Input, State, dcc, html
from dash.exceptions import PreventUpdate

from saelab import steering as st
from saelab.config import TextConfig
from saelab.dashboards import components as c
from saelab.dashboards import params as p
from saelab.dashboards.data import SaeInfo, check_model, chosen_sae, open_store
from saelab.dashboards.live import framed, live_model, load_sae, one_model, run_model
from saelab.errors import RunError
from saelab.models import is_encoder
from saelab.store import split_array
from saelab.text import iter_documents

TITLE = "Steering"
NAV = True
CORPUS_DOCUMENTS = 200  # the run's first documents, searched by the encoder view
MAX_NEW_TOKENS = 40  # tokens generated when the model's context has room for them after the prompt
QUERY_TOKENS = 256  # tokens of a query that `st.search` embeds (`st.embed`'s `max_length`)
MODES: tuple[st.Mode, ...] = get_args(st.Mode)
ScopeName = Literal["all", "prompt", "generated"]
SCOPES: tuple[ScopeName, ...] = ("all", "prompt", "generated")


@lru_cache(maxsize=2)
def _corpus(run: str, array: str) -> tuple[list[str], torch.Tensor]:
    """The first documents of the run's text source and their sentence embeddings by the model that made the store's
    array `array` (once per process)."""
    text = open_store(run).text  # its file found from where the run is now (runs move)
    try:
        docs = list(itertools.islice(iter_documents(TextConfig(**text)), CORPUS_DOCUMENTS))
    except Exception as err:
        raise RunError(
            f"Cannot read the run's text source ({type(err).__name__}: {err}), so there is no corpus to search."
        ) from None
    if len(docs) < 10:
        raise RunError(f"The run's text source has {len(docs)} documents; semantic search needs at least 10.")
    with live_model(run, array) as model:
        return docs, st.embed(model, docs, max_length=128)


@lru_cache(maxsize=4)
def _doc_acts(run: str, array: str, path: str) -> torch.Tensor:
    """The latents of the SAE at `path` (of the store's array `array`) on each corpus document."""
    docs, _ = _corpus(run, array)
    with live_model(run, array) as model:
        return st.doc_latent_acts(model, load_sae(path), split_array(array)[1], texts=docs, max_length=128)


@lru_cache(maxsize=64)
def _scale(run: str, path: str, array: str, latent: int) -> tuple[float, str]:
    return st.run_scale(run, path, load_sae(path), latent=latent, hook=array)


def _request(run: str, info: SaeInfo, params: p.Params) -> st.Intervention:
    """The intervention the URL asks for; `RequestError` (or `SteeringError`) naming what is wrong with it."""
    array, hook = one_model(info, "steering page")
    sae = load_sae(str(info.path))
    latent = p.feature_id(params.get("latent", "0"), sae.cfg.d_sae)
    mode: st.Mode = p.choice(params.get("mode"), "steering mode", MODES, default="add", listing="Modes")
    scope: ScopeName = p.choice(params.get("scope"), "scope", SCOPES, default="all", listing="Scopes")
    coefficient = p.number(
        params.get("coef"), "coefficient", default=4.0, low=-p.MAX_COEFFICIENT, high=p.MAX_COEFFICIENT
    )
    scale, _ = _scale(run, str(info.path), array, latent)
    iv = st.Intervention(
        hook=hook, sae=sae, latents=[latent], mode=mode, coefficient=coefficient, scale=scale, scope=scope
    )
    st.check_interventions(run_model(run, array), [iv], embedding=hook == st.EMBEDDING)
    return iv


def _dropdown(options: tuple[str, ...], value: str, component_id: str, width: str) -> dcc.Dropdown:
    return dcc.Dropdown(list(options), value, id=component_id, clearable=False, style={"width": width})


def _form(run: str, info: SaeInfo, params: p.Params, encoder: bool) -> html.Div:
    field = "query" if encoder else "prompt"
    latent = params.get("latent", "")
    return c.card(
        None,
        html.Div(["SAE", c.sae_dropdown(run, info, "steer-sae")], className="form"),
        html.Div(
            [
                "latent",
                dcc.Input(id="steer-latent", type="text", value=params.get("latent", "0"), style={"width": "80px"}),
                "mode",
                _dropdown(MODES, params.get("mode") or "add", "steer-mode", "140px"),
                "coefficient (x typical max activation)",
                dcc.Input(id="steer-coef", type="text", value=params.get("coef", "4"), style={"width": "70px"}),
                html.Span(
                    [
                        "scope",
                        _dropdown(SCOPES, params.get("scope") or "all", "steer-scope", "160px"),
                    ],
                    className="form",
                    style={"display": "none"} if encoder else None,
                ),
            ],
            className="form",
        ),
        html.Div(
            [
                dcc.Textarea(
                    id="steer-text",
                    value=params.get("text", ""),
                    placeholder=f"Type a {field}…",
                    style={"width": "100%", "height": "60px"},
                )
            ],
            className="form",
        ),
        html.Div(
            [
                html.Button("Steer", id="steer-go", className="go"),
                c.feature_link(info, int(latent), "the latent's feature page")
                if latent.isascii() and latent.isdigit() and len(latent) <= p.MAX_DIGITS
                else None,
            ],
            className="form",
        ),
        html.Div(id="steer-error"),
    )


@c.guarded
def layout(run: str, params: p.Params) -> Any:
    """Pick an SAE, a latent, a mode and a coefficient; see generations or search results with and without it."""
    info = chosen_sae(run, params)
    check_model(run, info)
    encoder = is_encoder(run_model(run, one_model(info, "steering page")[0]))
    results = None
    if "text" in params:
        text = p.text(params["text"], "query" if encoder else "prompt")
        iv = _request(run, info, params)
        results = (search_results if encoder else generation_results)(run, info, iv, text)
    kind = "the query's nearest documents in the run's corpus" if encoder else "the prompt's continuation"
    return html.Div(
        [
            html.H2("Steering"),
            html.Div(f"Steer one latent of an SAE and compare {kind} with and without it.", className="muted"),
            _form(run, info, params, encoder),
            html.Div(results, id="steer-results"),
        ],
        id="steering-page",
    )


def _stats(iv: st.Intervention, source: str, extra: list[tuple[str, str]]) -> html.Div:
    items = [
        ("latent", str(iv.latents[0])),
        ("mode", iv.mode),
        ("coefficient", c.fmt(iv.coefficient)),
        ("typical max act", f"{c.fmt(iv.scale)} ({source.split(':')[0]})"),
        *extra,
    ]
    return html.Div([c.stat(k, v) for k, v in items], className="stats", id="steer-stats")


@c.guarded
def generation_results(run: str, info: SaeInfo, iv: st.Intervention, text: str) -> Any:
    """The prompt's continuation without and with the intervention, and what it changed: `MAX_NEW_TOKENS` new
    tokens, or as many as the model's context leaves after the prompt."""
    with live_model(run, info.array) as model:
        n = framed(model, text, "prompt", keep=1).tokens.shape[1]
        new = min(MAX_NEW_TOKENS, st.new_token_budget(model, n))
        tokens = st.generate(model, text, [iv], max_new_tokens=new)
        plain = st.continuation(model, st.generate(model, text, (), max_new_tokens=new), n)
        metrics = st.steered_metrics(model, tokens, n, intervention=iv)
        steered = st.continuation(model, tokens, n)
        n_ctx = model.cfg.n_ctx

    def column(title: str, body: str, testid: str) -> html.Div:
        return c.card(title, html.Div([html.B(text), html.Span(body)], className="context", id=testid))

    _, source = _scale(run, str(info.path), info.array, iv.latents[0])
    stats = _stats(
        iv,
        source,
        [
            ("scope", str(iv.scope)),
            (
                "new tokens",
                str(new) if new == MAX_NEW_TOKENS else f"{new} (all that the model's {n_ctx}-token context leaves)",
            ),
            ("KL from unsteered", c.fmt(metrics.kl)),
            ("perplexity (unsteered model)", c.fmt(metrics.perplexity)),
            ("latent act after edit", c.fmt(metrics.latent_act)),
            ("latent act on the text", c.fmt(metrics.latent_act_text)),
        ],
    )
    return html.Div(
        [
            c.card(None, stats),
            html.Div(
                [column("Unsteered", plain, "steer-unsteered"), column("Steered", steered, "steer-steered")],
                style={"display": "grid", "gridTemplateColumns": "1fr 1fr", "gap": "16px"},
            ),
        ]
    )


@c.guarded
def search_results(run: str, info: SaeInfo, iv: st.Intervention, query: str) -> Any:
    """The query's nearest documents of the run's corpus before and after steering its embedding."""
    with live_model(run, info.array) as model:
        framed(model, query, "query", context=QUERY_TOKENS)
        docs, corpus = _corpus(run, info.array)
        acts = _doc_acts(run, info.array, str(info.path))[:, iv.latents[0]]
        found = st.search(model, query, corpus, [iv], k=10)

    def table(pairs: list[tuple[int, float]], changed: set[int], testid: str) -> html.Table:
        rows = [
            html.Tr(
                [
                    html.Td(str(r + 1), className="num"),
                    html.Td(f"{score:.3f}", className="num"),
                    html.Td(f"{float(acts[i]):.3f}", className="num"),
                    html.Td(
                        docs[i][:160] + ("…" if len(docs[i]) > 160 else ""),
                        style={"fontWeight": 600} if i in changed else None,
                    ),
                ],
                **c.data(doc=str(i)),
            )
            for r, (i, score) in enumerate(pairs)
        ]
        head = html.Tr(
            [
                html.Th("#", className="num"),
                html.Th("cosine", className="num"),
                html.Th("latent", className="num"),
                html.Th("document"),
            ]
        )
        return html.Table([html.Thead(head), html.Tbody(rows)], className="tbl", id=testid)

    mean = lambda pairs: float(acts[[i for i, _ in pairs]].mean())  # noqa: E731
    _, source = _scale(run, str(info.path), info.array, iv.latents[0])
    stats = _stats(
        iv,
        source,
        [
            ("new neighbours", str(len(found.entered))),
            ("latent on neighbours", f"{mean(found.before):.3f} → {mean(found.after):.3f}"),
        ],
    )
    note = html.Div(
        f"Corpus: the run's first {len(docs)} documents. 'latent': the latent's activation on the document "
        "(mean over its tokens, or on its embedding for an SAE of sentence embeddings). Bold: documents "
        "that steering brought in or sent away.",
        className="muted",
    )
    return html.Div(
        [
            c.card(None, stats, note),
            html.Div(
                [
                    c.card("Neighbours before steering", table(found.before, set(found.left), "steer-before")),
                    c.card("Neighbours after steering", table(found.after, set(found.entered), "steer-after")),
                ],
                style={"display": "grid", "gridTemplateColumns": "1fr 1fr", "gap": "16px"},
            ),
        ]
    )


def register(app: Dash, run: str) -> None:
    """The form navigates to the URL of its result, so every steered view can be shared."""

    fields = ("sae", "latent", "mode", "coef", "scope", "text")

    @c.navigation(app, "steer-error", Input("steer-go", "n_clicks"), *[State(f"steer-{f}", "value") for f in fields])
    def steer_url(clicks: Any, sae: Any, latent: Any, mode: Any, coef: Any, scope: Any, text: Any) -> str:
        if not p.clicks(clicks):
            raise PreventUpdate
        return c.page_url(
            "steering",
            **p.sae_choice(sae),
            latent=p.text(latent, "latent").strip(),
            mode=p.choice(mode, "steering mode", MODES, default="add", listing="Modes"),
            coef=p.text(coef, "coefficient").strip(),
            scope=p.choice(scope, "scope", SCOPES, default="all", listing="Scopes"),
            text=p.text(text, "prompt"),
        )
