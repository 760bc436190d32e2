"""Reading stores: slicing, the shuffled batch iterator, and importing arrays."""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from typer.testing import CliRunner

from saelab.cli import app
from saelab.errors import OverwriteError, StoreError
from saelab.importer import import_arrays, read_arrays
from saelab.store import ActivationStore

N, D = 1000, 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Rows whose first column is the row index, in two hooks, shards of 128 rows."""
    x = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
    x[:, 0] = np.arange(N)
    out = str(tmp_path_factory.mktemp("s") / "imp.zarr")
    return import_arrays({"a": x, "b": -x}, out, dtype="float32", shard_rows=128, chunk_rows=32, progress=False)


def ids(batch):
    return batch[:, 0].long().tolist()


def test_slicing_and_metadata(store):
    assert store.hooks == ["a", "b"] and store.n_tokens == N and store.d("a") == D and store.complete
    assert ids(store.activations("a", slice(10, 14))) == [10, 11, 12, 13]
    assert ids(store.activations("a", [900, 3, 512])) == [900, 3, 512]
    assert (store.tokens(slice(0, 3)) == -1).all() and store.doc_ids(slice(5, 7)).tolist() == [5, 6]
    with pytest.raises(StoreError, match="not in store"):
        store.activations("c")
    with pytest.raises(StoreError, match="out of range"):
        store.activations("a", [N])


def test_epoch_covers_every_row_once_shuffled_across_shards(store):
    batches = list(store.batches("a", 100, seed=1))
    assert len(batches) == N // 100
    seen = sum((ids(b) for b in batches), [])
    assert sorted(seen) == list(range(N))
    assert seen != sorted(seen)
    first = ids(batches[0])
    assert len({r // 128 for r in first}) > 1  # one batch mixes shards


def test_batches_are_seeded_and_resumable(store):
    a = [ids(b) for b in store.batches("a", 64, seed=3, epochs=2)]
    assert a == [ids(b) for b in store.batches("a", 64, seed=3, epochs=2)]
    assert a != [ids(b) for b in store.batches("a", 64, seed=4, epochs=2)]
    assert a[:15] != a[15:30]  # epochs differ
    for start in (1, 7, 15, 22):
        assert [ids(b) for b in store.batches("a", 64, seed=3, epochs=2, start_batch=start)] == a[start:]


def test_several_hooks_share_rows_and_row_ranges_hold(store):
    for batch in store.batches(["a", "b"], 50, seed=0, rows=(200, 700)):
        assert torch.equal(batch["a"], -batch["b"])
        assert all(200 <= r < 700 for r in ids(batch["a"]))
    unshuffled = [ids(b) for b in store.batches("a", 100, shuffle=False, rows=(0, 300))]
    assert unshuffled == [list(range(i, i + 100)) for i in (0, 100, 200)]
    with pytest.raises(StoreError, match="fewer rows than one batch"):
        next(store.batches("a", 2000))


def test_import_safetensors_and_cli(tmp_path):
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    save_file({"emb": x, "bias": np.zeros(2, np.float32)}, str(tmp_path / "e.safetensors"))
    assert list(read_arrays(tmp_path / "e.safetensors")) == ["emb"]  # 1-D tensors are skipped
    np.save(tmp_path / "v.npy", x)
    result = CliRunner().invoke(
        app, ["import", str(tmp_path / "v.npy"), "--out", str(tmp_path / "v.zarr"), "--dtype", "float16"]
    )
    assert result.exit_code == 0, result.output
    s = ActivationStore.open(str(tmp_path / "v.zarr"))
    assert s.hooks == ["v"] and torch.equal(s.activations("v"), torch.from_numpy(x))
    result = CliRunner().invoke(app, ["info", str(tmp_path / "v.zarr")])
    assert "rows         10 complete" in result.output
    with pytest.raises(StoreError, match="same number of rows"):
        import_arrays({"a": x, "b": x[:5]}, str(tmp_path / "bad.zarr"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_arrays(tmp_path / "missing.npy")


def test_opening_a_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore.open(str(tmp_path / "nope.zarr"))


def test_import_replaces_a_store_only_with_overwrite(tmp_path):
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    out = str(tmp_path / "s.zarr")
    import_arrays({"a": x}, out, progress=False)
    with pytest.raises(OverwriteError, match="already holds an activation store"):
        import_arrays({"b": x}, out, progress=False)
    assert ActivationStore.open(out).hooks == ["a"]
    result = CliRunner().invoke(app, ["import", str(tmp_path / "v.npy"), "--out", out, "--overwrite"])
    assert result.exit_code == 2 and "no such file" in result.stderr  # checked before the old store is touched
    np.save(tmp_path / "v.npy", 2 * x)
    result = CliRunner().invoke(app, ["import", str(tmp_path / "v.npy"), "--out", out, "--overwrite"])
    assert result.exit_code == 0, result.output
    store = ActivationStore.open(out)
    assert store.hooks == ["v"] and torch.equal(store.activations("v"), torch.from_numpy(2 * x))
    (tmp_path / "empty").mkdir()
    assert import_arrays({"a": x}, str(tmp_path / "empty"), progress=False).n_tokens == 10  # an empty folder is fine
