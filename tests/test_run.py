"""RunDir: the run-directory contract: paths, discovery, names that stay inside the run, the write guard."""

from __future__ import annotations

import pytest

from saelab.errors import OverwriteError, RunError
from saelab.run import RunDir, check_name

HOOK = "blocks.0.hook_resid_post"


def _sae(run: RunDir, hook: str, variant: str) -> None:
    folder = run.sae(hook, variant)
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text("{}")


def test_paths_follow_the_contract(tmp_path):
    run = RunDir(tmp_path / "r")
    root = tmp_path / "r"
    assert run.store == root / "activations.zarr"
    assert run.sae(HOOK, "topk-k8") == root / "saes" / HOOK / "topk-k8"
    assert run.sae_metrics(HOOK, "topk-k8") == root / "saes" / HOOK / "topk-k8" / "metrics.json"
    assert run.checkpoint == root / "saes" / "checkpoint"
    assert run.train_config == root / "saes" / "train_config.json"
    assert run.analysis(HOOK, "topk-k8") == root / "analysis" / HOOK / "topk-k8.zarr"
    assert run.absorption(HOOK, "topk-k8") == root / "absorption" / HOOK / "topk-k8.json"
    assert run.circuit("induction") == root / "circuits" / "induction.json"
    assert run.steering("sweep") == root / "steering" / "sweep.json"


def test_discovery_finds_each_dictionary_and_result_once(tmp_path):
    run = RunDir(tmp_path)
    _sae(run, HOOK, "b")
    _sae(run, HOOK, "a")
    _sae(run, "blocks.1.attn.hook_z", "a")
    (run.checkpoint / "step1").mkdir(parents=True)
    (run.checkpoint / "step1" / "cfg.json").write_text("{}")  # checkpoint copies are not the run's SAEs
    assert [(s.hook, s.variant) for s in run.saes()] == [(HOOK, "a"), (HOOK, "b"), ("blocks.1.attn.hook_z", "a")]
    assert run.find_sae(HOOK, "b").path == run.sae(HOOK, "b")
    with pytest.raises(RunError, match=rf"has no SAE {HOOK}/c; it has: {HOOK}/a, {HOOK}/b, blocks.1.attn.hook_z/a$"):
        run.find_sae(HOOK, "c")
    for name in ("x", "y"):
        run.circuit(name).parent.mkdir(parents=True, exist_ok=True)
        run.circuit(name).write_text("{}")
    run.absorption(HOOK, "a").parent.mkdir(parents=True)
    run.absorption(HOOK, "a").write_text("{}")
    assert run.circuits() == ["x", "y"]
    assert [(r.hook, r.variant) for r in run.absorption_results()] == [(HOOK, "a")]
    assert run.steering_runs() == []


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "no SAE variant given"),
        (None, "no SAE variant given"),
        ("..", "not a plain name"),
        ("a/b", "not a plain name"),
        ("../../etc", "not a plain name"),
        ("x" * 5000, "5000 characters long"),
        ("é" * 150, r"150 characters long \(300 bytes in UTF-8\)"),
    ],
)
def test_names_that_leave_the_run_are_refused(tmp_path, name, problem):
    with pytest.raises(RunError, match=problem):
        RunDir(tmp_path).sae(HOOK, name)  # type: ignore[arg-type]


def test_check_name_returns_a_plain_name():
    assert check_name("topk-k32-w3072-lr0.000462", "SAE variant") == "topk-k32-w3072-lr0.000462"


def test_prepare_refuses_a_folder_that_is_not_a_run_and_leaves_it_intact(tmp_path):
    thesis = tmp_path / "mythesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("\\chapter{One}")
    with pytest.raises(OverwriteError, match=r"not a saelab run directory \(it holds chapter1.tex\)"):
        RunDir(thesis).prepare()
    assert sorted(p.name for p in thesis.iterdir()) == ["chapter1.tex"]
    assert (thesis / "chapter1.tex").read_text() == "\\chapter{One}"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OverwriteError, match="is a file"):
        RunDir(tmp_path / "afile").prepare()


def test_prepare_accepts_new_empty_and_existing_runs(tmp_path):
    assert RunDir(tmp_path / "new" / "run").prepare().root.is_dir()
    (tmp_path / "empty").mkdir()
    RunDir(tmp_path / "empty").prepare()
    existing = RunDir(tmp_path / "existing")
    existing.store.mkdir(parents=True)
    (existing.root / "notes.txt").write_text("mine")
    existing.prepare()  # a run may hold the user's own files beside what saelab wrote
    assert (existing.root / "notes.txt").read_text() == "mine"
