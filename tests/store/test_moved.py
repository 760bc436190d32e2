"""A moved run's store finds its model folder and text file where the run now is (`ActivationStore.model_spec`,
`ActivationStore.text`): the harvest recorded them from the store's folder, so `analyze`, `saelab steer`, training's
spliced metrics and the app's live model all load the moved run's model, never the one where the run was made."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from saelab.analysis import AnalysisConfig, FeatureStore, analyze
from saelab.analysis import run as analysis_run
from saelab.config import TextConfig
from saelab.dashboards import live
from saelab.run import VOCAB, RunDir, store_relative, store_resolve
from saelab.steering import SteerConfig, run_steering
from saelab.steering import run as steering_run
from saelab.store import ActivationStore
from saelab.train import Grid, TrainConfig, metrics, train, trainer

MODEL, TEXT = "model", "induction.txt"  # where `saelab.toys.induction_run` puts them in its run


@pytest.fixture
def moved(induction_run: Path, tmp_path: Path) -> RunDir:
    """The session's induction run copied, then moved on from the copy (nothing is left where it was copied to)."""
    first = tmp_path / "first" / "run"
    shutil.copytree(induction_run, first)
    return RunDir(shutil.move(first, tmp_path / "elsewhere" / "moved"))


def test_a_store_records_paths_beside_it_from_its_folder_and_others_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are taken from the working directory, as a user's are
    store = "run/activations.zarr"
    assert store_relative("run/model", store=store) == "../model"
    assert store_relative(tmp_path / "run" / "data" / ".." / "t.txt", store=store) == "../t.txt"
    assert store_relative("run", store=store) == ".."
    assert store_relative("other/model", store=store) == str(tmp_path / "other" / "model")  # not beside the store
    assert store_relative("run/model", store="memory://run/activations.zarr") == str(tmp_path / "run" / "model")
    moved = tmp_path / "b" / "moved" / "activations.zarr"
    assert store_resolve("../model", store=moved) == str(tmp_path / "b" / "moved" / "model")
    assert store_resolve("..", store="moved/activations.zarr") == "moved"
    for recorded in ("minilm", "gpt2", "org/model", "/data/model", "s3://b/model", "..model"):
        assert store_resolve(recorded, store=moved) == recorded  # names, absolute paths and URLs as they are


def test_a_moved_runs_store_records_its_model_and_text_from_the_store_and_finds_them_where_it_now_is(
    induction_run, moved
):
    store = ActivationStore.open(str(moved.store))
    assert store.config["model"] == f"../{MODEL}" and store.config["text"]["path"] == f"../{TEXT}"
    assert str(Path(induction_run).resolve()) not in json.dumps(store.meta)  # nothing points back where it was made
    assert store.model_spec == str(moved.root / MODEL)
    assert store.text == {**store.config["text"], "path": str(moved.root / TEXT)}
    assert TextConfig(**store.text).path == str(moved.root / TEXT)


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, seen: list[Any], key: Any) -> None:
    """Replace `module.name` by itself, noting `key(first argument)` in `seen` at each call."""
    real = getattr(module, name)

    def noted(first: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(key(first))
        return real(first, *args, **kwargs)

    monkeypatch.setattr(module, name, noted)


def test_a_moved_run_analyses_steers_trains_and_serves_with_its_own_model_and_text(moved, tmp_path, monkeypatch):
    models: list[str] = []
    for module in (analysis_run, steering_run, trainer, live):
        _spy(monkeypatch, module, "load_model", models, str)
    texts: list[str | None] = []
    _spy(monkeypatch, metrics, "iter_documents", texts, lambda text: text.path)
    own_model, own_text = str(moved.root / MODEL), str(moved.root / TEXT)

    shutil.rmtree(moved.analysis_dir)  # analysed afresh, on a few rows
    (entry, *_) = moved.saes()
    analyze(moved.root, AnalysisConfig(max_tokens=2048, device="cpu"), progress=False)
    assert models == [own_model] and moved.vocab.name == VOCAB and moved.vocab.is_file()
    assert FeatureStore.open(moved.analysis(entry.hook, entry.variant)).attrs["logit_kind"] != "none"

    steered, _ = run_steering(
        SteerConfig(
            name="moved",
            run=str(moved.root),
            sae=str(entry.path),
            latent=1,
            coefficients=[0, 2],
            prompts=["ABCDABCD"],
            max_new_tokens=4,
            device="cpu",
        ),
        progress=False,
    )
    assert models[1:] == [own_model] and steered.scale_source.startswith("analysis")

    (trained,) = train(
        TrainConfig(
            store=str(moved.store),
            run=str(tmp_path / "trained"),
            hooks=[entry.hook],
            tokens=1024,
            batch_size=512,
            eval_rows=1024,
            warmup_steps=1,
            ce_contexts=4,
            grid=Grid(k=[2], expansion=[1]),
            device="cpu",
        ),
        progress=False,
    )
    assert models[2:] == [own_model] and texts == [own_text] and trained.spliced is not None

    assert live.run_model(str(moved.root)).cfg.n_ctx == 24 and models[3:] == [own_model]  # the app's prompt model
