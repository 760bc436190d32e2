"""The search page in headless Chromium: latents by token, and a feature opened by its id."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

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
