"""`FeatureStore`: one SAE's feature analysis on disk (a Zarr group, one array per panel, chunked by feature).

The app and the notebooks read one feature at a time: `FeatureStore.feature(i)` reads the `FEATURE_CHUNK` latents
around `i` and keeps the last `CACHED_CHUNKS` of them, so the next latents' pages read nothing. Besides one array per
panel (what `FeatureStore.column` reads), the analysis keeps every panel of a latent packed into one row of `ROWS`,
so a chunk of latents is one read of one Zarr chunk, not one per panel (zarr spends about 0.5 ms of CPU on each:
a cold chunk cost 13 ms with 23 panels, about 1 ms packed). Analyses written before `ROWS` are read panel by panel.
A damaged or missing chunk is a `StoreError` naming the analysis and the fix, never data. The run's `RunDir.vocab`
maps the run model's token ids to their display text.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr
from zarr.core.array_spec import ArrayConfig
from zarr.core.sync import sync

from saelab.errors import FeatureIndexError, StoreError
from saelab.run import RunDir

FEATURE_CHUNK = 64
CACHED_CHUNKS = 64
"""Chunks of `FEATURE_CHUNK` latents a `FeatureStore` keeps (least recently used out first): 4,096 latents, about
60 MB for the default analysis config (each latent's panels take about 15 kB)."""
EVERY_CHUNK = "saelab_every_chunk_written"
"""Group attribute of an analysis whose arrays have every chunk written (also those equal to the fill value), so a
missing chunk is damage; analyses written before it may lack all-zero chunks, which then read as zeros."""
TOKEN_IDS = "top_token_ids"  # every top example's own token, one chunk for token search
ROWS = "feature_rows"
"""The array `[d_sae, row bytes]` (uint8, chunked by `FEATURE_CHUNK` latents) holding every panel of a latent (all
but `TOKEN_IDS`) packed into its row, in the order and with the dtypes and shapes of the group attribute
`ROW_LAYOUT`."""
ROW_LAYOUT = "saelab_feature_rows"
"""Group attribute: `[[panel, dtype, per-latent shape], ...]`, the panels of a `ROWS` row in order (dtype as numpy
spells it with its byte order, e.g. `<f4`)."""
PACK_CHUNKS = 64
"""Chunks of `ROWS` packed and written at a time (bounds the memory that writing it takes)."""


class Panel(NamedTuple):
    """Where one panel lies in a `ROWS` row."""

    name: str
    """The panel."""
    dtype: np.dtype
    """Its values' dtype."""
    shape: tuple[int, ...]
    """Its shape for one latent (`()` for one number)."""
    start: int
    """Its first byte in the row."""
    stop: int
    """One past its last byte."""


def row_layout(spec: list[Any]) -> list[Panel]:
    """The panels of a `ROW_LAYOUT` attribute, each with its bytes in the row."""
    panels, start = [], 0
    for name, dtype, shape in spec:
        dt, shape = np.dtype(dtype), tuple(int(n) for n in shape)
        stop = start + dt.itemsize * math.prod(shape)
        panels.append(Panel(str(name), dt, shape, start, stop))
        start = stop
    return panels


def _pack(arrays: dict[str, np.ndarray], rows: slice) -> np.ndarray:
    """Rows `rows` of every panel of `arrays`, each latent's panels side by side as bytes: `[n, row bytes]` uint8."""
    parts = [np.ascontiguousarray(a[rows]) for a in arrays.values()]
    return np.concatenate([p.reshape(len(p), math.prod(p.shape[1:])).view(np.uint8) for p in parts], axis=1)


def write_feature_store(out: str | Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> FeatureStore:
    """Write the panels `arrays` (each `[d_sae, ...]`) and `attrs` as a feature analysis at `out`; open it."""
    group = zarr.open_group(store=str(out), mode="w", zarr_format=3)
    config = ArrayConfig(order="C", write_empty_chunks=True)
    columns = dict(arrays)
    if "top_tokens" in arrays:
        columns[TOKEN_IDS] = arrays["top_tokens"][:, :, arrays["top_tokens"].shape[2] // 2]
    for name, a in columns.items():
        a = np.ascontiguousarray(a)
        chunks = a.shape if name == TOKEN_IDS else (FEATURE_CHUNK, *a.shape[1:])
        group.create_array(name, data=a, chunks=chunks, config=config)
    layout = [[name, a.dtype.str, list(a.shape[1:])] for name, a in arrays.items()]
    d_sae, row_bytes = len(next(iter(arrays.values()))), row_layout(layout)[-1].stop
    packed = group.create_array(
        ROWS, shape=(d_sae, row_bytes), dtype=np.uint8, chunks=(FEATURE_CHUNK, row_bytes), config=config
    )
    step = FEATURE_CHUNK * PACK_CHUNKS
    for start in range(0, d_sae, step):
        packed[start : start + step] = _pack(arrays, slice(start, start + step))
    group.attrs.update({"saelab_analysis": attrs, EVERY_CHUNK: True, ROW_LAYOUT: layout})
    return FeatureStore.open(out)


def vocab_strings(tokenizer: Any) -> list[str]:
    """Display text of every token id."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


class FeatureStore:
    """Read access to one SAE's analysis: one feature at a time. Safe to share between threads (the app does)."""

    def __init__(self, group: zarr.Group, path: str):
        attrs = group.attrs["saelab_analysis"]
        if not isinstance(attrs, dict):
            raise StoreError(f"{path} is not a saelab feature analysis; run `saelab analyze` on the run directory")
        self.group, self.path = group, path
        self.attrs: dict[str, Any] = dict(attrs)
        self._arrays = {name: array for name, array in group.arrays()}
        self._every_chunk = group.attrs.get(EVERY_CHUNK) is True
        layout = group.attrs.get(ROW_LAYOUT)
        self._layout = row_layout(layout) if isinstance(layout, list) and ROWS in self._arrays else None
        self._vocab: list[str] | None = None
        self._chunks: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        """The analysis at `path`; `StoreError` when there is none."""
        try:
            return cls(zarr.open_group(store=str(path), mode="r", zarr_format=3), str(path))
        except (FileNotFoundError, KeyError):
            raise StoreError(f"no feature analysis at {path}; run `saelab analyze` on the run directory") from None

    @property
    def n_features(self) -> int:
        """The number of latents of the SAE."""
        return int(self.attrs["d_sae"])

    @property
    def run(self) -> RunDir:
        """The run the analysis belongs to: its path is `RunDir(run).analysis(hook, variant)`."""
        return RunDir(Path(self.path).parent.parent.parent)

    @property
    def vocab(self) -> list[str]:
        """Token display strings (the run's `RunDir.vocab`), or an empty list."""
        if self._vocab is None:
            path = self.run.vocab
            vocab: list[str] = json.loads(path.read_text()) if path.exists() else []
            self._vocab = vocab
        return self._vocab

    def feature(self, i: int) -> dict[str, Any]:
        """Every panel of feature `i`; `FeatureIndexError` (a `RunError` and an `IndexError`) when the SAE has no such
        feature, `StoreError` when its chunk of the analysis is damaged or missing."""
        if not 0 <= i < self.n_features:
            raise FeatureIndexError(f"feature {i} does not exist: this SAE has features 0..{self.n_features - 1}")
        chunk, row = divmod(i, FEATURE_CHUNK)
        out: dict[str, Any] = {}
        for name, values in self._chunk(chunk).items():
            v = values[row]
            out[name] = v.item() if v.ndim == 0 else v
        return out

    def _chunk(self, chunk: int) -> dict[str, np.ndarray]:
        """Every panel (but `TOKEN_IDS`) of the latents of chunk `chunk`, from the cache or read once."""
        with self._lock:
            if chunk in self._chunks:
                self._chunks.move_to_end(chunk)
                return self._chunks[chunk]
        rows = slice(chunk * FEATURE_CHUNK, (chunk + 1) * FEATURE_CHUNK)
        if self._layout is None:  # written before `ROWS`
            panels = self._read({name: a for name, a in self._arrays.items() if name != TOKEN_IDS}, rows)
        else:
            packed = self._read({ROWS: self._arrays[ROWS]}, rows)[ROWS]
            panels = {
                p.name: packed[:, p.start : p.stop].copy().view(p.dtype).reshape(len(packed), *p.shape)
                for p in self._layout
            }
        with self._lock:  # two threads may read the same chunk at once: both get the same values
            self._chunks[chunk] = panels
            self._chunks.move_to_end(chunk)
            while len(self._chunks) > CACHED_CHUNKS:
                self._chunks.popitem(last=False)
        return panels

    def _read(self, arrays: dict[str, zarr.Array], rows: slice) -> dict[str, np.ndarray]:
        """Rows `rows` of every panel of `arrays`, read concurrently (one call into zarr's event loop, not one per
        panel: a third of the time); `StoreError` naming the analysis and the fix when a chunk of them is damaged
        (zarr and numcodecs raise many kinds of errors for that) or missing."""

        async def read_all() -> list[np.ndarray | BaseException]:
            return await asyncio.gather(*(self._panel(a, rows) for a in arrays.values()), return_exceptions=True)

        out: dict[str, np.ndarray] = {}
        for (name, array), value in zip(arrays.items(), sync(read_all())):
            if isinstance(value, Exception):
                last = min(rows.stop, array.shape[0]) - 1
                what = "the packed panels" if name == ROWS else "panel"
                raise StoreError(
                    f"The feature analysis {self.path} is damaged: {what} {name!r}, latents {rows.start} to {last}, "
                    f"cannot be read ({type(value).__name__}: {value}). "
                    f"Run `saelab analyze {self.run.root}` again to recompute it."
                ) from None
            if isinstance(value, BaseException):  # an interrupt, not damage
                raise value
            out[name] = value
        return out

    async def _panel(self, array: zarr.Array, rows: slice) -> np.ndarray:
        """Rows `rows` of one panel; `FileNotFoundError` for a missing chunk where every chunk was written."""
        if self._every_chunk:
            size = array.chunks[0]
            for c in range(rows.start // size, -(-min(rows.stop, array.shape[0]) // size)):
                key = array.metadata.encode_chunk_key((c,) + (0,) * (array.ndim - 1))
                if not await array.store_path.store.exists(f"{array.path}/{key}"):
                    raise FileNotFoundError(f"its chunk {key} is missing")
        return np.asarray(await array.async_array.getitem(rows))

    def has(self, name: str) -> bool:
        """Whether the analysis has panel `name` (e.g. `dfa_heads`, only for dictionaries on `attn.hook_z`)."""
        return name in self._arrays

    def column(self, name: str) -> np.ndarray:
        """Panel `name` of every latent, `[d_sae, ...]` (e.g. `max_act`, `density`); `StoreError` if there is none
        or it is damaged."""
        array = self._arrays.get(name)
        if array is None:
            raise StoreError(f"the feature analysis {self.path} has no panel {name!r}; run `saelab analyze` again")
        return self._read({name: array}, slice(0, array.shape[0]))[name]

    def search_token(self, token_id: int) -> list[int]:
        """Latents whose label, top examples or top logit effects contain the token, most matches first (a label's
        n-gram counts as many matches as the latent has top examples: labels are what distinguishes a latent)."""
        top = self.column(TOKEN_IDS)
        hits = (top == token_id).sum(1)
        if "label_tokens" in self._arrays:  # `[d_sae, n_labels, 2]`
            labelled = (self.column("label_tokens") == token_id).any(2).sum(1)
            hits = hits + labelled * top.shape[1]
        if "logit_top_ids" in self._arrays:  # `[d_sae, n]`, a crosscoder's `[d_sae, S, n]`
            logits = self.column("logit_top_ids")
            hits = hits + (logits == token_id).reshape(len(logits), -1).sum(1)
        found = np.flatnonzero(hits)
        return found[np.argsort(-hits[found], kind="stable")].tolist()
