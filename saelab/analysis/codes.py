"""The pass: every stored row encoded once into its sparse code, indexed for the per-latent panels.

The code keeps (row, latent, value) of each nonzero activation. Every panel is computed exactly from it,
without reading the activations again: top examples, examples from true quantile bins of the nonzero
activations (sampled uniformly within each bin by random priorities, i.e. reservoir sampling), histograms,
co-occurrence, and each example's context.

Under `torchrun` the rows are split across ranks in whole batches (`rank_rows`), each rank encodes its own, and
`gather_code` puts the pieces together on rank 0 in row order: the same code, batch for batch, as one rank's.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from saelab.dictionaries import SAE, CrossCoder
from saelab.distributed import Ranks, gather_objects, ranks
from saelab.ops.topk import topk_rows
from saelab.store import ActivationStore, prefetch


class SparseBatch(NamedTuple):
    """The nonzero latents of one batch of rows, sorted by (row, latent), as tensors on the batch's device."""

    rows: torch.Tensor
    """Row of each entry within the batch."""
    latents: torch.Tensor
    """Latent of each entry."""
    values: torch.Tensor
    """Activation of each entry (positive)."""


class SparseCode(NamedTuple):
    """The nonzero latents of a store's rows, sorted by (row, latent), as numpy arrays."""

    rows: np.ndarray
    """Store row of each entry (int64)."""
    latents: np.ndarray
    """Latent of each entry (int32)."""
    values: np.ndarray
    """Activation of each entry (float32, positive)."""


class QuantileSamples(NamedTuple):
    """Each latent's quantile bins of its nonzero activations, and examples drawn from inside each bin."""

    edges: np.ndarray
    """Bin edges `[d_sae, bins + 1]` (0 for a latent that never fired)."""
    rows: np.ndarray
    """Store rows of the examples `[d_sae, bins, per_bin]`, -1 padded."""
    acts: np.ndarray
    """Their activations `[d_sae, bins, per_bin]`, 0 padded."""


def sparse_codes(
    store: ActivationStore,
    sae: SAE | CrossCoder,
    hook: str | Sequence[str],
    *,
    n_rows: int,
    batch_size: int,
    device: torch.device,
    start: int = 0,
    progress: bool = True,
) -> SparseCode:
    """Encode rows [start, n_rows) of the array `hook` (a crosscoder's: of its sources, `[rows, S, d]`, the arrays
    `hook` in the order of `CrossCoder.inputs`) once, in batches of `batch_size` from `start`; every nonzero (row,
    latent, value), sorted by (row, latent), with store row numbers."""
    arrays = [hook] if isinstance(hook, str) else list(hook)

    def read() -> Iterator[tuple[int, torch.Tensor]]:
        for first in range(start, n_rows, batch_size):
            rows = slice(first, min(first + batch_size, n_rows))
            x = [store.activations(a, rows) for a in arrays]
            yield first, x[0] if isinstance(hook, str) else torch.stack(x, dim=1)

    rows, feats, vals = [np.zeros(0, np.int64)], [np.zeros(0, np.int32)], [np.zeros(0, np.float32)]
    with (
        torch.no_grad(),
        tqdm(
            total=n_rows - start, unit="tok", unit_scale=True, disable=not progress, desc=f"encode {arrays[0]}"
        ) as bar,
    ):
        for first, x in prefetch(read(), 2):
            r, c, v = encode_sparse(sae, x.to(device))
            rows.append((r + first).cpu().numpy())
            feats.append(c.to(torch.int32).cpu().numpy())
            vals.append(v.float().cpu().numpy())
            bar.update(len(x))
    return SparseCode(np.concatenate(rows), np.concatenate(feats), np.concatenate(vals))


