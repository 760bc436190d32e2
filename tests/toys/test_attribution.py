"""The MLP toy whose attribution graph has a known answer: it predicts `B` exactly when `A` is in the prompt, its
head 1.0 attends to `A`'s position, and its transcoders are its MLPs."""

from __future__ import annotations

import torch

from saelab.toys.attribution import KNOWN_HEAD, A, B, mlp_graph_toy, mlp_transcoder


def test_the_toy_predicts_b_after_a_through_its_known_head():
    toy = mlp_graph_toy(n_pos=12, a_pos=5)
    logits, cache = toy.model.run_with_cache(toy.tokens[None])
    assert torch.as_tensor(logits)[0, -1].softmax(-1)[B] > 0.95
    layer, head = KNOWN_HEAD
    assert cache[f"blocks.{layer}.attn.hook_pattern"][0, head, -1, toy.a_pos] > 0.99
    without = toy.tokens.clone()
    without[toy.a_pos] = without[toy.a_pos + 1]  # a filler instead of A
    assert toy.model(without[None])[0, -1].argmax() != B
    assert A not in without.tolist()


def test_the_toys_transcoders_are_its_mlps_and_noise_makes_an_error():
    toy = mlp_graph_toy()
    _, cache = toy.model.run_with_cache(toy.tokens[None])
    for layer, tc in enumerate(toy.transcoders):
        mlp_in, mlp_out = cache[f"blocks.{layer}.hook_resid_mid"][0], cache[f"blocks.{layer}.hook_mlp_out"][0]
        torch.testing.assert_close(tc(mlp_in), mlp_out, atol=1e-6, rtol=1e-6)  # no LayerNorm: the MLP reads resid_mid
        noisy = mlp_transcoder(toy.model, layer, noise=0.1)
        assert (noisy(mlp_in) - mlp_out).abs().max() > 1e-2
