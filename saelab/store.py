"""The activation store: sharded Zarr v3, one `[n_tokens, d]` array per hook point plus token metadata.

Layout of a store (a local path or an fsspec URL such as `memory://` or `s3://`):

    zarr.json                    group attributes: `saelab` (config, hooks, rows_complete, stats, ...)
    activations/<hook name>      [n_tokens, d] float16 / float32 / bfloat16 (stored as uint16 bits)
    tokens, doc_id, position, context    [n_tokens] aligned row for row

Writers commit a shard at a time and then advance `rows_complete`; readers never look past it.
"""

from __future__ import annotations

import posixpath
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec
import numpy as np
import torch
import zarr
from zarr.codecs import ZstdCodec

from saelab import __version__
from saelab.errors import OverwriteError, StoreError

META_ARRAYS = {"tokens": "int32", "doc_id": "int64", "position": "int32", "context": "int64"}
STORAGE_DTYPE = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}
TORCH_DTYPE = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Cast activations to the store's dtype as a numpy array (bfloat16 as its uint16 bits)."""
    x = x.to(TORCH_DTYPE[dtype])
    if dtype == "bfloat16":
        return x.view(torch.int16).cpu().numpy().view(np.uint16)
    return x.cpu().numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of `to_storage`: a torch tensor in the stored dtype."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def _open_group(path: str, mode: Literal["r", "r+"]) -> zarr.Group:
    try:
        return zarr.open_group(store=path, mode=mode, zarr_format=3)
    except FileNotFoundError:
        raise StoreError(
            f"no activation store at {path!r}; run `saelab harvest` or `saelab import` to make one"
        ) from None
    except ValueError as err:  # zarr.json that does not parse or is not Zarr v3 metadata
        raise StoreError(f"{path!r} is not a readable Zarr v3 store ({err}); harvest or import it again") from None


def saelab_meta(group: zarr.Group, path: str) -> dict[str, Any]:
    """The `saelab` attribute of a store's group; `StoreError` when the group is not a saelab store."""
    meta = group.attrs.get("saelab")
    if not isinstance(meta, dict):
        raise StoreError(f"{path!r} is a Zarr group but not a saelab activation store (no `saelab` attribute)")
    return dict(meta)


def _array(group: zarr.Group, name: str) -> zarr.Array:
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{name!r} in store {group.store} is not an array; the store is damaged, make it again")
    return node


