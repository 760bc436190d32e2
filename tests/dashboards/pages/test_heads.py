"""Attention heads in the app, over the induction run (`induction_run` fixture): the feature page's direct feature
attribution card of a latent on `attn.hook_z` (its numbers are `direct_feature_attribution`'s; the chart and the
source-token highlighting render in headless Chromium), and the Heads page (composition heatmaps, top pairs, the
per-head census; a dictionary that is not on `attn.hook_z` is refused, naming the fix)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from selenium.webdriver.common.by import By
from transformer_lens import HookedTransformer

from saelab.analysis import AnalysisConfig, FeatureStore, analyze
from saelab.circuits import induction_task
from saelab.dashboards.pages import heads as heads_page
from saelab.dashboards.pages.feature import DFA_EXAMPLES, feature_page
from saelab.dictionaries import SAE
from saelab.heads import direct_feature_attribution
from saelab.heads.discrete import DiscreteConfig, head_circuit
from saelab.heads.run import composition_run
from saelab.models import load_model
from saelab.run import RunDir
from saelab.store import ActivationStore
from tests.dashboards.helpers import Server, alpha, components, visit, wait_for

HOOK = "blocks.1.attn.hook_z"


@pytest.fixture(scope="module")
def entry(induction_run):
    return next(s for s in RunDir(induction_run).saes() if s.hook == HOOK)


@pytest.fixture(scope="module")
def latent(induction_run, entry) -> int:
    """The latent that fires most often."""
    return int(np.argmax(FeatureStore.open(RunDir(induction_run).analysis(HOOK, entry.variant)).column("count")))


@pytest.fixture(scope="module")
def model(induction_run) -> HookedTransformer:
    found = load_model(str(induction_run / "model"), device="cpu")
    assert isinstance(found, HookedTransformer)  # a saved saelab model
    return found


@pytest.fixture(scope="module")
def written(induction_run):
    """`saelab heads RUN`'s results, in the run."""
    return composition_run(induction_run)


@pytest.fixture(scope="module")
def server(induction_run, written):
    srv = Server(induction_run)
    yield srv.url
    srv.close()


def by_id(page, name: str) -> dict:
    (found,) = [node for node in components(page) if node["props"].get("id") == name]
    return found


def test_the_dfa_card_shows_direct_feature_attribution_of_the_top_example(induction_run, entry, latent):
    page = feature_page(str(induction_run), HOOK, entry.variant, str(latent))
    figure = by_id(page, "dfa-heads")["props"]["figure"]
    run = RunDir(induction_run)
    store = ActivationStore.open(str(run.store))
    f = FeatureStore.open(run.analysis(HOOK, entry.variant)).feature(latent)
    row = int(f["top_rows"][0])
    ctx = store.contexts(slice(0, store.n_tokens))
    tokens = torch.from_numpy(store.tokens(np.flatnonzero(ctx == ctx[row])).astype(np.int64))[None]
    dest = int(store.positions([row])[0])
    model = load_model(str(induction_run / "model"), device="cpu")
    assert isinstance(model, HookedTransformer)  # a saved saelab model
    found = direct_feature_attribution(model, SAE.load(entry.path).eval(), tokens, latents=[latent])
    assert figure["data"][0]["x"] == ["L1H0"]
    assert figure["data"][0]["y"] == pytest.approx(found.per_head[0, dest, :, 0].tolist(), rel=1e-5)
    assert figure["data"][1]["y"] == pytest.approx(f["dfa_heads"][f["top_rows"] >= 0].mean(0).tolist(), rel=1e-5)


