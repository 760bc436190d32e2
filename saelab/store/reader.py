"""`ActivationStore`: read access to a store, row slices, and the shuffled, resumable batch iterator.

Reads are checked against the per-shard checksums (`saelab.store.checksums`): the first read that touches a shard of
an array, in this process, hashes the whole shard (reading the rest of it if the read does not cover it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from saelab.errors import StoreError
from saelab.run import RunDir, store_resolve
from saelab.store.checksums import DamagedShard, StoreCheck, digest, recorded, shard_exists
from saelab.store.layout import META_ARRAYS, from_storage, node_array, open_group, saelab_meta, split_array
from saelab.store.prefetch import prefetch

READ_ERRORS = (ValueError, RuntimeError, OSError)  # what Zarr and its codecs raise on a shard they cannot decode
_VERIFIED: set[tuple[str, str, int, str]] = set()  # (store, array, shard, checksum) already checked by this process


@dataclass(frozen=True)
class _Unit:
    start: int
    stop: int


class ActivationStore:
    """Read access to an activation store."""

    def __init__(self, group: zarr.Group, path: str, *, verify: bool = True):
        self.group = group
        self.path = path
        self.meta = saelab_meta(group, path)  # read once: a store opened for reading does not change under it
        self.hooks: list[str] = list(self.meta["hooks"])
        """The hook points it holds, in the order they were harvested: `<alias>/<hook>` where several models were
        harvested together (`models`), their arrays `activations/<alias>/<hook>` (nested Zarr groups)."""
        self.n_tokens = int(self.meta["rows_complete"])
        """Rows that are complete (readable) in every array."""
        self.complete = bool(self.meta["complete"])
        """Whether the harvest or import finished (an unfinished harvest is readable up to `n_tokens`)."""
        self.dtype = str(self.meta["dtype"])
        """The stored dtype: `float16`, `bfloat16` (as its uint16 bits) or `float32`."""
        self.verify = verify
        """Check each shard against its checksum the first time a read touches it (where the store has them)."""
        if self.imported and not self.complete:
            total = self.meta.get("rows_total")
            of = f" of {total:,}" if isinstance(total, int) else ""
            raise StoreError(
                f"store {path!r} is an import that did not finish ({self.n_tokens:,}{of} rows written); "
                "import it again with --overwrite (`overwrite=True`)"
            )

    @classmethod
    def open(cls, path: str, *, verify: bool = True) -> ActivationStore:
        """Open a store at a local path or fsspec URL, read-only; `verify` checks shards as reads reach them.

        A run directory (a local folder holding a run's store, `RunDir.store`) opens that store."""
        path = str(path)
        if Path(path).is_dir() and not (Path(path) / "zarr.json").exists() and RunDir(path).store.is_dir():
            path = str(RunDir(path).store)
        return cls(open_group(path, mode="r"), path, verify=verify)

    @property
    def imported(self) -> bool:
        """Whether `saelab import` made the store (rather than a harvest)."""
        return self.config.get("text", {}).get("source") == "imported"

    @property
    def fix(self) -> str:
        """What rewrites a damaged shard of this store."""
        if self.imported:
            return "import it again with --overwrite (`overwrite=True`)"
        return "rerun the same `saelab harvest` config: it rewrites only the damaged shards"

    @property
    def shard_rows(self) -> int:
        return int(self.meta["shard_rows"])

    @property
    def arrays(self) -> list[str]:
        """The names of every array in the store, hooks first."""
        return [*(f"activations/{h}" for h in self.hooks), *META_ARRAYS]

    def shard_span(self, shard: int) -> tuple[int, int]:
        """The committed rows `[start, stop)` of shard `shard`."""
        return shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.n_tokens)

    @property
    def config(self) -> dict[str, Any]:
        """The harvest config that made the store (for imports: a description of the source)."""
        return dict(self.meta.get("config", {}))

    @property
    def model_spec(self) -> str | None:
        """The spec of the model that made the store, for `load_model` here: a local model folder found from where
        the store now is (the config records it from the store's folder, `store_resolve`), a model name as given;
        `None` for an import (no model made it), a store that records no model, or one of several models
        (`model_specs`)."""
        spec = self.config.get("model")
        return None if self.imported or not spec else store_resolve(str(spec), store=self.path)

    @property
    def models(self) -> dict[str, str]:
        """Alias -> short model name of each model harvested together (`HarvestConfig.models`); empty for one model."""
        return dict(self.meta.get("models", {}))

    @property
    def model_specs(self) -> dict[str, str]:
        """Alias -> spec of each model harvested together, found from where the store now is as `model_spec` finds
        it; empty for a store of one model."""
        specs = self.config.get("models") or {}
        return {alias: store_resolve(str(spec), store=self.path) for alias, spec in specs.items()}

    def spec_of(self, array: str) -> str | None:
        """The spec of the model whose activations the array `array` holds, for `load_model` here: that alias's
        (`model_specs`) for `<alias>/<hook>` of several models, `model_spec` for a store of one model; `StoreError`
        for an alias the store does not record."""
        alias, _ = split_array(array)
        if not alias:
            return self.model_spec
        specs = self.model_specs
        if alias not in specs:
            if self.imported:  # an import records no models
                return None
            raise StoreError(
                f"store {self.path!r} records no model {alias!r} (the alias of {array!r}); it has {sorted(specs)}"
            )
        return specs[alias]

    def model_of(self, array: str) -> str:
        """The short name of the model whose activations the array `array` holds: its alias's (`models`) for
        `<alias>/<hook>`, else the store's `model`."""
        alias, _ = split_array(array)
        return self.models.get(alias, self.model) if alias else self.model

    @property
    def text(self) -> dict[str, Any]:
        """The harvest config's `text` (the `TextConfig` fields; empty when it records none), its local file or
        folder found from where the store now is, as `model_spec` finds the model."""
        text = dict(self.config.get("text", {}))
        if isinstance(text.get("path"), str):
            text["path"] = store_resolve(text["path"], store=self.path)
        return text

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

    def check(self) -> StoreCheck:
        """Read every committed shard of every array and compare it with its checksum (`saelab info --verify`)."""
        damaged = []
        n_shards = -(-self.n_tokens // self.shard_rows)
        for name in self.arrays:
            array = node_array(self.group, name)
            for shard in range(n_shards):
                problem = self._problem(array, name, shard)
                if problem is not None:
                    damaged.append(problem)
        return StoreCheck("checksums" in self.meta, len(self.arrays) * n_shards, damaged, self.fix)

    def _problem(self, array: zarr.Array, name: str, shard: int, rows: np.ndarray | None = None) -> DamagedShard | None:
        """What is wrong with shard `shard` of `array` (None: nothing); `rows` are its rows when already read."""
        span = self.shard_span(shard)
        if rows is None:
            try:
                rows = np.asarray(array[span[0] : span[1]])
            except READ_ERRORS:
                return DamagedShard(name, shard, span, "unreadable")
        want = recorded(self.meta, name, shard)
        if want is None or digest(rows) == want:
            return None
        return DamagedShard(name, shard, span, "changed" if shard_exists(array, shard) else "missing")

    def _unverified(self, name: str, shard: int) -> bool:
        """Whether a read must check shard `shard` of array `name` (it has a checksum that this process has not
        checked yet, and the store was opened with `verify`)."""
        want = recorded(self.meta, name, shard)
        return self.verify and want is not None and (self.path, name, shard, want) not in _VERIFIED

    def _verify(self, array: zarr.Array, name: str, shard: int, rows: np.ndarray | None = None) -> None:
        """Check shard `shard` of `array` (`rows`: its rows, when read already); `StoreError` naming it and the fix."""
        problem = self._problem(array, name, shard, rows)
        if problem is not None:
            raise StoreError(f"store {self.path!r}: {problem.describe()}; {self.fix}")
        _VERIFIED.add((self.path, name, shard, str(recorded(self.meta, name, shard))))

    def _read(self, name: str, rows: slice | np.ndarray) -> np.ndarray:
        array = node_array(self.group, name)
        if isinstance(rows, slice):
            shards = list(range(rows.start // self.shard_rows, -(-rows.stop // self.shard_rows)))
        else:
            shards = np.unique(rows // self.shard_rows).tolist()
        todo = [s for s in shards if self._unverified(name, s)]
        if not isinstance(rows, slice):
            for shard in todo:
                self._verify(array, name, shard)
            order = np.argsort(rows, kind="stable")
            out = self._get(array, name, (rows[order],) + (slice(None),) * (array.ndim - 1), shards)
            result = np.empty_like(out)
            result[order] = out
            return result
        lo = min([rows.start, *(self.shard_span(s)[0] for s in todo[:1])])  # whole shards where they are checked
        hi = max([rows.stop, *(self.shard_span(s)[1] for s in todo[-1:])])
        data = self._get(array, name, slice(lo, hi), shards)
        for shard in todo:
            start, stop = self.shard_span(shard)
            self._verify(array, name, shard, data[start - lo : stop - lo])
        return data[rows.start - lo : rows.stop - lo]

    def _get(self, array: zarr.Array, name: str, selection: slice | tuple, shards: list[int]) -> np.ndarray:
        """`array[selection]` (a row slice, or rows as an orthogonal selection) of rows in `shards`; `StoreError`
        naming the shard when Zarr cannot decode one."""
        try:
            if isinstance(selection, slice):
                return np.asarray(array[selection])
            return np.asarray(array.get_orthogonal_selection(selection))
        except READ_ERRORS:
            for shard in shards:
                problem = self._problem(array, name, shard)
                if problem is not None and problem.problem == "unreadable":
                    raise StoreError(f"store {self.path!r}: {problem.describe()}; {self.fix}") from None
            raise

    def activations(
        self, hook: str, rows: slice | np.ndarray | list[int] = slice(None), dtype: torch.dtype | None = torch.float32
    ) -> torch.Tensor:
        """Activations of `hook` at `rows` as a `[n, d]` tensor (float32 unless `dtype=None`: as stored)."""
        self._check_hook(hook)
        x = from_storage(self._read(f"activations/{hook}", self._rows(rows)), self.dtype)
        return x if dtype is None else x.to(dtype)

    def tokens(self, rows: slice | np.ndarray | list[int] = slice(None)) -> np.ndarray:
        return self._read("tokens", self._rows(rows))

    def doc_ids(self, rows: slice | np.ndarray | list[int] = slice(None)) -> np.ndarray:
        return self._read("doc_id", self._rows(rows))

    def positions(self, rows: slice | np.ndarray | list[int] = slice(None)) -> np.ndarray:
        return self._read("position", self._rows(rows))

    def contexts(self, rows: slice | np.ndarray | list[int] = slice(None)) -> np.ndarray:
        return self._read("context", self._rows(rows))

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
        r = self.shard_rows
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
        mix_shards = max(1, mix_rows // self.shard_rows)
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
        specs = c.get("models") or {}
        models = [
            f"{'models' if i == 0 else '':<13}{alias} = {self.models.get(alias, '?')} ({spec})"
            for i, (alias, spec) in enumerate(specs.items())
        ]
        lines = [
            f"store        {self.path}",
            *(models or [f"model        {self.model} ({c.get('model', '?')})"]),
            f"text         {text}",
            f"context      {c.get('context_length', '-')} tokens, special tokens dropped: {c.get('drop_special_tokens', '-')}",
            f"rows         {self.n_tokens:,} complete{'' if self.complete else ' (harvest not finished)'}",
            f"dtype        {self.dtype}, shards of {m['shard_rows']:,} rows",
            f"checksums    {m['checksums']['algorithm']} per shard (`saelab info --verify` checks every shard)"
            if "checksums" in m
            else "checksums    none (the store was written before saelab recorded them)",
            "hooks:",
        ]
        width = max([32, *map(len, self.hooks)])
        for h in self.hooks:
            lines.append(
                f"  {h:<{width}} d={self.d(h):<6} mean norm {m['stats'][h].get('mean_norm', float('nan')):.3f}"
            )
        return "\n".join(lines)
