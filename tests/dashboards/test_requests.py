"""Crafted requests, as a script rather than the app's own pages can send them, to every callback: each gets an
error box that names the problem (HTTP 200), refused by validation, not by the catch-all for unexpected errors;
a body that names no callback of the app, or not with the inputs it declares, gets a 400. Never a 500."""

from __future__ import annotations

from typing import Any

import pytest
from dash import Dash

from saelab.circuits import Circuit, Edge, Node
from saelab.dashboards.app import CALLBACK_PATH, create_app
from saelab.run import RunDir
from tests.dashboards.helpers import HOOK, body, errors, url

CIRCUIT = "crafted"
DECODER_HOOK = "blocks.0.hook_resid_post"
CATCH_ALL = "could not be built"  # the error box of an unexpected exception: no crafted request may reach it


@pytest.fixture(scope="module")
def apps(run_dir, decoder_run) -> dict[str, tuple[Dash, str]]:
    """The app over the MiniLM run (given a small circuit) and over the tiny decoder's run, each with its SAE's
    `hook|variant`."""
    Circuit(
        name=CIRCUIT,
        hooks=[HOOK],
        saes={HOOK: "elsewhere"},
        labels=["a", "b"],
        nodes=[Node(HOOK, 3, 0, 0.5), Node(HOOK, "err", 1, -0.2)],
        edges=[Edge(f"{HOOK}/3@0", f"{HOOK}/err@1", 0.1)],
        curves={"n": [0, 1, 2], "faithfulness": [0.0, 0.5, 1.0], "completeness": [1.0, 0.5, 0.0]},
        metric={"clean": 1.0, "empty": 0.0},
    ).save(RunDir(run_dir).circuit(CIRCUIT))
    made = {}
    for name, run in (("minilm", run_dir), ("decoder", decoder_run)):
        sae = RunDir(run).saes()[0]
        made[name] = (create_app(str(run)), f"{sae.hook}|{sae.variant}")
    return made


LONG = "x" * 5000
CASES = [
    # (app, (first input, values given the SAE's `hook|variant`), what the error box says)
    ("minilm", ("circuit-node-threshold", lambda sae: ["abc", 0, CIRCUIT]), "The node threshold 'abc' is not a number"),
    ("minilm", ("circuit-node-threshold", lambda sae: [0, [1], CIRCUIT]), "The edge threshold [1] is not a number"),
    ("minilm", ("circuit-node-threshold", lambda sae: [float("inf"), 0, CIRCUIT]), "is not a finite number"),
    ("minilm", ("circuit-node-threshold", lambda sae: [-1, 0, CIRCUIT]), "The node threshold -1 is out of range"),
    ("minilm", ("circuit-node-threshold", lambda sae: [0, 0, [CIRCUIT]]), "The circuit name must be a name, not list"),
    ("minilm", ("circuit-node-threshold", lambda sae: [0, 0, LONG]), "is 5000 characters long"),
    ("minilm", ("circuit-graph", lambda sae: [{"points": [{"customdata": [HOOK, "--1"]}]}, CIRCUIT]), "names no node"),
    ("minilm", ("circuit-graph", lambda sae: [{"points": [{"customdata": 7}]}, CIRCUIT]), "names no node"),
    (
        "minilm",
        ("steer-go", lambda sae: [1, [sae], "3", "add", "4", "all", "hi"]),
        "The SAE choice must be text, not list",
    ),
    ("minilm", ("steer-go", lambda sae: [1, sae, "3", ["add"], "4", "all", "hi"]), "There is no steering mode ['add']"),
    ("minilm", ("steer-go", lambda sae: [1, sae, {"id": 3}, "add", "4", "all", "hi"]), "The latent must be text"),
    ("minilm", ("prompt-go", lambda sae: [1, "hi", [sae], 5]), "The SAE choice must be text, not list"),
    ("minilm", ("prompt-go", lambda sae: [1, "hi", sae, "many"]), "'many' is not a whole number"),
    ("minilm", ("prompt-go", lambda sae: [1, ["hi"], sae, 5]), "The prompt must be text, not list"),
    ("minilm", ("search-id-go", lambda sae: [1, None, {"id": 3}, sae]), "The feature id must be text, not dict"),
    ("minilm", ("search-token-go", lambda sae: [1, None, 3, sae]), "The search text must be text, not int"),
    ("minilm", ("url", lambda sae: [["/"], ""]), "The page path must be text, not list"),
    ("minilm", ("url", lambda sae: ["/", 5]), "The query string must be text, not int"),
    ("minilm", url("/prompt", hook=HOOK, sae="{sae}", text="word " * 600), "this model reads at most 510"),
    ("minilm", url("/prompt", hook=HOOK, sae="{sae}", top="²", text="hi"), "'²' is not a whole number"),
    (
        "decoder",
        url("/steering", hook=DECODER_HOOK, sae="{sae}", latent="3", text="word " * 80),
        "exceed the model's context of 64",
    ),
    ("minilm", url("/steering", hook=HOOK, sae="{sae}", text="x" * 30_000), "characters long; give at most 20,000"),
    ("minilm", url("/feature", hook=HOOK, sae=LONG, id="0"), "is 5000 characters long"),
    ("minilm", url("/steering", hook=HOOK, sae=LONG, text="hi"), "is 5000 characters long"),
    ("minilm", url("/absorption", hook=HOOK, sae=LONG), "is 5000 characters long"),
    ("minilm", url("/feature", hook="..", sae="{sae}", id="0"), "is not a plain name"),
    ("minilm", url("/feature", hook=HOOK, sae="{sae}", id="--1"), "Feature id '--1' is not a number"),
    ("minilm", url("/feature", hook=HOOK, sae="{sae}", id="²"), "Feature id '²' is not a number"),
    ("minilm", url("/feature", hook=HOOK, sae="{sae}", id="9" * 5000), "is not a number"),
    ("minilm", url("/steering", hook=HOOK, sae="{sae}", latent="--1", text="hi"), "Feature id '--1' is not a number"),
    (
        "minilm",
        url("/steering", hook=HOOK, sae="{sae}", coef="inf", text="hi"),
        "The coefficient 'inf' is not a finite",
    ),
    (
        "minilm",
        url("/steering", hook=HOOK, sae="{sae}", coef="nan", text="hi"),
        "The coefficient 'nan' is not a finite",
    ),
    (
        "minilm",
        url("/steering", hook=HOOK, sae="{sae}", coef="1e300", text="hi"),
        "The coefficient 1e+300 is out of range",
    ),
    ("minilm", url("/steering", hook=HOOK, sae="{sae}", mode="", scope="sideways", text="hi"), "There is no scope"),
    ("minilm", url("/nowhere" + LONG), "The page path is 5,008 characters long"),
]
IDS = [
    "circuits-threshold-a-string",
    "circuits-threshold-a-list",
    "circuits-threshold-infinite",
    "circuits-threshold-negative",
    "circuits-name-a-list",
    "circuits-name-5000-characters",
    "circuits-click-on-no-node",
    "circuits-click-not-a-list",
    "steering-sae-a-list",
    "steering-mode-a-list",
    "steering-latent-a-dict",
    "prompt-sae-a-list",
    "prompt-top-a-word",
    "prompt-text-a-list",
    "search-id-a-dict",
    "search-text-a-number",
    "route-path-a-list",
    "route-query-a-number",
    "prompt-text-too-long-for-the-model",
    "prompt-top-a-superscript-digit",
    "steering-text-too-long-for-the-model",
    "steering-text-over-the-length-limit",
    "feature-sae-name-5000-characters",
    "steering-sae-name-5000-characters",
    "absorption-sae-name-5000-characters",
    "feature-hook-not-a-plain-name",
    "feature-id-minus-minus-1",
    "feature-id-a-superscript-digit",
    "feature-id-5000-digits",
    "steering-latent-minus-minus-1",
    "steering-coefficient-inf",
    "steering-coefficient-nan",
    "steering-coefficient-absurd",
    "steering-scope-unknown",
    "page-path-5000-characters",
]


