"""Interventions (saelab.steering.interventions) on answers known beforehand: identities of the error-kept SAE
splice, a model whose steered logits are computable by hand, bad input refused with the fix, and the coefficient
limits (absurd coefficients refused naming the limit; at the limit, every output stays finite)."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch

from saelab import steering as st
from saelab.dictionaries import SAE, SAEConfig
from saelab.steering import EMBEDDING, Intervention, Scope, SteeringError
from tests.steering.helpers import HOOK, PROMPT, logits


def test_clamping_a_latent_to_its_own_value_leaves_every_output_unchanged(decoder, dec_sae):
    tokens = st.prompt_tokens(decoder, PROMPT)
    f = dec_sae.encode(st.hook_acts(decoder, tokens, HOOK)[0])
    base = logits(decoder, tokens)
    free = decoder.generate(tokens, max_new_tokens=8, do_sample=False, verbose=False)
    checked = 0
    for p, i in f.nonzero()[::15].tolist():
        own = Intervention(HOOK, dec_sae, [i], "clamp", float(f[p, i]), scope=[p])
        assert torch.allclose(logits(decoder, tokens, [own]), base, atol=1e-5)
        assert torch.equal(st.generate(decoder, tokens, [own], max_new_tokens=8), free)
        moved = logits(decoder, tokens, [replace(own, coefficient=float(f[p, i]) + 5)])
        assert (moved - base)[p:].abs().max() > 1e-2 and torch.equal(moved[:p], base[:p])  # later positions only
        checked += 1
    assert checked >= 3
    dead = int((f.amax(0) == 0).nonzero()[0])  # a latent that is 0 everywhere, clamped to 0 at every position
    assert torch.allclose(logits(decoder, tokens, [Intervention(HOOK, dec_sae, [dead], "clamp", 0.0)]), base, atol=1e-5)


def test_ablating_with_the_error_kept(decoder, dec_sae):
    """Ablating latents edits the hook by exactly minus their decoded contribution: none ablated reproduces the model,
    all ablated leave the error term plus b_dec, and the effect of several is the sum of each one's."""
    tokens = st.prompt_tokens(decoder, PROMPT)
    x = st.hook_acts(decoder, tokens, HOOK)[0]
    f = dec_sae.encode(x)
    base = logits(decoder, tokens)
    assert torch.allclose(logits(decoder, tokens, [Intervention(HOOK, dec_sae, [], "ablate")]), base, atol=1e-5)

    def edited(latents):
        seen = []
        with (
            torch.no_grad(),
            st.steer(
                decoder, [Intervention(HOOK, dec_sae, latents, "ablate")], read=lambda hook, h, pos: seen.append(h[0])
            ),
        ):
            decoder(tokens, return_type=None)
        return seen[0]

    every = edited(list(range(dec_sae.cfg.d_sae)))
    assert torch.allclose(every, x - f @ dec_sae.W_dec, atol=1e-5)  # err + b_dec = x - dec(f) + b_dec
    each = [edited([i]) - x for i in f.amax(0).nonzero().flatten().tolist()]
    assert torch.allclose(every - x, sum(each[1:], start=each[0]), atol=1e-4)
    assert not torch.allclose(
        logits(decoder, tokens, [Intervention(HOOK, dec_sae, list(range(256)), "ablate")]), base, atol=1e-2
    )


def test_orthogonal_and_cap_set_the_component_on_the_direction(decoder, dec_sae):
    tokens = st.prompt_tokens(decoder, PROMPT)
    x = st.hook_acts(decoder, tokens, HOOK)[0]
    latent = int(dec_sae.encode(x).amax(0).argmax())
    v = dec_sae.W_dec[latent]
    u = v / v.norm()
    along = x @ u

    def edited(mode, coefficient, scale=2.0):
        seen = []
        with (
            torch.no_grad(),
            st.steer(
                decoder,
                [Intervention(HOOK, dec_sae, [latent], mode, coefficient, scale)],
                read=lambda hook, h, pos: seen.append(h[0]),
            ),
        ):
            decoder(tokens, return_type=None)
        return seen[0]

    ortho = edited("orthogonal", 1.5)
    assert torch.allclose(ortho @ u, torch.full_like(along, 3.0 * float(v.norm())), atol=1e-4)
    assert torch.allclose(ortho - (ortho @ u)[:, None] * u, x - along[:, None] * u, atol=1e-4)  # the rest is kept
    cap = float(along.median()) / 2
    capped = edited("cap", cap)
    assert torch.allclose(capped @ u, along.clamp_max(2 * cap * float(v.norm())), atol=1e-4)
    assert (along > 2 * cap).any() and (along < 2 * cap).any()


