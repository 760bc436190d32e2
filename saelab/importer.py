"""Turn arrays users already have (`.npy`, `.safetensors`) into an activation store.

Everything is checked before anything is written: a file that is not a plain numeric array (strings, records,
pickled objects), a truncated file, an array that is not `[n_rows, d]` with rows and columns, or one holding
NaN/inf raises `ImportArraysError`, and no store is created. An import that fails while writing removes the store it
made; one that is killed leaves a store marked incomplete, which `ActivationStore` refuses to read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import fsspec
import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.errors import ImportArraysError, MissingError, StoreError
from saelab.store import STORAGE_DTYPE, TORCH_DTYPE, ActivationStore, StoreWriter, to_storage

Arrays = Mapping[str, "np.ndarray | torch.Tensor"]
NUMERIC_KINDS = "biuf"  # numpy dtype kinds an activation can be: bool, signed and unsigned integers, floats
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def read_arrays(
    path: str | Path, keys: list[str] | None = None, name: str | None = None
) -> dict[str, np.ndarray | torch.Tensor]:
    """Name -> 2-D array from a `.npy` file (memory-mapped) or a `.safetensors` file (`keys`, or all 2-D tensors).

    Pickled (object) arrays are never loaded; a file that is not a complete numeric array raises
    `ImportArraysError`, a missing one `MissingError`."""
    path = Path(path)
    if not path.is_file():
        raise MissingError(f"no such file: {path}; give a .npy or .safetensors file")
    if path.suffix == ".npy":
        _check_npy(path)
        return {name or path.stem: np.load(path, mmap_mode="r", allow_pickle=False)}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                available = list(f.keys())
                missing = [k for k in keys or [] if k not in available]
                if missing:
                    raise ImportArraysError(f"{path} has no tensors {missing}; it has {available}")
                chosen = keys or [k for k in available if len(f.get_slice(k).get_shape()) == 2]
                tensors = {k: f.get_tensor(k) for k in chosen}
        except SafetensorError as err:
            raise ImportArraysError(
                f"{path} is not a complete safetensors file ({err}); it may be truncated: copy or save it again"
            ) from None
        if not tensors:
            raise ImportArraysError(f"{path} holds no 2-D tensor (it has {available}); name one with --key")
        if name and len(tensors) == 1:
            tensors = {name: next(iter(tensors.values()))}
        return tensors
    raise ImportArraysError(f"cannot import {path}: use a .npy or .safetensors file")


def _check_npy(path: Path) -> None:
    """Read a `.npy` header: refuse object, string and record arrays, and files shorter than the header says."""
    with path.open("rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            reader = NPY_HEADER_READERS.get(version)
            if reader is None:
                raise ImportArraysError(
                    f"{path} is a .npy file of format {version} (record fields); save a numeric array"
                )
            shape, _, dtype = reader(f)
        except ValueError as err:
            raise ImportArraysError(f"{path} is not a .npy file ({err}); save the array with `np.save`") from None
        data_start = f.tell()
    if dtype.hasobject:
        raise ImportArraysError(
            f"{path} holds Python objects (a pickled object array), which saelab never loads; "
            "save a numeric array, e.g. `np.save(path, np.asarray(x, dtype=np.float32))`"
        )
    if dtype.names is not None or dtype.kind not in NUMERIC_KINDS:
        raise ImportArraysError(
            f"{path} holds {dtype} values, not numbers; save a numeric [n_rows, d] array (float32 or float16)"
        )
    expected = data_start + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise ImportArraysError(
            f"{path} is truncated: its header says {shape} {dtype} ({expected:,} bytes), the file has {size:,}; "
            "copy or save it again"
        )


def import_arrays(
    arrays: Arrays,
    out: str,
    dtype: str = "float32",
    *,
    shard_rows: int = 65536,
    chunk_rows: int = 4096,
    source: str = "imported",
    progress: bool = True,
    overwrite: bool = False,
) -> ActivationStore:
    """Write 2-D arrays with the same number of rows as a store, one "hook" per array.

    Rows have no tokens: `tokens` is -1, `doc_id` the row index, `position` 0, `context` the row index. The
    arrays are checked first (shape, dtype, finite values in the stored `dtype`); nothing is written when they
    fail, nothing is left when writing fails, and an existing store at `out` is replaced only with `overwrite`.
    """
    n = _check_arrays(arrays, dtype, shard_rows=shard_rows, chunk_rows=chunk_rows, source=source)
    meta = {
        "config": {"model": source, "text": {"source": "imported"}, "context_length": 1, "drop_special_tokens": False},
        "model_name": source,
        "rows_total": n,
    }
    hooks = {k: int(a.shape[1]) for k, a in arrays.items()}
    fs, root = fsspec.core.url_to_fs(out)
    existed = fs.exists(root)  # an empty folder (`StoreWriter.create` refuses anything else without `overwrite`)
    writer = StoreWriter.create(
        out, meta, hooks, dtype=dtype, shard_rows=shard_rows, chunk_rows=chunk_rows, overwrite=overwrite
    )
    blocks = tqdm(
        _chunks(arrays, n, shard_rows), total=-(-n // shard_rows), desc="import", unit="shard", disable=not progress
    )
    try:
        for start, stop, chunk in blocks:
            rows = np.arange(start, stop, dtype=np.int64)
            writer.write(
                start,
                {k: to_storage(x, dtype) for k, x in chunk.items()},
                {
                    "tokens": np.full(len(rows), -1, np.int32),
                    "doc_id": rows,
                    "position": np.zeros(len(rows), np.int32),
                    "context": rows,
                },
            )
            writer.commit(stop, complete=stop == n)
    except BaseException:  # an error or Ctrl-C half way; a kill leaves the store marked incomplete instead
        fs.rm(root, recursive=True)
        if existed:
            fs.makedirs(root, exist_ok=True)
        raise
    return ActivationStore.open(out)


def _chunks(arrays: Arrays, n: int, rows: int) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
    """`(start, stop, {name: tensor})` for consecutive blocks of `rows` rows of every array."""
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        yield start, stop, {k: _tensor(a[start:stop]) for k, a in arrays.items()}


def _tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(np.array(a))


def _check_arrays(arrays: Arrays, dtype: str, *, shard_rows: int, chunk_rows: int, source: str) -> int:
    """The common row count of `arrays`, after checking that they can become a store of `dtype`."""
    if dtype not in STORAGE_DTYPE:
        raise ImportArraysError(f"dtype {dtype!r} is not one of {sorted(STORAGE_DTYPE)}; pick one of those")
    if shard_rows <= 0 or chunk_rows <= 0 or shard_rows % chunk_rows:
        raise ImportArraysError(
            f"shard_rows ({shard_rows}) must be a positive multiple of chunk_rows ({chunk_rows}); change them"
        )
    if not arrays:
        raise StoreError("nothing to import: give at least one array")
    shapes = {k: tuple(a.shape) for k, a in arrays.items()}
    bad = {k: s for k, s in shapes.items() if len(s) != 2}
    if bad:
        raise StoreError(f"arrays must be 2-D [n_rows, d]; got {bad} from {source}")
    for k, (n_rows, d) in shapes.items():
        if n_rows == 0 or d == 0:
            what = "no rows" if n_rows == 0 else "no columns"
            raise ImportArraysError(f"array {k!r} from {source} has shape {(n_rows, d)}: {what}; give [n_rows, d] data")
    for k, a in arrays.items():
        if a.is_complex() if isinstance(a, torch.Tensor) else a.dtype.kind not in NUMERIC_KINDS:
            raise ImportArraysError(f"array {k!r} from {source} holds {a.dtype} values, not real numbers")
    n_rows = {s[0] for s in shapes.values()}
    if len(n_rows) != 1:
        raise StoreError(f"arrays must have the same number of rows to share a store; got {shapes}")
    n = n_rows.pop()
    _check_finite(arrays, n, dtype, rows=shard_rows, source=source)
    return n


def _check_finite(arrays: Arrays, n: int, dtype: str, *, rows: int, source: str) -> None:
    """Refuse arrays with NaN/inf values, or values that become inf in the stored `dtype` (e.g. > 65504 in float16)."""
    bad = {k: 0 for k in arrays}
    overflow = {k: 0 for k in arrays}
    for _, _, chunk in _chunks(arrays, n, rows):
        for k, x in chunk.items():
            bad[k] += int((~torch.isfinite(x).all(1)).sum())
            stored = x.to(TORCH_DTYPE[dtype])
            overflow[k] += 0 if stored.dtype == x.dtype else int((~torch.isfinite(stored).all(1)).sum())
    for k in arrays:
        if bad[k]:
            raise ImportArraysError(
                f"array {k!r} from {source} has NaN or inf values in {bad[k]:,} of {n:,} rows; nothing was written. "
                "Drop or fix those rows first (e.g. `x = x[np.isfinite(x).all(axis=1)]`) and import again"
            )
        if overflow[k]:
            raise ImportArraysError(
                f"array {k!r} from {source} has values beyond {dtype}'s range in {overflow[k]:,} of {n:,} rows; "
                "nothing was written. Import with --dtype float32 (or scale the data down)"
            )
