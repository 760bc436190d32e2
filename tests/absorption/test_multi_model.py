"""`saelab absorption` with the SAE of one model of a two-model store (`two_model_run`): probed at the model's own
hook point and written under the SAE's folder (`<alias>__<hook>`); SAEs of two models in one absorption run are
refused with the fix."""

from __future__ import annotations

import pytest

from saelab.absorption import AbsorptionConfig, AbsorptionError, AbsorptionResult, run_absorption
from saelab.config import build
from saelab.dictionaries import SAE
from saelab.run import RunDir
from tests.conftest import TWO_MODEL_HOOKS


def _run(**data):
    settings = {"probe_epochs": 3, "max_k": 2}
    cfg = build(AbsorptionConfig, {"device": "cpu", "icl_examples": 2, "settings": settings, **data}, "config")
    return run_absorption(cfg, progress=False)


def test_the_tuned_models_sae_is_probed_at_its_hook_point(two_model_run, tuned_decoder_dir, tmp_path):
    run, results = two_model_run
    sae = results[0]
    (saved,) = _run(run=str(run), model=tuned_decoder_dir, saes=[str(sae.path)])
    assert saved.path == RunDir(run).absorption(sae.hook, sae.path.name)
    loaded = AbsorptionResult.load(saved.path)
    assert loaded.hook == TWO_MODEL_HOOKS[1] and loaded.d_sae == SAE.load(sae.path).cfg.d_sae
    assert [(r.hook, r.variant) for r in RunDir(run).absorption_results()] == [(sae.hook, sae.path.name)]


def test_saes_of_two_models_in_one_absorption_run_are_refused(two_model_run, tuned_decoder_dir, tmp_path):
    run, results = two_model_run
    sae = SAE.load(results[0].path)
    sae.cfg = sae.cfg.model_copy(update={"hook_name": f"base/{TWO_MODEL_HOOKS[1]}"})
    other = tmp_path / "base__blocks.0.hook_mlp_out" / "topk"
    sae.save(other)
    with pytest.raises(AbsorptionError, match="several models of the run's store \\(base, tuned\\).*list the `saes`"):
        _run(run=str(run), model=tuned_decoder_dir, saes=[str(results[0].path), str(other)])
