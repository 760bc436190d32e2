"""The graph page over a run holding the MLP toy's attribution graph (`saelab graph`): its scores, the layer x
position figure and the table of edges with the head that carries each, in headless Chromium; a run without graphs
gets an error naming the command that computes one; the graph's faithfulness on its prompt and held out."""

from __future__ import annotations

import json

import plotly.utils
import pytest
from selenium.webdriver.common.by import By

from saelab.circuits.graph_file import GraphFile, graph_run
from saelab.dashboards.pages import graph as graph_page
from saelab.run import RunDir
from saelab.toys.attribution import mlp_graph_run
from tests.dashboards.helpers import Server, components, errors, text, visit, wait_for


@pytest.fixture(scope="module")
def graph_run_dir(tmp_path_factory):
    root = mlp_graph_run(tmp_path_factory.mktemp("graph_page"))
    graph_run(root, "CDADCEC", name="toy", held_out=["CEAECDC", "DDACCED", "ECAEEDD"])
    return root


def rendered(component) -> dict:
    """A layout as the browser receives it (JSON, parsed)."""
    return json.loads(json.dumps(component, cls=plotly.utils.PlotlyJSONEncoder))


@pytest.fixture(scope="module")
def server(graph_run_dir):
    srv = Server(graph_run_dir)
    yield srv.url
    srv.close()


def test_the_graph_layout_lists_the_known_edge_with_its_head(graph_run_dir):
    page = rendered(graph_page.layout(str(graph_run_dir), {"name": "toy"}))
    shown = text(page)
    found = GraphFile.load(RunDir(graph_run_dir).graph("toy"))
    assert f"{found.replacement:.3f}" in shown
    assert "L0/0@3" in shown and "L1.H0 100%" in shown
    checked = found.faithfulness
    assert checked is not None and checked.held_out is not None and checked.held_out["examples"] == 3
    card = text(next(x for x in components(page) if x["props"].get("id") == "graph-faithfulness"))
    assert "held out" in card and f"{checked.held_out['faithfulness'][0]:.4g}" in card and "by position" in card


def test_a_graph_saved_without_its_faithfulness_says_how_to_measure_it(graph_run_dir):
    old = GraphFile.load(RunDir(graph_run_dir).graph("toy"))
    old.faithfulness, old.name = None, "old"
    old.save(RunDir(graph_run_dir).graph("old"))
    page = rendered(graph_page.layout(str(graph_run_dir), {"name": "old"}))
    card = text(next(x for x in components(page) if x["props"].get("id") == "graph-faithfulness"))
    assert "saved without its faithfulness" in card and "saelab graph" in card


def test_a_run_without_graphs_names_the_command(tmp_path):
    (tmp_path / "saes").mkdir()
    assert any("saelab graph" in e for e in errors(rendered(graph_page.layout(str(tmp_path), {}))))


@pytest.mark.browser
def test_the_graph_page_draws_the_graph_and_its_edges(driver, server):
    visit(driver, f"{server}/graph?name=toy", "#graph-page")
    wait_for(driver, "#graph-figure .main-svg")
    assert driver.find_elements(By.CSS_SELECTOR, "#graph-figure .scatterlayer .trace")
    rows = driver.find_elements(By.CSS_SELECTOR, "#graph-edges tbody tr")
    cells = [[td.text for td in r.find_elements(By.TAG_NAME, "td")] for r in rows]
    assert ["L0/0@3", "L1/0@7"] in [row[:2] for row in cells]
    known = next(row for row in cells if row[:2] == ["L0/0@3", "L1/0@7"])
    assert known[3].startswith("L1.H0")
    shown = [r.text for r in driver.find_elements(By.CSS_SELECTOR, "#graph-faithfulness tbody tr")]
    assert [row.split()[:2] for row in shown] == [["on", "its"], ["held", "out"]]
