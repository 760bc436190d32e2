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

from collections.abc import Sequence
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
    if CPU_KERNELS and vals.device.type == "cpu" and vals.dtype in (torch.float32, torch.float64):
        out = Entries(torch.empty_like(vals), torch.empty_like(flat), torch.empty_like(flat))
        _sort_flat(vals.numpy(), flat.numpy(), width, n_rows, *(t.numpy() for t in out))
        return out
    flat, order = flat.sort()
    return Entries(vals[order], flat % width, flat // width)


@njit(cache=True)
def _sort_flat(vals, flat, width, n_rows, vals_out, cols_out, rows_out):
    """The distinct flat indices `flat` into `[n_rows, width]` sorted (`torch.sort`'s order, ~30x faster on one
    thread): a counting sort by row, then an insertion sort of each row's few columns; `vals` follow."""
    counts = np.zeros(n_rows + 1, np.int64)
    for e in range(flat.shape[0]):
        counts[flat[e] // width + 1] += 1
    for r in range(n_rows):
        counts[r + 1] += counts[r]
    pos = counts[:-1].copy()
    for e in range(flat.shape[0]):
        r = flat[e] // width
        p = pos[r]
        pos[r] = p + 1
        vals_out[p], cols_out[p], rows_out[p] = vals[e], flat[e] - r * width, r
    for r in range(n_rows):
        for p in range(counts[r] + 1, counts[r + 1]):
            c, v, q = cols_out[p], vals_out[p], p
            while q > counts[r] and cols_out[q - 1] > c:
                cols_out[q], vals_out[q] = cols_out[q - 1], vals_out[q - 1]
                q -= 1
            cols_out[q], vals_out[q] = c, v


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


def band_sort(entries: Entries, inner: Sequence[int], n_rows: int) -> tuple[Entries, list[int]] | None:
    """`matryoshka.band_entries` on the CPU in one serial numba pass (a stable counting sort by band; ~20 small torch
    ops otherwise, each a thread barrier that a busy machine stretches to milliseconds); None where the torch path
    serves (other devices or dtypes, or `CPU_KERNELS` off)."""
    vals, cols, rows = entries
    if not (CPU_KERNELS and vals.device.type == "cpu" and vals.dtype in (torch.float32, torch.float64)):
        return None
    out = Entries(torch.empty_like(vals), torch.empty_like(cols), torch.empty_like(rows))
    counts = np.zeros(len(inner) + 1, np.int64)
    _band_sort(
        vals.detach().numpy(),
        cols.numpy(),
        rows.numpy(),
        np.asarray(inner, np.int64),
        n_rows,
        counts,
        *(t.numpy() for t in out),
    )
    return out, counts.tolist()


@njit(cache=True)
def _band_sort(vals, cols, rows, inner, n_rows, counts, vals_out, cols_out, bags_out):
    """Stable counting sort of the entries by band (`searchsorted(inner, col, "right")`), bag `band * n_rows + row`."""
    n = cols.shape[0]
    band = np.searchsorted(inner, cols, side="right")
    for e in range(n):
        counts[band[e]] += 1
    pos = np.zeros(counts.shape[0], np.int64)
    for j in range(1, counts.shape[0]):
        pos[j] = pos[j - 1] + counts[j - 1]
    for e in range(n):
        j = band[e]
        p = pos[j]
        pos[j] = p + 1
        vals_out[p] = vals[e]
        cols_out[p] = cols[e]
        bags_out[p] = rows[e] + j * n_rows


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
        offsets = bag_offsets(bag, len(group_sizes) * n_rows)  # every bag's start, all groups in one count
        outs, start = [], 0
        # One call per group: embedding_bag splits bags evenly across threads, so one call over
        # 32-entry main bags and 192-entry AuxK bags would leave one thread most of the work.
        # Detached weights take the cheaper forward-only path (no bag bookkeeping for autograd).
        for g, size in enumerate(group_sizes):
            part = slice(start, start + size)
            group_offsets = offsets[g * n_rows : (g + 1) * n_rows]
            outs.append(
                F.embedding_bag(
                    lat[part],
                    W_dec.detach(),
                    group_offsets - start if start else group_offsets,
                    mode="sum",
                    per_sample_weights=acts[part],
                )
            )
            start += size
        ctx.save_for_backward(x, b_dec, W_enc, W_dec, vals, lat, bag, offsets)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        x, b_dec, W_enc, W_dec, vals, lat, bag, offsets = ctx.saved_tensors
        n_rows, d_sae = x.shape[0], W_dec.shape[0]
        # [n_groups * B, d_out], row = bag
        grad_out = _stacked(grad_outs)

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
            # Bag r reads batch row r % B: index x - b_dec by it rather than repeat the table per group.
            rows_sorted = bag_sorted % n_rows if len(grad_outs) > 1 else bag_sorted
            grad_W_enc = F.embedding_bag(
                rows_sorted, x - b_dec, by_latent, mode="sum", per_sample_weights=grad_pre[order]
            ).T
        if ctx.needs_input_grad[1]:
            grad_b_dec = -(W_enc @ grad_b_enc)
        if ctx.needs_input_grad[0]:
            per_bag = F.embedding_bag(lat, W_enc.T.contiguous(), offsets, mode="sum", per_sample_weights=grad_pre)
            grad_x = per_bag.view(-1, n_rows, x.shape[1]).sum(0)
        return grad_x, grad_b_dec, grad_W_enc, grad_b_enc, grad_W_dec, None, None, None, None


def _stacked(grads: Sequence[Tensor]) -> Tensor:
    """The gradients `[B, d]` of `SparseAutoencode`'s outputs as one `[n * B, d]` table: the buffer they are
    consecutive slices of when they are (`NestedSSE.backward` writes them so), else a copy of them joined."""
    first = grads[0]
    base = first._base
    if len(grads) == 1:
        return first
    if (
        base is not None
        and base.is_contiguous()
        and base.numel() == first.numel() * len(grads)
        and all(g._base is base and g.data_ptr() == base.data_ptr() + i * g.nbytes for i, g in enumerate(grads))
    ):
        return base.view(-1, first.shape[-1])
    return torch.cat(list(grads))


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


class NestedSSE(torch.autograd.Function):
    """Squared errors of nested reconstructions from one running residual.

    Reconstruction `j` is `base + decodes[0] + ... + decodes[j]` (Matryoshka prefix `j`'s, from the decodes of its
    latent bands; one decode: a plain SAE's), residual `r_j = target - base - decodes[0] - ... - decodes[j]`, each a
    subtraction from `r_{j-1}`. With `held` (`[d]`, 0/1: the masked objective's held-out dimensions) the residuals are
    `r_j * held`. Returns `[G]` squared errors `|r_j|^2` and the residuals (no gradient). The backward pass is a reverse
    running sum: `d/d decodes[i] = -2 sum_{j >= i} grad_j r_j`, one fused multiply-add per decode, where autograd
    over the prefixes' own `(target - recon)^2` takes five ops per prefix and a copy of every reconstruction.
    """

    @staticmethod
    def forward(ctx, target, base, held, *decodes):
        residuals, r = [], target - base
        for decode in decodes:
            r = r - decode
            residuals.append(r if held is None else r * held)
        sse = torch.stack([torch.dot(m.view(-1), m.view(-1)) for m in residuals])
        ctx.save_for_backward(*residuals)
        ctx.set_materialize_grads(False)  # the residuals get no gradient: no zero tensors for them
        ctx.base_dims = base.dim()
        ctx.mark_non_differentiable(*residuals)
        return (sse, *residuals)

    @staticmethod
    def backward(ctx, grad_sse, *_):
        residuals = ctx.saved_tensors
        if grad_sse is None:
            return (None,) * (3 + len(residuals))
        coef = -2 * grad_sse
        # Every decode's gradient in one buffer, in order: `SparseAutoencode.backward` reads them as one table.
        grads = residuals[0].new_empty((len(residuals), *residuals[0].shape))
        last = len(residuals) - 1
        torch.mul(residuals[last], coef[last], out=grads[last])
        for j in range(last - 1, -1, -1):
            torch.addcmul(grads[j + 1], residuals[j], coef[j], out=grads[j])
        acc = grads[0]
        grad_target = -acc if ctx.needs_input_grad[0] else None
        grad_base = None
        if ctx.needs_input_grad[1]:
            grad_base = acc.sum(0) if ctx.base_dims == 1 else acc
        return grad_target, grad_base, None, *grads.unbind(0)


class NestedResiduals(NamedTuple):
    """What `nested_sse` returns."""

    sse: Tensor
    """`[G]` squared error of each nested reconstruction, shortest first."""
    residuals: list[Tensor]
    """`[batch, d_out]` residual of each (target minus reconstruction; with `held`, zero off the held-out dimensions),
    without gradient."""


def nested_sse(target: Tensor, base: Tensor, decodes: Sequence[Tensor], held: Tensor | None = None) -> NestedResiduals:
    """Functional form of `NestedSSE`: the squared errors of `base + decodes[0] + ... + decodes[j]` against `target`
    for every `j` (on the dimensions where `held` is 1, when given), differentiable in `target`, `base` (`[d_out]` or
    `[batch, d_out]`) and the decodes."""
    sse, *residuals = NestedSSE.apply(target, base, held, *decodes)
    return NestedResiduals(sse, residuals)


def dense_topk_decodes(
    x_in: Tensor,
    groups: Sequence[tuple[Tensor, int]],
    *,
    W_enc: Tensor,
    b_enc: Tensor,
    W_dec: Tensor,
    mm_dtype: torch.dtype,
) -> list[Tensor]:
    """For each group `(cols, k)` of latents (AuxK's dead latents; with Matryoshka prefixes, those of each band), the
    decode `[batch, d_out]` of the top `k` per row of `x_in @ W_enc[:, cols] + b_enc[cols]`, ReLU'd, with dense
    products over the groups' columns only (cost ~ batch x n_cols x d_in) and plain autograd; `x_in` is the centred
    input. The groups share one gather of the weights' columns and one encoder product, so `G` groups cost about one
    of their total width: the weights' gradients are scattered back once, not `G` times."""
    cols = torch.cat([c for c, _ in groups]) if len(groups) > 1 else groups[0][0]
    sizes = [len(c) for c, _ in groups]
    pre = torch.addmm(b_enc[cols].to(mm_dtype), x_in.to(mm_dtype), W_enc[:, cols].to(mm_dtype)).to(x_in.dtype)
    with torch.no_grad():
        picks, start = [], 0
        for n, (_, k) in zip(sizes, groups, strict=True):
            span = None if n == len(cols) else torch.arange(start, start + n, device=pre.device)
            if k >= n:  # every latent of the group (a short band's few dead ones): its top k needs no search
                span = torch.arange(n, device=pre.device) if span is None else span
                picks.append(span.expand(pre.shape[0], n))
            else:
                picks.append(topk_rows(pre.detach(), k, span)[1])
            start += n
        idx = torch.cat(picks, 1) if len(picks) > 1 else picks[0]
    acts = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    if len(groups) == 1:
        return [acts @ W_dec[cols]]
    return [a @ w for a, w in zip(acts.split(sizes, 1), W_dec[cols].split(sizes), strict=True)]


def sparse_decode(acts: Tensor, lat: Tensor, W_dec: Tensor) -> Tensor:
    """`sum_j acts[:, j] * W_dec[lat[:, j]]` for `[batch, k]` activations (no bias)."""
    return F.embedding_bag(lat, W_dec, mode="sum", per_sample_weights=acts.to(W_dec.dtype))
