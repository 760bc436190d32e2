"""Whole shards written directly (`saelab.store.shards`) are the files Zarr writes, byte for byte."""

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import ZstdCodec

from saelab.store.shards import plain_chunk_rows, set_shards


def _array(root: Path, name: str, dtype: str, width: int | None, *, shard: int, chunk: int, compressors=None):
    group = zarr.open_group(store=str(root), mode="a", zarr_format=3)
    rest = () if width is None else (width,)
    return group.create_array(
        name, shape=(0, *rest), dtype=dtype, chunks=(chunk, *rest), shards=(shard, *rest), compressors=compressors
    )


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("dtype", "width", "chunks_per_shard"),
    [("float16", 12, 2), ("uint16", 12, 4), ("float32", 5, 1), ("int32", None, 2), ("int64", None, 8)],
)
def test_shards_are_the_bytes_zarr_writes(tmp_path, dtype, width, chunks_per_shard):
    shard, chunk = 32, 32 // chunks_per_shard
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((3 * shard, *(() if width is None else (width,)))) * 1000).astype(dtype)
    rows[rows == 0] = 1  # no chunk empty: Zarr then writes every chunk, as `set_shards` does
    ours = _array(tmp_path / "a.zarr", "x", dtype, width, shard=shard, chunk=chunk)
    theirs = _array(tmp_path / "b.zarr", "x", dtype, width, shard=shard, chunk=chunk)
    for arr in (ours, theirs):
        arr.resize((4 * shard, *arr.shape[1:]))
    assert plain_chunk_rows(ours) == chunk
    set_shards(ours, shard, rows, chunk_rows=chunk)  # three shards at once, from the second
    theirs[shard : 4 * shard] = rows
    written = _files(tmp_path / "a.zarr" / "x" / "c")
    assert len(written) == 3
    assert written == _files(tmp_path / "b.zarr" / "x" / "c")
    np.testing.assert_array_equal(ours[shard:], rows)  # and Zarr reads them back


def test_compressed_and_column_chunked_arrays_are_left_to_zarr(tmp_path):
    zstd = _array(tmp_path / "s.zarr", "z", "float16", 8, shard=16, chunk=4, compressors=ZstdCodec(level=1))
    group = zarr.open_group(store=str(tmp_path / "s.zarr"), mode="a", zarr_format=3)
    columns = group.create_array("c", shape=(0, 8), dtype="float16", chunks=(4, 4), shards=(16, 8), compressors=None)
    assert plain_chunk_rows(zstd) is None
    assert plain_chunk_rows(columns) is None


def test_shards_on_an_fsspec_store_are_the_bytes_zarr_writes():
    """Off a local folder the shards go through the store's own `set`: the same bytes on an fsspec URL."""
    fsspec = pytest.importorskip("fsspec")
    memory = fsspec.filesystem("memory")
    rows = (np.random.default_rng(1).standard_normal((2 * 16, 6)) * 100).astype("float16")
    rows[rows == 0] = 1
    arrays = []
    for name in ("ours", "theirs"):
        group = zarr.open_group(f"memory://shards-{name}.zarr", mode="w", zarr_format=3)
        arr = group.create_array(
            "x", shape=(2 * 16, 6), dtype="float16", chunks=(8, 6), shards=(16, 6), compressors=None
        )
        arrays.append(arr)
    set_shards(arrays[0], 0, rows, chunk_rows=8)
    arrays[1][:] = rows
    files = [
        {p.rsplit("/c/", 1)[1]: memory.cat(p) for p in memory.find(f"/shards-{n}.zarr/x/c")} for n in ("ours", "theirs")
    ]
    assert len(files[0]) == 2
    assert files[0] == files[1]
    np.testing.assert_array_equal(arrays[0][:], rows)
