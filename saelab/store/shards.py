"""Whole shards of a store's arrays written as Zarr writes them, without Zarr's per-chunk pipeline.

A store's arrays are sharded along rows only, their inner chunks span the full row width, and their bytes are
little-endian and, by default, uncompressed. A whole shard of such an array is then the bytes of its rows as they
lie in memory, followed by Zarr's shard index (the offset and length of each inner chunk, uint64 little-endian, in
row order) and that index's CRC32C. `set_shards` writes exactly those bytes, one file per shard on a local store (written
straight from the rows, as Zarr's `LocalStore` writes a file: a `.partial` file renamed over the shard) and one
`store.set` of a joined buffer on any other (fsspec URLs): the files Zarr writes (`tests/store/test_shards.py`
compares them for every dtype a store uses), for about a third of Zarr's CPU time, which copies each chunk into a
shard buffer filled with the fill value and then joins the buffers. Any other layout (compression, a chunk that does
not span the row) is left to Zarr: `plain_chunk_rows` tells which.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ShardingCodecIndexLocation
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_grids import RegularChunkGrid
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.storage import LocalStore

_LITTLE = BytesCodec(endian="little")


def plain_chunk_rows(arr: zarr.Array) -> int | None:
    """The rows of an inner chunk of `arr` when `set_shards` can write its shards (uncompressed, little-endian,
    sharded and chunked along rows only, the index at the end), else None."""
    meta = arr.metadata
    sharding = meta.codecs[0] if isinstance(meta, ArrayV3Metadata) and len(meta.codecs) == 1 else None
    if not isinstance(sharding, ShardingCodec) or not isinstance(meta.chunk_grid, RegularChunkGrid):
        return None
    shard_shape = meta.chunk_grid.chunk_shape
    plain = (
        sharding.codecs == (_LITTLE,)
        and sharding.index_codecs == (_LITTLE, Crc32cCodec())
        and sharding.index_location == ShardingCodecIndexLocation.end
        and tuple(sharding.chunk_shape[1:]) == tuple(arr.shape[1:]) == tuple(shard_shape[1:])
        and shard_shape[0] % sharding.chunk_shape[0] == 0
    )
    return int(sharding.chunk_shape[0]) if plain else None


def set_shards(arr: zarr.Array, start: int, rows: np.ndarray, *, chunk_rows: int) -> None:
    """Write `rows` (whole shards, in `arr`'s dtype) as shards of `arr` from row `start` (a shard boundary), every
    inner chunk present, with the bytes Zarr writes; `arr` must have a `plain_chunk_rows` layout of `chunk_rows`."""
    if arr.shards is None:
        raise ValueError(f"array {arr.path!r} is not sharded: write it through Zarr")
    shard_rows = int(arr.shards[0])
    data = np.ascontiguousarray(rows, dtype=np.dtype(arr.dtype).newbyteorder("<"))
    chunks = shard_rows // chunk_rows
    chunk_bytes = data[:chunk_rows].nbytes
    index = np.empty((chunks, 2), dtype="<u8")
    index[:, 0] = np.arange(chunks, dtype=np.uint64) * chunk_bytes
    index[:, 1] = chunk_bytes
    tail = index.tobytes() + int(google_crc32c.value(index.tobytes())).to_bytes(4, "little")
    if isinstance(arr.store, LocalStore):  # the file written directly: no copy of the rows into one buffer
        for first in range(0, len(data), shard_rows):
            path = Path(arr.store.root) / f"{arr.path}/{_key(arr, start + first, shard_rows)}"
            _write_file(path, data[first : first + shard_rows], tail)
        return
    buffer = default_buffer_prototype().buffer
    blobs = {}
    for first in range(0, len(data), shard_rows):
        blob = np.empty(shard_rows * data[:1].nbytes + len(tail), dtype=np.uint8)
        blob[: -len(tail)] = data[first : first + shard_rows].reshape(-1).view(np.uint8)
        blob[-len(tail) :] = np.frombuffer(tail, dtype=np.uint8)
        blobs[f"{arr.path}/{_key(arr, start + first, shard_rows)}"] = buffer.from_bytes(blob.data)

    async def put_all() -> None:
        await asyncio.gather(*(arr.store.set(key, blob) for key, blob in blobs.items()))

    sync(put_all())


def _key(arr: zarr.Array, row: int, shard_rows: int) -> str:
    """The store key of the shard of `arr` that starts at row `row`, under the array's path."""
    return arr.metadata.encode_chunk_key((row // shard_rows,) + (0,) * (arr.ndim - 1))


def _write_file(path: Path, rows: np.ndarray, tail: bytes) -> None:
    """Write a shard's `rows` (contiguous) and its index `tail` to `path` as Zarr's `LocalStore` does: into
    a `.<uuid>.partial` file beside it, renamed over it once whole (so a crash leaves the old shard or none, and the
    leftover is one that `StoreWriter.remove_partial_writes` deletes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{uuid.uuid4().hex}.partial")
    try:
        with partial.open("wb") as f:
            f.write(rows.reshape(-1).view(np.uint8).data)
            f.write(tail)
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
