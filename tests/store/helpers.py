"""What the store tests share besides fixtures: a tiny imported store, ways to damage a shard of it, and a training
config of a few steps on a run's store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from saelab.importer import import_arrays
from saelab.store import ActivationStore

N, D, SHARD = 1000, 6, 128


def rows(n: int = N) -> np.ndarray:
    """Rows whose first column is the row index."""
    x = np.random.default_rng(0).normal(size=(n, D)).astype(np.float32)
    x[:, 0] = np.arange(n)
    return x


def small_store(out: Path | str, n: int = N) -> ActivationStore:
    """`n` rows (`rows`) under hook `a` and their negatives under `b`, in shards of 128 rows of chunks of 32, at `out`
    (a path or fsspec URL)."""
    x = rows(n)
    return import_arrays({"a": x, "b": -x}, str(out), dtype="float32", shard_rows=SHARD, chunk_rows=32, progress=False)


def shard_file(store: Path, array: str, shard: int) -> Path:
    """The file of shard `shard` of `array` in a local store: `c/<shard>/0` for 2-D arrays, `c/<shard>` for 1-D."""
    folder = store / array / "c" / str(shard)
    return folder / "0" if array.startswith("activations/") else folder


def flip_byte(path: Path, at: int = 100) -> None:
    """Invert one byte of a file (inside the data of an uncompressed shard: its index is at the end)."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


TINY_TRAINING = dict(
    tokens=256,
    batch_size=64,
    eval_rows=128,
    warmup_steps=1,
    checkpoint_every=128,
    log_every=1,
    ce_contexts=0,
    grid={"arch": ["topk"], "k": [2], "expansion": [2]},
)
"""Four steps of a TopK SAE (k 2, expansion 2) on a store of 600 rows or more: the `TrainConfig` fields but `run`."""


def train_config(run: Path, path: Path) -> Path:
    """A training config at `path` of `TINY_TRAINING` on every hook of `run`'s store."""
    path.write_text(json.dumps({"run": str(run), **TINY_TRAINING}))  # JSON is YAML
    return path
