"""Sparse kernels for top-k style SAEs.

A top-k training step needs only one dense product, the encoder pre-activations
`pre = (x - b_dec) @ W_enc + b_enc` (computed without autograd). Everything else
touches only the selected (row, latent) entries:

* forward decode: an embedding bag over `W_dec` rows weighted by the activations;
* activation gradient: one dot product per entry (embedding-bag weight backward);
* `W_dec`, `W_enc` and `b_enc` gradients: the entries are grouped by latent once
  (a parallel counting sort on the CPU) and each gradient row is an embedding bag over
  batch rows, so no `[batch, d_sae]` or `[nnz, d_in]` tensor is ever built;
* `b_dec`'s gradient through the encoder is `-W_enc @ grad_b_enc`.

Entries are given in COO form grouped into *bags*: bag `r` is output row `r` and
reads input row `r % batch`, so bags `[0, B)` reconstruct the batch from the main
latents and bags `[B, 2B)` from the AuxK latents, all in one autograd call.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange
from torch import Tensor

from saelab.ops.topk import match_torch_threads, topk_rows

_SUM = 0  # embedding-bag mode "sum"


def bag_offsets(bag: Tensor, n_bags: int) -> Tensor:
    """Start offset of each bag, given the sorted bag id of every entry."""
    counts = torch.bincount(bag, minlength=n_bags)
    return counts.cumsum(0) - counts


class Entries(NamedTuple):
    """Selected (row, latent) entries of a `[batch, d_sae]` pre-activation matrix in COO form, grouped by row."""

    vals: Tensor
    """`[nnz]` the pre-activation of each entry."""
    cols: Tensor
    """`[nnz]` the latent (column) of each entry."""
    rows: Tensor
    """`[nnz]` the row of each entry, sorted; for `sparse_autoencode` its bag (main rows `[0, B)`, AuxK `[B, 2B)`)."""


class LatentGroups(NamedTuple):
    """Entries regrouped by latent, stably (what `group_by_latent` returns)."""

    order: Tensor
    """`[nnz]` the position of each regrouped entry in the input entries."""
    by_latent: Tensor
    """`[d_sae]` the start offset of each latent's entries."""
    bag: Tensor
    """`[nnz]` the bags in the new order (`bag[order]`)."""
    acts: Tensor
    """`[nnz]` the activations in the new order (`acts[order]`)."""


def topk_entries(pre: Tensor, k: int, cols: Tensor | None = None) -> Entries:
    """Per-row top-k of `pre` among columns `cols` (default: all) as flat entries grouped by row."""
    vals, cols = topk_rows(pre, k, cols)
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
    return Entries(vals.flatten(), cols.flatten(), rows)


