"""The Evals page over a run written here (no training: `metrics.json` and eval results as `saelab eval` writes
them): the table, its links to the feature pages the numbers come from, intervals across seeds, a config of one seed
that shows none and says so, the Pareto fronts; in headless Chromium."""

from __future__ import annotations

import json

import pytest
from selenium.webdriver.common.by import By

from saelab.dashboards.pages import evals as page
from saelab.evals.intervals import ONE_SEED, t_interval
from saelab.evals.run_evals import HedgingResult
from saelab.evals.sparse_probing import KProbe, LabelProbes, SparseProbingResult, TaskProbes
from saelab.evals.table import run_table, write_run_by_config
from saelab.run import SAE_CONFIG, RunDir
from saelab.train.sweep import read_results
from tests.dashboards.helpers import Server, screenshot, visit, wait_for, wait_text

HOOK = "blocks.0.hook_resid_post"
# (k, width, seed, l0, fvu, k=1 accuracy, hedging rate): three seeds of k8 w64, one seed of k16 w128
SAES = [(8, 64, 0, 8.0, 0.30, 0.80, 0.10), (8, 64, 1, 8.0, 0.32, 0.90, 0.20), (8, 64, 2, 8.0, 0.31, 0.85, 0.15)]
SAES.append((16, 128, 0, 16.0, 0.20, 0.95, 0.05))


def variant(k: int, width: int, seed: int) -> str:
    return f"topk-k{k}-w{width}-lr0.001-s{seed}"


def write_run(root) -> RunDir:
    run = RunDir(root)
    for k, width, seed, l0, fvu, acc, rate in SAES:
        name = variant(k, width, seed)
        folder = run.sae(HOOK, name)
        folder.mkdir(parents=True)
        (folder / SAE_CONFIG).write_text("{}")
        row = {"hook": HOOK, "arch": "topk", "k": k, "width": width, "lr": 0.001, "seed": seed, "tokens": 1000}
        run.sae_metrics(HOOK, name).write_text(json.dumps(row | {"l0": l0, "fvu": fvu, "mse": fvu / 10}))
        latent = 3 + seed  # the 1-sparse probe's latent
        probe = KProbe(1, [latent], acc, acc, acc - 0.05, acc + 0.05)
        raw = KProbe(1, [0], 0.6, 0.6, 0.55, 0.65)
        task = TaskProbes("package", "document", [LabelProbes("asyncio", 40, 10, [probe], [raw])])
        SparseProbingResult(HOOK, name, [task]).save(run.eval_result(HOOK, name, "sparse_probing"))
        per = [0.0] * width
        per[7] = rate * 2
        HedgingResult(HOOK, name, rate, per, [0.0] * width, [0.0] * width, [1.0] * width, 0.01).save(
            run.eval_result(HOOK, name, "hedging")
        )
    return run


@pytest.fixture(scope="module")
def evals_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("evals") / "run")


@pytest.fixture(scope="module")
def evals_server(evals_run):
    srv = Server(evals_run.root)
    yield srv.url
    srv.close()


def test_table_and_results_by_config_hold_the_seeds_intervals(evals_run):
    table = run_table(evals_run.root)
    # sorted by variant: k16's one seed first, then k8's three
    assert [d.headlines["probing:package"].latents for d in table] == [[3], [3], [4], [5]]
    assert [d.headlines["hedging"].latents for d in table] == [[7]] * 4
    rows = read_results(write_run_by_config(evals_run.root))
    assert [r["n_seeds"] for r in rows] == ["1", "3"]
    hand = t_interval([0.80, 0.90, 0.85])  # mean 0.85, s 0.05, t(0.975, 2) 4.302653: half 0.124207
    assert float(rows[1]["probing:package_low"]) == pytest.approx(0.85 - 4.302652729911275 * 0.05 / 3**0.5)
    assert float(rows[1]["probing:package_high"]) == pytest.approx(hand.high)
    assert (rows[0]["probing:package_mean"], rows[0]["probing:package_low"], rows[0]["hedging_high"]) == (
        "0.95",
        "",
        "",
    )


def test_no_results_say_which_command_makes_them(tmp_path):
    run = RunDir(tmp_path / "run")
    folder = run.sae(HOOK, "a")
    folder.mkdir(parents=True)
    (folder / SAE_CONFIG).write_text("{}")
    assert "saelab eval" in str(page.layout(str(run.root), {}))


@pytest.mark.browser
def test_page_shows_numbers_intervals_fronts_and_links_to_feature_pages(driver, evals_server, tmp_path):
    visit(driver, f"{evals_server}/evals", "#evals-table")
    rows = driver.find_elements(By.CSS_SELECTOR, "#evals-table tr")
    assert len(rows) == 1 + len(SAES)
    assert "0.95" in rows[1].text and "0.05" in rows[1].text  # k16's accuracy and hedging rate
    configs = driver.find_element(By.CSS_SELECTOR, "#configs").text
    hand = t_interval([0.80, 0.90, 0.85])
    assert f"[{hand.low:.4g}, {hand.high:.4g}]" in configs  # the k8 config's three seeds
    assert ONE_SEED in configs  # the k16 config's one seed, with no interval
    assert "1 of 2 configs were trained with one seed" in driver.find_element(By.CSS_SELECTOR, "#seed-note").text
    single = driver.find_elements(By.CSS_SELECTOR, "#configs tr")[1]
    assert single.find_elements(By.CSS_SELECTOR, ".interval") == []
    wait_for(driver, "#front-probing-package-l0 .main-svg")
    wait_for(driver, "#front-hedging-width .main-svg")
    assert screenshot(driver, tmp_path / "evals.png").stat().st_size > 20_000
    link = rows[3].find_element(By.LINK_TEXT, "0.9")  # seed 1's k=1 accuracy: its probe's latent, #4
    link.click()
    wait_text(driver, "#page", variant(8, 64, 1))  # the feature page (this run has no analysis: it says so)
    assert "id=4" in driver.current_url and f"sae={variant(8, 64, 1)}" in driver.current_url
