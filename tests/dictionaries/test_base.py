"""The SAE interface: config checks, initialisation, bookkeeping, folding, the training step."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from saelab.config import build
from saelab.dictionaries import SAE, SAEConfig, geometric_median, train_step
from saelab.errors import ConfigError
from tests.dictionaries.helpers import ARCHS, make_sae


def test_config_refuses_unknown_fields_and_bad_k():
    with pytest.raises(ValidationError, match="extra"):
        SAEConfig(d_in=8, d_sae=16, kk=3)  # pyright: ignore[reportCallIssue]  (the unknown field under test)
    with pytest.raises(ValidationError, match="k=40 exceeds d_sae=16"):
        SAEConfig(d_in=8, d_sae=16, k=40)
    assert SAEConfig(d_in=8, d_sae=64).aux_k_resolved == 4


@pytest.mark.parametrize(
    ("field", "value", "needs"),
    [
        ("d_in", 0, "greater than 0"),
        ("d_sae", -4, "greater than 0"),
        ("k", 0, "greater than 0"),
        ("aux_k", -1, "greater than or equal to 0"),
        ("aux_coef", -0.5, "greater than or equal to 0"),
        ("dead_tokens", 0, "greater than 0"),
        ("l1_coef", -1.0, "greater than or equal to 0"),
        ("l0_coef", -1.0, "greater than or equal to 0"),
        ("jumprelu_bandwidth", 0.0, "greater than 0"),
        ("jumprelu_init_threshold", -0.1, "greater than or equal to 0"),
        ("threshold_lr", 0.0, "greater than 0"),
        ("threshold_lr", 1.5, "less than or equal to 1"),
        ("sparse_density", -0.1, "greater than or equal to 0"),
        ("sparse_density", 1.5, "less than or equal to 1"),
        ("aux_sparse_density", 2.0, "less than or equal to 1"),
        ("context_size", 0, "greater than 0"),
    ],
)
def test_config_refuses_out_of_range_values_naming_the_field(field, value, needs):
    fields = {"d_in": 8, "d_sae": 16, "k": 4, field: value}
    with pytest.raises(ValidationError, match=rf"(?s){field}\n.*{needs}"):
        SAEConfig(**fields)
    with pytest.raises(ConfigError, match=rf"`{field}`: Input should be {needs} \(got {value}\)"):
        build(SAEConfig, fields, "SAE config")


def test_k_above_d_sae_is_refused_only_where_k_selects():
    with pytest.raises(ConfigError, match="k=40 exceeds d_sae=16; lower k or widen the SAE"):
        build(SAEConfig, {"arch": "batchtopk", "d_in": 8, "d_sae": 16, "k": 40}, "SAE config")
    assert SAEConfig(arch="relu", d_in=8, d_sae=16, k=40).k == 40  # dense SAEs ignore k


@pytest.mark.parametrize("arch", ARCHS)
def test_init(arch):
    sae = SAE.from_config(SAEConfig(arch=arch, d_in=8, d_sae=32))
    assert type(sae).arch == arch
    assert sae.W_enc.shape == (8, 32) and sae.W_dec.shape == (32, 8)
    assert sae.b_enc.shape == (32,) and sae.b_dec.shape == (8,)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert torch.equal(sae.W_enc, sae.W_dec.T)


def test_wrong_input_width_is_named():
    sae = make_sae()
    with pytest.raises(ValueError, match=r"d_in=12\], got shape \(3, 7\)"):
        sae.encode(torch.randn(3, 7, dtype=torch.float64))


def test_geometric_median_known_answers():
    line = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])
    assert geometric_median(line, iters=200).item() == pytest.approx(2.0, abs=1e-3)
    square = torch.tensor([[1.0, 1], [1, -1], [-1, 1], [-1, -1], [0.2, 0.1]])
    assert geometric_median(square, iters=200).tolist() == pytest.approx([0.2, 0.1], abs=1e-3)


def test_residual_spread_is_the_spread_of_the_residual():
    """AuxK's denominator from the residual's known squared norm equals the direct `spread`, offset mean and all."""
    from saelab.dictionaries.batch import spread

    residual = torch.randn(4096, 96, generator=torch.Generator().manual_seed(0)) + torch.linspace(-0.5, 0.5, 96)
    sse = residual.square().sum()
    got = make_sae("topk").residual_spread(residual, sse)
    torch.testing.assert_close(got, spread(residual), rtol=1e-5, atol=0)
    assert not torch.isclose(got, sse, rtol=1e-3)  # the mean's share is really taken off


def test_init_from_sample_scales_and_centres():
    sae = SAE.from_config(SAEConfig(d_in=16, d_sae=64))
    x = torch.randn(2000, 16) * 7 + 30
    sae.init_from_sample(x)
    scaled = x * sae.input_scale
    assert scaled.norm(dim=1).mean().item() == pytest.approx(4.0, rel=1e-4)
    torch.testing.assert_close(sae.b_dec, geometric_median(scaled), rtol=0, atol=1e-5)
    assert (sae.b_dec / sae.input_scale - 30).abs().max() < 0.6  # the centre of the cloud


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_input_scale_keeps_encodings(arch):
    sae = make_sae(arch)
    x = torch.randn(20, 12, dtype=torch.float64) * 3
    f, recon = sae.encode(x), sae(x)
    assert (f != 0).any()
    sae.fold_input_scale()
    assert sae.input_scale.item() == 1.0
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), recon)


def test_metrics_are_tensors():
    for arch in ARCHS:
        _, metrics = make_sae(arch).training_loss(torch.randn(8, 12, dtype=torch.float64))
        assert {"loss", "fvu", "l0"} <= set(metrics)
        assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in metrics.values())


def test_dead_latent_counts_tokens_and_resets_only_firing_latents():
    sae = make_sae()
    sae.tokens_since_fired.fill_(7)
    latents = torch.tensor([[1, 2], [2, 5]])
    acts = torch.tensor([[0.5, 0.0], [1.0, -0.3]])  # latent 5 was selected but did not fire
    sae.update_dead(latents, acts, n_tokens=2)
    expected = torch.full((48,), 9)
    expected[[1, 2]] = 0
    assert torch.equal(sae.tokens_since_fired, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_train_step_keeps_unit_decoder_and_lowers_loss(arch):
    sae = make_sae(arch, dtype="float32", l1_coef=0.5, l0_coef=0.1)
    sae.input_scale.fill_(1.0)
    x = torch.randn(256, 12) @ torch.randn(12, 12)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    first = sae.training_loss(x)[0].item()
    for _ in range(100):
        train_step(sae, opt, x)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48))
    assert sae.training_loss(x)[0].item() < 0.8 * first


def test_project_decoder_grad_removes_parallel_part():
    sae = make_sae()
    sae.W_dec.grad = torch.randn_like(sae.W_dec) + 3 * sae.W_dec.detach()
    before = sae.W_dec.grad.clone()
    sae.project_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-12
    torch.testing.assert_close(before - sae.W_dec.grad, (before * sae.W_dec).sum(1, keepdim=True) * sae.W_dec)
