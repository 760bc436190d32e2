"""The sparse kernels against dense autograd references, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from saelab.ops import kernels

B, D, M = 6, 5, 16


@pytest.fixture(autouse=True, params=["numba", "torch"])
def kernel_path(request, monkeypatch):
    """Every test runs with the CPU numba counting sort and with the torch.sort that GPUs use."""
    monkeypatch.setattr(kernels, "CPU_KERNELS", request.param == "numba")
    return request.param


def make_problem(
    seed: int = 0, k: int = 4, k_aux: int = 3
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor, Tensor]:
    """Random SAE tensors and main + AuxK entries; some entries have negative pre-activations."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    x, b_dec, W_enc, b_enc, W_dec = randn(B, D), randn(D) * 0.1, randn(D, M), randn(M) - 0.5, randn(M, D)
    pre = (x - b_dec) @ W_enc + b_enc
    _, cols = pre.topk(k)
    _, aux_cols = pre[:, : M // 2].topk(k_aux)  # AuxK among the "dead" first half
    lat = torch.cat([cols.flatten(), aux_cols.flatten()])
    bag = torch.cat([torch.arange(B).repeat_interleave(k), B + torch.arange(B).repeat_interleave(k_aux)])
    tensors = (x, b_dec, W_enc, b_enc, W_dec)
    for t in tensors:
        t.requires_grad_()
    return tensors, lat, bag


def gathered_vals(x, b_dec, W_enc, b_enc, lat, bag):
    return ((x - b_dec) @ W_enc + b_enc)[bag % x.shape[0], lat]


def dense_reference(x, b_dec, W_enc, b_enc, W_dec, lat, bag, n_bags):
    acts = gathered_vals(x, b_dec, W_enc, b_enc, lat, bag).relu()
    out = torch.zeros(n_bags, x.shape[1], dtype=x.dtype).index_add(0, bag, acts[:, None] * W_dec[lat])
    return out.view(n_bags // x.shape[0], x.shape[0], -1)


def sparse(x, b_dec, W_enc, b_enc, W_dec, lat, bag, n_bags):
    vals = gathered_vals(x, b_dec, W_enc, b_enc, lat, bag).detach()
    group_sizes = torch.bincount(bag // B, minlength=n_bags // B).tolist()
    entries = kernels.Entries(vals, lat, bag)
    out = kernels.sparse_autoencode(x, entries, group_sizes, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    return torch.stack(out)


def test_problem_has_masked_entries():
    tensors, lat, bag = make_problem()
    vals = gathered_vals(*tensors[:4], lat, bag)
    assert (vals < 0).any() and (vals > 0).any()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sparse_autoencode_matches_dense_autograd(seed):
    tensors, lat, bag = make_problem(seed)
    weights = torch.randn(2, B, D, dtype=torch.float64)
    ref = dense_reference(*tensors, lat, bag, 2 * B)
    out = sparse(*tensors, lat, bag, 2 * B)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)

    ref_grads = torch.autograd.grad((ref * weights).sum(), tensors)
    grads = torch.autograd.grad((out * weights).sum(), tensors)
    for name, g, r in zip(["x", "b_dec", "W_enc", "b_enc", "W_dec"], grads, ref_grads):
        assert r.abs().max() > 0, name
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12, msg=f"gradient of {name}")


def test_sparse_autoencode_gradcheck():
    tensors, lat, bag = make_problem(seed=3)
    assert torch.autograd.gradcheck(
        lambda x, b_dec, W_enc, b_enc, W_dec: sparse(x, b_dec, W_enc, b_enc, W_dec, lat, bag, 2 * B), tensors
    )


def test_sparse_autoencode_partial_grads():
    """Only the inputs that need a gradient get one, and they are still right."""
    tensors, lat, bag = make_problem(seed=4)
    x, b_dec, W_enc, b_enc, W_dec = tensors
    x.requires_grad_(False)
    W_dec.requires_grad_(False)
    ref = torch.autograd.grad(dense_reference(*tensors, lat, bag, 2 * B).sum(), [b_dec, W_enc, b_enc])
    got = torch.autograd.grad(sparse(*tensors, lat, bag, 2 * B).sum(), [b_dec, W_enc, b_enc])
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)


def test_variable_bags_like_batch_topk():
    """Bags of unequal size (including empty ones) as BatchTopK produces them."""
    tensors, _, _ = make_problem(seed=5)
    lat = torch.tensor([3, 7, 1, 2, 9, 4, 4, 0])
    bag = torch.tensor([0, 0, 0, 2, 2, 3, 4, 4])  # rows 1 and 5 have no active latent
    torch.testing.assert_close(sparse(*tensors, lat, bag, B), dense_reference(*tensors, lat, bag, B))
    assert torch.all(sparse(*tensors, lat, bag, B)[0, [1, 5]] == 0)


def test_group_sizes_must_cover_the_entries():
    tensors, lat, bag = make_problem()
    x, b_dec, W_enc, b_enc, W_dec = tensors
    vals = gathered_vals(*tensors[:4], lat, bag).detach()
    with pytest.raises(ValueError, match="must add up to"):
        kernels.sparse_autoencode(
            x, kernels.Entries(vals, lat, bag), [len(lat) - 1], W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec
        )


def test_bag_offsets_with_empty_bags():
    assert kernels.bag_offsets(torch.tensor([0, 0, 2, 2, 2]), 4).tolist() == [0, 2, 2, 5]


def test_topk_entries_known_answer():
    pre = torch.tensor([[0.1, 0.9, -1.0, 0.5], [3.0, -2.0, 2.0, 1.0]])
    vals, cols, rows = kernels.topk_entries(pre, 2)
    assert rows.tolist() == [0, 0, 1, 1]
    assert {(r, c) for r, c in zip(rows.tolist(), cols.tolist())} == {(0, 1), (0, 3), (1, 0), (1, 2)}
    torch.testing.assert_close(vals, pre[rows, cols])


def test_batch_topk_entries_known_answer():
    pre = torch.tensor([[0.1, 0.9, -1.0, 0.5], [3.0, -2.0, 2.0, 1.0], [0.0, 0.2, 0.3, 0.4]])
    vals, cols, rows = kernels.batch_topk_entries(pre, 2)  # the 6 largest of the batch
    assert rows.tolist() == [0, 0, 1, 1, 1, 2]
    assert cols.tolist() == [1, 3, 0, 2, 3, 3]
    torch.testing.assert_close(vals, pre[rows, cols])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_topk_entries_are_the_row_major_sorted_top_entries(dtype):
    """Uneven rows (one holds most of the batch's top entries, some none): exactly the `k * batch` largest, sorted by
    (row, latent), on both paths."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(37, 53, generator=g, dtype=dtype)
    pre[5] += 3.0
    vals, cols, rows = kernels.batch_topk_entries(pre, 4)
    flat = pre.flatten().topk(4 * 37).indices.sort().values
    assert torch.equal(rows * 53 + cols, flat)
    assert torch.equal(vals, pre[rows, cols])


def test_sparse_decode_matches_dense():
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(M, D, generator=g)
    acts = torch.rand(B, 3, generator=g)
    lat = torch.randint(0, M, (B, 3), generator=g)
    dense = torch.zeros(B, M).index_put((torch.arange(B)[:, None].expand(-1, 3), lat), acts, accumulate=True)
    torch.testing.assert_close(kernels.sparse_decode(acts, lat, W_dec), dense @ W_dec)


def test_group_by_latent_is_a_stable_sort_by_latent():
    g = torch.Generator().manual_seed(0)
    lat = torch.randint(0, 50, (5000,), generator=g)
    bag = torch.arange(5000) // 7
    acts = torch.rand(5000, generator=g)
    order, by_latent, bag_sorted, acts_sorted = kernels.group_by_latent(lat, bag, acts, d_sae=60)
    lat_sorted, ref_order = torch.sort(lat, stable=True)
    assert torch.equal(order, ref_order)
    assert torch.equal(by_latent, kernels.bag_offsets(lat_sorted, 60))
    assert torch.equal(bag_sorted, bag[ref_order]) and torch.equal(acts_sorted, acts[ref_order])
