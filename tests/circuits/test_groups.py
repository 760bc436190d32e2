"""Circuits that transfer: on the induction model the circuit of latents found on 8 sequences says almost nothing
about 64 fresh ones (its latents are token-specific), while a circuit of at most 32 group nodes (latents grouped by
the head they read, at each position) keeps its faithfulness there; nodes that never fire are not circuit nodes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from typer.testing import CliRunner

from saelab.circuits import Circuit, CircuitError, Task, find_circuit, induction_task
from saelab.circuits.groups import ERR, fires, grouped_circuit, grouping
from saelab.circuits.spread import at_size
from saelab.cli import app as cli
from saelab.evals.families import Families, Family
from saelab.run import RunDir
from saelab.toys.induction import INDUCTION_HOOKS
from tests.circuits.helpers import L0, L1, LENGTH, POS, SOURCE
from tests.circuits.test_config import write_config


@pytest.fixture(scope="module")
def fresh(model):
    return induction_task(model, n=64, length=LENGTH, position=POS, seed=1)


@pytest.fixture(scope="module")
def by_head(model, saes, task):
    return grouping(model, saes, task, latents="head", positions="position")


@pytest.fixture(scope="module")
def transfer(model, saes, task, fresh, by_head):
    return find_circuit(model, saes, task, held_out=fresh, groups=by_head, progress=False)


def test_a_grouped_circuit_transfers_to_fresh_sequences(transfer):
    grouped = transfer.grouped
    assert grouped is not None and grouped.held_out is not None and transfer.held_out is not None
    size = len(grouped.nodes)
    assert 2 <= size <= 32
    top = {(n.hook, n.group, n.position) for n in grouped.nodes[:2]}
    assert top == {(L1, "L1H0", str(POS)), (L0, "L0H0", str(SOURCE))}, grouped.nodes[:4]
    i = at_size(grouped.held_out, size)
    held = grouped.held_out["faithfulness"][i]
    assert grouped.held_out["examples"] == 64 and held >= 0.8, grouped.held_out
    low, high = grouped.held_out["faithfulness_ci"][i]
    assert low <= held <= high and low >= 0.8
    lo, hi = grouped.held_out["faithfulness_range"][i]
    assert lo <= held <= hi
    assert grouped.held_out["completeness"][i] < 0.2
    # the circuit of single latents: faithful where it was found, not on fresh sequences
    j = at_size(transfer.found_on, 16)
    assert transfer.found_on["faithfulness"][j] >= 0.8 and transfer.held_out["faithfulness"][j] < 0.3
    assert transfer.curves["faithfulness"] == transfer.found_on["faithfulness"]


def test_nodes_that_never_fire_are_not_circuit_nodes(model, saes, task, ig, transfer):
    """The patch baseline moves latents that are silent on the clean sequences (they fire on the patch input):
    their effect measures the patch, not the circuit, so they are counted apart."""
    live = fires(ig.clean)
    assert transfer.silent > 0
    for node in transfer.nodes:
        index = saes[node.hook].cfg.d_sae if node.latent == ERR else node.latent
        assert live[node.hook][node.position, index], node
    # a latent that cannot fire, given the largest effect of all: it is left out of a grouped circuit too
    latent = 7
    f = {h: s.f.clone() for h, s in ig.clean.items()}
    f[L1][..., latent] = 0.0
    effects = {h: e.clone() for h, e in ig.effects.items()}
    effects[L1][:, POS, latent] = 100.0
    planted = dataclasses.replace(
        ig, effects=effects, clean={h: dataclasses.replace(s, f=f[h]) for h, s in ig.clean.items()}
    )
    single = grouping(model, saes, task, latents="node", positions="position")
    out = grouped_circuit(model, saes, task, effects=planted, groups=single, curve_sizes=[1])
    assert all((n.hook, n.group) != (L1, str(latent)) for n in out.nodes)
    assert out.nodes[0].effect != 100.0 and out.silent >= 1


def test_roles_and_families(model, saes, task, ig):
    roles = grouping(model, saes, task, latents="head", positions="role")
    assert roles.positions[POS] == "current token" and roles.positions[SOURCE] == "after earlier occurrence"
    out = grouped_circuit(model, saes, task, effects=ig, groups=roles, curve_sizes=[2])
    assert {(n.group, n.position) for n in out.nodes[:2]} == {
        ("L1H0", "current token"),
        ("L0H0", "after earlier occurrence"),
    }
    assert out.found_on["faithfulness"][0] >= 0.8
    families = {h: Families([], [Family(3, [5, 7], [5, 7, 9])]) for h in INDUCTION_HOOKS}
    fam = grouping(model, saes, task, latents="family", positions="all", families=families)
    assert [fam.latents[L0][i] for i in (3, 5, 7, 9, 4)] == ["family 3"] * 4 + ["4"]
    assert fam.latents[L0][-1] == ERR and set(fam.positions) == {"all"}
    with pytest.raises(CircuitError, match="feature families"):
        grouping(model, saes, task, latents="family")
    bare = Task(task.tokens, task.metric, task.patch)
    with pytest.raises(CircuitError, match="position roles"):
        grouping(model, saes, bare, positions="role")


def test_held_out_examples_must_fit_and_results_round_trip(model, saes, task, transfer, tmp_path):
    short = induction_task(model, n=4, length=LENGTH - 1, position=POS - 1, seed=2)
    with pytest.raises(CircuitError, match="same length"):
        find_circuit(model, saes, task, held_out=short, progress=False)
    path = transfer.save(tmp_path / "c.json")
    assert Circuit.load(path) == transfer
    assert torch.tensor(transfer.grouped.found_on["faithfulness_ci"]).shape[1] == 2  # pyright: ignore[reportOptionalMemberAccess]


def test_the_cli_reports_held_out_and_grouped_figures(induction_run, tmp_path):
    config = write_config(
        tmp_path / "c.yaml",
        induction_run,
        name="cli-transfer",
        data={"task": "induction", "examples": 8, "length": LENGTH, "held_out": 16},
        group_latents="head",
        group_positions="role",
    )
    result = CliRunner().invoke(cli, ["circuit", str(config), "-q"])
    assert result.exit_code == 0, result.output
    assert "held out (16 examples)" in result.output and "grouped (head x role)" in result.output
    saved = Circuit.load(RunDir(induction_run).circuit("cli-transfer"))
    assert saved.held_out is not None and saved.grouped is not None and saved.grouped.held_out is not None
    held = saved.grouped.held_out
    assert held["faithfulness"][at_size(held, len(saved.grouped.nodes))] >= 0.8
