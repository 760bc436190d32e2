"""TrainConfig's range checks, the run's own store as default, the write guard and the resume check."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from saelab.cli import app
from saelab.config import build
from saelab.errors import ConfigError, OverwriteError, TrainError
from saelab.importer import import_arrays
from saelab.run import RunDir
from saelab.train import TrainConfig, train

SMALL = {"tokens": 256 * 4, "batch_size": 256, "eval_rows": 512, "warmup_steps": 1, "log_every": 2}


def _config(run: Path, **kw: Any) -> dict[str, Any]:
    return {"run": str(run), **SMALL, "grid": {"k": [4], "expansion": [2]}, **kw}


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A run folder with its own store: 3,000 rows of 16-dim noise under hook `h0`."""
    x = np.random.default_rng(0).standard_normal((3000, 16)).astype(np.float32)
    import_arrays({"h0": x}, str(RunDir(tmp_path / "run").store), shard_rows=1024, chunk_rows=256, progress=False)
    return tmp_path / "run"


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize(
    "override, key",
    [
        ({"tokens": 0}, "`tokens`"),
        ({"tokens": -5}, "`tokens`"),
        ({"batch_size": 0}, "`batch_size`"),
        ({"eval_rows": 0}, "`eval_rows`"),
        ({"warmup_steps": -1}, "`warmup_steps`"),
        ({"decay_start": 1.5}, "`decay_start`"),
        ({"decay_start": -0.1}, "`decay_start`"),
        ({"seed": -1}, "`seed`"),
        ({"checkpoint_every": 0}, "`checkpoint_every`"),
        ({"log_every": 0}, "`log_every`"),
        ({"ce_contexts": -1}, "`ce_contexts`"),
        ({"grid": {"lr": [-1e-3]}}, "`grid.lr.0`"),
        ({"grid": {"lr": [1e-3, 0.0]}}, "`grid.lr.1`"),
        ({"grid": {"lr": [float("nan")]}}, "`grid.lr.0`"),
        ({"grid": {"k": [0]}}, "`grid.k.0`"),
        ({"grid": {"expansion": [-2]}}, "`grid.expansion.0`"),
        ({"grid": {"arch": []}}, "`grid.arch`"),
        ({"tokens": 100, "batch_size": 256}, "more than `tokens` (100)"),
    ],
)
def test_bad_values_are_refused_naming_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError) as err:
        build(TrainConfig, _config(tmp_path, **override), "config")
    assert key in str(err.value)


def test_store_defaults_to_the_runs_own_and_validation_touches_no_file(tmp_path):
    cfg = build(TrainConfig, {"run": str(tmp_path / "nowhere")}, "config")
    assert cfg.store is None and cfg.store_path == str(RunDir(tmp_path / "nowhere").store)
    assert cfg.identity()["store"] == "activations.zarr" and "run" not in cfg.identity()  # where the run is, moves
    explicit = build(TrainConfig, {"run": str(tmp_path / "nowhere"), "store": cfg.store_path}, "config")
    assert explicit.identity() == cfg.identity()  # the same SAEs: a run started either way resumes either way
    elsewhere = build(TrainConfig, {"run": str(tmp_path / "nowhere"), "store": "other/s.zarr"}, "config")
    assert elsewhere.identity()["store"] == str(Path("other/s.zarr").resolve())  # outside the run: absolute
    assert not (tmp_path / "nowhere").exists()


def test_cli_refuses_a_bad_value_in_one_line(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path / "run", tokens=0)))
    result = CliRunner().invoke(app, ["train", str(path), "--quiet"])
    assert result.exit_code == 2 and "`tokens`" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_a_folder_that_is_not_a_run_is_refused_and_left_alone(run, tmp_path):
    theirs = tmp_path / "thesis"
    theirs.mkdir()
    (theirs / "chapter1.tex").write_text("\\chapter{One}")
    with pytest.raises(OverwriteError, match="not a saelab run directory"):
        train(build(TrainConfig, _config(theirs, store=str(RunDir(run).store)), "config"), progress=False)
    assert [p.name for p in theirs.iterdir()] == ["chapter1.tex"]
    assert (theirs / "chapter1.tex").read_text() == "\\chapter{One}"


def test_resuming_into_other_saes_is_refused_and_the_checkpoint_left_untouched(run, tmp_path):
    (row,) = train(build(TrainConfig, _config(run), "config"), progress=False)
    before = _hashes(run)
    wider = build(TrainConfig, _config(run, grid={"k": [4], "expansion": [4]}), "config")
    with pytest.raises(TrainError, match="checkpoint") as err:
        train(wider, progress=False)
    message = str(err.value)
    assert str(RunDir(run).checkpoint) in message and row.variant in message and "`run`" in message
    assert _hashes(run) == before

    # Without the saved config to compare, the checkpoint itself still says which SAEs it holds.
    RunDir(run).train_config.unlink()
    before = _hashes(run)
    with pytest.raises(TrainError, match="made for other SAEs"):
        train(wider, progress=False)
    assert _hashes(run) == before


def test_cli_refuses_the_wider_resume_in_one_line(run, tmp_path):
    small, wide = tmp_path / "small.yaml", tmp_path / "wide.yaml"
    small.write_text(yaml.safe_dump(_config(run)))
    wide.write_text(yaml.safe_dump(_config(run, grid={"k": [4], "expansion": [4]})))
    assert CliRunner().invoke(app, ["train", str(small), "--quiet"]).exit_code == 0
    before = _hashes(tmp_path)
    result = CliRunner().invoke(app, ["train", str(wide), "--quiet"])
    assert result.exit_code == 2 and "checkpoint" in result.output and "Traceback" not in result.output
    assert _hashes(tmp_path) == before


def test_default_lr_is_gaos_rule_with_a_short_run_floor():
    from saelab.train.config import SHORT_RUN_LR, SHORT_RUN_MIN_STEPS, TrainConfig, default_lr

    gao = 2e-4 / (1536 / 2**14) ** 0.5
    assert default_lr(1536) == pytest.approx(gao, rel=1e-12)  # no step count: Gao et al.'s rule
    floor = SHORT_RUN_LR / (122 * 96**0.5)
    assert default_lr(1536, d_in=96, steps=122) == pytest.approx(floor, rel=1e-12)
    assert 0.015 < floor < 0.02  # at d_in 96 and 122 steps, ~25x Gao's
    assert default_lr(1536, d_in=384, steps=122) == pytest.approx(floor / 2, rel=1e-12)  # 4x d_in: half the rate
    assert default_lr(1536, d_in=96, steps=100_000) == pytest.approx(gao, rel=1e-12)  # long runs: Gao's again
    capped = default_lr(1536, d_in=96, steps=SHORT_RUN_MIN_STEPS)
    assert default_lr(1536, d_in=96, steps=30) == capped  # very short runs: the rate of 100 steps
    cfg = TrainConfig(run="r", tokens=4096 * 244, batch_size=4096)
    assert cfg.peak_lr(1536, d_in=96) == default_lr(1536, d_in=96, steps=244)
    assert cfg.peak_lr(1536, d_in=96, lr=1e-3) == 1e-3
