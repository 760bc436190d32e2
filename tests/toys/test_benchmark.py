"""The sample-efficiency benchmark's data: Zipf rates, the planted hierarchy, reproducible batches, bad settings."""

from __future__ import annotations

import itertools
from typing import cast

import pytest
import torch
from safetensors.torch import load_file

from saelab.dictionaries import SAEConfig
from saelab.errors import ConfigError
from saelab.importer import import_arrays
from saelab.store import ActivationStore
from saelab.toys.benchmark import DefaultsRun, batches, make_benchmark
from saelab.train import Grid, TrainConfig, default_lr, train


@pytest.fixture(scope="module")
def bench():
    data = make_benchmark(n_features=192, d=32, mean_active=4.0, n_parents=8, children=3, child_prob=0.6)
    return data, data.sample_fires(40_000, torch.Generator().manual_seed(0))


def test_children_fire_only_with_their_parent_and_one_at_a_time(bench):
    data, fires = bench
    parents, children = fires[:, data.parents], fires[:, data.children]  # [n, P], [n, P, C]
    assert not (children.any(2) & ~parents).any()
    assert children.sum(2).max() == 1
    # One child per firing parent with probability 0.6: 40k tokens give the rate to about +-0.02 (4 sigma).
    rate = children.any(2)[parents].float().mean().item()
    assert rate == pytest.approx(0.6, abs=0.02)


def test_roots_fire_at_their_zipf_rates(bench):
    data, fires = bench
    roots = torch.ones(data.n_features, dtype=torch.bool)
    roots[data.children.flatten()] = False
    rates = data.freqs[roots]
    assert rates.sum().item() == pytest.approx(4.0, rel=1e-5)  # float32 sum of 152 rates
    ranked = rates.sort(descending=True).values
    # Zipf-Mandelbrot with exponent 1 and offset 5: rank r fires at (r + 5)^-1 times a constant.
    assert (ranked[0] / ranked[-1]).item() == pytest.approx((len(ranked) + 4) / 5, rel=1e-4)
    measured = fires[:, roots].float().mean(0)
    # Each rate from 40k Bernoulli draws: standard error <= 0.0025, so 5 sigma is about 0.0125.
    assert (measured - rates).abs().max().item() < 0.0125


def test_recovery_by_kind_scores_flat_parent_and_child_directions_apart(bench):
    """The true dictionary recovers every kind; a dictionary that absorbed each child into its parent (rows parent
    + child, cosine 1/sqrt(2) with both for near-orthogonal directions) recovers the flat and parent directions and
    no child."""
    data, _ = bench
    kinds = data.kinds()
    assert [int(mask.sum()) for mask in kinds.values()] == [192 - 8 - 24, 8, 24]
    assert not (kinds["flat"] & kinds["parents"]).any() and not (kinds["flat"] & kinds["children"]).any()
    assert data.recovery_by_kind(data.directions) == {"all": 1.0, "flat": 1.0, "parents": 1.0, "children": 1.0}
    absorbed = data.directions[data.parents][:, None] + data.directions[data.children]  # [parents, children, d]
    rows = torch.cat([data.directions[kinds["flat"] | kinds["parents"]], absorbed.flatten(0, 1)])
    got = data.recovery_by_kind(rows)
    assert (got["flat"], got["parents"], got["children"]) == (1.0, 1.0, 0.0)
    assert got["all"] == pytest.approx((192 - 24) / 192)


def test_batches_are_the_same_on_every_call_and_differ_between_seeds(bench):
    data, _ = bench
    first, again = list(batches(data, 2, 64, seed=3)), list(batches(data, 2, 64, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], next(batches(data, 1, 64, seed=4)))


def test_the_dictionary_is_not_torchs_global_draw():
    """An SAE seeded with the benchmark's seed must not start at the answer (the generators are seeded apart)."""
    data = make_benchmark(n_features=64, d=16, n_parents=4, children=2, seed=0)
    torch.manual_seed(0)
    start = torch.randn(64, 16)  # the rows an SAE's decoder starts from (before normalising)
    start /= start.norm(dim=1, keepdim=True)
    assert (data.directions @ start.T).max() < 0.999  # drawn from the same stream, row i would equal row i: 1.0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_features": 20, "n_parents": 5, "children": 4}, "fewer parents"),
        ({"n_features": 64, "mean_active": 20.0, "n_parents": 2, "children": 2}, "smaller mean_active"),
    ],
)
def test_impossible_benchmarks_are_refused_with_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        make_benchmark(**changes)


def test_defaults_run_trains_the_weights_saelab_train_saves(tmp_path):
    """`DefaultsRun` is `saelab train`'s own per-step code: on the batches the trainer reads, from the same sample,
    it ends with the weights `train` saves, bit for bit (the default learning rate, schedule and AuxK refreshes
    included: 45 steps refresh at steps 0, 20 and 40)."""
    data = make_benchmark(n_features=64, d=16, n_parents=4, children=2, seed=0)
    store = str(tmp_path / "bench.zarr")
    import_arrays({"h": data.sample(16_384, torch.Generator().manual_seed(0)).numpy()}, store, progress=False)
    cfg = TrainConfig(
        store=store, run=str(tmp_path / "run"), tokens=256 * 45, batch_size=256, eval_rows=1024, ce_contexts=0,
        grid=Grid(k=[4], expansion=[4]),
    )  # fmt: skip
    (trained,) = train(cfg, progress=False)
    rows = (0, 16_384 - cfg.eval_rows)
    opened = ActivationStore.open(store)
    sample = cast(torch.Tensor, next(opened.batches("h", 8192, seed=cfg.seed + 1, rows=rows)))
    run = DefaultsRun(SAEConfig(d_in=16, d_sae=64, k=4), sample, cfg.total_steps, batch_size=256, seed=cfg.seed)
    assert run.lr == trained.lr == default_lr(64, d_in=16, steps=45)
    for batch in itertools.islice(opened.batches("h", 256, seed=cfg.seed, rows=rows, epochs=None), 45):
        run.step(cast(torch.Tensor, batch))
    run.sae.save(tmp_path / "bench_sae")
    want = load_file(str(trained.path / "sae_weights.safetensors"))
    got = load_file(str(tmp_path / "bench_sae" / "sae_weights.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