def test_additive_steering_matches_the_hand_computed_effect(linear):
    model, sae = linear
    tokens = st.prompt_tokens(model, "ABCDEFGH")
    n = tokens.shape[1]
    latent, c, scale = 5, 1.5, 2.0
    shift = c * scale * sae.W_dec[latent] @ model.W_U  # what the edit adds to the logits where it acts
    base = logits(model, tokens)
    final = "blocks.0.hook_resid_post"
    cases: list[tuple[Scope, list[int]]] = [
        ("all", list(range(n))),
        ([2, 5], [2, 5]),
        ("prompt", list(range(4))),
        ("generated", [4, 5, 6, 7, 8]),
    ]
    for scope, where in cases:
        iv = Intervention(final, sae, [latent], "add", c, scale, scope)
        expected = base.clone()
        expected[where] += shift
        assert torch.allclose(logits(model, tokens, [iv], prompt_length=4), expected, atol=1e-4), scope


def test_bad_input_names_the_problem_and_the_fix(decoder, dec_sae, minilm, emb_sae):
    tokens = st.prompt_tokens(decoder, PROMPT)
    cases = [
        (Intervention("blocks.9.hook_resid_post", dec_sae, [0]), "unknown hook point"),
        (Intervention(HOOK, dec_sae, [999]), "latent 999 does not exist: the SAE has latents 0 to 255"),
        (Intervention(HOOK, dec_sae, [1, 2], "clamp"), "steers exactly one latent"),
        (Intervention(HOOK, dec_sae, [1], "boost"), "unknown steering mode 'boost'"),  # pyright: ignore[reportArgumentType]  # on purpose
        (Intervention(HOOK, dec_sae, [1], scope="middle"), "unknown scope 'middle'"),  # pyright: ignore[reportArgumentType]  # on purpose
        (Intervention(HOOK, dec_sae, [], "clamp", code=torch.zeros(256)), "a code is added"),
        (Intervention("blocks.0.hook_mlp_out", SAE.from_config(SAEConfig(d_in=32, d_sae=64, k=4)), [0]), "d_in=32"),
        (Intervention(EMBEDDING, dec_sae, [0]), "not a hook point"),
    ]
    for iv, message in cases:
        with pytest.raises(
            SteeringError if "hook point" not in message or "not a" in message else ValueError, match=message
        ):
            st.generate(decoder, tokens, [iv], max_new_tokens=2)
    with pytest.raises(SteeringError, match="prompt is empty"):
        st.generate(decoder, "  ", [], max_new_tokens=2)
    with pytest.raises(SteeringError, match="exceed the model's context of 64"):
        st.generate(decoder, tokens, [], max_new_tokens=64)
    with pytest.raises(SteeringError, match="this is an encoder"):
        st.generate(minilm, "hello", [], max_new_tokens=2)
    with pytest.raises(SteeringError, match="an encoder generates no tokens"):
        st.embed(minilm, ["hi"], [Intervention("blocks.0.hook_resid_post", emb_sae, [0], scope="generated")])
    with pytest.raises(SteeringError, match="this model is a decoder"):
        st.embed(decoder, ["hi"])
    with pytest.raises(SteeringError, match="k=500 neighbours asked of a corpus of 3"):
        st.search(minilm, "hi", torch.zeros(3, 384), [], k=500)


