"""`saelab graph RUN --prompt ...`: the toy's model and transcoders in a run, its graph written through `RunDir` and
read back."""

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
