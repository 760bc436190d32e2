"""The search page in headless Chromium: latents by token and by label, and a feature opened by its id."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from saelab.analysis.labels import label_text, search_labels
from tests.dashboards.helpers import visit, wait_for, wait_text


@pytest.mark.browser
def test_search_by_token_and_by_id(driver, server, sae, fs, busy, minilm):
    f = fs.feature(busy)
    token_id = int(f["top_tokens"][0, f["top_tokens"].shape[1] // 2])
    word = minilm.tokenizer.decode([token_id])
    visit(driver, f"{server}/search?hook={sae.hook}&sae={sae.variant}", "#search-token").send_keys(word, Keys.ENTER)
    results = wait_for(driver, "#search-results .card")
    found = [int(a.text.lstrip("#")) for a in results.find_elements(By.CSS_SELECTOR, ".chip a")]
    assert found == fs.search_token(token_id) and busy in found
    assert f"'{word}'" in results.text

    driver.find_element(By.CSS_SELECTOR, "#search-id").send_keys(str(busy))
    driver.find_element(By.CSS_SELECTOR, "#search-id-go").click()
    wait_text(driver, "#feature-page h2", f"Feature #{busy}")


@pytest.mark.browser
def test_search_finds_latents_by_their_label_and_shows_it(driver, server, sae, fs, busy):
    """The busy latent's top label n-gram, typed as text: every latent whose label holds it as words is listed with
    its label (the busy one among them), and one opens its feature page, whose label is the same."""
    tokens, scores = fs.column("label_tokens"), fs.column("label_scores")
    words = label_text(tokens[busy][:1], fs.vocab)[1:-1]
    expected = search_labels(tokens, scores, fs.vocab, words)
    assert busy in expected
    visit(driver, f"{server}/search?hook={sae.hook}&sae={sae.variant}", "#search-token").send_keys(words, Keys.ENTER)
    card = wait_for(driver, "#label-results")
    chips = card.find_elements(By.CSS_SELECTOR, ".chip a")
    assert [int(a.text.split()[0].lstrip("#")) for a in chips] == expected[:100]
    assert [a.text for a in chips] == [f"#{i} {label_text(tokens[i], fs.vocab)}" for i in expected[:100]]
    assert f"Latents by label ({len(expected)})" in card.text or len(expected) > 100
    chips[0].click()
    wait_text(driver, "#feature-page h2", f"Feature #{expected[0]}")
    label = label_text(tokens[expected[0]], fs.vocab, scores=scores[expected[0]])
    assert driver.find_element(By.CSS_SELECTOR, "#feature-label").text == f"label: {label}"

    visit(driver, f"{server}/search?hook={sae.hook}&sae={sae.variant}&q=zzqx", "#label-results")
    assert "no label holds 'zzqx'" in driver.find_element(By.CSS_SELECTOR, "#label-results").text
