"""What a training step reads: the batch as an SAE's loss sees it, the masked objective's held-out dimensions, the loss
terms, and the statistics (geometric median, spread, over one rank or all) they are built from."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from saelab.distributed import all_gather


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 8, eps: float = 1e-6) -> Tensor:
    """Geometric median of the rows of `x` by Weiszfeld iterations from the mean."""
    median = x.mean(0)
    for _ in range(iters):
        weights = 1 / (x - median).norm(dim=1).clamp_min(eps)
        median = (weights @ x) / weights.sum()
    return median


def spread(x: Tensor) -> Tensor:
    """Summed squared deviation of the rows of `x` from their mean (`x.var(0).sum() * n`,
    several times faster than `var` on CPU)."""
    return (x - x.mean(0)).square().sum()


_HASH_MASK = 0xFFFFFFFF


def _mix32(v: Tensor) -> Tensor:
    """A 32-bit integer hash of each entry of the int64 tensor `v` (xor-shift-multiply rounds; every product stays
    below 2^63, so it is exact and the same on every device)."""
    v = v & _HASH_MASK
    v = ((v ^ (v >> 16)) * 0x7FEB352D) & _HASH_MASK
    v = ((v ^ (v >> 15)) * 0x5BD1E995) & _HASH_MASK
    return v ^ (v >> 16)


@torch.no_grad()
def held_out_dims(x: Tensor, n: int) -> Tensor:
    """`[d]` bool: `n` of the `d` columns of the batch `x` `[rows, d]`, drawn uniformly from a hash of the bytes of its
    first and last rows, on its device without a host sync; the same batch always gives the same columns."""
    data = x[[0, -1]].contiguous().view(torch.uint8).flatten().to(torch.int64)
    seed = ((data + 1) * (_mix32(torch.arange(len(data), device=x.device)) | 1)).sum()
    keys = _mix32(seed + 0x9E3779B1 * torch.arange(1, x.shape[1] + 1, device=x.device))
    return torch.zeros(x.shape[1], dtype=torch.bool, device=x.device).index_fill_(0, keys.argsort()[:n], True)


@torch.no_grad()
def global_spread(x: Tensor) -> Tensor:
    """`spread` of the rows of every rank's `x` taken together, the same number on every rank: each rank's row count,
    mean and `spread` are gathered and combined by Chan et al.'s pairwise formula (the sum of the spreads plus each
    count times its mean's squared distance from the overall mean), which loses no precision to cancellation."""
    local = torch.cat([x.new_tensor([x.shape[0]]), spread(x).reshape(1), x.mean(0)])
    parts = torch.stack(all_gather(local))
    counts, spreads, means = parts[:, 0], parts[:, 1], parts[:, 2:]
    mean = counts @ means / counts.sum()
    return spreads.sum() + counts @ (means - mean).square().sum(1)


class Masked(NamedTuple):
    """What the masked objective (`SAEConfig.mask_fraction`) adds to a training batch."""

    target: Tensor
    """The scaled rows this process trains on, unmasked: what the loss reconstructs on the held-out dimensions."""
    held_out: Tensor
    """`[d_in]` 1 on the dimensions hidden from the encoder (the loss is taken on them alone), 0 elsewhere."""
    held_var: Tensor
    """`spread` of the whole scaled batch on the held-out dimensions: the FVU's denominator."""


class Batch(NamedTuple):
    """A training batch as an SAE's loss reads it (`SAE.training_batch`)."""

    x: Tensor
    """The scaled rows this process's encoder reads, `[rows, d_in]` (under `SAE.split`, its slice of the batch). With
    masking, `b_dec + (rows - b_dec) * keep`, where `keep` is 0 on the held-out dimensions and `d_in / kept` on the
    others: `x - b_dec` is the masked, rescaled input, and it keeps its gradient to `b_dec`."""
    rows: int
    """Rows of the whole batch."""
    total_var: Tensor
    """`spread` of the whole scaled batch: the FVU's denominator (with masking, the sparsity penalties' only)."""
    masked: Masked | None = None
    """The target and held-out dimensions of the masked objective; `None` without masking."""
    y: Tensor | None = None
    """A transcoder's scaled output rows, what its loss reconstructs (under `SAE.split`, this rank's slice; `total_var`
    is then their `spread`); `None` for an SAE, which reconstructs `x`."""


class LossTerms(NamedTuple):
    """The reconstruction terms every SAE loss starts from."""

    residual: Tensor
    """`x - recon`, `[batch, d_in]` (with masking, zero but on the held-out dimensions)."""
    total_var: Tensor
    """Summed squared deviation of the whole batch from its mean (the FVU's and the sparsity penalties' denominator;
    with masking, the penalties' only)."""
    fvu: Tensor
    """Fraction of variance unexplained: squared error over `total_var` (with masking, the held-out dimensions'
    squared error over their `Masked.held_var`; under `SAE.split`, this rank's share)."""
