"""`StoreWriter`: creates a store, appends shard-aligned rows, and commits progress in the group attributes.

Each write records the checksum of every shard it fills (`saelab.store.checksums`); `commit` writes them into the
`saelab` attribute together with `rows_complete`, in one write, so a committed shard always has its checksum.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from saelab import __version__
from saelab.errors import StoreError
from saelab.store.checksums import ALGORITHM, digest, record
from saelab.store.layout import META_ARRAYS, STORAGE_DTYPE, check_new_store, from_storage, node_array, saelab_meta


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
        group = zarr.open_group(store=path, mode="w", zarr_format=3)
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
        n = len(meta_arrays["tokens"])
        for name, a in acts.items():
            self._put(f"activations/{name}", start, a, resize=True)
            stats = self.meta["stats"][name]
            x = from_storage(a, self.meta["dtype"]).float()
            stats["count"] += n
            stats["sum"] = (np.asarray(stats["sum"]) + x.sum(0, dtype=torch.float64).numpy()).tolist()
            stats["norm_sum"] += float(torch.linalg.vector_norm(x, dim=1).sum(dtype=torch.float64))
        for name, a in meta_arrays.items():
            self._put(name, start, a, resize=True)

    def rewrite(self, start: int, arrays: dict[str, np.ndarray]) -> None:
        """Write committed rows again from `start` (shard-aligned), by array name (`activations/<hook>`, `tokens`,
        ...), with their new checksums: the repair of damaged shards. The statistics already count these rows."""
        for name, a in arrays.items():
            self._put(name, start, a, resize=False)

    def _put(self, name: str, start: int, a: np.ndarray, *, resize: bool) -> None:
        """Rows `start:start + len(a)` of array `name`, and the checksum of each shard they fill."""
        r = int(self.meta["shard_rows"])
        if start % r:
            raise StoreError(f"writes to a store start at a shard boundary (multiples of {r} rows), not row {start}")
        arr = node_array(self.group, name)
        stop = start + len(a)
        if resize and arr.shape[0] != stop:
            arr.resize((stop, *arr.shape[1:]))
        arr[start:stop] = a
        stored = np.asarray(a, dtype=arr.dtype)  # the rows as Zarr will return them
        for first in range(0, len(a), r):
            record(self.meta, name, (start + first) // r, digest(stored[first : first + r]))

    def commit(self, rows_complete: int, complete: bool = False, **extra: Any) -> None:
        """Advance `rows_complete` (after the rows are written) and record resume information."""
        if complete:  # a crash may have left arrays longer than what was committed
            names = [*(f"activations/{h}" for h in self.meta["hooks"]), *META_ARRAYS]
            for arr in (node_array(self.group, n) for n in names):
                if arr.shape[0] != rows_complete:
                    arr.resize((rows_complete, *arr.shape[1:]))
        self.meta.update(rows_complete=rows_complete, complete=complete, **extra)
        for s in self.meta["stats"].values():
            s["mean"] = (np.asarray(s["sum"]) / max(s["count"], 1)).tolist()
            s["mean_norm"] = s["norm_sum"] / max(s["count"], 1)
        self.group.attrs["saelab"] = self.meta
