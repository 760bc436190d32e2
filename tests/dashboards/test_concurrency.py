"""The live-model pages under concurrent clients: 4 clients (threads) at once ask the app, served on 127.0.0.1,
for the prompt page and the steering page with inputs of their own, over the tiny decoder's run (steered
generation) and the MiniLM run (steered semantic search). Every answer must be the one the same request gets
when it is served alone, and none may be an error."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from dash import Dash

from saelab.dashboards.app import CALLBACK_PATH, create_app
from saelab.run import RunDir, SaeEntry
from tests.dashboards.helpers import OTHER, Server, body, errors, url

CLIENTS = 4
ROUNDS = 3  # each client sends its requests this many times, interleaved with the other clients'
PROMPTS = [
    "Return the absolute value of a number",
    "Open a network connection to a host",
    "Read the whole file into memory",
    "Raise an error when the key is missing",
]


def _requests(app: Dash, sae: SaeEntry, client: int) -> list[dict[str, Any]]:
    """Client `client`'s callback bodies for `app`'s SAE `sae`: its prompt page and its steering page."""
    prompt = PROMPTS[client]
    steering = {"latent": str(3 + 5 * client), "mode": ("add", "clamp")[client % 2], "coef": str(2 + client)}
    pages = [
        url("/prompt", hook=sae.hook, sae=sae.variant, top=str(2 + client), text=prompt),
        url("/steering", hook=sae.hook, sae=sae.variant, text=prompt, **steering),
    ]
    return [body(app, first, values(f"{sae.hook}|{sae.variant}")) for first, values in pages]


def _post(base: str, request: dict[str, Any]) -> Any:
    call = urllib.request.Request(
        base + CALLBACK_PATH, data=json.dumps(request).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(call, timeout=120) as response:
        assert response.status == 200
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served(run_dir, decoder_run):
    """The two apps on 127.0.0.1, and every client's requests to each: (server URL, body) pairs."""
    servers = [Server(run_dir), Server(decoder_run)]
    work: list[list[tuple[str, dict[str, Any]]]] = [[] for _ in range(CLIENTS)]
    for server, run in zip(servers, (run_dir, decoder_run)):
        app = create_app(str(run))  # the callback map the served app declares too
        sae = next(s for s in RunDir(run).saes() if s.variant != OTHER)
        for client in range(CLIENTS):
            work[client] += [(server.url, r) for r in _requests(app, sae, client)]
    yield work
    for server in servers:
        server.close()


def test_concurrent_prompt_and_steering_requests_each_get_their_own_answer(served):
    alone = {id(r): _post(base, r) for client in served for base, r in client}
    for answer in alone.values():  # the reference answers are real pages, not error boxes
        assert not errors(answer), errors(answer)

    def client(requests: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, Any]]:
        return [(id(r), _post(base, r)) for _ in range(ROUNDS) for base, r in requests]

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = [a for answers in pool.map(client, served) for a in answers]
    assert len(answers) == CLIENTS * ROUNDS * 4
    # Equal exactly: the same code on the same machine and thread count computes the same floats, so a request's
    # answer differs from its answer alone only if another request's hooks reached its forward pass.
    wrong = [key for key, answer in answers if answer != alone[key]]
    failed = [key for key, answer in answers if errors(answer)]
    assert not wrong and not failed, f"{len(wrong)} of {len(answers)} answers differ, {len(failed)} are errors"
