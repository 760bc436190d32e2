"""Circuits with transcoders replacing MLPs: a transcoder's nodes are its latents (encoded from the MLP's input) and
an error node, the MLP's output minus the transcoder's, on a tiny ReLU decoder where an exact transcoder is known."""

from __future__ import annotations

import pytest
import torch

from saelab.circuits import induction_task
from saelab.circuits.nodes import exact_patching, node_effects
from saelab.circuits.splice import clean_states, set_nodes, spliced_output
from saelab.dictionaries import SAE, SAEConfig
from saelab.errors import CircuitError
from saelab.models import forward_to
from tests.conftest import exact_transcoder

LAYER = 0
MLP_IN = f"blocks.{LAYER}.hook_mlp_in"  # saelab's: what the MLP reads, after ln2's weight and bias
MLP_OUT = f"blocks.{LAYER}.hook_mlp_out"


def transcoder(model, *, exact: bool, skip: bool = False) -> SAE:
    """A ReLU transcoder of layer 0's MLP: with `exact`, the MLP itself (its neurons as latents, `exact_transcoder`);
    otherwise random weights (and a random skip with `skip`)."""
    if exact:
        return exact_transcoder(model, LAYER, skip=skip)
    cfg = exact_transcoder(model, LAYER, skip=skip).cfg
    torch.manual_seed(1)
    sae = SAE.from_config(cfg).eval()
    if skip:
        assert sae.W_skip is not None
        with torch.no_grad():
            sae.W_skip.normal_(0, 0.1)
    return sae


@pytest.fixture(scope="module")
def task(relu_decoder):
    return induction_task(relu_decoder, n=4, length=6, position=9)


def test_an_exact_transcoder_has_no_error_and_leaves_the_output_unchanged(relu_decoder, task):
    tc = transcoder(relu_decoder, exact=True)
    clean = clean_states(relu_decoder, {MLP_OUT: tc}, task.tokens)[MLP_OUT]
    _, cache = relu_decoder.run_with_cache(task.tokens, names_filter=[f"blocks.{LAYER}.mlp.hook_post", MLP_OUT])
    torch.testing.assert_close(clean.f, cache[f"blocks.{LAYER}.mlp.hook_post"], atol=1e-4, rtol=1e-4)  # the neurons
    assert clean.err.abs().max() < 1e-4
    out = spliced_output(relu_decoder, task.tokens, {MLP_OUT: set_nodes(tc, clean)})
    torch.testing.assert_close(out, relu_decoder(task.tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("skip", [False, True])
def test_a_transcoders_error_node_is_the_mlp_output_minus_the_transcoders(relu_decoder, task, skip):
    tc = transcoder(relu_decoder, exact=False, skip=skip)
    clean = clean_states(relu_decoder, {MLP_OUT: tc}, task.tokens)[MLP_OUT]
    _, cache = relu_decoder.run_with_cache(task.tokens, names_filter=[MLP_OUT])
    with torch.no_grad():
        expected = cache[MLP_OUT] - tc(forward_to(relu_decoder, task.tokens, MLP_IN))
    torch.testing.assert_close(clean.err, expected, atol=1e-5, rtol=1e-5)
    assert expected.abs().max() > 0.1  # a random transcoder misses much: the error node carries it
    out = spliced_output(relu_decoder, task.tokens, {MLP_OUT: set_nodes(tc, clean)})
    torch.testing.assert_close(out, relu_decoder(task.tokens), atol=1e-4, rtol=1e-4)


def test_exact_patching_a_transcoder_latent_is_patching_its_mlp_neuron(relu_decoder, task):
    """Known answer: the exact transcoder's latent j at position p is the MLP's neuron j there, so patching the node
    to its baseline (the patch input's value) moves the metric exactly as patching the neuron does."""
    tc = transcoder(relu_decoder, exact=True)
    effects = exact_patching(relu_decoder, {MLP_OUT: tc}, task, baseline="patch", progress=False)[MLP_OUT]
    assert effects[:, -1].abs().max() < 1e-4  # the error node: zero at clean and at baseline
    hook_post = f"blocks.{LAYER}.mlp.hook_post"
    _, patch_cache = relu_decoder.run_with_cache(task.patch, names_filter=[hook_post])
    m_clean = task.metric(relu_decoder(task.tokens))
    strongest = effects[:, :-1].abs().flatten().topk(4).indices
    assert effects[:, :-1].abs().max() > 1e-3
    for flat in strongest.tolist():
        p, j = divmod(flat, effects.shape[1] - 1)

        def patch_neuron(act, hook, p=p, j=j):
            act[:, p, j] = patch_cache[hook_post][:, p, j]
            return act

        with torch.no_grad():
            m = task.metric(relu_decoder.run_with_hooks(task.tokens, fwd_hooks=[(hook_post, patch_neuron)]))
        torch.testing.assert_close(effects[p, j], (m - m_clean).mean(), atol=1e-4, rtol=1e-3)


def test_integrated_gradients_run_over_a_transcoder_and_an_sae_together(relu_decoder, task):
    """Node effects with a transcoder at layer 0's MLP and an SAE downstream: every node gets an effect, and the
    exact transcoder's error nodes none."""
    sae = SAE.from_config(SAEConfig(arch="topk", d_in=64, d_sae=96, k=8, hook_name="blocks.1.hook_resid_post")).eval()
    saes = {MLP_OUT: transcoder(relu_decoder, exact=True), "blocks.1.hook_resid_post": sae}
    result = node_effects(relu_decoder, saes, task, method="ig", ig_steps=4, progress=False)
    assert result.effects[MLP_OUT].shape[-1] == relu_decoder.cfg.d_mlp + 1
    assert result.effects[MLP_OUT][..., -1].abs().max() < 1e-4
    assert result.effects[MLP_OUT][..., :-1].abs().max() > 1e-3


def test_a_transcoder_keyed_by_another_hook_point_is_refused(relu_decoder, task):
    tc = transcoder(relu_decoder, exact=True)
    with pytest.raises(CircuitError, match="key it by the hook point it writes"):
        exact_patching(relu_decoder, {"blocks.1.hook_mlp_out": tc}, task, progress=False)
