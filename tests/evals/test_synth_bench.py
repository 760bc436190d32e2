"""`saelab bench-synth`: the synthetic benchmark ranks a known-better setting above a known-worse one on every seed."""

import json

import pytest
import torch
from typer.testing import CliRunner

from saelab.cli import app
from saelab.errors import ConfigError
from saelab.evals.synth_bench import SUITE, SUITE_VERSION, BenchSetting, bench_synth, score_sae, train_setting
from saelab.toys.synthetic import make_synthetic

SEEDS = (0, 1, 2)
GENERATORS = ("correlated-pairs", "hierarchy")


@pytest.fixture(scope="module")
def bench():
    settings = [
        BenchSetting("trained", steps=300, batch_size=256),
        BenchSetting("random-decoder", steps=0),
        BenchSetting("too-narrow", width=0.25, steps=300, batch_size=256),
    ]
    return bench_synth(settings, seeds=SEEDS, generators=GENERATORS, eval_rows=2048)


def test_trained_beats_a_random_decoder_on_every_seed(bench):
    for gen in GENERATORS:
        for metric in ("recovery@0.9", "mcc", "f1", "explained_variance"):
            good, bad = bench.values("trained", gen, metric), bench.values("random-decoder", gen, metric)
            assert len(good) == len(SEEDS) and all(g > b for g, b in zip(good, bad, strict=True)), (gen, metric)
        assert min(bench.values("trained", gen, "recovery@0.9")) >= 0.3
        assert max(bench.values("random-decoder", gen, "recovery@0.9")) == 0


def test_matching_width_beats_far_too_narrow_on_recovery_every_seed(bench):
    for gen in GENERATORS:
        good, bad = bench.values("trained", gen, "recovery@0.9"), bench.values("too-narrow", gen, "recovery@0.9")
        assert all(g > b + 0.2 for g, b in zip(good, bad, strict=True)), gen


def test_output_records_the_suite_version_and_every_row(bench):
    out = bench.to_json()
    assert out["version"] == SUITE_VERSION and set(out["generators"]) == {g.name for g in SUITE}
    assert len(out["rows"]) == 3 * len(SEEDS) * len(GENERATORS)
    hierarchy = [r for r in out["rows"] if r["generator"] == "hierarchy"]
    assert all(r["absorption"] is not None for r in hierarchy)
    assert SUITE_VERSION in bench.table() and len(bench.figure()["data"]) == 3
    json.dumps(out)


def test_perfect_dictionary_scores_one():
    """An SAE whose decoder is the true dictionary (encoder its transpose, k the true L0 bound) matches every
    feature: recovery, MCC and uniqueness 1."""
    data = make_synthetic(32, 32, 2.0, n_pairs=0, noise=0.0, seed=3)
    sae = train_setting(BenchSetting("x", width=1.0, k=32, steps=0), data, seed=0)
    with torch.no_grad():
        sae.W_dec.copy_(data.directions)
    scores = score_sae(sae, data, rows=512)
    assert scores.recovery["0.9"] == 1 and scores.mcc == pytest.approx(1, abs=1e-5) and scores.uniqueness == 1


def test_bad_input_names_the_fix():
    with pytest.raises(ConfigError, match="the suite"):
        bench_synth([BenchSetting("a")], generators=["nope"])
    with pytest.raises(ConfigError, match="must differ"):
        bench_synth([BenchSetting("a"), BenchSetting("a")])


def test_cli_writes_table_json_and_figure(tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "bench-synth",
            "--steps",
            "20",
            "--seeds",
            "0",
            "--generators",
            "noise",
            "--width",
            "1,0.5",
            "--json",
            str(tmp_path / "b.json"),
            "--figure",
            str(tmp_path / "b.html"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "topk-w0.5" in result.output and SUITE_VERSION in result.output
    assert json.loads((tmp_path / "b.json").read_text())["version"] == SUITE_VERSION
    assert (tmp_path / "b.html").stat().st_size > 1000
    bad = CliRunner().invoke(app, ["bench-synth", "--arch", "nope", "--seeds", "0"])
    assert bad.exit_code == 2 and "choose among" in bad.output


def test_hedging_on_request_on_the_correlated_pairs_alone():
    settings = [BenchSetting("narrow", width=0.5, steps=60, batch_size=256)]
    bench = bench_synth(
        settings, seeds=(0,), generators=["correlated-pairs", "noise"], eval_rows=1024, hedging_steps=20
    )
    pairs, noise = bench.values("narrow", "correlated-pairs", "hedging"), bench.values("narrow", "noise", "hedging")
    assert len(pairs) == 1 and 0 <= pairs[0] <= 1 and noise == []
