"""`ActivationStore`: read access to a store, row slices, and the shuffled, resumable batch iterator."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr

from saelab.errors import StoreError
from saelab.store.layout import from_storage, node_array, open_group, saelab_meta
from saelab.store.prefetch import prefetch


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
        return cls(open_group(str(path), mode="r"), str(path))

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
        x = from_storage(self._read(node_array(self.group, f"activations/{hook}"), self._rows(rows)), self.dtype)
        return x if dtype is None else x.to(dtype)

    def tokens(self, rows: slice | np.ndarray | list[int] = slice(None)) -> np.ndarray:
        return self._read(node_array(self.group, "tokens"), self._rows(rows))

    def doc_ids(self, rows: slice | np.ndarray | list[int] = slice(None)) -> np.ndarray:
        return self._read(node_array(self.group, "doc_id"), self._rows(rows))

    def positions(self, rows: slice | np.ndarray | list[int] = slice(None)) -> np.ndarray:
        return self._read(node_array(self.group, "position"), self._rows(rows))

    def contexts(self, rows: slice | np.ndarray | list[int] = slice(None)) -> np.ndarray:
        return self._read(node_array(self.group, "context"), self._rows(rows))

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
