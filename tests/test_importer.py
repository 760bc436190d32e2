"""Importing arrays: `.npy` and `.safetensors` sources, replacing a store, and imports that do not finish."""

import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from typer.testing import CliRunner

from saelab.cli import app
from saelab.errors import OverwriteError, StoreError
from saelab.importer import import_arrays, read_arrays
from saelab.store import ActivationStore, StoreWriter
from tests.store.helpers import train_config


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
    result = CliRunner().invoke(app, ["import", str(tmp_path / "v.npy"), "--run", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output  # --run: the store goes into the run directory
    assert torch.equal(ActivationStore.open(str(tmp_path / "run")).activations("v"), torch.from_numpy(x))
    for where in ([], ["--run", str(tmp_path / "r2"), "--out", str(tmp_path / "o.zarr")]):
        result = CliRunner().invoke(app, ["import", str(tmp_path / "v.npy"), *where])
        assert result.exit_code == 2 and "--run RUN_DIR" in result.output and "Traceback" not in result.output
    with pytest.raises(StoreError, match="same number of rows"):
        import_arrays({"a": x, "b": x[:5]}, str(tmp_path / "bad.zarr"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_arrays(tmp_path / "missing.npy")


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


def test_an_import_that_fails_half_way_leaves_nothing(tmp_path, monkeypatch):
    x = np.ones((1000, 4), np.float32)
    commit = StoreWriter.commit

    def fail_after_one_shard(self, rows_complete, complete=False, **extra):
        commit(self, rows_complete, complete, **extra)
        raise OSError("disk full")

    monkeypatch.setattr(StoreWriter, "commit", fail_after_one_shard)
    with pytest.raises(OSError, match="disk full"):
        import_arrays({"a": x}, str(tmp_path / "s.zarr"), shard_rows=128, chunk_rows=32, progress=False)
    assert not (tmp_path / "s.zarr").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="disk full"):
        import_arrays({"a": x}, str(tmp_path / "empty"), shard_rows=128, chunk_rows=32, progress=False)
    assert list((tmp_path / "empty").iterdir()) == []  # the folder that was there stays, empty


def _import_then_die_after_one_shard(out: str) -> None:
    """Start importing 1,000 rows in shards of 128 and SIGKILL this process once the first shard is committed."""
    commit = StoreWriter.commit

    def commit_then_die(self, *args, **kwargs):
        commit(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)

    StoreWriter.commit = commit_then_die
    import_arrays({"a": np.ones((1000, 4), np.float32)}, out, shard_rows=128, chunk_rows=32, progress=False)


def test_a_killed_import_is_refused_by_every_reader(tmp_path):
    out = tmp_path / "run" / "activations.zarr"
    proc = multiprocessing.get_context("fork").Process(target=_import_then_die_after_one_shard, args=(str(out),))
    proc.start()  # forked: it starts in milliseconds with saelab already imported
    proc.join(timeout=60)
    if proc.is_alive():  # it hung instead of dying: end it, and fail
        proc.kill()
    assert proc.exitcode == -signal.SIGKILL
    with pytest.raises(
        StoreError, match=r"an import that did not finish \(128 of 1,000 rows written\); import it again"
    ):
        ActivationStore.open(str(out))
    for args in (["info", str(out)], ["train", str(train_config(out.parent, tmp_path / "train.yaml")), "--quiet"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "did not finish" in result.stderr, result.output
    np.save(tmp_path / "v.npy", np.ones((1000, 4), np.float32))
    result = CliRunner().invoke(app, ["import", str(tmp_path / "v.npy"), "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert ActivationStore.open(str(out)).complete and os.path.isdir(out)