@pytest.mark.parametrize(
    ("mode", "coefficient"),
    [("add", 1e30), ("add", math.inf), ("add", -math.inf), ("add", math.nan), ("clamp", 1e39), ("orthogonal", -2e4)],
)
def test_absurd_coefficients_are_refused_naming_the_limit(decoder, dec_sae, mode, coefficient):
    limit = r"\|coefficient\| <= 10000 \(in units of the latent's typical max activation"
    assert st.MAX_COEFFICIENT == 1e4
    with pytest.raises(SteeringError, match=limit):
        Intervention(HOOK, dec_sae, [3], mode, coefficient)
    fine = Intervention(HOOK, dec_sae, [3], mode, 1.0)
    with pytest.raises(SteeringError, match=limit):  # a copy with another coefficient is checked as it is built
        replace(fine, coefficient=coefficient)
    with pytest.raises(SteeringError, match=limit):  # a sweep checks every coefficient before generating any text
        st.sweep(decoder, fine, [1.0, coefficient], [PROMPT], max_new_tokens=2, progress=False)
    with pytest.raises(AttributeError):  # frozen: a checked intervention cannot be given a bad coefficient later
        fine.coefficient = coefficient  # pyright: ignore[reportAttributeAccessIssue]  # on purpose


def test_coefficient_times_scale_is_held_below_the_float32_limit(dec_sae):
    st.check_coefficient(st.MAX_COEFFICIENT, 1e11)  # 1e15 in activation units: the limit itself
    for scale in (1e12, math.inf, math.nan):
        with pytest.raises(SteeringError, match=r"\|coefficient x scale\| <= 1e\+15"):
            Intervention(HOOK, dec_sae, [3], "add", st.MAX_COEFFICIENT, scale)


def test_steering_at_the_limit_keeps_every_output_finite(decoder, dec_sae, linear):
    """`MAX_COEFFICIENT` times the latent's scale, in every mode, through a LayerNorm model and one without."""
    for model, sae in ((decoder, dec_sae), linear):
        tokens = st.prompt_tokens(model, "QWERTY")
        n = tokens.shape[1]
        scale = float(sae.encode(st.hook_acts(model, tokens, HOOK)[0]).amax())
        for mode in ("add", "clamp", "orthogonal", "cap"):
            for sign in (1, -1):
                iv = Intervention(HOOK, sae, [3], mode, sign * st.MAX_COEFFICIENT, scale)
                out = st.generate(model, tokens, [iv], max_new_tokens=2)
                metrics = st.steered_metrics(model, out, n, intervention=iv)  # non-finite logits: a SteeringError
                assert all(math.isfinite(x) for x in metrics.as_json().values()), (mode, sign)


def test_an_edit_that_overflows_the_activations_is_refused_inside_the_pass(decoder, dec_sae):
    """A damaged SAE (a decoder row of norm 1e38) overflows float32 at coefficient 1000: the pass stops with
    the hook named, instead of generating from NaN logits."""
    damaged = copy.deepcopy(dec_sae)
    damaged.W_dec.data[3] *= 1e38
    iv = Intervention(HOOK, damaged, [3], "add", 1000.0)
    with pytest.raises(SteeringError, match=f"activations at {HOOK} non-finite in the model's torch.float32"):
        st.generate(decoder, PROMPT, [iv], max_new_tokens=3)


def test_a_transcoder_latent_steers_the_mlp_output_it_writes(decoder):
    """Steering by a transcoder latent adds its decoder row where the transcoder writes (the MLP's output, which
    `steered_hook` names); the modes that re-encode the edited activation are refused for it."""
    from saelab.steering.run import steered_hook

    d = decoder.cfg.d_model
    torch.manual_seed(0)
    tc = SAE.from_config(
        SAEConfig(
            d_in=d, d_sae=32, k=4, d_out=d, hook_name="blocks.0.hook_mlp_in", hook_name_out="blocks.0.hook_mlp_out"
        )
    ).eval()
    hook = steered_hook(tc, "blocks.0.hook_mlp_in")
    assert hook == "blocks.0.hook_mlp_out"
    tokens = st.prompt_tokens(decoder, PROMPT)
    x = st.hook_acts(decoder, tokens, hook)[0]
    seen = []
    with (
        torch.no_grad(),
        st.steer(decoder, [Intervention(hook, tc, [3], "add", 1.5, 2.0)], read=lambda h, a, p: seen.append(a[0])),
    ):
        decoder(tokens, return_type=None)
    torch.testing.assert_close(seen[0] - x, (3.0 * tc.W_dec[3]).expand_as(x), atol=1e-5, rtol=1e-5)
    for mode in ("clamp", "ablate"):
        with pytest.raises(SteeringError, match="transcoder's latents come from its MLP's input"):
            Intervention(hook, tc, [3], mode, 1.0)
