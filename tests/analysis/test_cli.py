"""`saelab analyze` with a run directory or with a YAML analysis config, and its errors (one line, exit 2)."""

import shutil
from pathlib import Path

import yaml
from typer.testing import CliRunner

from saelab.analysis import AnalysisConfig, FeatureStore
from saelab.cli import app
from saelab.config import load_config
from saelab.run import RunDir

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def analysed(run: Path) -> FeatureStore:
    (sae,) = RunDir(run).saes()
    return FeatureStore.open(RunDir(run).analysis(sae.hook, sae.variant))


def test_analyze_from_a_yaml_config(run, tmp_path):
    config = tmp_path / "analyze.yaml"
    config.write_text(yaml.safe_dump({"run": str(run), "n_top": 3, "window": 2, "batch_size": 512}))
    result = runner.invoke(app, ["analyze", str(config), "--quiet", "--set", "hist_bins=7"])
    assert result.exit_code == 0, result.output
    fs = analysed(run)
    assert f"wrote {fs.path}" in result.output
    assert (fs.attrs["n_top"], fs.attrs["window"], fs.attrs["hist_bins"]) == (3, 2, 7)
    assert fs.feature(0)["top_rows"].shape == (3,) and fs.feature(0)["top_tokens"].shape == (3, 5)
    assert "run" not in fs.attrs  # the analysis records its settings; where the run is, is where it lies


def test_analyze_from_a_run_directory_with_overrides(run):
    result = runner.invoke(app, ["analyze", str(run), "-q", "--set", "n_top=4"])
    assert result.exit_code == 0, result.output
    assert analysed(run).attrs["n_top"] == 4


def test_analyze_errors_name_the_problem(run, tmp_path):
    missing = runner.invoke(app, ["analyze", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no run directory or config file" in missing.output
    no_run = tmp_path / "no_run.yaml"
    no_run.write_text("n_top: 3\n")
    unnamed = runner.invoke(app, ["analyze", str(no_run)])
    assert unnamed.exit_code == 2 and "set `run` in the analysis config" in unnamed.output
    bad = runner.invoke(app, ["analyze", str(run), "--set", "n_top=0"])
    assert bad.exit_code == 2 and "`n_top`" in bad.output and "greater than 0" in bad.output
    for result in (missing, unnamed, bad):
        assert "Traceback" not in result.output


def test_no_trained_saes_is_a_run_error(run):
    shutil.rmtree(RunDir(run).saes_dir)
    result = runner.invoke(app, ["analyze", str(run)])
    assert result.exit_code == 2 and "has no trained SAEs" in result.output and "saelab train" in result.output
    assert not RunDir(run).analysis_dir.exists()


def test_the_shipped_config_loads():
    cfg = load_config(REPO / "configs" / "analyze_minilm.yaml", AnalysisConfig)
    assert cfg.run == "runs/quickstart" and cfg == AnalysisConfig(run="runs/quickstart")
