"""`saelab analyze` over a run of a two-model store (`two_model_analysed`): the SAE of `tuned/<hook>` gets its feature
pages from the tuned rows, with logit effects through the tuned model; the crosscoder gets feature pages from its
codes of both sources stacked, its per-source decoder norms, the relative norm, and logit effects per source."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelab.analysis import FeatureStore, logit_effects, residual_directions
from saelab.dictionaries import SAE, CrossCoder
from saelab.models import load_model
from saelab.run import RunDir
from saelab.store import ActivationStore
from tests.conftest import TWO_MODEL_HOOKS

MLP_OUT = TWO_MODEL_HOOKS[1]


def _analysis(run, result) -> FeatureStore:
    return FeatureStore.open(RunDir(run).analysis(result.hook, result.path.name))


def _check_top_examples(fs: FeatureStore, codes: np.ndarray) -> int:
    """Every latent's firing count, and the busiest latent's top examples, equal the codes computed here; the busiest."""
    counts = (codes > 0).sum(0)
    assert [fs.feature(i)["count"] for i in range(fs.n_features)] == counts.tolist()
    busiest = int(np.argmax(counts))
    p = fs.feature(busiest)
    order = np.argsort(-codes[:, busiest], kind="stable")[: len(p["top_rows"])]
    assert p["top_rows"].tolist() == order.tolist()
    np.testing.assert_allclose(p["top_acts"], codes[order, busiest], rtol=1e-5)
    assert p["hist_counts"].sum() == counts[busiest]
    return busiest


def test_every_dictionary_of_the_run_is_analysed(two_model_analysed):
    run, results, paths = two_model_analysed
    assert sorted(paths) == sorted(RunDir(run).analysis(r.hook, r.path.name) for r in results)
    kinds = {r.hook: _analysis(run, r).attrs["kind"] for r in results}
    assert kinds == {
        "tuned__blocks.0.hook_mlp_out": "sae",
        "tuned__blocks.0.hook_mlp_in": "sae",
        "base__blocks.0.hook_mlp_out": "crosscoder",
    }


def test_the_sae_of_the_tuned_model_is_analysed_on_its_rows(two_model_analysed, tuned_decoder_dir):
    run, results, _ = two_model_analysed
    store = ActivationStore.open(str(RunDir(run).store))
    assert store.spec_of(f"tuned/{MLP_OUT}") == tuned_decoder_dir and store.model_of(f"tuned/{MLP_OUT}")
    fs = _analysis(run, results[0])
    assert fs.attrs["hook"] == f"tuned/{MLP_OUT}" and fs.attrs["logit_kind"] == "unembedding"
    sae = SAE.load(results[0].path)
    with torch.no_grad():
        codes = sae.encode(store.activations(f"tuned/{MLP_OUT}")).numpy()
        base_codes = sae.encode(store.activations(f"base/{MLP_OUT}")).numpy()
    assert not np.array_equal((codes > 0).sum(0), (base_codes > 0).sum(0))  # the rows it read tell the models apart
    busiest = _check_top_examples(fs, codes)
    model = load_model(tuned_decoder_dir, device="cpu")
    want = logit_effects(model, residual_directions(model, sae, MLP_OUT), 10)
    p = fs.feature(busiest)
    assert p["logit_top_ids"].tolist() == want.top_ids[busiest].tolist()
    np.testing.assert_allclose(p["logit_top_vals"], want.top_vals[busiest], rtol=1e-5)
    assert model.tokenizer is not None and len(fs.vocab) == len(model.tokenizer)


def test_the_crosscoder_is_analysed_on_both_sources_with_its_decoder_norms(
    two_model_analysed, decoder_dir, tuned_decoder_dir
):
    run, results, _ = two_model_analysed
    store = ActivationStore.open(str(RunDir(run).store))
    fs = _analysis(run, results[2])
    cc = CrossCoder.load(results[2].path)
    assert fs.attrs["reads"] == cc.cfg.sources == [f"base/{MLP_OUT}", f"tuned/{MLP_OUT}"]
    with torch.no_grad():
        codes = cc.encode(torch.stack([store.activations(s) for s in cc.cfg.sources], 1)).numpy()
    busiest = _check_top_examples(fs, codes)
    norms = cc.decoder_norms().numpy()
    np.testing.assert_allclose(fs.column("decoder_norms"), norms, rtol=1e-6)
    np.testing.assert_allclose(fs.column("relative_norm"), norms[:, 1] / norms.sum(1), rtol=1e-5)
    assert norms.sum(1) == pytest.approx(np.ones(cc.cfg.d_sae), abs=1e-5)
    p = fs.feature(busiest)
    assert p["logit_top_ids"].shape == (2, 10)  # per source, each through its own model
    for s, spec in enumerate((decoder_dir, tuned_decoder_dir)):
        model = load_model(spec, device="cpu")
        want = logit_effects(model, residual_directions(model, cc, MLP_OUT, source=s), 10)
        assert p["logit_top_ids"][s].tolist() == want.top_ids[busiest].tolist()
        np.testing.assert_allclose(p["logit_bottom_vals"][s], want.bottom_vals[busiest], rtol=1e-5)
    token = int(p["logit_top_ids"][1, 0])
    assert busiest in fs.search_token(token)