def check_new_store(path: str, *, overwrite: bool = False) -> None:
    """Refuse to create a store at `path` (local or fsspec URL) when that would delete anything saelab did not
    write, or replace an existing store without `overwrite`; a path that is absent or an empty folder is fine."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        return
    if fs.isfile(root):
        raise OverwriteError(f"{path} is a file, not an activation store; nothing was written. Choose another path")
    held = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    if not held:
        return
    try:
        meta = saelab_meta(zarr.open_group(store=path, mode="r", zarr_format=3), path)
    except (OSError, ValueError):  # no Zarr group there, or one that saelab did not write
        shown = ", ".join(held[:5]) + (f", ... ({len(held)} entries)" if len(held) > 5 else "")
        raise OverwriteError(
            f"{path} is not empty and is not a saelab activation store (it holds {shown}); nothing was written. "
            "Choose a new or empty folder for the store"
        ) from None
    if not overwrite:
        raise OverwriteError(
            f"{path} already holds an activation store ({meta.get('rows_complete', 0)} rows of "
            f"{', '.join(meta.get('hooks', {}))}); nothing was written. Pass --overwrite (`overwrite=True`) to "
            "replace it, or choose another path"
        )


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
        """Write rows [start, start + n) of every array (n rows, shard-aligned start)."""
        n = len(meta_arrays["tokens"])
        stop = start + n
        for name, a in acts.items():
            arr = _array(self.group, f"activations/{name}")
            if arr.shape[0] != stop:
                arr.resize((stop, arr.shape[1]))
            arr[start:stop] = a
            stats = self.meta["stats"][name]
            x = from_storage(a, self.meta["dtype"]).float()
            stats["count"] += n
            stats["sum"] = (np.asarray(stats["sum"]) + x.sum(0, dtype=torch.float64).numpy()).tolist()
            stats["norm_sum"] += float(torch.linalg.vector_norm(x, dim=1).sum(dtype=torch.float64))
        for name, a in meta_arrays.items():
            arr = _array(self.group, name)
            if arr.shape[0] != stop:
                arr.resize((stop,))
            arr[start:stop] = a

    def commit(self, rows_complete: int, complete: bool = False, **extra: Any) -> None:
        """Advance `rows_complete` (after the rows are written) and record resume information."""
        if complete:  # a crash may have left arrays longer than what was committed
            names = [*(f"activations/{h}" for h in self.meta["hooks"]), *META_ARRAYS]
            for arr in (_array(self.group, n) for n in names):
                if arr.shape[0] != rows_complete:
                    arr.resize((rows_complete, *arr.shape[1:]))
        self.meta.update(rows_complete=rows_complete, complete=complete, **extra)
        for s in self.meta["stats"].values():
            s["mean"] = (np.asarray(s["sum"]) / max(s["count"], 1)).tolist()
            s["mean_norm"] = s["norm_sum"] / max(s["count"], 1)
        self.group.attrs["saelab"] = self.meta


@dataclass(frozen=True)
class _Unit:
    start: int
    stop: int


class ActivationStore:
    """Read access to an activation store."""

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        self.meta = saelab_meta(group, path)

    @classmethod
    def open(cls, path: str) -> ActivationStore:
        """Open a store at a local path or fsspec URL, read-only."""
        return cls(_open_group(str(path), mode="r"), str(path))

    @property
    def hooks(self) -> list[str]:
        return list(self.meta["hooks"])

    @property
    def n_tokens(self) -> int:
        """Rows that are complete (readable) in every array."""
        return int(self.meta["rows_complete"])

    @property
    def complete(self) -> bool:
        return bool(self.meta["complete"])

    @property
    def dtype(self) -> str:
        return str(self.meta["dtype"])

    @property
    def config(self) -> dict[str, Any]:
        """The harvest config that made the store (for imports: a description of the source)."""
        return dict(self.meta.get("config", {}))

    @property
    def model(self) -> str:
        """The model's short name (e.g. `minilm`)."""
        return str(self.meta.get("model_name", ""))

    def d(self, hook: str) -> int:
        """Width of a hook point's activations."""
        self._check_hook(hook)
        return int(self.meta["hooks"][hook])

    def mean(self, hook: str) -> torch.Tensor:
        """Mean activation vector, computed during the harvest."""
        return torch.tensor(self.meta["stats"][hook]["mean"], dtype=torch.float32)

    def mean_norm(self, hook: str) -> float:
        """Mean L2 norm of the activations, computed during the harvest."""
        return float(self.meta["stats"][hook]["mean_norm"])

    def _check_hook(self, hook: str) -> None:
        if hook not in self.meta["hooks"]:
            raise StoreError(f"hook {hook!r} is not in store {self.path!r}; it has {self.hooks}")

    def _rows(self, rows: slice | np.ndarray | list[int]) -> slice | np.ndarray:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.n_tokens)
            if step != 1:
                raise StoreError("row slices must have step 1; index with an array of rows instead")
            return slice(start, stop)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_tokens):
            raise StoreError(f"rows out of range: the store has {self.n_tokens} complete rows")
        return rows

    def _read(self, array: zarr.Array, rows: slice | np.ndarray) -> np.ndarray:
        if isinstance(rows, slice):
            return np.asarray(array[rows])
        order = np.argsort(rows, kind="stable")
        out = array.get_orthogonal_selection((rows[order],) + (slice(None),) * (array.ndim - 1))
        result = np.empty_like(out)
        result[order] = out
        return result

    def activations(
        self, hook: str, rows: slice | np.ndarray | list[int] = slice(None), dtype: torch.dtype | None = torch.float32
    ) -> torch.Tensor:
        """Activations of `hook` at `rows` as a `[n, d]` tensor (float32 unless `dtype=None`: as stored)."""
        self._check_hook(hook)
        x = from_storage(self._read(_array(self.group, f"activations/{hook}"), self._rows(rows)), self.dtype)
        return x if dtype is None else x.to(dtype)

    def tokens(self, rows: slice | np.ndarray | list[int] = slice(None)) -> np.ndarray:
        return self._read(_array(self.group, "tokens"), self._rows(rows))

    def doc_ids(self, rows: slice | np.ndarray | list[int] = slice(None)) -> np.ndarray:
        return self._read(_array(self.group, "doc_id"), self._rows(rows))

    def positions(self, rows: slice | np.ndarray | list[int] = slice(None)) -> np.ndarray:
        return self._read(_array(self.group, "position"), self._rows(rows))

    def contexts(self, rows: slice | np.ndarray | list[int] = slice(None)) -> np.ndarray:
        return self._read(_array(self.group, "context"), self._rows(rows))

    def context_of(self, row: int, before: int = 8, after: int = 8) -> dict[str, Any]:
        """The stored tokens around `row` within its own context: ids, rows, and where `row` is."""
        lo, hi = max(0, row - before), min(self.n_tokens, row + after + 1)
        ctx = self.contexts(slice(lo, hi))
        same = ctx == ctx[row - lo]
        rows = np.arange(lo, hi)[same]
        return {"rows": rows, "tokens": self.tokens(slice(lo, hi))[same], "index": int(np.flatnonzero(rows == row)[0])}

    def _units(self, rows: tuple[int, int]) -> list[_Unit]:
        """Shard-aligned pieces of the row range: the read unit of the shuffled iterator."""
        start, stop = rows
        r = int(self.meta["shard_rows"])
        edges = [start, *range((start // r + 1) * r, stop, r), stop]
        return [_Unit(a, b) for a, b in zip(edges, edges[1:]) if b > a]

    def batches(
        self,
        hooks: str | list[str],
        batch_size: int,
        *,
        seed: int = 0,
        rows: tuple[int, int] | None = None,
        shuffle: bool = True,
        epochs: int | None = 1,
        start_batch: int = 0,
        mix_rows: int = 262_144,
        read_ahead: int = 4,
    ) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        """Full batches of float32 rows, shuffled across shards, `read_ahead` batches read ahead in a background thread.

        Each epoch permutes the shards, reads about `mix_rows` rows of them at a time and permutes those;
        the same `seed` gives the same batches. `start_batch` skips ahead without reading what it skips
        (for resuming). With several hooks, each batch is a dict with the same rows of every hook.
        """
        names = [hooks] if isinstance(hooks, str) else list(hooks)
        for h in names:
            self._check_hook(h)
        lo, hi = rows if rows is not None else (0, self.n_tokens)
        if not 0 <= lo < hi <= self.n_tokens:
            raise StoreError(f"row range {(lo, hi)} is outside the store's {self.n_tokens} complete rows")
        per_epoch = (hi - lo) // batch_size
        if per_epoch == 0:
            raise StoreError(f"row range {(lo, hi)} holds fewer rows than one batch of {batch_size}")
        mix_shards = max(1, mix_rows // int(self.meta["shard_rows"]))
        produce = self._produce(names, batch_size, seed, (lo, hi), shuffle, epochs, start_batch, mix_shards, per_epoch)
        single = isinstance(hooks, str)
        for batch in prefetch(produce, read_ahead):
            yield batch[names[0]] if single else batch

    def _produce(self, names, batch_size, seed, rows, shuffle, epochs, start_batch, mix_shards, per_epoch):
        units = self._units(rows)
        epoch = start_batch // per_epoch
        skip_rows = (start_batch % per_epoch) * batch_size
        while epochs is None or epoch < epochs:
            order = np.random.default_rng([seed, epoch]).permutation(len(units)) if shuffle else np.arange(len(units))
            carry: dict[str, torch.Tensor] | None = None
            seen = emitted = 0
            for g, first in enumerate(range(0, len(units), mix_shards)):
                group = [units[i] for i in order[first : first + mix_shards]]
                n = sum(u.stop - u.start for u in group)
                if seen + n <= skip_rows:
                    seen += n
                    continue
                data = {h: torch.cat([self.activations(h, slice(u.start, u.stop)) for u in group]) for h in names}
                if shuffle:
                    perm = torch.from_numpy(np.random.default_rng([seed, epoch, g]).permutation(n))
                    data = {h: x[perm] for h, x in data.items()}
                if seen < skip_rows:
                    data = {h: x[skip_rows - seen :] for h, x in data.items()}
                seen += n
                if carry is not None:
                    data = {h: torch.cat([carry[h], x]) for h, x in data.items()}
                n_full = len(data[names[0]]) // batch_size
                for b in range(n_full):
                    if emitted + start_batch % per_epoch >= per_epoch:
                        break
                    yield {h: x[b * batch_size : (b + 1) * batch_size] for h, x in data.items()}
                    emitted += 1
                carry = {h: x[n_full * batch_size :] for h, x in data.items()}
            skip_rows = 0
            start_batch = 0
            epoch += 1

    def summary(self) -> str:
        """A human-readable description of the store."""
        m, c = self.meta, self.config
        text = {k: v for k, v in c.get("text", {}).items() if v is not None}
        lines = [
            f"store        {self.path}",
            f"model        {self.model} ({c.get('model', '?')})",
            f"text         {text}",
            f"context      {c.get('context_length', '-')} tokens, special tokens dropped: {c.get('drop_special_tokens', '-')}",
            f"rows         {self.n_tokens:,} complete{'' if self.complete else ' (harvest not finished)'}",
            f"dtype        {self.dtype}, shards of {m['shard_rows']:,} rows",
            "hooks:",
        ]
        for h in self.hooks:
            lines.append(f"  {h:<32} d={self.d(h):<6} mean norm {m['stats'][h].get('mean_norm', float('nan')):.3f}")
        return "\n".join(lines)


def prefetch(gen: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run a generator in a background thread, `depth` items ahead; errors reach the consumer."""
    q: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()
    done = object()

    def work() -> None:
        try:
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as err:  # handed to the consumer
            q.put(err)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
