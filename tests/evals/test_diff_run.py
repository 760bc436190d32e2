"""`saelab diff` over a run: a crosscoder trained by `saelab train` on a store of two synthetic models, classified on
the held-out rows, written into the run and read back; the genuine exclusive features' latents come out exclusive,
and `enrichment` finds B-only latents firing where model B's own features are."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch

from saelab.dictionaries import CrossCoder
from saelab.errors import ConfigError, RunError
from saelab.evals.diff_run import ModelDiffResult, diff_run, doc_enrichment, enrichment
from saelab.evals.model_diff import B_ONLY
from saelab.importer import import_arrays
from saelab.run import RunDir, saved_kind
from saelab.store import ActivationStore
from saelab.toys.model_diff import make_model_diff
from saelab.train import TrainConfig, train

ROWS = 1024
EVAL_ROWS = 4096


@pytest.fixture(scope="module")
def toy():
    return make_model_diff()


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """A run whose crosscoder over `h_a` and `h_b` (the toy's two models) was trained, and the held-out rows."""
    sample = toy.sample(16 * ROWS + EVAL_ROWS, torch.Generator().manual_seed(1))
    x = sample.x.numpy()
    store = str(tmp_path_factory.mktemp("store") / "diff.zarr")
    import_arrays({"h_a": x[:, 0], "h_b": x[:, 1]}, store, shard_rows=4096, chunk_rows=1024, progress=False)
    run = tmp_path_factory.mktemp("run")
    cfg: dict[str, Any] = dict(
        store=store,
        run=str(run),
        crosscoders=[{"sources": ["h_a", "h_b"], "arch": "batchtopk"}],
        tokens=ROWS * 400,
        batch_size=ROWS,
        eval_rows=EVAL_ROWS,
        warmup_steps=10,
        log_every=50,
        grid={"k": [4], "expansion": [2], "lr": [5e-3]},
        sae={"dead_tokens": 30 * ROWS},
    )
    (result,) = train(TrainConfig.model_validate(cfg), progress=False)
    return run, result, sample


def test_diff_run_classifies_the_latents_and_the_run_keeps_the_result(toy, trained):
    run, result, _ = trained
    diff, path = diff_run(run, result.hook, result.path.name)
    assert path == RunDir(run).model_diff(result.hook, result.path.name)
    again = ModelDiffResult.load(path)
    assert again == diff
    assert diff.rows == [16 * ROWS, 16 * ROWS + EVAL_ROWS]  # the rows training held out
    assert diff.sources == ["h_a", "h_b"]
    assert sum(diff.counts().values()) == len(diff.delta_norm) == 64
    # every genuine B-only feature's best latent is B-only (the crosscoder training test shows they are found)
    dirs = torch.nn.functional.normalize(toy.directions, dim=-1)
    cc = CrossCoder.load(result.path)
    dec_b = torch.nn.functional.normalize(cc.W_dec[:, 1].detach(), dim=-1)
    best = (dirs[toy.kinds == B_ONLY] @ dec_b.T).argmax(1).tolist()
    assert all(diff.scaling_class[j] == "b_only" for j in best)
    assert set(best) <= set(diff.exclusive("b_only"))
    assert [k.path.name for k in RunDir(run).model_diffs()] == [f"{result.path.name}.json"]


def test_enrichment_finds_b_only_latents_where_b_alone_has_features(toy, trained):
    """Known answer: rows where some B-only feature fires are where B-only latents fire (enrichment > 3), while
    shared latents fire there about as often as elsewhere (within a factor 1.5)."""
    run, result, sample = trained
    diff, _ = diff_run(run, result.hook, result.path.name)
    cc = CrossCoder.load(result.path)
    held = slice(16 * ROWS, None)
    with torch.no_grad():
        codes = cc.encode(sample.x[held])
    marked = sample.fires[held][:, toy.kinds == B_ONLY].any(1)
    figures = enrichment(codes, marked, diff.scaling_class)
    assert figures["b_only"] > 3
    assert 1 / 1.5 < figures["shared"] < 1.5
    with pytest.raises(ConfigError, match="mark some rows, not all"):
        enrichment(codes, torch.ones(len(codes), dtype=torch.bool), diff.scaling_class)


def test_a_missing_crosscoder_is_named(trained):
    run, _, _ = trained
    with pytest.raises(RunError, match="has no SAE h_a/crosscoder-nope"):
        diff_run(run, "h_a", "crosscoder-nope")


def test_the_app_lists_a_crosscoder_as_usable_with_its_sources(trained):
    """The app's SAE list keeps a crosscoder, whose `cfg.json` says its kind, as usable (its feature pages are
    `saelab analyze`'s), reading its sources."""
    from saelab.dashboards.data import list_saes

    run, result, _ = trained
    assert saved_kind(result.path) == "crosscoder"
    (info,) = list_saes(str(run))
    assert info.error is None and info.kind == "crosscoder" and info.reads == ("h_a", "h_b")


def test_saelab_diff_classifies_every_crosscoder_of_the_run(trained, tmp_path):
    from typer.testing import CliRunner

    from saelab.cli import app

    run, result, _ = trained
    out = CliRunner().invoke(app, ["diff", str(run)])
    assert out.exit_code == 0, out.output
    assert f"{result.hook}/{result.path.name}: " in out.output and "only in h_b" in out.output
    assert str(RunDir(run).model_diff(result.hook, result.path.name)) in out.output
    tuned = CliRunner().invoke(app, ["diff", str(run), "--tuned-on", "asyncio"])  # an import's doc ids are rows
    assert tuned.exit_code == 2 and "marks documents of the embedded corpus" in tuned.output
    empty = CliRunner().invoke(app, ["diff", str(tmp_path)])
    assert empty.exit_code != 0 and "has no crosscoders" in empty.output


def test_doc_enrichment_over_the_whole_store_in_chunks(toy, trained):
    """Known answer: rows (their `doc_id` is the row index in an imported store) where some B-only feature fires are
    where B-only latents fire; the chunked count over every row equals `enrichment` on all the codes at once."""
    run, result, sample = trained
    diff, _ = diff_run(run, result.hook, result.path.name)
    cc = CrossCoder.load(result.path)
    store = ActivationStore.open(json.loads(RunDir(run).train_config.read_text())["store"])
    marked = sample.fires[:, toy.kinds == B_ONLY].any(1)
    figures = doc_enrichment(cc, store, diff.scaling_class, docs=marked.nonzero()[:, 0].numpy())
    with torch.no_grad():
        at_once = enrichment(
            cc.encode(torch.stack([store.activations(h) for h in ("h_a", "h_b")], 1)), marked, diff.scaling_class
        )
    assert figures["b_only"] > 3
    for name, value in at_once.items():
        assert figures[name] == pytest.approx(value, rel=1e-5, nan_ok=True)
    diff.tuned_on, diff.enrichment = "asyncio", {"shared": 1.0, "a_only": None, "b_only": figures["b_only"]}
    assert f"on asyncio's documents b_only latents fire {figures['b_only']:.2f}x as often" in diff.summary()
    with pytest.raises(ConfigError, match="enrichment needs both"):
        doc_enrichment(cc, store, diff.scaling_class, docs=np.array([-5]))
