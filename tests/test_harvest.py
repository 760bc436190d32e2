"""Harvest: exact activations, metadata, resume after SIGKILL and after a move, repair of damaged shards, refusal,
memory:// stores."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
import zarr
from typer.testing import CliRunner

from saelab.cli import app
from saelab.config import HarvestConfig, TextConfig
from saelab.errors import StoreError, TextSourceError
from saelab.harvest import given_identity, harvest
from saelab.run import RunDir
from saelab.store import ActivationStore, saelab_meta
from saelab.text import embedded_documents
from tests.store.helpers import flip_byte, shard_file

KINDS = ["hook_resid_pre", "hook_resid_post", "hook_mlp_out", "hook_attn_out", "attn.hook_z"]


def small_cfg(out, **kw):
    base = dict(
        hooks=[f"blocks.1.{k}" for k in KINDS],
        out=str(out),
        context_length=24,
        batch_size=4,
        max_tokens=300,
        dtype="float32",
        drop_special_tokens=False,
        shard_rows=128,
        chunk_rows=32,
        text=TextConfig(max_documents=200),
    )
    return HarvestConfig(**{**base, **kw})


@pytest.mark.parametrize("which", ["minilm", "decoder"])
def test_stored_activations_equal_run_with_cache(which, request, tmp_path):
    model = request.getfixturevalue(which)
    cfg = small_cfg(tmp_path / "s.zarr", model=which)
    store = harvest(cfg, model=model, progress=False)
    assert store.n_tokens == 300 and store.complete
    n_ctx, bs = cfg.context_length, cfg.batch_size
    tokens = store.tokens(slice(0, n_ctx * bs)).reshape(bs, n_ctx)  # exactly the first batch
    assert (store.positions(slice(0, n_ctx)) == np.arange(n_ctx)).all()
    assert (store.contexts(slice(0, 2 * n_ctx)) == np.repeat([0, 1], n_ctx)).all()
    _, cache = model.run_with_cache(torch.from_numpy(tokens.astype(np.int64)), names_filter=lambda n: n in cfg.hooks)
    for hook in cfg.hooks:
        want = cache[hook]
        want = want.flatten(2) if want.ndim == 4 else want
        assert torch.equal(store.activations(hook, slice(0, n_ctx * bs)), want.reshape(-1, want.shape[-1])), hook
        all_rows = store.activations(hook).double()
        np.testing.assert_allclose(store.mean(hook).numpy(), all_rows.mean(0).numpy(), rtol=1e-5, atol=1e-6)
        assert store.mean_norm(hook) == pytest.approx(all_rows.norm(dim=1).mean().item(), rel=1e-6)


def test_special_tokens_dropped_and_metadata_aligned(minilm, tmp_path):
    cfg = small_cfg(tmp_path / "s.zarr", drop_special_tokens=True, dtype="float16", hooks=["blocks.0.hook_resid_post"])
    store = harvest(cfg, model=minilm, progress=False)
    toks = store.tokens()
    special = list(minilm.tokenizer.all_special_ids)
    assert store.n_tokens == 300 and not np.isin(toks, special).any()
    assert store.positions().min() == 1  # position 0 is [CLS], dropped
    ctx = store.context_of(40, before=3, after=3)
    assert len(ctx["tokens"]) == 7 and ctx["tokens"][ctx["index"]] == toks[40]
    assert store.activations("blocks.0.hook_resid_post", dtype=None).dtype == torch.float16
    assert store.model == "minilm" and store.config["context_length"] == 24
    assert store.config["hooks"] == ["blocks.0.hook_resid_post"] and store.config["text"]["source"] == "embedded"
    for key in ("hooks", "dtype", "rows_complete", "complete", "saelab_version", "stats"):
        assert key in store.meta


def test_bfloat16_round_trips(decoder, tmp_path):
    cfg = small_cfg(tmp_path / "s.zarr", dtype="bfloat16", hooks=["blocks.0.hook_mlp_out"], max_tokens=96)
    store = harvest(cfg, model=decoder, progress=False)
    ref = harvest(
        small_cfg(tmp_path / "f.zarr", hooks=["blocks.0.hook_mlp_out"], max_tokens=96), model=decoder, progress=False
    )
    got = store.activations("blocks.0.hook_mlp_out", dtype=None)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ref.activations("blocks.0.hook_mlp_out").to(torch.bfloat16))


def test_memory_store(decoder):
    out = f"memory://saelab-test-{os.getpid()}/acts.zarr"
    harvest(small_cfg(out, hooks=["blocks.1.attn.hook_z"]), model=decoder, progress=False)
    store = ActivationStore.open(out)
    assert store.n_tokens == 300 and store.d("blocks.1.attn.hook_z") == 64
    assert len(next(store.batches("blocks.1.attn.hook_z", 50))) == 50


def test_mismatched_store_is_refused_and_kept(decoder, tmp_path):
    out = tmp_path / "s.zarr"
    harvest(small_cfg(out, hooks=["blocks.0.hook_mlp_out"]), model=decoder, progress=False)
    before = (out / "zarr.json").read_bytes()
    with pytest.raises(StoreError, match=r"different config \(hooks"):
        harvest(small_cfg(out, hooks=["blocks.1.hook_mlp_out"]), model=decoder, progress=False)
    assert (out / "zarr.json").read_bytes() == before
    (tmp_path / "other.zarr").mkdir()
    (tmp_path / "other.zarr" / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}})
    )
    with pytest.raises(StoreError, match="not a saelab store"):
        harvest(small_cfg(tmp_path / "other.zarr"), model=decoder, progress=False)


def test_overwrite_replaces_a_store_of_another_config(decoder, tmp_path):
    def cfg(out, hook):
        return small_cfg(out, hooks=[hook], max_tokens=96)

    out = tmp_path / "s.zarr"
    harvest(cfg(out, "blocks.0.hook_mlp_out"), model=decoder, progress=False)
    store = harvest(cfg(out, "blocks.1.hook_mlp_out"), model=decoder, progress=False, overwrite=True)
    assert store.hooks == ["blocks.1.hook_mlp_out"] and store.n_tokens == 96
    harvest(cfg(tmp_path / "fresh.zarr", "blocks.1.hook_mlp_out"), model=decoder, progress=False)
    assert _files(out) == _files(tmp_path / "fresh.zarr")  # the same bytes as a store made there first


def test_empty_text_source_is_refused(decoder, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    cfg = small_cfg(tmp_path / "s.zarr", text=TextConfig(source="files", path=str(tmp_path / "empty.txt")))
    with pytest.raises(TextSourceError, match="no complete context"):
        harvest(cfg, model=decoder, progress=False)
    assert not (tmp_path / "s.zarr").exists()


def _run_cli(cfg_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "saelab.cli", "harvest", str(cfg_path), "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _stderr_tail(proc: subprocess.Popen) -> str:
    assert proc.stderr is not None
    return proc.stderr.read().decode()[-2000:]


def _rows_complete(out: Path) -> int:
    try:
        return json.loads((out / "zarr.json").read_text())["attributes"]["saelab"]["rows_complete"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return 0


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_after_sigkill_gives_identical_store(decoder_dir, tmp_path):
    def config(out):
        path = tmp_path / f"{out}.yaml"
        path.write_text(
            yaml.safe_dump(
                dict(
                    model=decoder_dir,
                    hooks=["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"],
                    out=str(tmp_path / out),
                    context_length=32,
                    batch_size=4,
                    max_tokens=30_000,
                    dtype="float16",
                    shard_rows=512,
                    chunk_rows=128,
                    text={"source": "embedded"},
                )
            )
        )
        return path

    ref = _run_cli(config("ref.zarr"))
    assert ref.wait(timeout=300) == 0, _stderr_tail(ref)

    out = tmp_path / "killed.zarr"
    for threshold in (3 * 512, 25 * 512):  # kill twice, at different points
        proc = _run_cli(config("killed.zarr"))
        deadline = time.time() + 120
        while _rows_complete(out) < threshold and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not ActivationStore.open(str(out)).complete, "harvest finished before it could be killed"
    proc = _run_cli(config("killed.zarr"))
    assert proc.wait(timeout=300) == 0, _stderr_tail(proc)

    got, want = _files(out), _files(tmp_path / "ref.zarr")
    assert sorted(got) == sorted(want)
    assert [k for k in want if got[k] != want[k]] == []
    assert ActivationStore.open(str(out)).n_tokens == 30_000


def test_rerun_rewrites_exactly_the_damaged_shards(decoder, tmp_path):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
    cfg = small_cfg(tmp_path / "s.zarr", hooks=hooks, max_tokens=600, drop_special_tokens=True)  # shards of 128
    harvest(cfg, model=decoder, progress=False)
    out = Path(cfg.out)
    want = _files(out)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    damaged = [shard_file(out, f"activations/{hooks[1]}", 1), shard_file(out, f"activations/{hooks[0]}", 4)]
    for path in damaged:
        path.unlink()  # shard 4 is the last one, 88 rows
    damaged.append(shard_file(out, "tokens", 3))
    flip_byte(damaged[-1])
    result = CliRunner().invoke(app, ["info", str(out), "--verify"])
    assert result.exit_code == 2 and "rerun the same `saelab harvest` config" in result.stderr
    assert "shard 1 (rows 128 to 255) of 'activations/blocks.1.attn.hook_z' is missing" in result.stdout
    assert "shard 4 (rows 512 to 599)" in result.stdout and "shard 3 (rows 384 to 511) of 'tokens'" in result.stdout
    with pytest.raises(StoreError, match="rerun the same `saelab harvest` config"):
        ActivationStore.open(str(out)).tokens(slice(400, 401))
    harvest(cfg, model=decoder, progress=False)
    assert _files(out) == want
    rewritten = {p for p, t in stamps.items() if p.stat().st_mtime_ns != t}
    assert rewritten == {*damaged, out / "zarr.json"}  # zarr.json: the commit of the new checksums (the same bytes)


def _run_with_model(root: Path, decoder_dir: str, model: str = "model") -> HarvestConfig:
    """A harvest config over a run folder `root` that holds a copy of the tiny decoder (`root/model`) and a text
    file (`root/t.txt`); the store goes into the run."""
    if not (root / model).exists():
        shutil.copytree(decoder_dir, root / model)
    (root / "t.txt").write_text("\n\n".join(islice(embedded_documents(), 100)))
    return small_cfg(
        RunDir(root).store,
        model=str(root / model),
        hooks=["blocks.0.hook_resid_post"],
        text=TextConfig(source="files", path=str(root / "t.txt")),
    )


def _harvest_until_interrupted(cfg: HarvestConfig, model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Harvest `cfg` and stop, as Ctrl-C would, when the fourth batch is handed to the writer (two shards are in)."""
    module = sys.modules["saelab.harvest"]  # `saelab.harvest` on `saelab` is the function
    put, handed = module.put, []

    def put_then_stop(shard_writer: Any, item: object) -> None:
        if len(handed) == 3:
            raise KeyboardInterrupt
        handed.append(item)
        put(shard_writer, item)

    with monkeypatch.context() as patched:
        patched.setattr(module, "put", put_then_stop)
        with pytest.raises(KeyboardInterrupt):
            harvest(cfg, model=model, progress=False)
    store = ActivationStore.open(cfg.out)
    assert not store.complete and store.n_tokens == 256


