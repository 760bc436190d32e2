"""Moved to `saelab.ops.kernels`; this module re-exports its names for this release.

`CPU_KERNELS` is read by `saelab.ops.kernels`: switch it there (`saelab.ops.kernels.CPU_KERNELS = False`), not here.
"""

from __future__ import annotations

from saelab.ops.kernels import (
    CPU_KERNELS,
    Entries,
    LatentGroups,
    SparseAutoencode,
    bag_offsets,
    batch_topk_entries,
    group_by_latent,
    sparse_autoencode,
    sparse_decode,
    topk_entries,
)
from saelab.ops.topk import match_torch_threads, topk_rows

__all__ = [
    "CPU_KERNELS",
    "Entries",
    "LatentGroups",
    "SparseAutoencode",
    "bag_offsets",
    "batch_topk_entries",
    "group_by_latent",
    "match_torch_threads",
    "sparse_autoencode",
    "sparse_decode",
    "topk_entries",
    "topk_rows",
]