def flat_topk(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Unsorted top-`k` of a 1-D tensor, values and indices: the CPU kernel of `topk_rows` over it as one row (2.7x
    `torch.topk` for BatchTopK's k*B of B*d_sae on one thread, the same entries), `torch.topk` elsewhere."""
    vals, idx = topk_rows(values.reshape(1, -1), k)
    return vals[0], idx[0]


def batch_topk_entries(pre: Tensor, k: int) -> Entries:
    """Top `k * batch` entries of the whole batch (BatchTopK), grouped by row."""
    n_rows, width = pre.shape
    vals, flat = flat_topk(pre.flatten(), k * n_rows)
    flat, order = flat.sort()
    return Entries(vals[order], flat % width, flat // width)


CPU_KERNELS = True  # the numba counting sort for CPU tensors; tests switch it off (on this module) for the torch path


def group_by_latent(lat: Tensor, bag: Tensor, acts: Tensor, *, d_sae: int) -> LatentGroups:
    """Entries `(lat, bag, acts)` regrouped by latent, stably. A parallel counting sort on the CPU (numba),
    `torch.sort` elsewhere."""
    if not (CPU_KERNELS and acts.device.type == "cpu" and acts.dtype in (torch.float32, torch.float64)):
        lat_sorted, order = torch.sort(lat.int(), stable=True)
        return LatentGroups(order, bag_offsets(lat_sorted, d_sae), bag[order], acts[order])
    order, bag_sorted, acts_sorted = torch.empty_like(lat), torch.empty_like(bag), torch.empty_like(acts)
    by_latent = torch.empty(d_sae, dtype=torch.long)
    n_chunks = match_torch_threads()
    _counting_sort(
        lat.numpy(),
        bag.numpy(),
        acts.detach().numpy(),
        d_sae,
        n_chunks,
        order.numpy(),
        by_latent.numpy(),
        bag_sorted.numpy(),
        acts_sorted.numpy(),
    )
    return LatentGroups(order, by_latent, bag_sorted, acts_sorted)


@njit(parallel=True, cache=True)
def _counting_sort(lat, bag, acts, d_sae, n_chunks, order, starts, bag_sorted, acts_sorted):
    """Stable counting sort of the entries by `lat`; each of `n_chunks` threads counts, then
    scatters, its own contiguous slice of the entries."""
    n = lat.shape[0]
    size = (n + n_chunks - 1) // n_chunks
    pos = np.zeros((n_chunks, d_sae), np.int64)
    for c in prange(n_chunks):
        for e in range(c * size, min(n, (c + 1) * size)):
            pos[c, lat[e]] += 1
    total = 0
    for latent in range(d_sae):  # chunk c's entries of a latent follow chunk c-1's
        starts[latent] = total
        for c in range(n_chunks):
            count = pos[c, latent]
            pos[c, latent] = total
            total += count
    for c in prange(n_chunks):
        for e in range(c * size, min(n, (c + 1) * size)):
            p = pos[c, lat[e]]
            pos[c, lat[e]] = p + 1
            order[p] = e
            bag_sorted[p] = bag[e]
            acts_sorted[p] = acts[e]


class SparseAutoencode(torch.autograd.Function):
    """Decode selected encoder entries; gradients flow to the encoder and decoder.

    Entry `e` has latent `lat[e]`, bag `bag[e]` (sorted) and pre-activation
    `vals[e] = ((x - b_dec) @ W_enc + b_enc)[bag[e] % B, lat[e]]`, computed by the
    caller without autograd. Bags come in groups of B (main, then AuxK); `group_sizes` gives
    each group's number of entries. Returns one `[B, d_in]` tensor per group whose row `r`
    is `sum_{e in bag r} relu(vals[e]) * W_dec[lat[e]]`.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, W_dec, vals, lat, bag, group_sizes):
        n_rows = x.shape[0]
        if sum(group_sizes) != len(lat):
            raise ValueError(f"group_sizes {group_sizes} must add up to the {len(lat)} entries")
        acts = vals.relu()
        outs, offsets, start = [], [], 0
        # One call per group: embedding_bag splits bags evenly across threads, so one call over
        # 32-entry main bags and 192-entry AuxK bags would leave one thread most of the work.
        # Detached weights take the cheaper forward-only path (no bag bookkeeping for autograd).
        for g, size in enumerate(group_sizes):
            part = slice(start, start + size)
            group_offsets = bag_offsets(bag[part] - g * n_rows, n_rows)
            outs.append(
                F.embedding_bag(lat[part], W_dec.detach(), group_offsets, mode="sum", per_sample_weights=acts[part])
            )
            offsets.append(group_offsets + start)
            start += size
        offsets = torch.cat(offsets)
        ctx.save_for_backward(x, b_dec, W_enc, W_dec, vals, lat, bag, offsets)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        x, b_dec, W_enc, W_dec, vals, lat, bag, offsets = ctx.saved_tensors
        n_rows, d_sae = x.shape[0], W_dec.shape[0]
        grad_out = torch.cat(grad_outs)  # [n_groups * B, d_in], row = bag id

        # Group entries by latent once; every weight gradient row is then a bag.
        order, by_latent, bag_sorted, acts_sorted = group_by_latent(lat, bag, vals.relu(), d_sae=d_sae)

        grad_x = grad_b_dec = grad_W_enc = grad_b_enc = grad_W_dec = None
        if ctx.needs_input_grad[4]:
            grad_W_dec = F.embedding_bag(bag_sorted, grad_out, by_latent, mode="sum", per_sample_weights=acts_sorted)
        if any(ctx.needs_input_grad[:4]):
            # d(loss)/d(act) per entry: grad_out[bag] . W_dec[lat], no gathered copy.
            grad_acts = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_out, W_dec, lat, offsets, bag, _SUM
            )
            grad_pre = torch.where(vals > 0, grad_acts, 0.0)
            grad_b_enc = torch.zeros(d_sae, dtype=grad_pre.dtype, device=grad_pre.device)
            grad_b_enc.index_add_(0, lat, grad_pre)
        if ctx.needs_input_grad[2]:
            # Bags >= B read the same batch rows as bags < B: the table repeats x - b_dec.
            x_rows = (x - b_dec).repeat(len(grad_outs), 1)
            grad_W_enc = F.embedding_bag(
                bag_sorted, x_rows, by_latent, mode="sum", per_sample_weights=grad_pre[order]
            ).T
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(W_enc @ grad_b_enc)
        if ctx.needs_input_grad[0]:
            per_bag = F.embedding_bag(lat, W_enc.T.contiguous(), offsets, mode="sum", per_sample_weights=grad_pre)
            grad_x = per_bag.view(-1, n_rows, x.shape[1]).sum(0)
        return grad_x, grad_b_dec, grad_W_enc, grad_b_enc, grad_W_dec, None, None, None, None


def sparse_autoencode(
    x: Tensor,
    entries: Entries,
    group_sizes: list[int],
    *,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
) -> tuple[Tensor, ...]:
    """Functional form of `SparseAutoencode` for the `entries` (`rows` are bags) of an SAE's weights; returns one
    `[B, d_in]` tensor per group of `group_sizes`."""
    vals, lat, bag = entries
    return SparseAutoencode.apply(x, b_dec, W_enc, b_enc, W_dec, vals, lat, bag, group_sizes)


def sparse_decode(acts: Tensor, lat: Tensor, W_dec: Tensor) -> Tensor:
    """`sum_j acts[:, j] * W_dec[lat[:, j]]` for `[batch, k]` activations (no bias)."""
    return F.embedding_bag(lat, W_dec, mode="sum", per_sample_weights=acts.to(W_dec.dtype))
