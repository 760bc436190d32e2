"""The feature browser: a Dash app over one run directory (`saelab serve RUN_DIR`).

Pages, all addressed by their URL so any view can be shared:

    /                                         the run: hook points, SAEs and metrics, the sweep's Pareto plot
    /feature?hook=H&sae=VARIANT&id=N          one latent: stats, examples, histogram, logit effects, neighbours
    /search?hook=H&sae=VARIANT&q=TEXT         latents by token (or open one by id)
    /prompt?hook=H&sae=VARIANT&text=TEXT      the model and SAE run live on a prompt
    /circuits?name=NAME                       a sparse feature circuit (`saelab circuit`): graph and faithfulness
    /steering?hook=H&sae=VARIANT&latent=N&mode=add&coef=4&text=TEXT   steer with a latent: generations or search
    /absorption?hook=H&sae=VARIANT&label=L    feature absorption (`saelab absorption`): labels, cases, sweep
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from dash import Dash, Input, Output, State, dcc, html
from dash.exceptions import PreventUpdate

from saelab.dashboards import absorption, circuits, pages, steering
from saelab.dashboards.components import STYLE, error_box, page_url

INDEX = (
    """<!DOCTYPE html>
<html>
<head>{%metas%}<title>{%title%}</title>{%favicon%}{%css%}<style>"""
    + STYLE
    + """</style></head>
<body>{%app_entry%}<footer>{%config%}{%scripts%}{%renderer%}</footer></body>
</html>"""
)


def _nav() -> html.Div:
    return html.Div(
        [
            html.Span("saelab", className="brand"),
            dcc.Link("Run", href="/"),
            dcc.Link("Find features", href="/search"),
            dcc.Link("Prompt", href="/prompt"),
            dcc.Link("Circuits", href="/circuits"),
            dcc.Link("Steering", href="/steering"),
            dcc.Link("Absorption", href="/absorption"),
        ],
        className="nav",
    )


def render(run_dir: str, pathname: str, search: str) -> Any:
    """The page a URL asks for."""
    params = {k: v[0] for k, v in parse_qs(search.lstrip("?"), keep_blank_values=True).items()}
    if pathname in ("/", ""):
        return pages.overview_page(run_dir)
    if pathname == "/feature":
        return pages.feature_page(run_dir, params.get("hook"), params.get("sae"), params.get("id"))
    if pathname == "/search":
        return pages.search_page(run_dir, params)
    if pathname == "/prompt":
        return pages.prompt_page(run_dir, params)
    if pathname == "/circuits":
        return circuits.circuits_page(run_dir, params)
    if pathname == "/steering":
        return steering.steering_page(run_dir, params)
    if pathname == "/absorption":
        return absorption.absorption_page(run_dir, params)
    return error_box(
        f"There is no page {pathname!r}. Pages: / (the run), /feature, /search, /prompt, "
        "/circuits, /steering, /absorption."
    )


def _require_action(*counts: int | None) -> None:
    """Dash also fires these callbacks when a page (re)inserts their form; act only on a click or Enter."""
    if not any(counts):
        raise PreventUpdate


def _sae_params(value: str | None) -> dict[str, str]:
    hook, _, variant = (value or "").partition("|")
    return {"hook": hook, "sae": variant}


def create_app(run_dir: str) -> Dash:
    """The browser for one run directory. A broken run directory still gives an app that says what is wrong."""
    run_dir = str(Path(run_dir).resolve())
    app = Dash(__name__, title="saelab", suppress_callback_exceptions=True, update_title=None)
    app.index_string = INDEX
    app.layout = html.Div(
        [dcc.Location(id="url", refresh="callback-nav"), _nav(), html.Div(id="page", className="page")]
    )

    @app.callback(Output("page", "children"), Input("url", "pathname"), Input("url", "search"))
    def route(pathname: str | None, search: str | None) -> Any:
        return render(run_dir, pathname or "/", search or "")

    # Forms navigate to the URL of their result, so results are pages too (shareable, back button works).
    @app.callback(
        Output("url", "href", allow_duplicate=True),
        Input("search-id-go", "n_clicks"),
        Input("search-id", "n_submit"),
        State("search-id", "value"),
        State("search-sae", "value"),
        prevent_initial_call=True,
    )
    def open_feature(clicks: int | None, submits: int | None, index: str | None, sae: str | None) -> str:
        _require_action(clicks, submits)
        return page_url("feature", **_sae_params(sae), id=(index or "").strip())

    @app.callback(
        Output("url", "href", allow_duplicate=True),
        Input("search-token-go", "n_clicks"),
        Input("search-token", "n_submit"),
        State("search-token", "value"),
        State("search-sae", "value"),
        prevent_initial_call=True,
    )
    def search_token(clicks: int | None, submits: int | None, text: str | None, sae: str | None) -> str:
        _require_action(clicks, submits)
        return page_url("search", **_sae_params(sae), q=text or "")

    @app.callback(
        Output("url", "href", allow_duplicate=True),
        Input("prompt-go", "n_clicks"),
        State("prompt-text", "value"),
        State("prompt-sae", "value"),
        State("prompt-top", "value"),
        prevent_initial_call=True,
    )
    def run_prompt(clicks: int | None, text: str | None, sae: str | None, top: int | None) -> str:
        _require_action(clicks)
        return page_url("prompt", **_sae_params(sae), top=top or 5, text=text or "")

    circuits.register(app, run_dir)
    steering.register(app, run_dir)
    return app


def serve(run_dir: str, host: str = "127.0.0.1", port: int = 8050) -> None:
    """Serve the browser for a run directory until interrupted."""
    app = create_app(run_dir)
    # Full garbage collections scan every tracked object (torch and the libraries hold ~500k): ~0.5 s on a
    # small CPU, landing in whichever page happens to trigger one. Freezing what is loaded by now keeps
    # them out of every collection.
    gc.freeze()
    app.run(host=host, port=port, debug=False)
