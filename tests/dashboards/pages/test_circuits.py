"""The circuits page in headless Chromium, over the induction run (`induction_run` fixture) with a circuit found
by saelab.circuits on 8 sequences and checked on 64 fresh ones, with its head x position grouped circuit: the graph,
its threshold sliders, the faithfulness curve, the found-on and held-out figures, and clicks into feature pages."""

from __future__ import annotations

import dataclasses

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from saelab.circuits import INDUCTION_HOOKS, find_circuit, induction_task
from saelab.circuits.groups import grouping
from saelab.circuits.spread import at_size
from saelab.dashboards.pages import circuits as page
from saelab.dictionaries import SAE
from saelab.errors import RunError
from saelab.models import load_model
from saelab.run import RunDir
from tests.dashboards.helpers import Server, screenshot, visit, wait_for, wait_text

NAME = "browser"


@pytest.fixture(scope="module")
def circuit(induction_run):
    """An induction circuit with held-out figures and a head x position grouped circuit, as RUN/circuits/browser.json."""
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


def shown_points(driver) -> int:
    """Node markers drawn in the circuit graph (edges are lines and draw none)."""
    return len(driver.find_elements(By.CSS_SELECTOR, "#circuit-graph .scatterlayer path.point"))


def slide_to_end(driver, slider: str, left_steps: int = 0) -> float:
    """Move a slider to its maximum and `left_steps` steps back with the keyboard; return its value."""
    handle = driver.find_element(By.CSS_SELECTOR, f"#{slider} [role=slider]")
    handle.click()
    handle.send_keys(Keys.END, *[Keys.ARROW_LEFT] * left_steps)
    return float(handle.get_attribute("aria-valuenow"))


@pytest.mark.browser
def test_page_draws_every_node_and_the_faithfulness_curve(driver, server, circuit, tmp_path):
    visit(driver, f"{server}/circuits?name={NAME}", "#circuit-graph .scatterlayer path.point")
    wait_text(
        driver,
        "#circuit-count",
        f"showing {len(circuit.nodes)} of {len(circuit.nodes)} nodes and "
        f"{len(circuit.edges)} of {len(circuit.edges)} edges",
    )
    assert shown_points(driver) == len(circuit.nodes)
    ticks = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#circuit-graph .ytick text")]
    assert ticks == INDUCTION_HOOKS
    curve_points = driver.find_elements(By.CSS_SELECTOR, "#circuit-curve .scatterlayer path.point")
    assert len(curve_points) == 2 * sum(n > 0 for n in circuit.curves["n"])
    assert "Circuit: browser" in driver.find_element(By.CSS_SELECTOR, "#circuits-page h2").text
    assert screenshot(driver, tmp_path / "circuits.png").stat().st_size > 20_000


@pytest.mark.browser
def test_threshold_sliders_filter_nodes_and_edges(driver, server, circuit):
    visit(driver, f"{server}/circuits?name={NAME}", "#circuit-graph .scatterlayer path.point")
    for steps in (0, 60):
        value = slide_to_end(driver, "circuit-node-threshold", steps)
        expected = sum(abs(n.effect) >= value for n in circuit.nodes)
        assert 0 < expected < len(circuit.nodes)
        wait_text(driver, "#circuit-count", f"showing {expected} of {len(circuit.nodes)} nodes")
        assert shown_points(driver) == expected
    driver.find_element(By.CSS_SELECTOR, "#circuit-node-threshold [role=slider]").send_keys(Keys.HOME)
    wait_text(driver, "#circuit-count", f"showing {len(circuit.nodes)} of")
    value = slide_to_end(driver, "circuit-edge-threshold")
    assert value == pytest.approx(max(abs(e.weight) for e in circuit.edges))
    wait_text(driver, "#circuit-count", f"and 1 of {len(circuit.edges)} edges")
    assert shown_points(driver) == len(circuit.nodes)


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


@pytest.mark.browser
def test_clicking_a_latent_opens_its_feature_page(driver, server, circuit):
    visit(driver, f"{server}/circuits?name={NAME}", "#circuit-graph .scatterlayer path.point")
    slide_to_end(driver, "circuit-node-threshold", 50)  # nodes with half the top |effect| or more: none hides another
    wait_text(driver, "#circuit-count", "showing")
    point = driver.execute_script("""
        const graph = document.querySelector('#circuit-graph .js-plotly-plot');
        const trace = graph.data.findIndex(d => d.name === 'latents');
        return document.querySelectorAll('#circuit-graph .scatterlayer .trace')[trace].querySelector('path.point');""")
    ActionChains(driver).move_to_element(point).click().perform()
    node = next(n for n in circuit.nodes if n.latent != "err")  # the first point of the latents is the strongest
    wait_text(driver, "#page", f"Feature #{node.latent}")
    assert f"hook={node.hook}" in driver.current_url and f"id={node.latent}" in driver.current_url
    wait_for(driver, "#feature-page [data-testid=top-examples] .example")


def test_clicks_map_to_feature_pages_or_say_why_not(induction_run, circuit):
    node = next(n for n in circuit.nodes if n.latent != "err")
    variant = next(s.variant for s in RunDir(induction_run).saes() if s.hook == node.hook)
    url = page.node_link(str(induction_run), circuit, node.hook, node.latent)
    assert url == f"/feature?hook={node.hook}&sae={variant}&id={node.latent}"
    with pytest.raises(RunError, match="error node"):
        page.node_link(str(induction_run), circuit, node.hook, "err")
    elsewhere = dataclasses.replace(circuit, saes={h: "/elsewhere/topk-x" for h in circuit.saes})
    with pytest.raises(RunError, match="not in this run's saes/ folder"):
        page.node_link(str(induction_run), elsewhere, node.hook, node.latent)


@pytest.mark.browser
def test_missing_circuits_say_which_command_makes_them(driver, server, induction_run, tmp_path):
    visit(driver, f"{server}/circuits?name=nope", ".error")
    assert f"has no circuit 'nope'. It has: {NAME}" in driver.find_element(By.CSS_SELECTOR, ".error").text
    empty = tmp_path / "empty-run"
    empty.mkdir()
    message = str(page.layout(str(empty), {}).children)
    assert "No circuits in" in message and "saelab circuit CONFIG.yaml" in message
    broken = RunDir(empty).circuit("broken")
    broken.parent.mkdir()
    broken.write_text("{not json")
    assert "is not a saelab circuit" in str(page.layout(str(empty), {"name": "broken"}).children)
