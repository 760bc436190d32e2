"""The app over a run of a two-model store (`two_model_analysed`, copied per test): a crosscoder's feature page with
its decoder norm per source, relative norm and model-diff class, and its logit effects per source; the feature page of
the SAE of `tuned/<hook>`, which the run page links as the tuned model's; the prompt runs that SAE on the tuned model
and refuses the crosscoder naming why; and the crosscoder's page in headless Chromium draws the bar chart."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from selenium.webdriver.common.by import By

from saelab.analysis import FeatureStore
from saelab.dashboards.app import create_app
from saelab.dashboards.data import sae_info
from saelab.dashboards.live import prompt_latents
from saelab.dictionaries import SAE
from saelab.errors import RequestError
from saelab.evals.diff_run import ModelDiffResult
from saelab.models import capture, load_model, resolve_hooks
from saelab.run import RunDir
from saelab.text import SpecialTokens
from tests.conftest import TWO_MODEL_HOOKS
from tests.dashboards.helpers import Server, components, errors, page, text, visit

MLP_OUT = TWO_MODEL_HOOKS[1]


@pytest.fixture
def run(two_model_analysed, tmp_path):
    """A copy of the analysed run (tests here write a model diff into it), and its SAE, transcoder and crosscoder
    as (folder, variant)."""
    source, results, _ = two_model_analysed
    copy = tmp_path / "run"
    shutil.copytree(source, copy)
    return copy, [(r.hook, r.path.name) for r in results]


def _by_id(answer, component_id: str):
    return next(c for c in components(answer) if c["props"].get("id") == component_id)


def _busiest(run, hook: str, variant: str) -> int:
    return int(np.argmax(FeatureStore.open(RunDir(run).analysis(hook, variant)).column("count")))


def test_a_crosscoders_feature_page_shows_its_decoder_norm_per_source(run):
    run, (_, _, (hook, variant)) = run
    fs = FeatureStore.open(RunDir(run).analysis(hook, variant))
    index = _busiest(run, hook, variant)
    answer = page(create_app(str(run)), "/feature", hook=hook, sae=variant, id=str(index))
    assert errors(answer) == []
    bars = _by_id(answer, "decoder-norms")["props"]["figure"]["data"][0]
    assert bars["x"] == [f"base/{MLP_OUT}", f"tuned/{MLP_OUT}"]
    np.testing.assert_allclose(bars["y"], fs.column("decoder_norms")[index], rtol=1e-6)
    stats = text(_by_id(answer, "source-stats"))
    assert f"relative norm (tuned/{MLP_OUT}) {fs.column('relative_norm')[index]:.3f}" in stats
    assert f"not classified: run `saelab diff RUN --sae {hook}/{variant}`" in stats
    logits = text(_by_id(answer, "logit-effects"))
    assert f"base/{MLP_OUT}" in logits and f"tuned/{MLP_OUT}" in logits  # a pair of tables per source


def test_a_crosscoders_feature_page_shows_the_latents_model_diff_class(run):
    run, (_, _, (hook, variant)) = run
    d_sae = FeatureStore.open(RunDir(run).analysis(hook, variant)).n_features
    classes = ["shared"] * d_sae
    classes[3] = "b_only"
    ModelDiffResult(
        hook=hook,
        variant=variant,
        sources=[f"base/{MLP_OUT}", f"tuned/{MLP_OUT}"],
        rows=[0, 10],
        delta_norm=[0.5] * d_sae,
        norm_class=["a_only" if j == 3 else "shared" for j in range(d_sae)],
        scaling_class=classes,
        nu_error=[None] * d_sae,
        nu_recon=[None] * d_sae,
        fired=[0] * d_sae,
    ).save(RunDir(run).model_diff(hook, variant))
    app = create_app(str(run))
    for index, shown in ((3, "model diff b_only (a_only by norm)"), (4, "model diff shared (shared by norm)")):
        assert shown in text(_by_id(page(app, "/feature", hook=hook, sae=variant, id=str(index)), "source-stats"))
    exclusive = _by_id(page(app, "/model_diff", hook=hook, sae=variant), "diff-b_only")
    links = [c["props"]["href"] for c in components(exclusive) if c["type"] == "Link"]
    assert links == [f"/feature?hook={hook}&sae={variant}&id=3"]  # the model-diff page links its feature page


def test_the_tuned_models_sae_has_feature_pages_and_its_run_page_links(run):
    run, ((hook, variant), _, _) = run
    app = create_app(str(run))
    answer = page(app, "/feature", hook=hook, sae=variant, id=str(_busiest(run, hook, variant)))
    assert errors(answer) == []
    assert f"tuned/{MLP_OUT} · {variant}" in text(answer)
    assert "promoted" in text(_by_id(answer, "logit-effects"))
    overview = page(app, "/")
    row = next(r for r in components(_by_id(overview, "sae-table")) if r["type"] == "Tr" and hook in text(r))
    assert "features" in text(row) and "trained on" not in text(row)


def test_the_prompt_runs_the_sae_on_its_own_model_and_refuses_the_crosscoder(run, tuned_decoder_dir):
    run, ((hook, variant), _, (cc_hook, cc_variant)) = run
    info = sae_info(str(run), hook, variant)
    text_ = "Return the absolute value of a number."
    got = prompt_latents(str(run), info, text_, top=1)
    model = load_model(tuned_decoder_dir, device="cpu")
    assert model.tokenizer is not None
    ids = model.tokenizer(text_, add_special_tokens=False)["input_ids"]
    special = SpecialTokens.for_tokenizer(model.tokenizer, False)  # framed as the harvest framed its contexts
    acts = capture(model, torch.tensor([special.frame(ids)]), resolve_hooks(model, [MLP_OUT]))[MLP_OUT][0]
    with torch.no_grad():
        codes = SAE.load(info.path).encode(acts[len(special.prefix) : len(special.prefix) + len(ids)])
    assert len(got) == len(ids) and sum(bool(t.latents) for t in got) == int((codes.max(1).values > 0).sum()) > 0
    for token, f in zip(got, codes):
        if token.latents:
            assert token.latents[0][0] == int(f.argmax()) and token.latents[0][1] == pytest.approx(float(f.max()))
    with pytest.raises(RequestError, match="is a crosscoder: it reads base/.*the prompt runs one model"):
        prompt_latents(str(run), sae_info(str(run), cc_hook, cc_variant), text_)


@pytest.mark.browser
def test_the_crosscoders_decoder_norms_are_drawn(driver, run):
    run, (_, _, (hook, variant)) = run
    server = Server(run)
    try:
        index = _busiest(run, hook, variant)
        visit(driver, f"{server.url}/feature?hook={hook}&sae={variant}&id={index}", "#decoder-norms .main-svg")
        bars = driver.find_elements(By.CSS_SELECTOR, "#decoder-norms .bars path")
        assert len(bars) == 2
    finally:
        server.close()
