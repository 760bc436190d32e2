"""Steered generation (saelab.steering.generation): hand-computed logits, KV-cached against uncached generation,
and the coefficient sweep's metrics."""

from __future__ import annotations

import pytest
import torch

from saelab import steering as st
from saelab.circuits import ALPHABET
from saelab.steering import Intervention, Mode, Scope
from tests.steering.helpers import HOOK, PROMPT


def test_steered_generation_follows_the_hand_computed_logits_with_and_without_kv_cache(linear):
    model, sae = linear
    tokens = st.prompt_tokens(model, "QWERTY")
    n, new = tokens.shape[1], 10
    latent = 7
    target = int((sae.W_dec[latent] @ model.W_U).argmax())  # a strong push along the latent makes this the argmax
    free = st.generate(model, tokens, (), max_new_tokens=new)
    for cache in (True, False):

        def run(scope, cache=cache):
            return st.generate(
                model,
                tokens,
                [Intervention(HOOK, sae, [latent], "add", 50.0, 1.0, scope)],
                max_new_tokens=new,
                use_past_kv_cache=cache,
            )[0, n:].tolist()

        assert run("all") == [target] * new
        generated = run("generated")  # the first new token is predicted at the prompt's last position: unsteered
        assert generated == [int(free[0, n])] + [target] * (new - 1)
        prompt = run("prompt")  # only the first new token is steered; the rest continue from it unsteered
        assert prompt[0] == target
        longer = torch.cat([tokens, torch.tensor([[target]])], 1)
        rest = st.generate(model, longer, (), max_new_tokens=new - 1)[0, n + 1 :].tolist()
        assert prompt[1:] == rest


def test_kv_cached_steered_generation_equals_uncached(decoder, dec_sae):
    tokens = st.prompt_tokens(decoder, PROMPT)
    n = tokens.shape[1]
    f = dec_sae.encode(st.hook_acts(decoder, tokens, HOOK)[0])
    latent = int(f.amax(0).argmax())
    free = st.generate(decoder, tokens, (), max_new_tokens=10)
    cases: list[tuple[Mode, Scope, float]] = [
        ("add", "generated", 4.0),
        ("add", "prompt", 4.0),
        ("clamp", "all", 3.0),
        ("orthogonal", [n - 1, n + 3, n + 7], 2.0),
        ("ablate", "generated", 0.0),
    ]
    for mode, scope, c in cases:
        latents = list(range(dec_sae.cfg.d_sae)) if mode == "ablate" else [latent]
        iv = Intervention(HOOK, dec_sae, latents, mode, c, float(f.amax()), scope)
        cached, uncached = (
            st.generate(decoder, tokens, [iv], max_new_tokens=10, use_past_kv_cache=u) for u in (True, False)
        )
        assert torch.equal(cached, uncached), (mode, scope)
        assert not torch.equal(cached, free), (mode, scope)  # the steering did something


def test_sweep_reports_latent_activation_kl_and_perplexity(linear):
    model, sae = linear
    latent = 7
    iv = Intervention(HOOK, sae, [latent], "add", 0.0, 1.0, "generated")
    rows = st.sweep(model, iv, [0.0, 2.0, 50.0], ["QWERTY", "ZXCV"], max_new_tokens=6, progress=False)
    zero, small, big = (r["mean"] for r in rows)
    assert zero["kl"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < small["kl"] < big["kl"] and zero["perplexity"] < big["perplexity"]
    base = zero["latent_act"]
    # The latent is read at its hook after the edit: adding c times its decoder row raises it by about c (unit rows).
    assert big["latent_act"] > base + 40
    target = ALPHABET[int((sae.W_dec[latent] @ model.W_U).argmax())]
    assert rows[2]["prompts"][0]["text"].replace(" ", "")[1:] == target * 5  # the first new token is unsteered