@pytest.mark.parametrize(("app", "request_", "message"), CASES, ids=IDS)
def test_a_crafted_request_gets_an_error_box_not_a_500(apps, app, request_, message):
    dash_app, sae = apps[app]
    first_input, values = request_
    response = dash_app.server.test_client().post(CALLBACK_PATH, json=body(dash_app, first_input, values(sae)))
    assert response.status_code == 200, response.data[:300]
    shown = errors(response.data)
    assert any(message in text for text in shown), shown
    assert not any(CATCH_ALL in text for text in shown), shown


def test_good_requests_get_their_page(apps, busy):
    dash_app, sae = apps["minilm"]
    for first_input, values in (url("/feature", hook=HOOK, sae="{sae}", id=str(busy)), url("/circuits", name=CIRCUIT)):
        response = dash_app.server.test_client().post(CALLBACK_PATH, json=body(dash_app, first_input, values(sae)))
        assert response.status_code == 200 and errors(response.data) == []
    response = dash_app.server.test_client().post(
        CALLBACK_PATH, json=body(dash_app, "circuit-node-threshold", [0.3, 0, CIRCUIT])
    )
    assert response.status_code == 200 and "showing 1 of 2 nodes" in response.data.decode()


def _route(app: Dash) -> dict[str, Any]:
    return body(app, "url", ["/", ""])


MALFORMED = {
    "not-json-object": lambda app: "page",
    "no-output": lambda app: {},
    "unknown-output": lambda app: {**_route(app), "output": "nope.children"},
    "output-a-list": lambda app: {**_route(app), "output": ["page.children"]},
    "missing-inputs": lambda app: {**_route(app), "inputs": []},
    "inputs-not-a-list": lambda app: {**_route(app), "inputs": "url"},
    "other-inputs": lambda app: {**_route(app), "inputs": [{"id": "x", "property": "y"}] * 2},
    "outputs-a-list-for-one": lambda app: {**_route(app), "outputs": [{"id": "page", "property": "children"}]},
    "outputs-not-objects": lambda app: {**body(app, "prompt-go", [1, "", "", 5]), "outputs": ["url", "prompt"]},
    "too-few-outputs": lambda app: {**body(app, "prompt-go", [1, "", "", 5]), "outputs": [{"id": "url"}]},
    "extra-state": lambda app: {**_route(app), "state": [{"id": "url", "property": "href"}]},
    "changed-not-names": lambda app: {**_route(app), "changedPropIds": [1]},
}


@pytest.mark.parametrize("make", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_callback_body_gets_a_400(apps, make):
    dash_app, _ = apps["minilm"]
    response = dash_app.server.test_client().post(CALLBACK_PATH, json=make(dash_app))
    assert response.status_code == 400 and b"not a request this app answers" in response.data
    client = dash_app.server.test_client()
    assert client.post(CALLBACK_PATH, data="{not json", content_type="application/json").status_code == 400
