"""Runs that move: a run moved mid-training resumes to an unmoved run's weights, old runs that recorded absolute
paths resume after a move, and the results written in a run (analysis, absorption, circuit) still open, and show in
the app, once it has moved."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from saelab.absorption import AbsorptionConfig, AbsorptionResult, run_absorption
from saelab.analysis import FeatureStore
from saelab.circuits import Circuit, CircuitConfig, run_circuit
from saelab.dashboards import data
from saelab.dashboards.app import render
from saelab.errors import ConfigError
from saelab.importer import import_arrays
from saelab.run import SAE_CONFIG, SAE_WEIGHTS, RunDir, absolute_path
from saelab.store import ActivationStore
from saelab.toys.runs import small_run
from saelab.train import (
    Grid,
    TrainConfig,
    train,
    trainer,  # the module (`saelab.train` on `saelab` is the function)
)

STEPS, STOP_AT, BATCH = 60, 20, 256


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """8,000 rows of 16-dim Gaussian noise under hook `h0`, to copy into runs."""
    x = torch.randn(8000, 16, generator=torch.Generator().manual_seed(0)).numpy()
    out = tmp_path_factory.mktemp("store") / "s.zarr"
    import_arrays({"h0": x}, str(out), shard_rows=4096, chunk_rows=1024, progress=False)
    return out


def _config(run: str | Path, store: Path | None = None) -> TrainConfig:
    return TrainConfig(
        store=None if store is None else str(store),
        run=str(run),
        tokens=BATCH * STEPS,
        batch_size=BATCH,
        eval_rows=1024,
        warmup_steps=5,
        checkpoint_every=BATCH * STOP_AT,
        log_every=10,
        grid=Grid(k=[4], expansion=[4]),
    )


def _run_with_store(root: Path, store: Path) -> Path:
    root.mkdir(parents=True)
    shutil.copytree(store, RunDir(root).store)
    return root


def _train_until_interrupted(cfg: TrainConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    """Train `cfg` until its first checkpoint is written, then stop as Ctrl-C would."""
    save = trainer.save_checkpoint

    def save_then_stop(folder: Path, members: Any, step: int) -> None:
        save(folder, members, step)
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(trainer, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)
    assert json.loads((RunDir(cfg.run).checkpoint / "latest.json").read_text())["step"] == STOP_AT


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.parent.name: load_file(str(p)) for p in sorted(RunDir(run).saes_dir.glob(f"h0/*/{SAE_WEIGHTS}"))}


def _assert_same_weights(got: Path, want: Path) -> None:
    # Exact: a resume runs the same steps on the same batches as an uninterrupted run (the SIGKILL test's guarantee).
    a, b = _weights(got), _weights(want)
    assert a.keys() == b.keys() and len(a) == 1
    for variant, tensors in a.items():
        differ = [k for k in tensors if not torch.equal(tensors[k], b[variant][k])]
        assert tensors.keys() == b[variant].keys() and not differ, f"{variant} differs in {differ}"


@pytest.mark.parametrize("own_store", [True, False], ids=["runs-own-store", "store-elsewhere"])
def test_a_run_moved_mid_training_resumes_to_the_weights_of_an_unmoved_one(store, tmp_path, monkeypatch, own_store):
    def config(run: str | Path) -> TrainConfig:
        return _config(run, None if own_store else store)

    reference = _run_with_store(tmp_path / "reference", store)
    train(config(reference), progress=False)

    before = _run_with_store(tmp_path / "a" / "run", store)
    _train_until_interrupted(config(before), monkeypatch)
    saved = json.loads(RunDir(before).train_config.read_text())
    assert "run" not in saved and saved["store"] == ("activations.zarr" if own_store else str(store.resolve()))
    moved = Path(shutil.move(before, tmp_path / "b" / "moved"))

    monkeypatch.chdir(tmp_path / "b")  # a relative `run:` from another working directory names the same run
    (result,) = train(config("moved"), progress=False)
    assert result.path.resolve() == RunDir(moved).sae("h0", result.variant).resolve()
    assert result.row()["path"] == f"saes/h0/{result.variant}"
    _assert_same_weights(moved, reference)


def test_an_old_run_that_recorded_absolute_paths_resumes_after_a_move(store, tmp_path, monkeypatch):
    reference = _run_with_store(tmp_path / "reference", store)
    train(_config(reference), progress=False)
    before = _run_with_store(tmp_path / "a" / "run", store)
    _train_until_interrupted(_config(before), monkeypatch)
    # What train_config.json held before runs could move: `run`, and the run's own store as an absolute path.
    identity = _config(before).identity()
    old = {
        "store": str(RunDir(before).store),
        "run": str(before),
        **{k: v for k, v in identity.items() if k != "store"},
    }
    RunDir(before).train_config.write_text(json.dumps(old, indent=1))
    moved = Path(shutil.move(before, tmp_path / "b" / "moved"))
    assert not Path(old["store"]).exists()  # the recorded store now points nowhere: it moved with the run

    train(_config(moved), progress=False)
    _assert_same_weights(moved, reference)
    assert json.loads(RunDir(moved).train_config.read_text()) == identity  # rewritten in today's form

    # Another store (not the run's own) recorded absolute that now points nowhere is still a different config.
    RunDir(moved).train_config.write_text(json.dumps({**old, "store": str(tmp_path / "gone.zarr")}))
    with pytest.raises(ConfigError, match=r"differs in \['store'\]"):
        train(_config(moved), progress=False)


def test_recorded_paths_are_relative_inside_the_run_and_absolute_outside(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert run.relative("run/saes/h/v") == "saes/h/v"  # relative to the working directory, inside
    assert run.relative(run.root / "x" / ".." / "activations.zarr") == "activations.zarr"
    assert run.relative("other/s.zarr") == str(tmp_path / "other" / "s.zarr")
    assert run.relative("run2/s.zarr") == str(tmp_path / "run2" / "s.zarr")  # a sibling is not inside
    assert run.relative("memory://s.zarr") == "memory://s.zarr"
    assert absolute_path("s.zarr") == str(tmp_path / "s.zarr")
    moved = RunDir(tmp_path / "elsewhere")
    assert moved.resolve("saes/h/v") == str(moved.root / "saes" / "h" / "v")
    assert moved.resolve("/data/s.zarr") == "/data/s.zarr"
    assert moved.resolve("s3://b/s.zarr") == "s3://b/s.zarr"


def test_analysis_absorption_and_circuit_results_of_a_moved_run_still_open_and_show_in_the_app(
    decoder_dir, tmp_path, monkeypatch
):
    hook = "blocks.1.hook_resid_post"
    monkeypatch.chdir(tmp_path)  # every path below is given relative to here, as a user in a shell would
    rel = RunDir(small_run(Path("a"), decoder_dir, hook, k=4, analysed=True))
    (sae,) = rel.saes()
    run_absorption(
        AbsorptionConfig.model_validate(
            {
                "run": str(rel.root),
                "model": decoder_dir,
                "icl_examples": 2,
                "max_words": 40,
                "settings": {"probe_epochs": 2, "max_k": 2},
                "device": "cpu",
            }
        ),
        progress=False,
    )
    run_circuit(
        CircuitConfig.model_validate(
            {
                "name": "found",
                "run": str(rel.root),
                "model": decoder_dir,
                "saes": {hook: sae.variant},
                "data": {"task": "induction", "examples": 2, "length": 6},
                "ig_steps": 2,
                "device": "cpu",
            }
        ),
        progress=False,
    )

    run = RunDir(Path(shutil.move(rel.root, tmp_path / "b" / "moved")).resolve())
    folder = f"saes/{hook}/{sae.variant}"
    analysis = FeatureStore.open(run.analysis(hook, sae.variant))
    assert analysis.attrs["store"] == "activations.zarr"
    assert ActivationStore.open(run.resolve(analysis.attrs["store"])).hooks == [hook]
    absorption = AbsorptionResult.load(run.absorption(hook, sae.variant))
    circuit = Circuit.load(run.circuit("found"))
    assert absorption.sae == circuit.saes[hook] == folder
    assert (Path(run.resolve(folder)) / SAE_CONFIG).is_file()
    assert json.loads(run.sae_metrics(hook, sae.variant).read_text())["path"] == folder

    root = str(run.root)
    assert [(s.hook, s.variant) for s in data.list_saes(root)] == [(hook, sae.variant)]
    assert data.absorption_keys(root) == [(hook, sae.variant)] and data.circuit_names(root) == ["found"]
    overview = str(render(root, "/", ""))
    assert sae.variant in overview and "'error'" not in overview
