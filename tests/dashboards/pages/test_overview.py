"""The run page in headless Chromium: the run's SAEs, their metrics and the sweep's Pareto plot."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from tests.dashboards.helpers import OTHER, visit, wait_for


@pytest.mark.browser
def test_overview_lists_the_runs_saes_metrics_and_pareto_plot(driver, server, sae):
    table = visit(driver, server + "/", "#sae-table")
    rows = {r.text.split()[1]: r.text for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")}
    assert set(rows) == {sae.variant, OTHER}
    assert f"{sae.metrics['fvu']:.4g}" in rows[sae.variant] and "features" in rows[sae.variant]
    assert "trained on 'gpt2', not 'minilm'" in rows[OTHER]
    assert "8,192" in driver.find_element(By.CSS_SELECTOR, ".stats").text
    wait_for(driver, "#pareto .main-svg")