@pytest.mark.browser
def test_the_dfa_chart_and_the_source_highlighting_render(driver, server, entry, latent, induction_run):
    visit(driver, f"{server}/feature?hook={HOOK}&sae={entry.variant}&id={latent}", "#feature-page")
    wait_for(driver, "#dfa-heads .main-svg")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#dfa-heads .barlayer .point")) == 2  # one head, two bars
    rows = driver.find_elements(By.CSS_SELECTOR, "[data-testid=dfa-sources] .example")
    assert len(rows) == DFA_EXAMPLES
    shaded = rows[0].find_elements(By.CSS_SELECTOR, ".tok")
    assert all("attribution" in t.get_attribute("title") for t in shaded)
    sources = FeatureStore.open(RunDir(induction_run).analysis(HOOK, entry.variant)).feature(latent)["dfa_sources"]
    strongest = max(shaded, key=alpha)
    assert alpha(strongest) == pytest.approx(0.9, abs=0.01)  # the strongest source of the five examples: full shade
    assert strongest.get_attribute("title").endswith(f"attribution {sources[0][np.abs(sources[0]).argmax()]:.3f}")


@pytest.mark.browser
def test_the_heads_page_shows_composition_heatmaps_top_pairs_and_the_census(driver, server, written):
    visit(driver, f"{server}/heads", "#heads-page")
    for mode in "QKV":
        wait_for(driver, f"#composition-{mode} .main-svg")
        assert driver.find_elements(By.CSS_SELECTOR, f"#composition-{mode} .heatmaplayer image")
    rows = driver.find_elements(By.CSS_SELECTOR, "#top-pairs tbody tr")
    pairs = written.scores.top_pairs(heads_page.TOP_PAIRS)
    assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == [p.mode for p in pairs] == ["K", "Q", "V"]
    assert rows[0].find_elements(By.TAG_NAME, "td")[3].text == f"{pairs[0].score:.3f}"
    census = driver.find_elements(By.CSS_SELECTOR, "[data-testid=census]")
    assert len(census) == 2 and "L1H0" in census[1].text and "blocks.1.attn.hook_z" in census[1].text
    links = census[1].find_elements(By.CSS_SELECTOR, "a")
    assert len(links) == heads_page.SHOWN_LATENTS and "/feature?hook=blocks.1.attn.hook_z" in links[0].get_attribute(
        "href"
    )


def test_the_heads_page_refuses_a_dictionary_that_is_not_on_attn_hook_z(induction_run, written):
    page = heads_page.layout(str(induction_run), {"hook": "blocks.0.hook_resid_post", "sae": "topk"})
    shown = str(page.children)  # the error box (`components.error_box`)
    assert page.className == "error"
    assert "not attention heads" in shown and "blocks.1.attn.hook_z/" in shown and "train one there" in shown


def test_the_dfa_card_says_why_an_analysis_has_no_dfa_panels(induction_run, entry, latent, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(induction_run, run, ignore=shutil.ignore_patterns("circuits", "steering", "heads"))
    analyze(run, AnalysisConfig(dfa=False), progress=False)
    card = by_id(feature_page(str(run), HOOK, entry.variant, str(latent)), "dfa")
    assert "Not computed: turned off (`dfa: false` in the analysis config)" in str(card)


@pytest.mark.browser
def test_the_heads_page_shows_a_head_circuit_with_runtimes_and_agreement(driver, server, model, induction_run):
    """A head circuit written into the run (`saelab heads CONFIG`'s result) shows as a ranking table (scores, their
    p-values against chance, patching drops) with both methods' runtimes and their agreement."""
    found = head_circuit(model, induction_task(model, n=8, length=10, seed=3), DiscreteConfig(steps=50))
    found.save(RunDir(induction_run).heads("induction_heads"))
    visit(driver, f"{server}/heads", "#heads-page")
    (card,) = driver.find_elements(By.CSS_SELECTOR, "[data-testid=head-circuit]")
    rows = card.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows] == found.ranking()
    top = found.heads.index(found.ranking()[0])
    cells = [td.text for td in rows[0].find_elements(By.TAG_NAME, "td")]
    assert cells[2:4] == [f"{found.p_values[top]:.3f}", f"{found.effects[top]:.3f}"], cells
    assert f"Pearson {found.pearson:.3f}" in card.text and f"patching {found.patching_seconds:.2f} s" in card.text
