"""Intervals across seeds: the t-interval against a hand computation, one seed (no interval, said so), the grouping by
config and `results_by_config.csv`."""

from __future__ import annotations

import math

import pytest

from saelab.evals.intervals import ONE_SEED, group_by_config, t_interval, write_by_config
from saelab.evals.table import pareto_front
from saelab.run import RunDir
from saelab.train.sweep import read_results, write_sweep_outputs


def test_t_interval_matches_a_hand_computation():
    # values 1, 2, 3, 4: mean 2.5, s = sqrt(5/3) = 1.2910, s/sqrt(4) = 0.6455, t(0.975, 3) = 3.182446
    iv = t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert iv.mean == 2.5 and iv.n == 4
    assert iv.low == pytest.approx(2.5 - half, abs=1e-9) and iv.high == pytest.approx(2.5 + half, abs=1e-9)
    assert iv.low == pytest.approx(0.44574, abs=1e-5)
    # two seeds: t(0.975, 1) = 12.7062, s = |a - b| / sqrt 2, so half = 12.7062 * |a - b| / 2
    two = t_interval([0.8, 0.9])
    assert two.high is not None and two.high - two.mean == pytest.approx(12.706204736 * 0.1 / 2, rel=1e-8)


def test_one_seed_has_no_interval_and_says_so():
    iv = t_interval([0.25])
    assert (iv.mean, iv.low, iv.high, iv.n) == (0.25, None, None, 1)
    assert iv.text() == f"0.25 ({ONE_SEED})"
    with pytest.raises(ValueError, match="one per seed"):
        t_interval([])


def test_rows_group_by_everything_but_the_seed(tmp_path):
    base = {"hook": "h", "arch": "topk", "k": 8, "width": 64, "lr": 1e-3, "tokens": 100}
    rows = [base | {"seed": s, "fvu": f, "path": f"p{s}"} for s, f in ((0, 0.1), (1, 0.2), (2, 0.3))]
    rows.append(base | {"k": 16, "seed": 0, "fvu": 0.05, "path": "q"})
    groups = group_by_config(rows, ["fvu", "l0"])
    assert [len(g.rows) for g in groups] == [3, 1] and groups[0].seeds == ["0", "1", "2"]
    assert groups[0].intervals["fvu"].mean == pytest.approx(0.2) and "l0" not in groups[0].intervals
    assert groups[1].intervals["fvu"].low is None
    table = read_results(write_by_config(groups, tmp_path / "by_config.csv", metrics=["fvu", "l0"]))
    assert table[0]["n_seeds"] == "3" and table[0]["seeds"] == "0;1;2"
    assert float(table[0]["fvu_low"]) == pytest.approx(0.2 - 4.302652729911275 * 0.1 / math.sqrt(3))
    assert (table[1]["n_seeds"], table[1]["fvu_mean"], table[1]["fvu_low"], table[1]["fvu_high"]) == (
        "1",
        "0.05",
        "",
        "",
    )
    assert table[0]["l0_mean"] == ""


def test_pareto_front_keeps_the_undominated_points():
    xs, ys = [1.0, 2.0, 3.0, 4.0], [0.5, 0.4, 0.8, 0.7]
    assert pareto_front(xs, ys, lower_is_better=False) == [0, 2]
    assert pareto_front(xs, ys, lower_is_better=True) == [0, 1]


def test_a_sweep_writes_results_by_config_beside_results_csv(tmp_path):
    base = {"hook": "h", "arch": "topk", "k": 8, "width": 64, "lr": 1e-3, "tokens": 100, "l0": 8.0}
    rows = [base | {"seed": s, "fvu": 0.1 * (s + 1), "path": f"saes/h/v{s}"} for s in range(3)]
    write_sweep_outputs(rows, tmp_path / "run")
    (config,) = read_results(RunDir(tmp_path / "run").sweep_by_config)
    assert (config["n_seeds"], config["seeds"], float(config["fvu_mean"])) == ("3", "0;1;2", pytest.approx(0.2))
    assert float(config["fvu_high"]) == pytest.approx(0.2 + 4.302652729911275 * 0.1 / math.sqrt(3))
