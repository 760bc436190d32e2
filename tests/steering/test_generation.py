"""Steered generation (saelab.steering.generation): hand-computed logits, KV-cached against uncached generation,
the coefficient sweep's typed metrics, the context limit, and non-finite metrics refused."""

from __future__ import annotations

import copy

import pytest
import torch

from saelab import steering as st
from saelab.circuits import ALPHABET
from saelab.steering import Intervention, Mode, Scope, SteeringError
from tests.steering.helpers import HOOK, PROMPT, logits


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
    zero, small, big = (r.mean for r in rows)
    assert zero.kl == pytest.approx(0.0, abs=1e-6)
    assert 0 < small.kl < big.kl and zero.perplexity < big.perplexity
    base = zero.latent_act
    assert base is not None and big.latent_act is not None
    # The latent is read at its hook after the edit: adding c times its decoder row raises it by about c (unit rows).
    assert big.latent_act > base + 40
    target = ALPHABET[int((sae.W_dec[latent] @ model.W_U).argmax())]
    assert rows[2].prompts[0].text.replace(" ", "")[1:] == target * 5  # the first new token is unsteered
    assert [(r.coefficient, r.value) for r in rows] == [(0.0, 0.0), (2.0, 2.0), (50.0, 50.0)]
    for row in rows:  # the mean row is each metric's mean over the prompts (to float64 rounding: numpy's mean)
        for field in st.SteeredMetrics._fields:
            each = [getattr(p.metrics, field) for p in row.prompts]
            assert getattr(row.mean, field) == pytest.approx(sum(each) / len(each), rel=1e-12)


def test_steered_metrics_are_the_old_dicts_values_typed(linear):
    """The fields of `SteeredMetrics` are the values of the dict `steered_metrics` returned, recomputed here as it did
    (KL and latent activations by the same float32 operations, so equal exactly; the perplexity is now
    exponentiated in float64 rather than float32, so it agrees to float32 rounding, rel 1e-6)."""
    model, sae = linear
    latent = 7
    iv = Intervention(HOOK, sae, [latent], "add", 3.0, 1.0, "generated")
    prompt = st.prompt_tokens(model, "QWERTY")
    n = prompt.shape[1]
    tokens = st.generate(model, prompt, [iv], max_new_tokens=6)
    got = st.steered_metrics(model, tokens, n, intervention=iv)
    with torch.no_grad():
        steered = logits(model, tokens, [iv], prompt_length=n).float().log_softmax(-1)[n - 1 : -1]
        plain = logits(model, tokens).float().log_softmax(-1)[n - 1 : -1]
        edited = st.hook_acts(model, tokens, HOOK)[0, n:] + 3.0 * sae.W_dec[latent]  # `add` on the generated tokens
    old = {
        "kl": float((plain.exp() * (plain - steered)).sum(-1).mean()),
        "perplexity": float((-plain.gather(-1, tokens[0, n:, None]).mean()).exp()),
        "latent_act": float(sae.encode(edited)[:, latent].mean()),
        "latent_act_text": float(sae.encode(st.hook_acts(model, tokens, HOOK)[0, n:])[:, latent].mean()),
    }
    assert got.kl == old["kl"] and got.latent_act_text == old["latent_act_text"]
    assert got.perplexity == pytest.approx(old["perplexity"], rel=1e-6)
    assert got.latent_act == pytest.approx(old["latent_act"], rel=1e-5)  # the edit recomputed here: float32 rounding
    assert list(got.as_json()) == list(old) and got.as_json()["kl"] == old["kl"]
    code = Intervention(HOOK, sae, [], "add", 1.0, code=torch.zeros(sae.cfg.d_sae).index_fill(0, torch.tensor(7), 3.0))
    no_latent = st.steered_metrics(model, tokens, n, intervention=code)
    assert no_latent.latent_act is None and list(no_latent.as_json()) == ["kl", "perplexity"]


def test_generation_is_held_to_the_models_context(linear):
    """The library refuses (never clamps) new tokens past the context; `new_token_budget` says how many fit."""
    model, sae = linear  # n_ctx 48
    tokens = st.prompt_tokens(model, "QWERTY")  # BOS + 6 characters
    budget = st.new_token_budget(model, tokens)
    assert budget == 48 - 7 == st.new_token_budget(model, 7)
    assert st.generate(model, tokens, max_new_tokens=budget).shape == (1, 48)
    with pytest.raises(SteeringError, match="exceed the model's context of 48; generate at most 41 new tokens"):
        st.generate(model, tokens, max_new_tokens=budget + 1)
    with pytest.raises(SteeringError, match="generate at least one token"):
        st.generate(model, tokens, max_new_tokens=0)
    full = st.prompt_tokens(model, ALPHABET[:47])  # 48 tokens: the whole context
    for call in (
        lambda: st.new_token_budget(model, full),
        lambda: st.generate(model, full, max_new_tokens=1),
        lambda: st.sweep(model, Intervention(HOOK, sae, [7]), [1.0], ["QWERTY", ALPHABET[:47]], progress=False),
    ):
        with pytest.raises(SteeringError, match="fills the model's context of 48, leaving no room to generate"):
            call()


def test_non_finite_metrics_are_refused_naming_them_and_the_cause(linear):
    """A damaged SAE (its latent's encoder column inf) edits the activations finely (`add` uses the decoder row) but
    reads the latent back as NaN: the metrics name what came out non-finite and why, instead of reporting NaN."""
    model, sae = linear
    damaged = copy.deepcopy(sae)
    damaged.W_enc.data[:, 7] = torch.inf
    iv = Intervention(HOOK, damaged, [7], "add", 3.0, 1.0, "generated")
    prompt = st.prompt_tokens(model, "QWERTY")
    tokens = st.generate(model, prompt, [iv], max_new_tokens=3)
    with pytest.raises(
        SteeringError,
        match="coefficient 3 \\(value 3\\) made latent_act and latent_act_text non-finite: the SAE's weights are not all",
    ):
        st.steered_metrics(model, tokens, prompt.shape[1], intervention=iv)
