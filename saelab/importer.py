"""Turn arrays users already have (`.npy`, `.safetensors`) into an activation store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.errors import StoreError
from saelab.store import ActivationStore, StoreWriter, to_storage


def read_arrays(
    path: str | Path, keys: list[str] | None = None, name: str | None = None
) -> dict[str, np.ndarray | torch.Tensor]:
    """Name -> 2-D array from a `.npy` file (memory-mapped) or a `.safetensors` file (`keys`, or all 2-D tensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}; give a .npy or .safetensors file")
    if path.suffix == ".npy":
        return {name or path.stem: np.load(path, mmap_mode="r")}
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            available = list(f.keys())
            missing = [k for k in keys or [] if k not in available]
            if missing:
                raise StoreError(f"{path} has no tensors {missing}; it has {available}")
            chosen = keys or [k for k in available if len(f.get_slice(k).get_shape()) == 2]
            tensors = {k: f.get_tensor(k) for k in chosen}
        if name and len(tensors) == 1:
            tensors = {name: next(iter(tensors.values()))}
        return tensors
    raise StoreError(f"cannot import {path}: use a .npy or .safetensors file")


def import_arrays(
    arrays: dict[str, np.ndarray | torch.Tensor],
    out: str,
    dtype: str = "float32",
    shard_rows: int = 65536,
    chunk_rows: int = 4096,
    source: str = "imported",
    progress: bool = True,
) -> ActivationStore:
    """Write 2-D arrays with the same number of rows as a store, one "hook" per array.

    Rows have no tokens: `tokens` is -1, `doc_id` the row index, `position` 0, `context` the row index.
    """
    if not arrays:
        raise StoreError("nothing to import: give at least one array")
    shapes = {k: tuple(a.shape) for k, a in arrays.items()}
    bad = {k: s for k, s in shapes.items() if len(s) != 2}
    if bad:
        raise StoreError(f"arrays must be 2-D [n_rows, d]; got {bad}")
    n_rows = {s[0] for s in shapes.values()}
    if len(n_rows) != 1:
        raise StoreError(f"arrays must have the same number of rows to share a store; got {shapes}")
    n = n_rows.pop()
    meta = {
        "config": {"model": source, "text": {"source": "imported"}, "context_length": 1, "drop_special_tokens": False},
        "model_name": source,
    }
    writer = StoreWriter.create(out, meta, {k: s[1] for k, s in shapes.items()}, dtype, shard_rows, chunk_rows)
    for start in tqdm(range(0, n, shard_rows), desc="import", unit="shard", disable=not progress):
        stop = min(start + shard_rows, n)
        rows = np.arange(start, stop, dtype=np.int64)
        acts = {k: to_storage(torch.as_tensor(np.array(a[start:stop])), dtype) for k, a in arrays.items()}
        writer.write(
            start,
            acts,
            {
                "tokens": np.full(len(rows), -1, np.int32),
                "doc_id": rows,
                "position": np.zeros(len(rows), np.int32),
                "context": rows,
            },
        )
        writer.commit(stop, complete=stop == n)
    return ActivationStore.open(out)
