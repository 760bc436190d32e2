"""TopK and BatchTopK SAEs: encoding, losses against a naive reference, dead latents, thresholds, autocast."""

from __future__ import annotations

import math

import pytest
import torch

from saelab.dictionaries import SAE, BatchTopKSAE
from tests.dictionaries.helpers import make_sae


def test_topk_encode_decode_forward():
    sae = make_sae()
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    f = sae.encode(x)
    assert f.shape == (3, 7, 48)
    assert ((f > 0).sum(-1) <= 5).all() and ((f != 0).sum(-1) >= 1).all()
    pre = sae.pre_acts(x.reshape(-1, 12) * sae.input_scale)
    expected = torch.zeros_like(pre).scatter(1, pre.topk(5).indices, pre.topk(5).values.relu())
    torch.testing.assert_close(f.reshape(-1, 48), expected / sae.input_scale)
    torch.testing.assert_close(sae(x), sae.decode(f))


def naive_topk_loss(sae: SAE, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Gao et al. TopK loss with AuxK, written densely and independently of saelab's code paths."""
    xs = x * sae.input_scale
    pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(sae.cfg.k)
    recon = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu()) @ sae.W_dec + sae.b_dec
    residual = xs - recon
    fvu = residual.pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()
    if not dead.any():
        return fvu
    aux = pre.masked_fill(~dead, -math.inf).topk(sae.cfg.aux_k_resolved)
    e_hat = torch.zeros_like(pre).scatter(1, aux.indices, aux.values.relu()) @ sae.W_dec
    e = residual.detach()
    return fvu + sae.cfg.aux_coef * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()


@pytest.mark.parametrize(
    ("sparse_density", "aux_sparse_density"),
    [(1.0, 1.0), (1.0, 0.0), (0.0, 0.0)],
    ids=["sparse", "sparse+dense-auxk", "dense"],
)
@pytest.mark.parametrize("n_dead", [0, 20])
def test_topk_training_loss_matches_naive_reference(sparse_density, aux_sparse_density, n_dead):
    sae = make_sae(sparse_density=sparse_density, aux_sparse_density=aux_sparse_density, aux_k=6, dead_tokens=100)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[torch.randperm(48)[:n_dead]] = True
    sae.tokens_since_fired[dead] = 100
    x = torch.randn(32, 12, dtype=torch.float64)

    loss, metrics = sae.training_loss(x)
    expected = naive_topk_loss(sae, x, dead)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert (metrics["auxk"] > 0).item() == (n_dead > 0)
    grads = torch.autograd.grad(loss, list(sae.parameters()))
    ref = torch.autograd.grad(expected, list(sae.parameters()))
    for (name, _), g, r in zip(sae.named_parameters(), grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


def test_aux_coef_zero_disables_auxk():
    sae = make_sae(aux_coef=0.0, dead_tokens=10)
    sae.tokens_since_fired.fill_(10)
    _, metrics = sae.training_loss(torch.randn(16, 12, dtype=torch.float64))
    assert metrics["auxk"].item() == 0 and metrics["dead_frac"].item() == 1


def test_training_loss_updates_dead_counters():
    sae = make_sae(dead_tokens=64)
    x = torch.randn(16, 12, dtype=torch.float64)
    _, metrics = sae.training_loss(x)
    fired = sae.encode(x).gt(0).any(0)
    assert torch.equal(sae.tokens_since_fired == 0, fired)
    assert (sae.tokens_since_fired[~fired] == 16).all()
    for _ in range(2):
        sae.training_loss(x)
    assert not sae.dead_mask().any()  # 48 tokens unfired < dead_tokens
    sae.training_loss(x)
    assert torch.equal(sae.dead_mask(), ~fired)  # exactly 64 tokens unfired: dead


def test_batch_topk_selects_k_per_token_on_average_and_learns_threshold():
    sae = make_sae("batchtopk", threshold_lr=0.5)
    assert isinstance(sae, BatchTopKSAE)
    sae.threshold.fill_(0.0)
    x = torch.randn(40, 12, dtype=torch.float64)
    _, metrics = sae.training_loss(x)
    pre = sae.pre_acts(x * sae.input_scale)
    kth = pre.flatten().topk(5 * 40).values
    assert metrics["l0"].item() == pytest.approx((kth > 0).sum().item() / 40)
    assert sae.threshold.item() == pytest.approx(0.5 * kth[kth > 0].min().item())
    assert ((sae.encode(x) > 0) == (pre > sae.threshold)).all()


def test_cpu_autocast_matches_float32():
    sae = make_sae(dtype="float32")
    x = torch.randn(64, 12)
    loss, _ = sae.training_loss(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, metrics = sae.training_loss(x)
    assert low.dtype == torch.float32 and low.item() == pytest.approx(loss.item(), rel=0.05)
    low.backward()
    assert sae.W_enc.grad is not None
    assert sae.W_enc.grad.dtype == torch.float32
