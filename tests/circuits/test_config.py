"""`saelab circuit CONFIG.yaml` over the induction run: the circuit lands in the run, prompts come from a file, and
bad configs are refused with the fix."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from saelab.circuits import Circuit, CircuitConfig, sae_folders
from saelab.cli import app as cli
from saelab.errors import MissingError
from saelab.run import RunDir
from saelab.toys.induction import INDUCTION_HOOKS
from tests.circuits.helpers import L0, L1, LENGTH, sae_folder


def write_config(path, induction_run, **changes):
    cfg = {
        "name": "cli",
        "run": str(induction_run),
        "model": str(induction_run / "model"),
        "saes": {h: str(sae_folder(induction_run, h)) for h in INDUCTION_HOOKS},
        "data": {"task": "induction", "examples": 8, "length": LENGTH},
        "curve_sizes": [4, 16, 64],
    } | changes
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_cli_writes_the_circuit_into_the_run(induction_run, tmp_path):
    result = CliRunner().invoke(
        cli, ["circuit", str(write_config(tmp_path / "c.yaml", induction_run)), "-q", "--set", "method=atp"]
    )
    assert result.exit_code == 0, result.output
    assert "faithfulness by node count" in result.output
    saved = Circuit.load(RunDir(induction_run).circuit("cli"))
    assert saved.nodes and saved.config["method"] == "atp" and saved.curves["n"] == [4, 16, 64]
    assert saved.saes[L1] == sae_folder(induction_run, L1).relative_to(induction_run).as_posix()  # the run moves


def test_cli_reads_prompts_from_a_file(induction_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "\n".join(
            json.dumps(p)
            for p in [
                {"clean": "Qz7bKDmQ", "patch": "aX7bKDmQ", "target": "z", "distractor": "X"},
                {"clean": "Hr2cYwpH", "patch": "Jf2cYwpH", "target": "r", "distractor": "f"},
            ]
        )
    )
    config = write_config(
        tmp_path / "c.yaml",
        induction_run,
        name="cli-prompts",
        metric="logit_diff",
        data={"task": "prompts", "file": str(prompts)},
    )
    result = CliRunner().invoke(cli, ["circuit", str(config), "-q"])
    assert result.exit_code == 0, result.output
    saved = Circuit.load(RunDir(induction_run).circuit("cli-prompts"))
    assert saved.labels == ["<s>", *"Qz7bKDmQ"] and saved.metric["clean"] > saved.metric["patch"] + 2
    prompts.write_text(prompts.read_text().replace('"clean"', '"cleen"', 1))
    result = CliRunner().invoke(cli, ["circuit", str(config), "-q"])
    assert result.exit_code == 2 and "line 1 is not a prompt" in result.output, result.output


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"saes": {L0: "/nonexistent/sae"}}, "no SAE folder"),
        ({"metric": "logit_diff"}, "use metric logit or loss"),
        ({"nodes": 3}, "unknown key `nodes`"),
        ({"model": "/nonexistent/model"}, "no model folder"),
        ({"data": {"task": "induction", "length": 40}}, "needs 81 positions"),
        ({"data": {"task": "prompts"}}, "give either `prompts`"),
    ],
)
def test_cli_refuses_bad_configs_with_the_fix(induction_run, tmp_path, changes, message):
    result = CliRunner().invoke(
        cli, ["circuit", str(write_config(tmp_path / "c.yaml", induction_run, **changes)), "-q"]
    )
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"ig_steps": 0}, "ig_steps"),
        ({"node_threshold": -0.1}, "node_threshold"),
        ({"edge_threshold": -1}, "edge_threshold"),
        ({"max_nodes": 0}, "max_nodes"),
        ({"curve_sizes": [4, -1]}, "curve_sizes"),
        ({"data": {"task": "induction", "examples": 0}}, "examples"),
        (
            {"data": {"task": "prompts", "file": "/nonexistent/prompts.jsonl"}, "metric": "logit_diff"},
            "no prompts file",
        ),
        ({"saes": {L0: "no-such-variant"}}, "the run"),
    ],
)
def test_cli_refuses_out_of_range_values_and_missing_files(induction_run, tmp_path, changes, message):
    result = CliRunner().invoke(
        cli, ["circuit", str(write_config(tmp_path / "c.yaml", induction_run, **changes)), "-q"]
    )
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output, result.output


def test_a_config_is_checked_without_the_filesystem(induction_run, tmp_path):
    """Paths are only checked by `run_circuit`: a config naming none that exist still builds."""
    cfg = CircuitConfig.model_validate(
        {
            "run": "/nowhere/run",
            "model": "/nowhere/model",
            "saes": {L0: "/nowhere/sae"},
            "data": {"task": "prompts", "file": "/nowhere/p.jsonl"},
        }
    )
    with pytest.raises(MissingError, match="/nowhere/sae"):
        sae_folders(cfg)
    # an SAE can be named by its variant in the run
    variant = sae_folder(induction_run, L0).name
    cfg = cfg.model_copy(update={"run": str(induction_run), "saes": {L0: variant}})
    assert sae_folders(cfg) == {L0: sae_folder(induction_run, L0)}


def test_the_circuit_is_not_written_into_a_folder_that_is_not_a_run(induction_run, tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("\\chapter{One}")
    config = write_config(tmp_path / "c.yaml", induction_run, run=str(thesis))
    result = CliRunner().invoke(cli, ["circuit", str(config), "-q"])
    assert result.exit_code == 2 and "not a saelab run directory" in result.output, result.output
    assert sorted(p.name for p in thesis.iterdir()) == ["chapter1.tex"]
