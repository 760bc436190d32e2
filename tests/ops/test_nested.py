"""The Matryoshka kernels (`nested_sse`, `dense_topk_decodes`) against plain autograd, in float64 (summation order
alone separates them: tolerances 1e-10 relative, 1e-12 absolute)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from saelab.dictionaries import matryoshka
from saelab.ops import kernels

B, D, M = 7, 5, 24
RTOL, ATOL = 1e-10, 1e-12


def randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)


def reference_sse(target: Tensor, base: Tensor, decodes: list[Tensor], held: Tensor | None) -> Tensor:
    """Each nested reconstruction's squared error the obvious way: build it, subtract, square, sum."""
    out = []
    for j in range(len(decodes)):
        r = target - (base + sum(decodes[: j + 1]))
        out.append((r if held is None else r * held).square().sum())
    return torch.stack(out)


@pytest.mark.parametrize("base_rows", [False, True], ids=["base [d]", "base [batch, d]"])
@pytest.mark.parametrize("masked", [False, True], ids=["all dims", "held-out dims"])
@pytest.mark.parametrize("n_decodes", [1, 3])
def test_nested_sse_matches_autograd(base_rows, masked, n_decodes):
    g = torch.Generator().manual_seed(n_decodes + 2 * masked + 4 * base_rows)
    target, decodes = randn(g, B, D), [randn(g, B, D) for _ in range(n_decodes)]
    base = randn(g, B, D) if base_rows else randn(g, D)
    held = (torch.rand(D, generator=g) < 0.5).double() if masked else None
    weights = torch.rand(n_decodes, generator=g, dtype=torch.float64)  # a loss weighting each prefix differently
    inputs = [target, base, *decodes]

    got = kernels.nested_sse(target, base, decodes, held)
    want = reference_sse(target, base, decodes, held)
    torch.testing.assert_close(got.sse, want, rtol=RTOL, atol=ATOL)
    for j, residual in enumerate(got.residuals):  # the residuals are the reconstructions' own, without gradient
        expected = target - base - sum(decodes[: j + 1])
        torch.testing.assert_close(
            residual, (expected if held is None else expected * held).detach(), rtol=RTOL, atol=ATOL
        )
        assert not residual.requires_grad
    grads = torch.autograd.grad((got.sse * weights).sum(), inputs)
    want_grads = torch.autograd.grad((want * weights).sum(), inputs)
    for name, a, b in zip(["target", "base", *(f"decode {i}" for i in range(n_decodes))], grads, want_grads):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=name)


def test_nested_sse_gradcheck():
    g = torch.Generator().manual_seed(1)
    target, base, decodes = randn(g, 3, 2), randn(g, 2), [randn(g, 3, 2) for _ in range(2)]
    held = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda *t: kernels.nested_sse(t[0], t[1], t[2:], held).sse, (target, base, *decodes)
    )


def reference_topk_decode(x_in, cols, k, W_enc, b_enc, W_dec):
    """One group's decode with the whole dictionary's dense tensors: pre-activations of every latent, all but the top
    `k` of `cols` per row zeroed, ReLU'd, times `W_dec`."""
    pre = x_in @ W_enc + b_enc
    idx = cols[pre[:, cols].topk(k, dim=1).indices]
    acts = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    return acts @ W_dec


@pytest.mark.parametrize("ks", [[2], [6], [2, 3, 6]], ids=["1 group", "1 whole group", "3 groups, 1 whole"])
def test_dense_topk_decodes_match_autograd(ks):
    n_groups = len(ks)
    g = torch.Generator().manual_seed(sum(ks))
    x_in, W_enc, b_enc, W_dec = randn(g, B, D), randn(g, D, M), randn(g, M), randn(g, M, D)
    cols = torch.randperm(M, generator=g)[: 6 * n_groups].view(n_groups, 6).sort(1).values
    groups = [(c, k) for c, k in zip(cols, ks, strict=True)]
    weights = torch.rand(n_groups, B, D, generator=g, dtype=torch.float64)
    inputs = [x_in, W_enc, b_enc, W_dec]

    got = kernels.dense_topk_decodes(x_in, groups, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, mm_dtype=torch.float64)
    want = [reference_topk_decode(x_in, c, k, W_enc, b_enc, W_dec) for c, k in groups]
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    grads = torch.autograd.grad(torch.stack([(w * a).sum() for w, a in zip(weights, got)]).sum(), inputs)
    want_grads = torch.autograd.grad(torch.stack([(w * b).sum() for w, b in zip(weights, want)]).sum(), inputs)
    for name, a, b in zip(["x_in", "W_enc", "b_enc", "W_dec"], grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=name)


@pytest.mark.parametrize("cpu_kernels", [True, False], ids=["numba", "torch"])
def test_band_entries_known_answer(cpu_kernels, monkeypatch):
    """Entries regrouped into bands [0, 2), [2, 5), [5, d_sae), rows still in order inside each band, band j's bags
    offset by j * n_rows; a band with no entries gets a count of 0."""
    monkeypatch.setattr(kernels, "CPU_KERNELS", cpu_kernels)
    vals = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], dtype=torch.float64)
    cols = torch.tensor([6, 1, 3, 0, 5, 2, 1])
    rows = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    (got_vals, got_cols, got_bags), counts = matryoshka.band_entries(kernels.Entries(vals, cols, rows), [2, 5], 3)
    assert counts == [3, 2, 2]
    assert got_cols.tolist() == [1, 0, 1, 3, 2, 6, 5]
    assert got_bags.tolist() == [0, 1, 2, 3, 5, 6, 7]
    torch.testing.assert_close(got_vals, torch.tensor([0.2, 0.4, 0.7, 0.3, 0.6, 0.1, 0.5], dtype=torch.float64))
    (_, _, bags), counts = matryoshka.band_entries(kernels.Entries(vals, cols, rows), [2, 4, 5], 3)
    assert counts == [3, 2, 0, 2]
    assert bags.tolist() == [0, 1, 2, 3, 5, 9, 10]
