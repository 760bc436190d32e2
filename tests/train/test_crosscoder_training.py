"""Crosscoders in the trainer: trained in the same pass as SAEs on a store of two synthetic models, they recover the
planted shared and exclusive features; an interrupted run resumes to the same weights; sources of different widths
are refused; the saved folder loads as a `CrossCoder`."""

from __future__ import annotations

import importlib
import json
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from saelab.dictionaries import CrossCoder, load_dictionary
from saelab.errors import ConfigError
from saelab.evals.model_diff import A_ONLY, B_ONLY, SHARED, auroc, model_diff
from saelab.importer import import_arrays
from saelab.run import array_folder
from saelab.toys.model_diff import make_model_diff
from saelab.train import TrainConfig, train

trainer_module = importlib.import_module("saelab.train.trainer")  # `saelab.train` is also a function's name
D = 32
ROWS = 1024
EVAL_ROWS = 4096


@pytest.fixture(scope="module")
def toy():
    """The toy's two models (16 shared, 8 A-only, 8 B-only, 6 decoupled features in 32 dimensions)."""
    return make_model_diff()


@pytest.fixture(scope="module")
def store_path(toy, tmp_path_factory):
    """A store of 16 batches of training rows plus the held-out rows: model A's activations as `h_a`, model B's as
    `h_b` (row `i` the same token in both), and a narrower `h_narrow`."""
    x = toy.sample(16 * ROWS + EVAL_ROWS, torch.Generator().manual_seed(1)).x.numpy()
    out = str(tmp_path_factory.mktemp("store") / "diff.zarr")
    arrays = {"h_a": x[:, 0], "h_b": x[:, 1], "h_narrow": x[:, 0, : D // 2]}
    import_arrays(arrays, out, shard_rows=4096, chunk_rows=1024, progress=False)
    return out


def config(store_path, run, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        store=store_path,
        run=str(run),
        hooks=["h_a"],
        crosscoders=[{"sources": ["h_a", "h_b"], "arch": "batchtopk"}],
        tokens=ROWS * 400,
        batch_size=ROWS,
        eval_rows=EVAL_ROWS,
        warmup_steps=10,
        checkpoint_every=ROWS * 100,
        log_every=50,
        grid={"arch": ["topk"], "k": [4], "expansion": [2], "lr": [5e-3]},
        sae={"dead_tokens": 30 * ROWS},
    )
    return TrainConfig.model_validate(base | kw)


def test_crosscoder_trained_with_an_sae_recovers_the_planted_classes(toy, store_path, tmp_path):
    """One pass trains the SAE on `h_a` and the crosscoder over both models; the crosscoder, loaded back by its
    `cfg.json`'s kind, reconstructs both (FVU per source <= 0.03, as `metrics.json` records) and its relative decoder
    norms tell the planted classes apart (AUROC >= 0.95 over the genuine features that a latent found)."""
    results = train(config(store_path, tmp_path), progress=False)
    assert [(r.hook, r.arch) for r in results] == [("h_a", "topk"), ("h_a", "crosscoder-batchtopk")]
    cc_result = results[1]
    assert cc_result.path.name.startswith("crosscoder-batchtopk-k4-w64-lr")
    metrics = json.loads((cc_result.path / "metrics.json").read_text())
    assert metrics["sources"] == ["h_a", "h_b"]
    assert max(metrics["fvu_per_source"]) <= 0.03 and metrics["fvu"] <= 0.03
    assert sum(metrics["decoder_norm_share"]) == pytest.approx(1.0)
    assert metrics["shared_frac"] + sum(metrics["exclusive_frac"]) == pytest.approx(1.0)

    cc = load_dictionary(cc_result.path)
    assert isinstance(cc, CrossCoder) and cc.cfg.sources == ["h_a", "h_b"]
    x = toy.sample(8192, torch.Generator().manual_seed(2)).x
    diff = model_diff(cc, [x[:4096], x[4096:]])
    rows = cc.W_dec.detach()[torch.arange(cc.cfg.d_sae), (diff.delta_norm >= 0.5).long()]
    best_cos, best = ((rows / rows.norm(dim=1, keepdim=True)) @ toy.directions.T).max(0)
    genuine = ~toy.decoupled & (best_cos >= 0.9)
    assert genuine.sum() >= 0.9 * (~toy.decoupled).sum()
    delta, kinds = diff.delta_norm[best[genuine]], toy.kinds[genuine]
    assert auroc(delta, kinds == B_ONLY) >= 0.95
    assert auroc(-delta, kinds == A_ONLY) >= 0.95
    assert auroc((delta - 0.5).abs(), kinds != SHARED) >= 0.95


def test_interrupted_run_resumes_to_the_same_weights(store_path, tmp_path, monkeypatch):
    """A run stopped right after its checkpoint at step 40 resumes from it to the weights of a run never stopped."""
    kw: dict[str, Any] = dict(
        hooks=None, tokens=ROWS * 80, checkpoint_every=ROWS * 40, grid={"k": [4], "expansion": [2]}
    )
    kw |= dict(crosscoders=[{"sources": ["h_a", "h_b"], "arch": "topk"}])
    ref = train(config(store_path, tmp_path / "ref", **kw), progress=False)
    save = trainer_module.save_checkpoint

    def save_then_stop(folder, members, step):
        save(folder, members, step)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_module, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(config(store_path, tmp_path / "cut", **kw), progress=False)
    assert json.loads((tmp_path / "cut/saes/checkpoint/latest.json").read_text())["step"] == 40
    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    resumed = train(config(store_path, tmp_path / "cut", **kw), progress=False)
    assert [r.variant for r in resumed] == [r.variant for r in ref] and len(ref) == 1
    want = load_file(str(ref[0].path / "sae_weights.safetensors"))
    got = load_file(str(resumed[0].path / "sae_weights.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_sources_of_different_widths_are_refused_with_the_fix(store_path, tmp_path):
    cfg = config(store_path, tmp_path, crosscoders=[{"sources": ["h_a", "h_narrow"]}])
    with pytest.raises(ConfigError, match="different widths.*project each to a common width"):
        train(cfg, progress=False)
    assert not (tmp_path / "saes").exists()


def test_crosscoders_saved_under_one_folder_are_refused(store_path, tmp_path):
    """Two crosscoders that start with the same source would share a folder."""
    twice = [{"sources": ["h_a", "h_b"]}, {"sources": ["h_a", "h_b"], "arch": "batchtopk"}]
    with pytest.raises(ConfigError, match="put another of their sources first"):
        train(config(store_path, tmp_path, crosscoders=twice, grid={"k": [4], "expansion": [1]}), progress=False)


def test_spec_refuses_a_source_named_twice_and_folders_are_plain_names():
    with pytest.raises(ValueError, match="name one array twice"):
        TrainConfig.model_validate({"run": "r", "crosscoders": [{"sources": ["h", "h"]}]})
    assert array_folder("base/blocks.1.hook_resid_post") == "base__blocks.1.hook_resid_post"
