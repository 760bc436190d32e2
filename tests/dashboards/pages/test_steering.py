"""The steering page in headless Chromium, over two small runs made here: a decoder run (the tiny decoder, a TopK SAE
on blocks.0.hook_resid_post, its analysis) and a MiniLM run (an SAE on blocks.1.hook_resid_post, no analysis, so
the latent's scale is measured on the store). What the page shows must be what saelab.steering computes."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from saelab import steering as st
from saelab.dashboards.data import list_saes
from saelab.dashboards.live import load_sae, run_model
from saelab.dashboards.pages import steering as page
from saelab.toys.runs import small_run
from tests.dashboards.helpers import Server, go, screenshot, visit, wait_for

PROMPT = "Return the absolute value of a number"
QUERY = "Open a network connection to a host."


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory):
    return small_run(tmp_path_factory.mktemp("steer-enc"), "minilm", "blocks.1.hook_resid_post", k=16, analysed=False)


@pytest.fixture(scope="module")
def servers(decoder_run, encoder_run):
    made = {name: Server(run) for name, run in (("decoder", decoder_run), ("encoder", encoder_run))}
    yield {name: srv.url for name, srv in made.items()}
    for srv in made.values():
        srv.close()


def url(run, latent, text, **params) -> str:
    sae = list_saes(str(run))[0]
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return f"/steering?hook={sae.hook}&sae={sae.variant}&latent={latent}&{query}&text={quote(text)}"


def expected(run, latent: int, mode: st.Mode, coef: float, scope: st.Scope = "all"):
    sae_info = list_saes(str(run))[0]
    sae = load_sae(str(sae_info.path))
    scale, source = st.run_scale(str(run), sae_info.path, sae, latent=latent, hook=sae_info.hook)
    return st.Intervention(sae_info.hook, sae, [latent], mode, coef, scale, scope), source


@pytest.mark.browser
def test_decoder_page_shows_steered_and_unsteered_generations(driver, servers, decoder_run, tmp_path):
    iv, source = expected(decoder_run, 3, "add", 8.0, "generated")
    assert source == "analysis"
    visit(
        driver,
        servers["decoder"] + url(decoder_run, 3, PROMPT, mode="add", coef=8, scope="generated"),
        "#steer-steered",
        timeout=60,
    )
    model = run_model(str(decoder_run))
    want = st.compare(model, PROMPT, [iv], max_new_tokens=page.MAX_NEW_TOKENS)
    assert want.steered != want.unsteered
    assert driver.find_element(By.ID, "steer-unsteered").text == (PROMPT + want.unsteered).strip()
    assert driver.find_element(By.ID, "steer-steered").text == (PROMPT + want.steered).strip()
    n = st.prompt_tokens(model, PROMPT).shape[1]
    metrics = st.steered_metrics(
        model, st.generate(model, PROMPT, [iv], max_new_tokens=page.MAX_NEW_TOKENS), n, intervention=iv
    )
    stats = driver.find_element(By.ID, "steer-stats").text
    assert f"{metrics.kl:.4g}" in stats and f"{iv.scale:.4g} (analysis)" in stats
    assert screenshot(driver, tmp_path / "steering-decoder.png").stat().st_size > 20_000


@pytest.mark.browser
def test_the_form_opens_a_shareable_url(driver, servers, decoder_run):
    visit(driver, servers["decoder"] + url(decoder_run, 5, "", mode="clamp")[: -len("&text=")], "#steer-text")
    assert not driver.find_elements(By.ID, "steer-steered")
    driver.find_element(By.ID, "steer-text").send_keys(PROMPT)
    coef = driver.find_element(By.ID, "steer-coef")
    coef.send_keys(Keys.CONTROL, "a", Keys.DELETE)
    coef.send_keys("-2")
    driver.find_element(By.ID, "steer-go").click()
    wait_for(driver, "#steer-steered", timeout=60)
    assert "latent=5" in driver.current_url and "mode=clamp" in driver.current_url and "coef=-2" in driver.current_url
    assert "text=Return+the+absolute" in driver.current_url
    iv, _ = expected(decoder_run, 5, "clamp", -2.0)
    want = st.compare(run_model(str(decoder_run)), PROMPT, [iv], max_new_tokens=page.MAX_NEW_TOKENS)
    assert driver.find_element(By.ID, "steer-steered").text == (PROMPT + want.steered).strip()


@pytest.mark.browser
def test_encoder_page_shows_the_querys_neighbours_before_and_after(driver, servers, encoder_run, tmp_path):
    iv, source = expected(encoder_run, 7, "add", 6.0)
    docs, corpus = page._corpus(str(encoder_run), iv.hook)  # a store of one model: the array is the hook point
    model = run_model(str(encoder_run))
    assert source == "measured"
    found = st.search(model, QUERY, corpus, [iv], k=10)
    assert found.entered
    acts = page._doc_acts(str(encoder_run), iv.hook, str(list_saes(str(encoder_run))[0].path))[:, 7]
    assert acts[[i for i, _ in found.after]].mean() > 2 * acts[[i for i, _ in found.before]].mean()  # toward the latent
    visit(driver, servers["encoder"] + url(encoder_run, 7, QUERY, mode="add", coef=6), "#steer-after", timeout=120)
    for table, pairs in (("steer-before", found.before), ("steer-after", found.after)):
        rows = driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")
        assert [int(r.get_attribute("data-doc")) for r in rows] == [i for i, _ in pairs]
        assert rows[0].text.startswith(f"1 {pairs[0][1]:.3f}")
    assert f"new neighbours\n{len(found.entered)}" in driver.find_element(By.ID, "steer-stats").text.lower()
    assert not driver.find_element(By.ID, "steer-scope").is_displayed()  # encoders have no generated tokens
    assert screenshot(driver, tmp_path / "steering-encoder.png").stat().st_size > 20_000


@pytest.mark.browser
def test_bad_requests_show_a_message(driver, servers, decoder_run):
    visit(driver, servers["decoder"] + "/steering", "#steer-text")
    cases = {
        url(decoder_run, 99999, PROMPT): "Feature 99999 does not exist: this SAE has 128 latents",
        url(decoder_run, 3, PROMPT, coef="abc"): "The coefficient 'abc' is not a number",
        url(decoder_run, 3, PROMPT, mode="boost"): "There is no steering mode 'boost'",
        url(decoder_run, 3, PROMPT, scope="middle"): "There is no scope 'middle'",
        url(decoder_run, 3, " "): "the prompt is empty",
        url(decoder_run, 3, "word " * 80): "exceed the model's context of 64",
        "/steering?hook=nope&sae=nope": "The run has no SAE nope/nope",
    }
    for path, text in cases.items():
        go(driver, path, text)
        assert driver.find_elements(By.CSS_SELECTOR, "#page .error")
