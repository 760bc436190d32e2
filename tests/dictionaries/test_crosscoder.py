"""Crosscoders: the per-source encode/decode formulas, the sparse training step against dense autograd, the decoder
norm constraint, per-source input scales, FVU per source, save/load, and the configs refused."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.dictionaries import CrossCoder, CrossCoderConfig
from saelab.dictionaries.crosscoder import train_step
from saelab.dictionaries.registry import KINDS
from saelab.errors import ConfigError, MissingError, SAELoadError
from saelab.run import SAE_CONFIG, SAE_WEIGHTS

S, D, M = 3, 6, 24


def make_cc(activation: str = "batchtopk", **kw) -> CrossCoder:
    """A float64 crosscoder over three sources with non-trivial biases, input scales and threshold."""
    torch.manual_seed(0)
    fields = {"sources": ["a", "b", "c"], "d_in": D, "d_sae": M, "k": 4, "activation": activation, "dtype": "float64"}
    cc = CrossCoder(CrossCoderConfig(**(fields | kw)))
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.3)
        cc.b_dec.normal_(0, 0.3)
        cc.input_scale.copy_(torch.tensor([0.5, 2.0, 1.3], dtype=torch.float64))
        if cc.threshold is not None:
            cc.threshold.fill_(0.05)
    return cc


def reference_encode(cc: CrossCoder, x: torch.Tensor) -> torch.Tensor:
    """`act(sum_s (x_s * s_s - b_dec[s]) @ W_enc[s] + b_enc)`, one source at a time."""
    pre = cc.b_enc + sum((x[:, s] * cc.input_scale[s] - cc.b_dec[s]) @ cc.W_enc[s] for s in range(S))
    if cc.threshold is not None:
        return pre.relu() * (pre > cc.threshold)
    top = pre.topk(cc.cfg.k, dim=1)
    return torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_encode_decode_follow_the_per_source_formulas(activation):
    cc = make_cc(activation)
    x = torch.randn(40, S, D, dtype=torch.float64)
    with torch.no_grad():
        f = cc.encode(x)
        expected_f = reference_encode(cc, x)
        recon = cc.decode(f)
        expected = torch.stack([(f @ cc.W_dec[:, s] + cc.b_dec[s]) / cc.input_scale[s] for s in range(S)], dim=1)
    torch.testing.assert_close(f, expected_f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(recon, expected, rtol=1e-12, atol=1e-12)
    assert cc(x.view(4, 10, S, D)).shape == (4, 10, S, D)
    assert (f > 0).sum(1).float().mean() > 0  # the threshold and biases leave some latents on
    if activation == "topk":
        assert int((f > 0).sum(1).max()) <= cc.cfg.k


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_sparse_training_loss_matches_dense_autograd(activation):
    """The training step's sparse kernels give the loss and gradients that dense autograd gives for the same entries:
    the top k per row (topk) or the top k * rows of the batch (batchtopk), the sum of every source's squared error
    over the summed spread of the sources."""
    cc = make_cc(activation, aux_coef=0.0)
    x = torch.randn(32, S, D, dtype=torch.float64)
    loss, metrics = cc.training_loss(x)
    loss.backward()
    sparse_grads = {name: p.grad.clone() for name, p in cc.named_parameters() if p.grad is not None}
    cc.zero_grad()

    xs = (x * cc.input_scale[:, None]).view(32, -1)
    pre = torch.addmm(cc.b_enc, xs - cc.b_dec.view(-1), cc.W_enc.view(-1, M))
    flat = pre.detach().flatten()
    if activation == "topk":
        keep = torch.zeros_like(pre, dtype=torch.bool).scatter(1, pre.detach().topk(cc.cfg.k, dim=1).indices, True)
    else:
        keep = torch.zeros_like(flat, dtype=torch.bool).index_fill(0, flat.topk(cc.cfg.k * 32).indices, True)
        keep = keep.view_as(pre)
    recon = (pre.relu() * keep) @ cc.W_dec.view(M, -1) + cc.b_dec.view(-1)
    per_source = (xs - recon).view(32, S, D).square().sum((0, 2))
    spreads = (xs.view(32, S, D) - xs.view(32, S, D).mean(0)).square().sum((0, 2))
    dense = per_source.sum() / spreads.sum()
    dense.backward()
    torch.testing.assert_close(loss.detach(), dense.detach(), rtol=1e-12, atol=1e-12)
    for s in range(S):
        torch.testing.assert_close(metrics[f"fvu_s{s}"], (per_source[s] / spreads[s]).detach(), rtol=1e-12, atol=0)
    for name, p in cc.named_parameters():
        torch.testing.assert_close(sparse_grads[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_decoder_norms_sum_to_one_and_the_projection_keeps_them():
    """Each latent's per-source norms sum to 1 from the start and after a step; the projected gradient has no part
    that would change that sum (its inner product with each source's unit row, summed, is 0)."""
    cc = make_cc()
    torch.testing.assert_close(cc.decoder_norms().sum(1), torch.ones(M, dtype=torch.float64))
    optimizer = torch.optim.Adam(cc.parameters(), lr=1e-2)
    x = torch.randn(64, S, D, dtype=torch.float64)
    loss, _ = cc.training_loss(x)
    loss.backward()
    cc.project_decoder_grad()
    grad = cc.W_dec.grad
    assert grad is not None and grad.abs().sum() > 0
    unit = cc.W_dec / cc.W_dec.norm(dim=2, keepdim=True)
    torch.testing.assert_close((grad * unit).sum((1, 2)), torch.zeros(M, dtype=torch.float64), rtol=0, atol=1e-12)
    optimizer.zero_grad()
    train_step(cc, optimizer, x)
    torch.testing.assert_close(cc.decoder_norms().sum(1), torch.ones(M, dtype=torch.float64))
    assert cc.decoder_norms().std(1).max() > 1e-4  # the split between the sources is free


def test_each_source_is_normalised_on_its_own():
    """`init_from_sample` gives each source mean norm sqrt(d_in): a source in other units (x1000) gets the codes and
    the relative reconstruction it had."""
    x = torch.randn(256, S, D, dtype=torch.float64) + 0.5
    scaled = x * torch.tensor([1.0, 1000.0, 1e-3], dtype=torch.float64)[:, None]
    codes, fvus = [], []
    for data in (x, scaled):
        cc = make_cc()
        cc.init_from_sample(data)
        norms = (data * cc.input_scale[:, None]).norm(dim=2).mean(0)
        torch.testing.assert_close(norms, torch.full((S,), D**0.5, dtype=torch.float64))
        codes.append(cc.encode(data).detach())
        fvus.append(cc.fvu(data))
    torch.testing.assert_close(codes[0], codes[1], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fvus[0], fvus[1], rtol=1e-9, atol=0)


def test_fvu_per_source_known_answer():
    """A crosscoder exact on source 0 (one latent per coordinate of non-negative data) that decodes nothing into
    source 1 but its mean: FVU 0 and 1."""
    cfg = CrossCoderConfig(sources=["s0", "s1"], d_in=D, d_sae=D, k=D, activation="topk", dtype="float64")
    cc = CrossCoder(cfg)
    with torch.no_grad():
        cc.W_enc.zero_()
        cc.W_enc[0] = torch.eye(D, dtype=torch.float64)
        cc.W_dec.zero_()
        cc.W_dec[:, 0] = torch.eye(D, dtype=torch.float64)
        cc.b_enc.zero_()
        cc.b_dec.zero_()
    x = torch.rand(500, 2, D, dtype=torch.float64)
    with torch.no_grad():
        cc.b_dec[1] = x[:, 1].mean(0)
    torch.testing.assert_close(cc.fvu(x), torch.tensor([0.0, 1.0], dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["topk", "batchtopk"])
def test_save_load_round_trip(tmp_path, activation):
    cc = make_cc(activation)
    cc.save(tmp_path / "cc")
    loaded = CrossCoder.load(tmp_path / "cc")
    assert loaded.cfg == cc.cfg
    assert KINDS["crosscoder"] is CrossCoder
    assert json.loads((tmp_path / "cc" / SAE_CONFIG).read_text())["sources"] == ["a", "b", "c"]
    x = torch.randn(20, S, D, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), cc(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode(x), cc.encode(x), rtol=0, atol=0)
    assert loaded.inputs == loaded.outputs == ["a", "b", "c"]


def test_load_refuses_what_is_not_a_crosscoder(tmp_path):
    with pytest.raises(MissingError, match="CrossCoder.save"):
        CrossCoder.load(tmp_path / "nothing")
    cc = make_cc()
    cc.save(tmp_path / "cc")
    raw = json.loads((tmp_path / "cc" / SAE_CONFIG).read_text())
    (tmp_path / "cc" / SAE_CONFIG).write_text(json.dumps(raw | {"kind": "sae"}))
    with pytest.raises(SAELoadError, match="kind 'sae'"):
        CrossCoder.load(tmp_path / "cc")
    raw["crosscoder_config"]["d_sae"] = M + 1
    (tmp_path / "cc" / SAE_CONFIG).write_text(json.dumps(raw))
    with pytest.raises(SAELoadError, match="its config needs"):
        CrossCoder.load(tmp_path / "cc")
    (tmp_path / "cc" / SAE_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(SAELoadError, match="cannot load the crosscoder"):
        CrossCoder.load(tmp_path / "cc")


def test_configs_refused_with_the_fix():
    with pytest.raises(ConfigError, match="project each to a common width"):
        CrossCoderConfig.for_sources({"base/blocks.0.hook_mlp_out": 64, "tuned/blocks.0.hook_z": 128}, d_sae=32)
    cfg = CrossCoderConfig.for_sources({"base/h": 16, "tuned/h": 16}, d_sae=32, k=4)
    assert (cfg.sources, cfg.d_in, cfg.n_sources) == (["base/h", "tuned/h"], 16, 2)
    with pytest.raises(ValueError, match="name one array twice"):
        CrossCoderConfig(sources=["h", "h"], d_in=4, d_sae=8)
    with pytest.raises(ValueError, match="lower k"):
        CrossCoderConfig(sources=["a", "b"], d_in=4, d_sae=8, k=9)
    with pytest.raises(ValueError, match="at least 2"):
        CrossCoderConfig(sources=["a"], d_in=4, d_sae=8)
    with pytest.raises(ValueError, match=r"n_sources=3, d_in=6"):
        make_cc().encode(torch.zeros(5, 2, D))
