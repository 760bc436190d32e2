"""One run, every kind of result: written through the library, found again through `RunDir` and through the app."""

from __future__ import annotations

import json
import shutil
from urllib.parse import urlencode

import pytest

from saelab.absorption import AbsorptionResult, AbsorptionSettings, absorption_result
from saelab.analysis import FeatureStore
from saelab.circuits import Circuit, CircuitConfig, run_circuit
from saelab.dashboards import data
from saelab.dashboards.app import render
from saelab.heads import CompositionScores
from saelab.heads.run import composition_run
from saelab.run import RunDir
from saelab.steering import SteerConfig, SteeringResult, run_steering
from saelab.store import ActivationStore
from saelab.toys.planted import planted_absorption, planted_probe_data
from saelab.train import write_sweep_outputs

HOOKS = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]


def _page(run: RunDir, path: str, **params: str) -> str:
    """The app's page at `path` as text (Dash components print their children), failing on an error box."""
    text = str(render(str(run.root), path, "?" + urlencode(params)))
    assert "'error'" not in text, text[:500]
    return text


@pytest.mark.slow
def test_every_result_is_written_and_found_through_rundir_and_the_app(induction_run, tmp_path):
    run = RunDir(tmp_path / "run")
    shutil.copytree(induction_run, run.root)  # the session's run stays as the other tests expect it
    for folder in (
        run.circuit("x").parent,
        run.steering("x").parent,
        run.absorption(HOOKS[0], "x").parent.parent,
        run.heads("x").parent,
    ):
        shutil.rmtree(folder, ignore_errors=True)  # results other tests wrote into the session's run

    # The stages before the analyses: a store, one SAE per hook point with metrics, their feature analyses.
    store = ActivationStore.open(str(run.store))
    assert store.hooks == HOOKS
    saes = run.saes()
    assert [s.hook for s in saes] == HOOKS
    variant = saes[0].variant
    assert all(run.sae_metrics(s.hook, s.variant).is_file() for s in saes)
    assert all(FeatureStore.open(run.analysis(s.hook, s.variant)).n_features == 128 for s in saes)
    assert [(i.hook, i.variant) for i in data.list_saes(str(run.root))] == [(s.hook, s.variant) for s in saes]

    # A sweep table and its plot, from the rows training wrote beside each SAE.
    rows = [json.loads(run.sae_metrics(s.hook, s.variant).read_text()) for s in saes]
    assert write_sweep_outputs(rows, run.root) == (run.sweep_table, run.sweep_plot)

    # A circuit, a steering run and an absorption result, each through its library entry point.
    circuit, circuit_path = run_circuit(
        CircuitConfig.model_validate(
            {
                "name": "found",
                "run": str(run.root),
                "model": str(run.root / "model"),
                "saes": {s.hook: s.variant for s in saes},
                "data": {"task": "induction", "examples": 4, "length": 10},
                "ig_steps": 2,
            }
        ),
        progress=False,
    )
    steered, steering_path = run_steering(
        SteerConfig.model_validate(
            {
                "name": "steered",
                "run": str(run.root),
                "sae": str(saes[1].path),
                "latent": 0,
                "coefficients": [0, 2],
                "prompts": ["ABCDEFGHIJABC"],
                "max_new_tokens": 4,
            }
        ),
        progress=False,
    )
    planted = planted_absorption(n_rows=4_000, hierarchy=True)
    fast = AbsorptionSettings(probe_batch_size=1024)
    scores = absorption_result(planted.sae, planted_probe_data(planted, s=fast), HOOKS[0], variant=variant, s=fast)
    absorption_path = scores.save(run.absorption(HOOKS[0], variant))

    # RunDir finds each where the contract puts it, and each reads back as what was written.
    assert circuit_path == run.circuit("found") and run.circuits() == ["found"]
    assert steering_path == run.steering("steered") and run.steering_runs() == ["steered"]
    assert [(r.hook, r.variant, r.path) for r in run.absorption_results()] == [(HOOKS[0], variant, absorption_path)]
    assert Circuit.load(run.circuit("found")).nodes == circuit.nodes
    assert SteeringResult.load(run.steering("steered")).rows == json.loads(json.dumps(steered.rows))
    assert AbsorptionResult.load(absorption_path).mean_absorption_fraction == pytest.approx(
        scores.mean_absorption_fraction
    )
    assert [r["hook"] for r in json.loads(json.dumps(rows))] == HOOKS and run.sweep_table.read_text().count("\n") == 3

    # The app finds the same results through its data layer and renders their pages without an error box.
    root = str(run.root)
    assert data.circuit_names(root) == ["found"]
    assert data.load_circuit(root, "found").nodes == circuit.nodes
    assert data.absorption_keys(root) == [(HOOKS[0], variant)]
    assert data.load_absorption(root, HOOKS[0], variant).variant == variant
    assert "found" in _page(run, "/circuits", name="found")
    assert variant in _page(run, "/absorption", hook=HOOKS[0], sae=variant)
    assert variant in _page(run, "/feature", hook=saes[0].hook, sae=variant, id="0")

    # Attention heads: `saelab heads RUN`'s composition scores and channels, found by the app's Heads page.
    heads = composition_run(run.root)
    assert (heads.scores_path, heads.channels_path) == (run.heads("composition"), run.heads("channels"))
    assert CompositionScores.load(run.heads("composition")).top_pairs(1) == heads.scores.top_pairs(1)
    shown = _page(run, "/heads")
    assert "top-pairs" in shown and all(f"{s.hook}/{s.variant}" in shown for s in saes)
    overview = _page(run, "/")
    assert all(s.variant in overview for s in saes)
