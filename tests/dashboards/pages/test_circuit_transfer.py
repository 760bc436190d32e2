"""The circuits page's found-on and held-out figures in headless Chromium, over the induction run with a circuit
found on 8 sequences, checked on 64 fresh ones, with its head-grouped circuit."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from saelab.circuits import INDUCTION_HOOKS, find_circuit, induction_task
from saelab.circuits.groups import grouping
from saelab.circuits.spread import at_size
from saelab.dictionaries import SAE
from saelab.models import load_model
from saelab.run import RunDir
from tests.dashboards.helpers import Server, visit, wait_for

NAME = "transfer"


@pytest.fixture(scope="module")
def circuit(induction_run):
    """An induction circuit with held-out figures and a head x position grouped circuit, as RUN/circuits/transfer.json."""
    model = load_model(str(induction_run / "model"), device="cpu")
    folders = {h: next(s.path for s in RunDir(induction_run).saes() if s.hook == h) for h in INDUCTION_HOOKS}
    saes = {h: SAE.load(f).eval() for h, f in folders.items()}
    task = induction_task(model, n=8)
    found = find_circuit(
        model,
        saes,
        task,
        name=NAME,
        held_out=induction_task(model, n=64, seed=1),
        groups=grouping(model, saes, task, latents="head", positions="position"),
        sae_paths={h: str(f) for h, f in folders.items()},
        progress=False,
    )
    found.save(RunDir(induction_run).circuit(NAME))
    return found


@pytest.fixture(scope="module")
def server(induction_run, circuit):
    srv = Server(induction_run)
    yield srv.url
    srv.close()


@pytest.mark.browser
def test_page_shows_found_on_and_held_out_figures(driver, server, circuit):
    visit(driver, f"{server}/circuits?name={NAME}", "#circuit-transfer-table")
    wait_for(driver, "#circuit-transfer-table tbody tr")
    rows = [
        [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in driver.find_elements(By.CSS_SELECTOR, "#circuit-transfer-table tbody tr")
    ]
    assert [r[0] for r in rows] == [
        "latents, found on",
        "latents, held out",
        "grouped (head x position), found on",
        "grouped (head x position), held out",
    ]
    grouped = circuit.grouped
    assert grouped is not None and grouped.held_out is not None
    held = grouped.held_out["faithfulness"][at_size(grouped.held_out, len(grouped.nodes))]
    assert held >= 0.8
    assert rows[3][1:3] == ["64", str(len(grouped.nodes))] and float(rows[3][3]) == pytest.approx(held, abs=1e-3)
    assert rows[1][1] == "64" and float(rows[1][3]) < 0.5  # the latents alone do not transfer
    assert " to " in rows[3][5] and rows[3][4].startswith("[")
    assert "never fire" in driver.find_element(By.ID, "circuit-transfer").text
