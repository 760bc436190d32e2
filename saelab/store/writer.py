"""`StoreWriter`: creates a store, appends shard-aligned rows, and commits progress in the group attributes.

Each write records the checksum of every shard it fills (`saelab.store.checksums`); `commit` writes them into the
`saelab` attribute together with `rows_complete`, in one write, so a committed shard always has its checksum.

On several ranks (`saelab.harvest` under torchrun) each rank writes its own shards with `put` and rank 0 alone folds
what they wrote (`Written`, gathered from every rank) into the attribute with `add`, and `commit`s it; rank 0 also
sizes the arrays (`reserve`), so no two ranks ever write the same `zarr.json`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from saelab import __version__
from saelab.errors import StoreError
from saelab.store.checksums import ALGORITHM, digest, record
from saelab.store.layout import (
    META_ARRAYS,
    STORAGE_DTYPE,
    check_new_store,
    from_storage,
    node_array,
    saelab_meta,
    zarr_group,
)
from saelab.store.shards import plain_chunk_rows, set_shards


class RowSums(NamedTuple):
    """What the statistics of a store (`stats` in its attribute) add up for one hook over the rows of one write."""

    count: int
    """How many rows."""
    sum: np.ndarray
    """Their float64 sum, `[d]`."""
    norm_sum: float
    """The sum of their L2 norms."""


class Written(NamedTuple):
    """What one write put into a store, to record in its attribute (`StoreWriter.add`) on whichever rank commits."""

    checksums: list[tuple[str, int, str]]
    """`(array, shard, checksum)` of every shard it filled, in the order written."""
    sums: dict[str, RowSums]
    """The statistics of its rows by hook (empty for a `reput`: the store already counts those rows)."""


EXACT_FLOAT16_ROWS = 1 << 13
"""Up to this many float16 rows, a float64 sum of them is exact whatever the order."""
SUM_BLOCK_ROWS = 1024
"""Rows summed at a time on the exact float16 path (a block in float64 stays in the CPU's cache)."""


def row_sums(a: np.ndarray, dtype: str) -> RowSums:
    """The `RowSums` of stored rows `a` (in the store's `dtype`).

    float16 values are multiples of 2^-24 below 2^16, so a float64 sum of up to 2^13 of them is exact in any order:
    for those it is summed in cache-sized blocks (about twice as fast, the same bits); otherwise in one reduction.
    """
    x = from_storage(a, dtype).float()
    if dtype == "float16" and len(a) <= EXACT_FLOAT16_ROWS:
        total = torch.zeros(x.shape[1], dtype=torch.float64)
        for block in torch.split(x, SUM_BLOCK_ROWS):
            total += block.double().sum(0)
    else:
        total = x.sum(0, dtype=torch.float64)
    return RowSums(len(a), total.numpy(), float(torch.linalg.vector_norm(x, dim=1).sum(dtype=torch.float64)))


class StoreWriter:
    """Appends shard-aligned rows to a store and commits progress in its attributes."""

    def __init__(self, group: zarr.Group):
        self.group = group
        self.meta = saelab_meta(group, str(group.store))

    @classmethod
    def create(
        cls,
        path: str,
        meta: dict[str, Any],
        hooks: dict[str, int],
        *,
        dtype: str,
        shard_rows: int,
        chunk_rows: int,
        compression: str = "none",
        overwrite: bool = False,
    ) -> StoreWriter:
        """Make a new, empty store. `meta` goes into the `saelab` attribute.

        Nothing that saelab did not write is ever deleted: a non-empty folder that is not a saelab store is
        refused, and an existing store is replaced only with `overwrite` (`OverwriteError`, see `check_new_store`).
        """
        check_new_store(path, overwrite=overwrite)
        group = zarr_group(path, "w")
        compressors = None if compression == "none" else ZstdCodec(level=1)
        for name, d in hooks.items():
            group.create_array(
                f"activations/{name}",
                shape=(0, d),
                dtype=STORAGE_DTYPE[dtype],
                chunks=(chunk_rows, d),
                shards=(shard_rows, d),
                compressors=compressors,
            )
        for name, dt in META_ARRAYS.items():
            group.create_array(
                name, shape=(0,), dtype=dt, chunks=(chunk_rows,), shards=(shard_rows,), compressors=compressors
            )
        meta = {
            **meta,
            "saelab_version": __version__,
            "hooks": hooks,
            "dtype": dtype,
            "shard_rows": shard_rows,
            "rows_complete": 0,
            "complete": False,
            "stats": {name: {"count": 0, "sum": [0.0] * d, "norm_sum": 0.0} for name, d in hooks.items()},
            "checksums": {"algorithm": ALGORITHM, "shards": {}},
        }
        group.attrs["saelab"] = meta
        return cls(group)

    def remove_partial_writes(self) -> int:
        """Delete temp files of writes that a crash cut short (local stores); return how many."""
        root = getattr(self.group.store, "root", None)
        if root is None:
            return 0
        leftovers = list(Path(root).rglob("*.partial"))
        for path in leftovers:
            path.unlink()
        return len(leftovers)

    @property
    def rows_complete(self) -> int:
        return int(self.meta["rows_complete"])

    def write(self, start: int, acts: dict[str, np.ndarray], meta_arrays: dict[str, np.ndarray]) -> None:
        """Write rows [start, start + n) of every array (n rows, shard-aligned start) and their shards' checksums."""
        self.add(self.put(start, acts, meta_arrays))

    def put(
        self, start: int, acts: dict[str, np.ndarray], meta_arrays: dict[str, np.ndarray], *, resize: bool = True
    ) -> Written:
        """`write` without recording anything: what it wrote, for `add` here or on rank 0. `resize=False` leaves the
        arrays' shapes alone (on several ranks, where rank 0 `reserve`s rows before the others write them)."""
        checksums = []
        for name, a in acts.items():
            checksums += self._put(f"activations/{name}", start, a, resize=resize)
        for name, a in meta_arrays.items():
            checksums += self._put(name, start, a, resize=resize)
        return Written(checksums, {name: row_sums(a, self.meta["dtype"]) for name, a in acts.items()})

    def rewrite(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write committed rows again from `start` (shard-aligned), by array name (`activations/<hook>`, `tokens`,
        ...), with their new checksums: the repair of damaged shards. The statistics already count these rows."""
        self.add(self.reput(start, arrays))

    def reput(self, start: int, arrays: dict[str, np.ndarray]) -> Written:
        """`rewrite` without recording anything: what it wrote, for `add` here or on rank 0."""
        return Written([c for name, a in arrays.items() for c in self._put(name, start, a, resize=False)], {})

    def add(self, written: Written) -> None:
        """Record what a write put into the store (its checksums and statistics); `commit` writes them out."""
        for name, shard, checksum in written.checksums:
            record(self.meta, name, shard, checksum)
        for name, sums in written.sums.items():
            stats = self.meta["stats"][name]
            stats["count"] += sums.count
            stats["sum"] = (np.asarray(stats["sum"]) + sums.sum).tolist()
            stats["norm_sum"] += sums.norm_sum

    def reserve(self, rows: int) -> None:
        """Grow every array to at least `rows` rows (rank 0, before other ranks write shards up to there)."""
        for arr in (node_array(self.group, n) for n in self.arrays):
            if arr.shape[0] < rows:
                arr.resize((rows, *arr.shape[1:]))

    @property
    def arrays(self) -> list[str]:
        """The names of every array in the store, hooks first."""
        return [*(f"activations/{h}" for h in self.meta["hooks"]), *META_ARRAYS]

    def _put(self, name: str, start: int, a: np.ndarray, *, resize: bool) -> list[tuple[str, int, str]]:
        """Rows `start:start + len(a)` of array `name`; the checksum of each shard they fill."""
        r = int(self.meta["shard_rows"])
        if start % r:
            raise StoreError(f"writes to a store start at a shard boundary (multiples of {r} rows), not row {start}")
        arr = node_array(self.group, name)
        stop = start + len(a)
        if resize and arr.shape[0] != stop:
            arr.resize((stop, *arr.shape[1:]))
        stored = np.asarray(a, dtype=arr.dtype)  # the rows as Zarr will return them
        chunk_rows = plain_chunk_rows(arr)
        if not _no_empty_chunks(stored, shard_rows=r, chunk_rows=arr.chunks[0]):
            arr[start:stop] = stored
        elif chunk_rows is not None:
            set_shards(arr, start, stored, chunk_rows=chunk_rows)  # Zarr's bytes, without its pipeline
        else:  # skips Zarr's own scan for empty chunks: the same bytes
            arr.with_config(replace(arr.config, write_empty_chunks=True))[start:stop] = stored
        return [(name, (start + first) // r, digest(stored[first : first + r])) for first in range(0, len(a), r)]

    def commit(self, rows_complete: int, complete: bool = False, **extra: Any) -> None:
        """Advance `rows_complete` (after the rows are written) and record resume information."""
        if complete:  # a crash may have left arrays longer than what was committed
            for arr in (node_array(self.group, n) for n in self.arrays):
                if arr.shape[0] != rows_complete:
                    arr.resize((rows_complete, *arr.shape[1:]))
        self.meta.update(rows_complete=rows_complete, complete=complete, **extra)
        for s in self.meta["stats"].values():
            s["mean"] = (np.asarray(s["sum"]) / max(s["count"], 1)).tolist()
            s["mean_norm"] = s["norm_sum"] / max(s["count"], 1)
        self.group.attrs["saelab"] = self.meta


def _no_empty_chunks(a: np.ndarray, *, shard_rows: int, chunk_rows: int) -> bool:
    """Whether rows `a` fill whole shards and none of their inner chunks is empty (all bytes zero, the fill value).

    Zarr leaves empty chunks out of a shard, which it finds by comparing every chunk with the fill value, a scan
    that costs more than writing the chunk; where no chunk is empty, writing them all gives the same bytes. One
    non-zero byte in a chunk's first row settles it for that chunk, almost always."""
    if len(a) % shard_rows:
        return False  # a shard's missing tail is empty chunks, left out
    rows = np.ascontiguousarray(a).reshape(len(a), -1).view(np.uint8)
    return all(rows[i].any() or rows[i : i + chunk_rows].any() for i in range(0, len(a), chunk_rows))
