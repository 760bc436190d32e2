"""`saelab graph RUN --prompt ...`: the toy's model and transcoders in a run, its graph written through `RunDir` and
read back, with its faithfulness on the prompt and on held-out prompts."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from saelab.circuits.graph_file import GraphFile
from saelab.cli import app
from saelab.models import save_model
from saelab.run import RunDir
from saelab.toys.attribution import A, B, mlp_graph_model, mlp_graph_run
from saelab.toys.induction import induction_tokenizer


@pytest.fixture(scope="module")
def graph_run_dir(tmp_path_factory):
    root = mlp_graph_run(tmp_path_factory.mktemp("graph_run"))
    return root


def test_the_graph_command_writes_the_known_path_into_the_run(graph_run_dir):
    result = CliRunner().invoke(app, ["graph", str(graph_run_dir), "--prompt", "CDADCEC", "--name", "toy"])
    assert result.exit_code == 0, result.output
    assert "replacement" in result.output
    found = GraphFile.load(RunDir(graph_run_dir).graph("toy"))
    assert RunDir(graph_run_dir).graphs() == ["toy"]
    labels = {n.node: n.label for n in found.nodes}
    assert {f"tok {A}@3", "L0/0@3", "L1/0@7", f"logit {B}"} <= set(labels.values())  # BOS first: A at 3
    known = next(e for e in found.edges if labels[e.source] == "L0/0@3" and labels[e.target] == "L1/0@7")
    assert known.heads.get("L1.H0", 0.0) / known.weight > 0.99
    assert found.replacement >= 0.9
    assert found.token_strs[3] == "A"
    assert found.config["transcoders"]["0"].startswith("saes/")
    assert found.faithfulness is not None and found.faithfulness.held_out is None  # no held-out prompts given
    assert found.faithfulness.found_on["faithfulness"][0] > 0.95


HELD_OUT = ["CEAECDC", "DDACCED", "ECAEEDD", "CCADDCE"]
"""Prompts of the toy's task with A where the graph's prompt has it (position 3 after BOS), other fillers."""


def test_the_graph_command_measures_the_graph_on_held_out_prompts(graph_run_dir):
    args = ["graph", str(graph_run_dir), "--prompt", "CDADCEC", "--name", "held"]
    result = CliRunner().invoke(app, [*args, *[x for h in HELD_OUT for x in ("--held-out", h)]])
    assert result.exit_code == 0, result.output
    assert "faithfulness on 4 held-out" in result.output
    found = GraphFile.load(RunDir(graph_run_dir).graph("held"))
    checked = found.faithfulness
    assert checked is not None and checked.target == B and checked.granularity == "position"
    assert found.held_out == HELD_OUT
    held = checked.held_out
    assert held is not None and held["examples"] == 4 and checked.held_out_silent == 0
    assert held["faithfulness"][0] > 0.95 and held["faithfulness_range"][0][0] > 0.95  # the known path, every prompt
    moved = ["CEEACDC", "DDCACED"]  # A one position later: the path's latents, kept by feature, still carry B
    result = CliRunner().invoke(
        app, [*args[:-1], "moved", *[x for h in moved for x in ("--held-out", h)], "--granularity", "feature"]
    )
    assert result.exit_code == 0, result.output
    checked = GraphFile.load(RunDir(graph_run_dir).graph("moved")).faithfulness
    assert checked is not None and checked.held_out is not None and checked.held_out["faithfulness"][0] > 0.95


def test_held_out_prompts_of_other_lengths_are_refused_before_the_graph_is_built(graph_run_dir):
    args = ["graph", str(graph_run_dir), "--prompt", "CDADCEC", "--name", "bad"]
    result = CliRunner().invoke(app, [*args, "--held-out", "CEAECD"])
    assert result.exit_code == 2 and "7 tokens long and the graph's prompt 8" in result.output
    assert "same length (or --granularity feature," in result.output
    result = CliRunner().invoke(app, [*args, "--held-out", "CEAECDC", "--held-out", "CEA", "--granularity", "feature"])
    assert result.exit_code == 2 and "2 lengths (4, 8 tokens)" in result.output
    result = CliRunner().invoke(app, [*args, "--held-out", "CEAECDC", "--granularity", "layer"])
    assert result.exit_code == 2 and "--granularity is one of position, feature" in result.output
    assert not RunDir(graph_run_dir).graph("bad").exists()  # nothing written


def test_the_graph_command_refuses_a_run_without_transcoders_and_a_prompt_over_the_budget(graph_run_dir, tmp_path):
    (tmp_path / "saes").mkdir()
    save_model(mlp_graph_model(tokenizer=induction_tokenizer(tmp_path / "tok")), tmp_path / "model")
    result = CliRunner().invoke(app, ["graph", str(tmp_path), "--prompt", "CA"])
    assert result.exit_code == 2 and "no transcoder for layer 0" in result.output
    result = CliRunner().invoke(app, ["graph", str(graph_run_dir), "--prompt", "CA" * 30, "--budget-mb", "0.01"])
    assert result.exit_code == 2 and "MiB" in result.output and "budget" in result.output
    assert not RunDir(graph_run_dir).graph("graph").exists()  # nothing written


def test_a_file_that_is_not_a_graph_is_refused(tmp_path):
    bad = tmp_path / "g.json"
    bad.write_text('{"name": 1}')
    with pytest.raises(Exception, match="not a saelab attribution graph"):
        GraphFile.load(bad)
