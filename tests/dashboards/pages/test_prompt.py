"""The prompt page in headless Chromium: the model and the SAE run live on a typed prompt."""

from __future__ import annotations

import pytest
import torch
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from saelab.analysis.labels import label_text
from saelab.dictionaries import SAE
from saelab.models import capture, resolve_hooks
from tests.dashboards.helpers import HOOK, screenshot, visit, wait_for


@pytest.mark.browser
def test_prompt_runs_model_and_sae_live(driver, server, sae, fs, minilm, tmp_path):
    """Each token's strongest latents, the strongest first, each chip `#id 'label' activation` (the label's first
    n-gram, `saelab.analysis.labels`)."""
    text = "Return the absolute value of a number."
    box = visit(driver, f"{server}/prompt?hook={sae.hook}&sae={sae.variant}", "#prompt-text")
    box.send_keys(text)
    driver.find_element(By.CSS_SELECTOR, "#prompt-go").click()
    rows = wait_for(driver, "#prompt-results .card").find_elements(By.CSS_SELECTOR, "tbody tr")

    ids = minilm.tokenizer(text)["input_ids"]  # [CLS] body [SEP], as the harvest framed contexts
    acts = capture(minilm, torch.tensor([ids]), resolve_hooks(minilm, [HOOK]))[HOOK][0, 1:-1]
    expected = SAE.load(sae.path).encode(acts).argmax(-1).tolist()
    assert len(rows) == len(ids) - 2
    for row, latent in zip(rows, expected):
        links = row.find_elements(By.CSS_SELECTOR, ".chip a")
        label = label_text(fs.feature(latent)["label_tokens"][:1], fs.vocab)
        assert 0 < len(links) <= 5 and links[0].text.startswith(f"#{latent} {label} ") and label.startswith("'")
        assert links[0].get_attribute("href").endswith(f"&id={latent}")  # pyright: ignore[reportOptionalMemberAccess]  (links have an href)
    assert "absolute" in rows[2].text and f"text={text.split()[0]}" in driver.current_url
    png = screenshot(driver, tmp_path / "prompt.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 30_000

    box = driver.find_element(By.CSS_SELECTOR, "#prompt-text")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    driver.find_element(By.CSS_SELECTOR, "#prompt-go").click()
    assert "The prompt is empty" in wait_for(driver, "#prompt-results .error").text
