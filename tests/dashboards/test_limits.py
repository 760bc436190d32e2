"""The app's request limits: an oversized body gets HTTP 413 unread, texts too long in characters or in the model's
tokens and absurd steering coefficients get an error box that names the limit, the decoder steering page
generates as many tokens as the model's context leaves, and requests past the model's wait queue are told to retry."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from saelab import steering as st
from saelab.dashboards import live
from saelab.dashboards import params as p
from saelab.dashboards.app import CALLBACK_PATH, create_app
from saelab.dashboards.live import ModelPool, load_sae, run_model
from saelab.dashboards.pages import steering as page
from saelab.errors import RequestError
from saelab.run import RunDir
from tests.dashboards.helpers import body, errors, url


def _answer(run, first_input: str, values: Callable[[str], list[Any]]) -> str:
    """The run's app's answer (HTTP 200) to a callback request; `values` are given its first SAE's `hook|variant`."""
    app = create_app(str(run))
    sae = RunDir(run).saes()[0]
    response = app.server.test_client().post(
        CALLBACK_PATH, json=body(app, first_input, values(f"{sae.hook}|{sae.variant}"))
    )
    assert response.status_code == 200, response.data[:300]
    return response.get_data(as_text=True)


def _page(path: str, **query: str) -> tuple[str, Callable[[str], list[Any]]]:
    """The routing callback's request for the page `path?query` with the run's first SAE."""
    return "url", lambda sae: url(path, hook=sae.partition("|")[0], sae="{sae}", **query)[1](sae)


def test_a_body_over_the_limit_gets_a_413_that_names_it(decoder_run):
    client = create_app(str(decoder_run)).server.test_client()
    start = time.perf_counter()
    response = client.post(CALLBACK_PATH, data=b"x" * (p.MAX_BODY + 1), content_type="application/json")
    assert time.perf_counter() - start < 2  # refused before the body is read or parsed
    assert response.status_code == 413
    assert response.json == {
        "error": f"The request body is {p.MAX_BODY + 1:,} bytes; this app accepts at most 1,048,576 bytes (1 MiB). "
        "Send less: prompts, queries and searches are at most 20,000 characters."
    }


TOO_LONG = "x" * (p.MAX_TEXT + 1)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            ("prompt-go", lambda sae: [1, TOO_LONG, sae, 5]),
            "The prompt is 20,001 characters long; give at most 20,000.",
        ),
        (("search-token-go", lambda sae: [1, None, TOO_LONG, sae]), "The search text is 20,001 characters long"),
        # the tiny decoder: a 64-token context, BOS in front of the text
        (
            _page("/prompt", text="word " * 80),
            "this model reads at most 63: more would exceed the model's context of 64",
        ),
        (
            _page("/search", q="word " * 80),
            "tokens; this model reads at most 63: more would exceed the model's context of 64 (1 framing token included)",
        ),
        (
            _page("/steering", text="word " * 63),
            "at most 62: more would exceed the model's context of 64 (1 framing token and 1 to generate included)",
        ),
        (_page("/steering", coef="1e30", text="hi"), "The coefficient 1e+30 is out of range; give one from -10000 to"),
        (_page("/steering", coef="-1e39", text="hi"), "The coefficient -1e+39 is out of range"),
        (_page("/steering", coef="inf", text="hi"), "The coefficient 'inf' is not a finite number"),
        (_page("/steering", coef="nan", text="hi"), "The coefficient 'nan' is not a finite number"),
    ],
    ids=[
        "prompt-characters",
        "search-characters",
        "prompt-tokens",
        "search-tokens",
        "steering-tokens-and-one-to-generate",
        "coefficient-1e30",
        "coefficient-minus-1e39",
        "coefficient-inf",
        "coefficient-nan",
    ],
)
def test_a_request_past_a_limit_gets_an_error_box_naming_it(decoder_run, request_, message):
    shown = errors(_answer(decoder_run, *request_))
    assert any(message in text for text in shown), shown


def test_the_decoder_steering_page_generates_what_the_context_leaves(induction_run):
    """The induction model's context is 24 tokens: after BOS and an 8-character prompt, 15 new tokens (not 40)."""
    sae_entry = RunDir(induction_run).saes()[0]
    prompt = "ABCDABCD"
    model = run_model(str(induction_run))
    assert model.cfg.n_ctx == 24 and page.MAX_NEW_TOKENS == 40
    sae = load_sae(str(sae_entry.path))
    scale, _ = st.run_scale(str(induction_run), sae_entry.path, sae, latent=1, hook=sae_entry.hook)
    iv = st.Intervention(sae_entry.hook, sae, [1], "add", 2.0, scale)
    want = st.compare(model, prompt, [iv], max_new_tokens=15)
    answer = _answer(induction_run, *_page("/steering", latent="1", coef="2", text=prompt))
    assert not errors(answer), errors(answer)
    assert "15 (all that the model's 24-token context leaves)" in answer
    assert len(want.unsteered) > 0 and json.dumps(want.unsteered) in answer and json.dumps(want.steered) in answer


def test_a_request_past_the_wait_queue_is_told_to_retry(monkeypatch):
    pool = ModelPool(torch.nn.Linear(2, 2), copies=1)  # pyright: ignore[reportArgumentType]  (any module lends)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with pool.turn() as model:
            with pool.turn() as again:  # a request in a turn gets its own copy again, never waits for itself
                assert again is model
            holding.set()
            release.wait(10)

    worker = threading.Thread(target=hold)
    worker.start()
    assert holding.wait(10)
    monkeypatch.setattr(live, "MAX_WAIT_S", 0.05)
    with pytest.raises(RequestError, match="The model is busy: other requests have held it for 0.05 s. Retry"):
        with pool.turn():
            pass
    monkeypatch.setattr(live, "MAX_WAITING", 0)
    with pytest.raises(RequestError, match="The model is busy: 0 requests are already waiting for it. Retry"):
        with pool.turn():
            pass
    release.set()
    worker.join()
    monkeypatch.undo()
    with pool.turn() as model:  # free again
        assert model is pool.model
