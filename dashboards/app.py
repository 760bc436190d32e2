"""The app: a Dash server over one run directory (`saelab serve RUN_DIR`), one page per entry of `PAGES`.

Pages are addressed by their URL, so any view can be shared:

    /                                         the run: hook points, SAEs and metrics, the sweep's Pareto plot
    /feature?hook=H&sae=VARIANT&id=N          one latent: stats, examples, histogram, logit effects, neighbours
    /search?hook=H&sae=VARIANT&q=TEXT         latents by token (or open one by id)
    /prompt?hook=H&sae=VARIANT&text=TEXT      the model and SAE run live on a prompt
    /circuits?name=NAME                       a sparse feature circuit (`saelab circuit`): graph and faithfulness
    /steering?hook=H&sae=VARIANT&latent=N&mode=add&coef=4&text=TEXT   steer with a latent: generations or search
    /absorption?hook=H&sae=VARIANT&label=L    feature absorption (`saelab absorption`): labels, cases, sweep
    /model_diff?hook=H&sae=VARIANT            a crosscoder's shared and exclusive latents (`saelab diff`)
    /evals                                    every dictionary x eval (`saelab eval`), across seeds, Pareto fronts
    /families?hook=H&sae=VARIANT              an SAE's feature families: parents and children (`saelab eval`)
    /heads?hook=H&sae=VARIANT                 attention heads: composition scores (`saelab heads`), latents by head
    /graph?name=NAME                          an attribution graph over transcoders (`saelab graph`), edges by head

Every page is built server-side by its module's `layout(run, params)`; forms navigate to the URL of their result.
A `SaelabError` anywhere shows as an error box in the page; a callback request whose body does not name one of
the app's callbacks with the inputs it declares is refused with HTTP 400 before Dash reads it, and a body over
`params.MAX_BODY` bytes (1 MiB, several times the largest the pages send) with HTTP 413, unread. The pages that run
the model take turns on copies of it (`saelab.dashboards.live.live_model`), so concurrent requests never see each
other's hooks.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs

import flask
from dash import Dash, Input, Output, dcc, html

from saelab.dashboards import components as c
from saelab.dashboards import params as p
from saelab.dashboards.pages import (
    absorption,
    circuits,
    evals,
    families,
    feature,
    graph,
    heads,
    model_diff,
    overview,
    prompt,
    search,
    steering,
)

PAGES: dict[str, ModuleType] = {
    "/": overview,
    "/feature": feature,
    "/search": search,
    "/prompt": prompt,
    "/circuits": circuits,
    "/steering": steering,
    "/absorption": absorption,
    "/model_diff": model_diff,
    "/evals": evals,
    "/families": families,
    "/heads": heads,
    "/graph": graph,
}
"""The app's pages by path: each module has `TITLE`, `NAV` (whether the nav links to it), `layout(run, params)`,
and `register(app, run)` when it has callbacks."""

CALLBACK_PATH = "/_dash-update-component"

INDEX = (
    """<!DOCTYPE html>
<html>
<head>{%metas%}<title>{%title%}</title>{%favicon%}{%css%}<style>"""
    + c.STYLE
    + """</style></head>
