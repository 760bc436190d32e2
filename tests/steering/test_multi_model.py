"""`saelab steer` with the SAE of one model of a two-model store (`two_model_analysed`): it steers that model (its
alias's, as the store records it) at the model's own hook point, with the scale from the SAE's analysis."""

from __future__ import annotations

import numpy as np

from saelab import steering as st
from saelab.analysis import FeatureStore
from saelab.models import load_model
from saelab.run import RunDir
from tests.conftest import TWO_MODEL_HOOKS
from tests.steering.helpers import PROMPT


def test_the_sae_of_the_tuned_model_steers_the_tuned_model(two_model_analysed, decoder_dir, tuned_decoder_dir):
    run, results, _ = two_model_analysed
    sae = results[0]
    latent = int(np.argmax(FeatureStore.open(RunDir(run).analysis(sae.hook, sae.path.name)).column("count")))
    cfg = st.SteerConfig(
        name="tuned",
        run=str(run),
        sae=str(sae.path),
        latent=latent,
        coefficients=[0.0, 4.0],
        prompts=[PROMPT],
        max_new_tokens=8,
        device="cpu",
    )
    result, path = st.run_steering(cfg, progress=False)
    assert path == RunDir(run).steering("tuned")
    assert result.hook == TWO_MODEL_HOOKS[1] and result.scale_source.startswith("analysis")
    plain = {}
    for alias, spec in (("base", decoder_dir), ("tuned", tuned_decoder_dir)):
        model = load_model(spec, device="cpu")
        n = st.prompt_tokens(model, PROMPT).shape[1]
        plain[alias] = st.continuation(model, st.generate(model, PROMPT, (), max_new_tokens=8), n)
    assert plain["base"] != plain["tuned"]  # the two models continue the prompt differently
    assert result.unsteered == [plain["tuned"]]