def test_a_harvest_moved_mid_run_resumes_to_the_store_of_an_unmoved_one(decoder, decoder_dir, tmp_path, monkeypatch):
    reference = harvest(_run_with_model(tmp_path / "reference", decoder_dir), model=decoder, progress=False)
    # The run's model folder and text file are recorded from the store's folder; names and URLs as given.
    assert reference.config["model"] == "../model" and reference.config["text"]["path"] == "../t.txt"
    assert reference.model_spec == str(tmp_path / "reference" / "model")
    assert reference.text["path"] == str(tmp_path / "reference" / "t.txt")

    _harvest_until_interrupted(_run_with_model(tmp_path / "a" / "run", decoder_dir), decoder, monkeypatch)
    moved = Path(shutil.move(tmp_path / "a" / "run", tmp_path / "b" / "moved"))
    store = harvest(_run_with_model(moved, decoder_dir), model=decoder, progress=False)  # the moved paths, absolute
    assert store.complete and store.model_spec == str(moved / "model")
    assert _files(RunDir(moved).store) == _files(RunDir(tmp_path / "reference").store)  # byte for byte

    outside = small_cfg(tmp_path / "elsewhere" / "s.zarr", model=str(moved / "model"), hooks=["blocks.0.hook_mlp_out"])
    kept = harvest(outside, model=decoder, progress=False)
    assert kept.config["model"] == kept.model_spec == str(moved / "model")  # not beside the store: absolute
    named = harvest(small_cfg(tmp_path / "named.zarr", model="decoder", max_tokens=96), model=decoder, progress=False)
    assert named.config["model"] == named.model_spec == "decoder" and named.text == named.config["text"]


def test_a_store_that_recorded_paths_as_given_resumes_with_the_same_config(decoder, decoder_dir, tmp_path, monkeypatch):
    cfg = _run_with_model(tmp_path / "run", decoder_dir)
    _harvest_until_interrupted(cfg, decoder, monkeypatch)
    group = zarr.open_group(cfg.out, mode="r+", zarr_format=3)
    old = {**saelab_meta(group, cfg.out), "config": given_identity(cfg)}  # what stores recorded before runs could move
    group.attrs["saelab"] = old
    assert ActivationStore.open(cfg.out).model_spec == str(tmp_path / "run" / "model")  # absolute: as it is

    with pytest.raises(StoreError, match=r"different config \(model: '.*/run/model' -> '../other'\)"):
        harvest(_run_with_model(tmp_path / "run", decoder_dir, model="other"), model=decoder, progress=False)
    store = harvest(cfg, model=decoder, progress=False)
    assert store.complete and store.n_tokens == 300 and store.config["model"] == str(tmp_path / "run" / "model")
