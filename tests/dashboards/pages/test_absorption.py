"""The absorption page in headless Chromium, over the small MiniLM run of the app's tests (`run_dir`) with the
first-letter absorption of its SAE measured by saelab.absorption: scores, the sweep, the label table, the
cases and clicks into feature pages."""

from __future__ import annotations

import dataclasses

import pytest
from selenium.webdriver.common.by import By

from saelab.absorption import AbsorptionResult, AbsorptionSettings, absorption_result, probe_data
from saelab.dashboards.pages import absorption as page
from saelab.dictionaries import SAE
from saelab.plots import absorption_sweep_figure
from saelab.run import RunDir
from tests.dashboards.helpers import HOOK, OTHER, Server, screenshot, visit, wait_for, wait_text

WORDS = 1500


@pytest.fixture(scope="module")
def result(run_dir, minilm):
    """First-letter absorption of the run's SAE over 1500 MiniLM words, saved where the app reads it."""
    folder = next(s.path for s in RunDir(run_dir).saes() if s.hook == HOOK and s.variant != OTHER)
    s = AbsorptionSettings(probe_batch_size=256)
    data = probe_data(minilm, HOOK, max_words=WORDS, s=s)
    found = absorption_result(
        SAE.load(folder).eval(), data, HOOK, variant=folder.name, s=s, sae_path=str(folder), model="minilm"
    )
    found.save(RunDir(run_dir).absorption(HOOK, folder.name))
    return found


@pytest.fixture(scope="module")
def server(run_dir, result):
    srv = Server(run_dir)
    yield srv.url
    srv.close()


def url(base: str, result: AbsorptionResult, **extra: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in {"hook": result.hook, "sae": result.variant, **extra}.items())
    return f"{base}/absorption?{query}"


@pytest.mark.browser
def test_page_shows_scores_sweep_labels_and_cases(driver, server, result, tmp_path):
    visit(driver, url(server, result), "#absorption-labels")
    rows = driver.find_elements(By.CSS_SELECTOR, "#absorption-labels tr")
    assert [r.find_elements(By.TAG_NAME, "td")[0].text for r in rows[1:]] == [lab.label for lab in result.labels]
    busiest = max(result.labels, key=lambda x: (len(x.cases), x.true_positives))
    assert busiest.cases  # the run's SAE absorbs some first letters
    case_rows = driver.find_elements(By.CSS_SELECTOR, "#absorption-cases tr")
    assert len(case_rows) == 1 + min(len(busiest.cases), page.MAX_CASES)
    assert (
        f"{len(busiest.cases)} of {busiest.true_positives} true positives absorbed"
        in driver.find_element(By.CSS_SELECTOR, "#absorption-cases").text
    )
    stats = driver.find_element(By.CSS_SELECTOR, ".stats").text
    assert f"WIDTH\n{result.d_sae}" in stats
    fraction = result.mean_absorption_fraction  # None on MiniLM, whose first-letter probes miss the F1 bar
    assert f"ABSORPTION FRACTION\n{'n/a' if fraction is None else f'{fraction:.4g}'}" in stats
    wait_for(driver, "#absorption-l0 .main-svg")
    assert screenshot(driver, tmp_path / "absorption.png").stat().st_size > 20_000


@pytest.mark.browser
def test_a_label_link_shows_its_cases_and_an_absorber_opens_its_feature_page(driver, server, result):
    lab = next(x for x in sorted(result.labels, key=lambda x: len(x.cases)) if x.cases)  # not the default label
    visit(driver, url(server, result), "#absorption-labels")
    driver.find_element(By.LINK_TEXT, lab.label).click()
    wait_text(driver, "#page", f"Cases of {lab.label!r}")
    assert f"label={lab.label}" in driver.current_url
    case = sorted(lab.cases, key=lambda x: (-x.absorption_fraction, -x.probe_projection))[0]
    latent = int(page.absorbing(case)[0][0])
    driver.find_element(By.CSS_SELECTOR, "#absorption-cases .absorber a").click()
    wait_text(driver, "#page", f"Feature #{latent}")
    assert f"hook={result.hook}" in driver.current_url and f"id={latent}" in driver.current_url
    wait_for(driver, "#feature-page [data-testid=top-examples] .example")


@pytest.mark.browser
def test_bad_requests_say_what_exists(driver, server, result):
    visit(driver, url(server, result, label="zz"), ".error")
    assert f"has no label 'zz'. Labels: {result.labels[0].label}" in driver.find_element(By.CSS_SELECTOR, ".error").text
    visit(driver, f"{server}/absorption?hook={result.hook}&sae=nope", ".error")
    assert (
        f"no absorption result for {result.hook}/nope. It has: {result.hook}/{result.variant}"
        in driver.find_element(By.CSS_SELECTOR, ".error").text
    )


def test_missing_or_broken_results_say_which_command_makes_them(tmp_path, result):
    empty = tmp_path / "run"
    empty.mkdir()
    message = str(page.layout(str(empty), {}).children)
    assert "No absorption results in" in message and "saelab absorption CONFIG.yaml" in message
    broken = RunDir(empty).absorption(HOOK, "broken")
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    assert "is not a saelab absorption result" in str(page.layout(str(empty), {}).children)
    elsewhere = dataclasses.replace(result, variant="elsewhere")
    elsewhere.save(RunDir(empty).absorption(HOOK, "elsewhere"))
    built = str(page.layout(str(empty), {"hook": HOOK, "sae": "elsewhere"}))
    assert "Absorption: " in built and "/feature?" not in built  # no feature pages for SAEs outside the run


def test_sweep_plots_scored_saes_against_l0_and_width(result):
    a = dataclasses.replace(
        result, variant="a", l0=8.0, d_sae=768, mean_absorption_fraction=0.1, mean_full_absorption_rate=0.05
    )
    b = dataclasses.replace(
        a, variant="b", l0=32.0, d_sae=3072, mean_absorption_fraction=0.3, mean_full_absorption_rate=0.2
    )
    unscored = dataclasses.replace(a, variant="c", mean_absorption_fraction=None, mean_full_absorption_rate=None)
    by_l0 = absorption_sweep_figure([a, b, unscored], "l0")
    assert [t["name"] for t in by_l0["data"]] == ["absorption fraction", "full-absorption rate"]
    assert by_l0["data"][0]["x"] == [8.0, 32.0] and by_l0["data"][0]["y"] == [0.1, 0.3]
    assert by_l0["data"][1]["y"] == [0.05, 0.2]
    by_width = absorption_sweep_figure([a, b, unscored], "width")
    assert by_width["data"][0]["x"] == [768, 3072] and by_width["layout"]["xaxis"]["type"] == "log"
