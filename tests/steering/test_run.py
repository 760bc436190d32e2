"""`saelab steer` (saelab.steering.run): a decoder's coefficient sweep and an encoder's steered search, written
into the run."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from saelab import steering as st
from saelab.cli import app as cli
from saelab.config import load_config
from saelab.errors import ConfigError, MissingError
from saelab.steering import EMBEDDING, SteeringError
from tests.steering.helpers import HOOK, PROMPT, steer_config


def test_steer_command_writes_a_generation_sweep(decoder, decoder_dir, dec_sae, tmp_path):
    config, run = steer_config(
        tmp_path,
        dec_sae,
        HOOK,
        f"name: demo\nmodel: {decoder_dir}\nlatent: 3\nscale: 2.0\n"
        f"coefficients: [0, 4]\nprompts: ['{PROMPT}']\nmax_new_tokens: 5\ndevice: cpu\n",
    )
    result = CliRunner().invoke(cli, ["steer", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    # Exact by construction, on any CPU: `add` at coefficient 0 is skipped (`Intervention.is_identity`), so the
    # coefficient-0 logits and text are computed by the very code of the unsteered ones (KL exactly 0).
    assert "coefficient 0: KL 0," in result.output and "coefficient 4: KL" in result.output
    data = json.loads(run.steering("demo").read_text())
    assert data["kind"] == "generation" and data["scale_source"] == "config" and len(data["rows"]) == 2
    assert data["rows"][0]["prompts"][0]["text"] == data["unsteered"][0]
    assert list(data) == ["config", "hook", "kind", "scale", "scale_source", "unsteered", "rows"]
    # The typed sweep rows write the JSON rows of before, key for key (`SweepRow.as_json`).
    assert list(data["rows"][1]) == ["coefficient", "value", "mean", "prompts"]
    assert list(data["rows"][1]["mean"]) == ["kl", "perplexity", "latent_act", "latent_act_text"]
    assert list(data["rows"][1]["prompts"][0]) == [
        "prompt",
        "text",
        "kl",
        "perplexity",
        "latent_act",
        "latent_act_text",
    ]
    assert (data["rows"][1]["coefficient"], data["rows"][1]["value"]) == (4.0, 8.0)
    loaded = st.SteeringResult.load(run.steering("demo"))
    assert loaded.to_json() == data and loaded.summary() in result.output
    assert data["rows"][1]["mean"]["kl"] > 0
    for override, message in (  # the limits, named (the tiny decoder's context is 64 tokens)
        ("coefficients=[1e30]", "less than or equal to 10000"),
        ("coefficients=[-2e4]", "greater than or equal to -10000"),
        ("scale=1e12", "past the steering limit |coefficient x scale| <= 1e+15"),
        ("max_new_tokens=64", "exceed the model's context of 64; generate at most"),
    ):
        bad = CliRunner().invoke(cli, ["steer", str(config), "--set", "coefficients=[0, 4000]", "--set", override])
        assert bad.exit_code == 2 and message in bad.output, (override, bad.output)

    bad = CliRunner().invoke(cli, ["steer", str(config), "--set", "latent=9999"])
    assert bad.exit_code == 2 and "latent 9999 does not exist" in bad.output
    bad = CliRunner().invoke(cli, ["steer", str(config), "--set", "mode=boost"])
    assert bad.exit_code == 2 and "`mode`" in bad.output
    bad = CliRunner().invoke(cli, ["steer", str(config), "--set", "prompts=[]"])
    assert bad.exit_code == 2 and "give `prompts`" in bad.output
    # Folders are looked for when the command runs, not when the config is read (validators touch no files).
    bad = CliRunner().invoke(cli, ["steer", str(config), "--set", "sae=/nowhere"])
    assert bad.exit_code == 2 and "no SAE in '/nowhere'" in bad.output
    with pytest.raises(MissingError, match="no SAE in"):
        st.run_steering(load_config(config, st.SteerConfig, ["sae=/nowhere"]))
    with pytest.raises(MissingError, match="no run directory"):
        st.run_steering(load_config(config, st.SteerConfig, [f"run={tmp_path / 'nowhere'}"]))
    for override, message in (
        ("coefficients=[]", "at least 1 item"),
        ("coefficients=[.nan]", "finite number"),
        ("scale=0", "greater than 0"),
        ("scope=[-1]", "greater than or equal to 0"),
        ("k=0", "greater than or equal to 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(config, st.SteerConfig, [override])
    with pytest.raises(SteeringError, match="not a saelab steering result"):
        st.SteeringResult.load(config)


def test_steer_command_writes_a_steered_search(corpus, emb_sae, tmp_path):
    latent = int((emb_sae.encode(corpus[1][:40]) > 0).sum(0).argmax())  # fires on the 40 documents searched
    config, run = steer_config(
        tmp_path,
        emb_sae,
        EMBEDDING,
        f"name: search\nmodel: minilm\nlatent: {latent}\ncoefficients: [0, 3]\n"
        "queries: ['Open a network connection to a host.']\ncorpus_documents: 40\nk: 5\ndevice: cpu\n",
    )
    result = CliRunner().invoke(cli, ["steer", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads(run.steering("search").read_text())
    assert data["kind"] == "search" and data["hook"] == EMBEDDING and data["scale_source"] == "measured"
    still, moved = (row["queries"][0] for row in data["rows"])
    # Exact by construction, on any CPU (issue 12 item 7: this compared cosines computed by two code paths): `add` at
    # coefficient 0 is skipped, so the "after" cosines are those of the unsteered query embedding itself.
    assert still["before"] == still["after"] and not still["entered"]
    assert moved["latent_act_after"] > moved["latent_act_before"] and moved["entered"]
    assert all(str(i) in data["documents"] for i, _ in moved["after"])
    assert list(data) == ["config", "hook", "kind", "scale", "scale_source", "rows", "documents"]
    assert st.SteeringResult.load(run.steering("search")).to_json() == data
    assert "coefficient 3:" in result.output and "new neighbours per query" in result.output
    bad = CliRunner().invoke(cli, ["steer", str(config), "--set", "queries=[]"])
    assert bad.exit_code == 2 and "give `queries`" in bad.output
