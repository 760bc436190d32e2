"""Reading stores: slicing, the shuffled batch iterator, and the checks of every shard against its checksum."""

import json
import os

import fsspec
import pytest
import torch
from typer.testing import CliRunner

import saelab.store.reader
from saelab.cli import app
from saelab.errors import StoreError
from saelab.run import RunDir
from saelab.store import ActivationStore
from tests.store.helpers import SHARD, D, N, flip_byte, shard_file, small_store, train_config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Rows whose first column is the row index, in two hooks, shards of 128 rows."""
    return small_store(tmp_path_factory.mktemp("s") / "imp.zarr")


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


def test_a_run_directory_opens_its_store(tmp_path):
    run = RunDir(tmp_path / "run")
    small_store(str(run.store))
    opened = ActivationStore.open(str(run.root))
    assert opened.path == str(run.store) and opened.n_tokens == N
    with pytest.raises(StoreError, match="no activation store"):  # a folder that is neither is still refused
        ActivationStore.open(str(tmp_path))


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


def test_a_deleted_shard_is_named_by_row_reads_batches_and_info(tmp_path):
    out = tmp_path / "s.zarr"
    small_store(out)
    shard_file(out, "activations/a", 3).unlink()
    store = ActivationStore.open(str(out))
    named = "shard 3 (rows 384 to 511) of 'activations/a' is missing"
    assert ids(store.activations("a", slice(0, 300))) == list(range(300))  # the other shards read as before
    for read in (lambda: store.activations("a", [5, 400]), lambda: list(store.batches("a", 100))):
        with pytest.raises(StoreError, match="import it again") as err:
            read()
        assert named in str(err.value)
    unchecked = ActivationStore.open(str(out), verify=False).activations("a", slice(384, 512))
    assert not unchecked.any()  # what Zarr returns for the deleted shard: fill values
    result = CliRunner().invoke(app, ["info", str(out), "--verify"])
    assert result.exit_code == 2 and "1 damaged shards" in result.stderr and "import it again" in result.stderr
    assert f"DAMAGED: 1 of {6 * -(-N // SHARD)} shards" in result.stdout and named in result.stdout


def test_corrupted_bytes_are_named_whether_zarr_decodes_them_or_not(tmp_path):
    out = tmp_path / "s.zarr"
    small_store(out)
    flip_byte(shard_file(out, "activations/b", 5))  # inside the data: decodes to wrong numbers
    path = shard_file(out, "tokens", 6)
    flip_byte(path, at=path.stat().st_size - 10)  # inside the shard index: Zarr's own check fails
    store = ActivationStore.open(str(out))
    with pytest.raises(StoreError, match=r"shard 5 \(rows 640 to 767\) of 'activations/b' is damaged \(its bytes"):
        store.activations("b", slice(700, 701))
    with pytest.raises(StoreError, match=r"shard 6 \(rows 768 to 895\) of 'tokens' is damaged \(Zarr cannot decode"):
        store.tokens(slice(800, 810))
    assert (store.tokens(slice(0, 768)) == -1).all() and ids(store.activations("a", [900, 3])) == [900, 3]
    result = CliRunner().invoke(app, ["info", str(out), "--verify"])
    assert result.exit_code == 2 and "2 damaged shards" in result.stderr
    assert "'activations/b'" in result.stdout and "'tokens'" in result.stdout


def test_an_intact_store_verifies_and_each_shard_is_hashed_once(tmp_path, monkeypatch):
    out = tmp_path / "s.zarr"
    small_store(out)
    result = CliRunner().invoke(app, ["info", str(out), "--verify"])
    assert result.exit_code == 0 and f"OK: all {6 * -(-N // SHARD)} shards match" in result.stdout
    hashed = []
    digest = saelab.store.reader.digest
    monkeypatch.setattr(saelab.store.reader, "digest", lambda rows: hashed.append(len(rows)) or digest(rows))
    store = ActivationStore.open(str(out))
    for _ in range(2):
        assert sum(len(b) for b in store.batches("a", 100, epochs=2)) == 2 * N
    store.activations("a", [1, 999])
    assert sorted(hashed) == sorted([SHARD] * (N // SHARD) + [N % SHARD])  # every shard of `a`, once


def test_a_store_without_checksums_reads_as_before_and_says_so(tmp_path):
    out = tmp_path / "s.zarr"
    small_store(out)
    meta_file = out / "zarr.json"
    meta = json.loads(meta_file.read_text())
    del meta["attributes"]["saelab"]["checksums"]  # as saelab wrote stores before it recorded checksums
    meta_file.write_text(json.dumps(meta))
    flip_byte(shard_file(out, "activations/a", 1))
    store = ActivationStore.open(str(out))
    assert store.activations("a", slice(128, 256)).shape == (128, D)
    result = CliRunner().invoke(app, ["info", str(out), "--verify"])
    assert result.exit_code == 0, result.output
    assert "checksums    none" in result.stdout and "checksums unavailable" in result.stdout


def test_train_refuses_a_damaged_store(tmp_path):
    run = tmp_path / "run"
    small_store(run / "activations.zarr", n=600)
    os.remove(shard_file(run / "activations.zarr", "activations/b", 2))
    config = train_config(run, tmp_path / "train.yaml")
    result = CliRunner().invoke(app, ["train", str(config), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "shard 2 (rows 256 to 383) of 'activations/b' is missing" in result.stderr


def test_a_missing_shard_of_an_fsspec_store_is_named_the_same_way():
    out = f"memory://verify-{os.getpid()}/s.zarr"
    small_store(out)
    fs, root = fsspec.core.url_to_fs(out)
    fs.rm(f"{root}/activations/a/c/2/0")
    with pytest.raises(StoreError, match=r"shard 2 \(rows 256 to 383\) of 'activations/a' is missing"):
        ActivationStore.open(out).activations("a", slice(300, 301))
