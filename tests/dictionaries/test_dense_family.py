"""JumpReLU and ReLU SAEs: the straight-through gradients."""

from __future__ import annotations

import torch

from saelab.dictionaries import JumpReLUSAE
from tests.dictionaries.helpers import make_sae


def test_jumprelu_straight_through_gradients():
    sae = make_sae("jumprelu", jumprelu_bandwidth=0.2, l0_coef=2.0)
    assert isinstance(sae, JumpReLUSAE)
    x = torch.randn(64, 12, dtype=torch.float64)
    loss, _ = sae.training_loss(x)
    (grad_threshold,) = torch.autograd.grad(loss, [sae.threshold])
    pre = sae.pre_acts(x * sae.input_scale)
    acts = pre * (pre > sae.threshold)
    recon = acts @ sae.W_dec + sae.b_dec
    xs = x * sae.input_scale
    total_var = (xs - xs.mean(0)).pow(2).sum()
    grad_acts = (2 * (recon - xs) @ sae.W_dec.T / total_var).detach()
    window = ((pre - sae.threshold).abs() < 0.1).double()
    expected = -(sae.threshold / 0.2 * window * grad_acts).sum(0) - 2.0 * window.sum(0) / 0.2 / total_var
    torch.testing.assert_close(grad_threshold, expected.detach())
    assert (grad_threshold != 0).any()