<body>{%app_entry%}<footer>{%config%}{%scripts%}{%renderer%}</footer></body>
</html>"""
)


def _nav() -> html.Div:
    links = [dcc.Link(page.TITLE, href=path) for path, page in PAGES.items() if page.NAV]
    return html.Div([html.Span("saelab", className="brand"), *links], className="nav")


@c.guarded
def render(run: str, pathname: Any, search: Any) -> Any:
    """The page a URL (its path and its query string) asks for."""
    path = p.text(pathname, "page path", max_chars=1_000) or "/"
    query = p.text(search, "query string").lstrip("?")
    page = PAGES.get(path)
    if page is None:
        known = ", ".join(f"{name} ({module.TITLE.lower()})" for name, module in PAGES.items())
        return c.error_box(f"There is no page {path[:200]!r}. Pages: {known}.")
    params = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
    return page.layout(run, params)


def _malformed(app: Dash, body: Any) -> str | None:
    """What is wrong with a callback request's body, or None when it names one of `app`'s callbacks with the
    outputs, inputs and state that callback declares (their values are each callback's to check)."""
    if not isinstance(body, dict):
        return "the body is not a JSON object"
    spec = app.callback_map.get(body.get("output")) if isinstance(body.get("output"), str) else None
    if spec is None:
        return "it names no callback of this app"
    outputs = body.get("outputs")
    if isinstance(spec["output"], list):  # several outputs: a list of them (one output: that output alone)
        if not isinstance(outputs, list) or len(outputs) != len(spec["output"]):
            return f"its outputs are not the callback's {len(spec['output'])}"
    elif not isinstance(outputs, dict):
        return "its output is not the callback's one"
    if not all(isinstance(o, dict) for o in (outputs if isinstance(outputs, list) else [outputs])):
        return "its outputs are not objects"
    for part, declared in (("inputs", spec["inputs"]), ("state", spec["state"])):
        given = body.get(part, [])
        if not isinstance(given, list) or len(given) != len(declared):
            return f"its {part} are not the callback's {len(declared)}"
        for item, want in zip(given, declared):
            if not isinstance(item, dict) or (item.get("id"), item.get("property")) != (want["id"], want["property"]):
                return f"its {part} are not the callback's ({want['id']}.{want['property']} expected)"
    changed = body.get("changedPropIds", [])
    if not isinstance(changed, list) or not all(isinstance(x, str) for x in changed):
        return "changedPropIds is not a list of names"
    return None


def _refuse_malformed_callbacks(app: Dash) -> None:
    """Answer HTTP 400 to callback requests that Dash itself would fail on with a 500 (a script's, not the page's)."""

    @app.server.before_request
    def check() -> flask.Response | None:
        if flask.request.path != CALLBACK_PATH or flask.request.method != "POST":
            return None
        problem = _malformed(app, flask.request.get_json(silent=True))
        if problem is None:
            return None
        message = json.dumps({"error": f"not a request this app answers: {problem}"})
        return flask.Response(message, status=400, mimetype="application/json")


def _limit_bodies(app: Dash) -> None:
    """Refuse request bodies over `params.MAX_BODY` bytes with HTTP 413 and a message that says the limit."""
    app.server.config["MAX_CONTENT_LENGTH"] = p.MAX_BODY

    @app.server.errorhandler(413)
    def too_large(_: Exception) -> flask.Response:
        size = flask.request.content_length
        given = f"{size:,} bytes" if size is not None else "over the limit"
        message = (
            f"The request body is {given}; this app accepts at most {p.MAX_BODY:,} bytes (1 MiB). "
            f"Send less: prompts, queries and searches are at most {p.MAX_TEXT:,} characters."
        )
        return flask.Response(json.dumps({"error": message}), status=413, mimetype="application/json")


def create_app(run: str) -> Dash:
    """The app for one run directory. A broken run directory still gives an app that says what is wrong."""
    run = str(Path(run).resolve())
    # update_title=None: no "Updating..." tab title (Dash documents None; its stub types the argument `str`)
    app = Dash(
        __name__,
        title="saelab",
        suppress_callback_exceptions=True,
        update_title=None,  # pyright: ignore[reportArgumentType]
    )
    app.index_string = INDEX
    app.layout = html.Div(
        [dcc.Location(id="url", refresh="callback-nav"), _nav(), html.Div(id="page", className="page")]
    )

    @app.callback(Output("page", "children"), Input("url", "pathname"), Input("url", "search"))
    def route(pathname: Any, search: Any) -> Any:
        return render(run, pathname, search)

    for page in PAGES.values():
        if hasattr(page, "register"):
            page.register(app, run)
    _limit_bodies(app)
    _refuse_malformed_callbacks(app)
    return app


def serve(run: str, host: str = "127.0.0.1", port: int = 8050) -> None:
    """Serve the app for a run directory until interrupted."""
    app = create_app(run)
    # Full garbage collections scan every tracked object (torch and the libraries hold ~500k): ~0.5 s on a
    # small CPU, landing in whichever page happens to trigger one. Freezing what is loaded by now keeps
    # them out of every collection.
    gc.freeze()
    app.run(host=host, port=port, debug=False)
