"""The families page and the family card of the feature page in headless Chromium, over the tiny decoder's analysed
run (`decoder_run`) with its SAE's feature families computed by `saelab eval --only families`."""

from __future__ import annotations

import numpy as np
import pytest
from selenium.webdriver.common.by import By

from saelab.absorption import AbsorptionResult
from saelab.absorption.scoring import Case, LabelScore
from saelab.dashboards.pages import families as page
from saelab.evals.families import FamiliesResult
from saelab.evals.run_evals import EvalSettings, HedgingResult, run_evals
from saelab.run import RunDir
from tests.dashboards.helpers import Server, screenshot, visit, wait_for, wait_text


@pytest.fixture(scope="module")
def found(decoder_run) -> FamiliesResult:
    """The families of the run's SAE over its 4k rows."""
    (result, _), *_ = run_evals(decoder_run, settings=EvalSettings(only=("families",))).written
    assert isinstance(result, FamiliesResult)
    return result


@pytest.fixture(scope="module")
def families_server(decoder_run, found):
    srv = Server(decoder_run)
    yield srv.url
    srv.close()


def test_the_run_has_families(found):
    assert found.links and found.families, found.summary()
    assert all(len(f.children) >= 2 for f in found.families)


@pytest.mark.browser
def test_page_lists_families_and_a_parent_opens_its_feature_page_with_its_children(
    driver, families_server, found, tmp_path
):
    visit(driver, f"{families_server}/families", "#families-table")
    members = {f.parent for f in found.families} | {i for f in found.families for i in f.descendants}
    live = sum(n >= 5 for n in found.counts)
    children = sorted(len(f.children) for f in found.families)
    values = [v.text for v in driver.find_elements(By.CSS_SELECTOR, "#families-headline .value")]
    assert values == [
        str(len(found.families)),
        f"{len(members)} of {live} live",
        f"median {float(np.median(children)):g}",
        f"{len(found.families[0].descendants)} below its parent",
    ]
    assert 0 < len(members) < live  # families hold part of the dictionary; the forest's links reach nearly all of it
    rows = driver.find_elements(By.CSS_SELECTOR, "#families-table tr")
    assert len(rows) == 1 + min(len(found.families), page.MAX_FAMILIES)
    largest = found.families[0]
    assert rows[1].find_elements(By.TAG_NAME, "td")[0].text == f"#{largest.parent}"
    assert f"{len(largest.descendants)}" == rows[1].find_elements(By.TAG_NAME, "td")[3].text
    assert screenshot(driver, tmp_path / "families.png").stat().st_size > 10_000
    rows[1].find_element(By.LINK_TEXT, f"#{largest.parent}").click()
    wait_text(driver, "#page", f"Feature #{largest.parent}")
    card = wait_for(driver, "#family-links")
    assert "none (a root)" in card.text or "contains" in card.text
    assert f"children ({len(largest.children)})" in card.text
    shown = [a.text.split()[0] for a in card.find_elements(By.CSS_SELECTOR, ".chip a")]
    assert [f"#{i}" for i in largest.children] == shown[-len(largest.children) :]
    card.find_element(
        By.LINK_TEXT, f"#{largest.children[0]} in {found.children_of(largest.parent)[0].containment:.2f}"
    ).click()
    wait_text(driver, "#page", f"Feature #{largest.children[0]}")
    assert f"#{largest.parent} contains" in wait_for(driver, "#family-links").text


@pytest.mark.browser
def test_the_family_card_shows_the_latents_hedging_and_absorption_evidence(driver, families_server, decoder_run, found):
    run = RunDir(decoder_run)
    width = len(found.counts)
    parent, child = found.families[0].parent, found.families[0].children[0]
    per = [0.0] * width
    per[parent] = 0.375
    HedgingResult(found.hook, found.variant, 0.125, per, per, per, [0.5] * width, 0.01).save(
        run.eval_result(found.hook, found.variant, "hedging")
    )
    case = Case("ab", 1.0, [0.0], [[float(child), 1.0, 0.5, 0.5]], [], 0.9, False)
    label = LabelScore("a", 0.9, [parent], [0.9], 10, 5, 0.5, 0.1, 1, True, [case])
    AbsorptionResult(
        found.hook, found.variant, "", "m", "first_letter", width, 8.0, [label], 0.5, 0.1, 1.0, 1, False
    ).save(run.absorption(found.hook, found.variant))
    try:
        visit(
            driver, f"{families_server}/feature?hook={found.hook}&sae={found.variant}&id={parent}", "#latent-evidence"
        )
        text = driver.find_element(By.CSS_SELECTOR, "#latent-evidence").text
        assert "hedging rate 0.375 (the SAE's 0.125; decoder cosine to the control 0.50)" in text
        assert "the split latent of 'a'" in text
        visit(driver, f"{families_server}/feature?hook={found.hook}&sae={found.variant}&id={child}", "#latent-evidence")
        assert "absorbs cases of 'a'" in driver.find_element(By.CSS_SELECTOR, "#latent-evidence").text
    finally:
        run.eval_result(found.hook, found.variant, "hedging").unlink()
        run.absorption(found.hook, found.variant).unlink()


@pytest.mark.browser
def test_a_feature_page_without_families_says_how_to_compute_them(driver, families_server, decoder_run, found):
    path = RunDir(decoder_run).eval_result(found.hook, found.variant, "families")
    saved = path.read_text()
    path.unlink()
    try:
        visit(driver, f"{families_server}/feature?hook={found.hook}&sae={found.variant}&id=0", "#family")
        assert "saelab eval RUN --only families" in driver.find_element(By.CSS_SELECTOR, "#family").text
        visit(driver, f"{families_server}/families", ".error")
        assert "--only families" in driver.find_element(By.CSS_SELECTOR, ".error").text
    finally:
        path.write_text(saved)


@pytest.mark.browser
def test_evals_page_of_a_trained_run_of_one_seed_links_the_largest_family_and_shows_no_interval(
    driver, families_server, decoder_run, found
):
    visit(driver, f"{families_server}/evals", "#evals-table")
    (row,) = driver.find_elements(By.CSS_SELECTOR, "#evals-table tr")[1:]
    assert "1 of 1 configs were trained with one seed" in driver.find_element(By.CSS_SELECTOR, "#seed-note").text
    assert driver.find_elements(By.CSS_SELECTOR, "#configs .interval") == []
    row.find_element(By.LINK_TEXT, str(len(found.families))).click()  # the headline: how many families
    wait_text(driver, "#page", f"Feature #{found.families[0].parent}")
    by_config = RunDir(decoder_run).sweep_by_config.read_text().splitlines()
    assert by_config[1].split(",")[6] == "1" and "families_low" in by_config[0]  # n_seeds 1, no interval
