"""`saelab absorption` (saelab.absorption.run and .config): results for every SAE of a run, the integrated-gradients
option, configs that build anywhere (no filesystem checks), range checks, and errors that name the fix."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from saelab.absorption import AbsorptionConfig, AbsorptionError, AbsorptionResult, run_absorption
from saelab.cli import app as cli
from saelab.config import ConfigError, build
from saelab.dictionaries import SAE, SAEConfig
from saelab.errors import MissingError
from saelab.run import RunDir


def test_cli_writes_results_for_every_sae_of_a_run(decoder_dir, tmp_path):
    run = tmp_path / "run"
    for k in (2, 8):
        cfg = SAEConfig(d_in=64, d_sae=128, k=k, hook_name="blocks.1.hook_resid_post")
        SAE.from_config(cfg).save(RunDir(run).sae("blocks.1.hook_resid_post", f"topk-k{k}"))
    config = tmp_path / "absorption.yaml"
    config.write_text(f"run: {run}\nmodel: {decoder_dir}\nicl_examples: 2\nsettings:\n  probe_epochs: 3\n  max_k: 2\n")
    out = CliRunner().invoke(cli, ["absorption", str(config), "--quiet", "--set", "device=cpu"])
    assert out.exit_code == 0, out.output
    for k in (2, 8):
        result = AbsorptionResult.load(RunDir(run).absorption("blocks.1.hook_resid_post", f"topk-k{k}"))
        assert result.l0 == k and result.d_sae == 128 and result.task == "first_letter"
        assert result.config["icl_examples"] == 2 and f"topk-k{k}: mean absorption fraction" in out.output
    ig = CliRunner().invoke(
        cli,
        [
            "absorption",
            str(config),
            "-q",
            "--set",
            "device=cpu",
            "--set",
            "saes=[" + str(RunDir(run).sae("blocks.1.hook_resid_post", "topk-k2")) + "]",
            "--set",
            "integrated_gradients=true",
            "--set",
            "settings.min_probe_f1=0",
            "--set",
            "ig_words=2",
            "--set",
            "ig_steps=2",
        ],
    )
    assert ig.exit_code == 0, ig.output
    labels = AbsorptionResult.load(RunDir(run).absorption("blocks.1.hook_resid_post", "topk-k2")).labels
    with_ig = {lab.label: lab.ig for lab in labels if lab.scored}
    assert with_ig and all(v is not None for v in with_ig.values())
    # " S" is two tokens here, " A" one (the line above checked that no value is None; pyright does not narrow dicts)
    assert "is 2 tokens" in with_ig["s"]["error"] and with_ig["a"]["tested"] <= 2  # pyright: ignore[reportOptionalSubscript]
    bad = CliRunner().invoke(cli, ["absorption", str(config), "--set", "template=no placeholder"])
    assert bad.exit_code == 2 and "needs a {word} placeholder" in bad.output
    missing = CliRunner().invoke(cli, ["absorption", str(config), "--set", f"run={tmp_path / 'nope'}"])
    assert missing.exit_code == 2 and "no run directory" in missing.output and "Traceback" not in missing.output


def _run(**data):
    return run_absorption(build(AbsorptionConfig, {"device": "cpu", **data}, "config"), progress=False)


def test_config_errors_name_the_fix(tmp_path):
    # the config builds anywhere; `run_absorption` checks that what it names exists, before loading the model
    build(AbsorptionConfig, {"run": str(tmp_path / "nope"), "saes": [str(tmp_path / "x")], "labels": "no.csv"}, "c")
    with pytest.raises(MissingError, match="no run directory"):
        _run(run=str(tmp_path / "nope"))
    with pytest.raises(MissingError, match="no SAE folder"):
        _run(run=str(tmp_path), saes=[str(tmp_path / "x")])
    with pytest.raises(MissingError, match="no label table"):
        _run(run=str(tmp_path), labels="nope.csv")
    with pytest.raises(AbsorptionError, match="no SAEs under"):
        _run(run=str(tmp_path))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("train_fraction", 1.0),
        ("train_fraction", 0),
        ("icl_examples", 0),
        ("batch_size", 0),
        ("max_words", 5),
        ("ig_steps", 0),
        ("ig_words", -1),
        ("settings.probe_lr", 0),
        ("settings.probe_end_lr", -1e-5),
        ("settings.probe_epochs", 0),
        ("settings.l1_batch_size", 0),
        ("settings.l1_decay", -0.1),
        ("settings.max_k", 0),
        ("settings.min_probe_f1", 1.5),
        ("settings.f1_jump_threshold", -0.1),
        ("settings.absorber_cos_threshold", 2),
        ("settings.projection_proportion_threshold", 0),
        ("settings.max_absorbers", 0),
        ("settings.top_latents", 0),
        ("settings.min_labels", 0),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(tmp_path, key, value):
    data: dict = {"run": str(tmp_path)}
    section, _, leaf = key.rpartition(".")
    (data.setdefault(section, {}) if section else data)[leaf] = value
    with pytest.raises(ConfigError, match=f"`{key}`: Input should be"):
        build(AbsorptionConfig, data, "absorption config")
