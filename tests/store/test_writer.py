"""Writing stores: checksums committed with the rows they cover, rewriting a damaged shard."""

import numpy as np
import pytest

from saelab.errors import StoreError
from saelab.store import ActivationStore, StoreWriter, node_array, open_group
from saelab.store.checksums import digest
from tests.store.helpers import SHARD, rows, shard_file, small_store

HOOKS = {"a": 6}


def _meta_arrays(start: int, n: int) -> dict[str, np.ndarray]:
    index = np.arange(start, start + n)
    return {"tokens": index.astype(np.int32), "doc_id": index, "position": np.zeros(n, np.int32), "context": index}


def test_a_shard_checksum_is_committed_with_its_rows(tmp_path):
    out = str(tmp_path / "s.zarr")
    x = rows(3 * SHARD)
    writer = StoreWriter.create(out, {}, HOOKS, dtype="float16", shard_rows=SHARD, chunk_rows=32)
    writer.write(0, {"a": x[: 2 * SHARD].astype(np.float16)}, _meta_arrays(0, 2 * SHARD))  # two shards at once
    writer.commit(2 * SHARD)
    writer.write(2 * SHARD, {"a": x[2 * SHARD :].astype(np.float16)}, _meta_arrays(2 * SHARD, SHARD))
    on_disk = ActivationStore.open(out).meta  # the third shard is written but not committed
    assert on_disk["rows_complete"] == 2 * SHARD
    assert [len(t) for t in on_disk["checksums"]["shards"].values()] == [2] * 5
    writer.commit(3 * SHARD, complete=True)
    store = ActivationStore.open(out)
    for name in store.arrays:
        table = store.meta["checksums"]["shards"][name]
        read = np.asarray(node_array(store.group, name)[:])
        assert table == [digest(read[s * SHARD : (s + 1) * SHARD]) for s in range(3)], name
    assert store.check().damaged == []


def test_rewrite_restores_a_shard_without_counting_its_rows_again(tmp_path):
    out = tmp_path / "s.zarr"
    store = small_store(out)
    before, stats = shard_file(out, "activations/a", 2).read_bytes(), store.meta["stats"]
    shard_file(out, "activations/a", 2).unlink()
    writer = StoreWriter(open_group(str(out), mode="r+"))
    writer.rewrite(2 * SHARD, {"activations/a": rows()[2 * SHARD : 3 * SHARD]})
    writer.commit(writer.rows_complete, complete=True)
    again = ActivationStore.open(str(out))
    assert shard_file(out, "activations/a", 2).read_bytes() == before and again.meta["stats"] == stats
    assert again.check().damaged == []
    with pytest.raises(StoreError, match="start at a shard boundary"):
        writer.rewrite(SHARD + 1, {"activations/a": rows()[:10]})