def rank_rows(n_rows: int, batch_size: int, here: Ranks) -> range:
    """The rows of [0, n_rows) that rank `here` encodes: a contiguous run of whole batches of `batch_size` (the
    batches of a 1-rank pass, so every row is encoded in the same batch as on one rank), ranks in row order."""
    n_batches = -(-n_rows // batch_size)
    first, last = (n_batches * r // here.world for r in (here.rank, here.rank + 1))
    return range(first * batch_size, min(last * batch_size, n_rows))


def gather_code(code: SparseCode) -> SparseCode:
    """Every rank's `code` (of its `rank_rows`) on rank 0, in rank order: the code of all the rows, as one rank
    computes it; the other ranks get an empty code. One `torch.distributed.gather` per array, each rank's part
    padded to the longest (NCCL gathers on this rank's GPU); `code` itself on one rank."""
    here = ranks()
    if not here.many:
        return code
    sizes = gather_objects(len(code.values))
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    parts = []
    for a in code:
        mine = torch.zeros(max(sizes), dtype=torch.from_numpy(a[:0]).dtype, device=on)
        mine[: len(a)] = torch.from_numpy(a).to(on)
        into = [torch.empty_like(mine) for _ in sizes] if here.main else None
        dist.gather(mine, into, dst=0)
        whole = [t[:n].cpu().numpy() for t, n in zip(into, sizes)] if into is not None else [a[:0]]
        parts.append(np.concatenate(whole))
    return SparseCode(*parts)


def encode_sparse(sae: SAE | CrossCoder, x: torch.Tensor) -> SparseBatch:
    """(row, latent, value) of the nonzero latents of `x` (a crosscoder's: `[rows, S, d_in]`), sorted by (row, latent).

    TopK SAEs are encoded straight from the top-k of the pre-activations, never densely."""
    if isinstance(sae, SAE) and sae.cfg.arch == "topk":
        vals, idx = topk_rows(sae.pre_acts(sae.prepare_input(x)), sae.cfg.k)
        idx, order = idx.sort(dim=1)
        vals = vals.gather(1, order).relu() / sae.input_scale
        rows = torch.arange(len(x), device=x.device)[:, None].expand_as(idx)
        keep = vals > 0
        return SparseBatch(rows[keep], idx[keep], vals[keep])
    f = sae.encode(x)
    r, c = f.nonzero(as_tuple=True)  # row-major, so (row, latent) pairs come out sorted
    return SparseBatch(r, c, f[r, c])


def _argsort_pairs(major: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """Order by (major, minor) for non-negative ints `major` < 2^31 and non-negative float32 or
    uint32 `minor`: one int64 sort (the bits of non-negative floats sort like the floats)."""
    bits = minor.view(np.uint32) if minor.dtype == np.float32 else minor.astype(np.uint32)
    return np.argsort((major.astype(np.int64) << 32) | bits.astype(np.int64), kind="stable")


def _segments(sorted_keys: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of each key 0..n-1 in a sorted key array."""
    return np.searchsorted(sorted_keys, np.arange(n)), np.searchsorted(sorted_keys, np.arange(n), side="right")


def _gather(values: np.ndarray, idx: np.ndarray, valid: np.ndarray, fill: float | int) -> np.ndarray:
    out = np.full(idx.shape, fill, dtype=values.dtype)
    out[valid] = values[idx[valid]]
    return out


class _Codes:
    """The sparse code of a store, indexed for per-latent and per-(row, latent) lookups."""

    def __init__(self, rows: np.ndarray, feats: np.ndarray, vals: np.ndarray, d_sae: int):
        self.rows, self.feats, self.vals, self.d_sae = rows, feats, vals, d_sae
        self.keys = rows * d_sae + feats  # sorted, as the pass emits (row, latent) in order
        if len(vals) and vals.min() < 0:
            raise ValueError("sparse codes must be non-negative")
        # per latent, ascending activation; sorting the reversed arrays puts tied activations in
        # descending row order, so that reading from the end (largest first) favours earlier rows
        self.by_feat = len(vals) - 1 - _argsort_pairs(feats[::-1], vals[::-1])
        self.start, self.end = _segments(feats[self.by_feat], d_sae)
        self.count = self.end - self.start

    def act_at(self, rows: np.ndarray, feats: np.ndarray) -> np.ndarray:
        """Activation of latent `feats` at store row `rows` (0 where it did not fire; rows < 0 give 0)."""
        q = rows.astype(np.int64) * self.d_sae + feats
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        hit = (self.keys[pos] == q) & (rows >= 0)
        return np.where(hit, self.vals[pos], 0).astype(np.float32)

    def top(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, acts) of each latent's n largest activations, largest first; -1 / 0 padded."""
        idx = self.end[:, None] - 1 - np.arange(n)[None]
        valid = idx >= self.start[:, None]
        idx = self.by_feat[np.where(valid, idx, 0)]
        return _gather(self.rows, idx, valid, -1), _gather(self.vals, idx, valid, 0)

    def quantile_samples(self, bins: int, per_bin: int, seed: int) -> QuantileSamples:
        """Each latent's quantile bins, with examples sampled uniformly without replacement inside each bin
        (smallest random priorities)."""
        order = self.by_feat
        f = self.feats[order]
        rank = np.arange(len(order)) - self.start[f]
        bin_of = rank * bins // self.count[f]
        group = f.astype(np.int64) * bins + bin_of
        priority = np.random.default_rng(seed).integers(0, 2**32, len(order), dtype=np.uint32)
        pick = _argsort_pairs(group, priority)
        g_start, g_end = _segments(group[pick], self.d_sae * bins)
        idx = g_start[:, None] + np.arange(per_bin)[None]
        valid = idx < g_end[:, None]
        chosen = order[pick[np.where(valid, idx, 0)]]
        rows = _gather(self.rows, chosen, valid, -1).reshape(self.d_sae, bins, per_bin)
        acts = _gather(self.vals, chosen, valid, 0).reshape(self.d_sae, bins, per_bin)
        q = np.minimum(
            self.start[:, None] + self.count[:, None] * np.arange(bins + 1)[None] // bins, self.end[:, None] - 1
        )
        has = self.count[:, None] > 0
        edges = np.where(has, self.vals[order[np.maximum(q, 0)]], 0).astype(np.float32)
        return QuantileSamples(edges, rows, acts)

    def histograms(self, n_bins: int, max_act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of each latent's nonzero activations over [0, max]: counts [d_sae, n_bins], edges."""
        scale = np.where(max_act > 0, max_act, 1)[self.feats]
        b = np.minimum((self.vals / scale * n_bins).astype(np.int64), n_bins - 1)
        counts = np.bincount(self.feats.astype(np.int64) * n_bins + b, minlength=self.d_sae * n_bins)
        edges = max_act[:, None] * np.linspace(0, 1, n_bins + 1, dtype=np.float32)[None]
        return counts.reshape(self.d_sae, n_bins), edges.astype(np.float32)

    @staticmethod
    def _pair_counts(rows: np.ndarray, cols: np.ndarray, m: int, chunk: int = 16384) -> np.ndarray:
        """[m, m] counts of rows where both columns fire, from (row, col) entries sorted by row."""
        first = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
        length = np.diff(np.r_[first, len(rows)])
        padded = np.full((len(first), int(length.max())), -1, dtype=np.int64)
        padded[np.repeat(np.arange(len(first)), length), np.arange(len(rows)) - np.repeat(first, length)] = cols
        ia, ib = np.triu_indices(padded.shape[1], 1)
        counts = np.zeros(m * m, dtype=np.int64)
        for s in range(0, len(padded), chunk):
            a, b = padded[s : s + chunk, ia], padded[s : s + chunk, ib]
            ok = (a >= 0) & (b >= 0)
            counts += np.bincount(a[ok] * m + b[ok], minlength=m * m)
        counts = counts.reshape(m, m)
        return counts + counts.T

    def cooccurrence(self, n_rows: int, min_density: float, max_latents: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Jaccard neighbours among latents firing on at least `min_density` of rows; -1 for the others."""
        ids = np.full((self.d_sae, n), -1, dtype=np.int32)
        jac = np.zeros((self.d_sae, n), dtype=np.float32)
        frequent = np.flatnonzero(self.count >= max(1, min_density * n_rows))
        frequent = frequent[np.argsort(-self.count[frequent], kind="stable")][:max_latents]
        if len(frequent) < 2:
            return ids, jac
        m = len(frequent)
        col = np.full(self.d_sae, -1)
        col[frequent] = np.arange(m)
        keep = col[self.feats] >= 0
        r, c = self.rows[keep], col[self.feats[keep]]
        both = torch.from_numpy(self._pair_counts(r, c, m).astype(np.float32))
        counts = torch.from_numpy(self.count[frequent].astype(np.float32))
        jaccard = both / (counts[:, None] + counts[None] - both)
        jaccard.fill_diagonal_(-1)
        k = min(n, len(frequent) - 1)
        vals, idx = jaccard.topk(k, dim=1)
        ids[frequent, :k] = frequent[idx.numpy()]
        jac[frequent, :k] = vals.numpy()
        return ids, jac


def contexts(
    codes: _Codes, tokens: np.ndarray, ctx: np.ndarray, *, rows: np.ndarray, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and this latent's activations at rows-window..rows+window inside each row's own context.

    `rows` is [d_sae, ...]; results are [d_sae, ..., 2*window+1] with -1 / 0 outside the context.
    """
    offsets = np.arange(-window, window + 1)
    around = rows[..., None] + offsets
    feats = np.broadcast_to(np.arange(codes.d_sae).reshape((-1,) + (1,) * (rows.ndim)), around.shape)
    inside = (rows[..., None] >= 0) & (around >= 0) & (around < len(tokens))
    safe = np.where(inside, around, 0)
    inside &= ctx[safe] == ctx[np.maximum(rows, 0)][..., None]
    tok = np.where(inside, tokens[safe], -1).astype(np.int32)
    acts = codes.act_at(np.where(inside, around, -1), feats)
    return tok, acts
