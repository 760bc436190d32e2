"""Moved: the absorption page is `saelab.dashboards.pages.absorption`, its sweep figure
`saelab.plots.absorption_sweep_figure`, and the result loaders `saelab.dashboards.data` (`absorption_keys`,
`load_absorption`). This module re-exports them under their old names for this release."""

from __future__ import annotations

from saelab.dashboards.data import absorption_keys as result_keys
from saelab.dashboards.data import load_absorption as load_result
from saelab.dashboards.pages.absorption import MAX_CASES, absorbing, case_table, label_table
from saelab.dashboards.pages.absorption import layout as absorption_page
from saelab.plots import absorption_sweep_figure as sweep_figure

__all__ = [
    "MAX_CASES",
    "absorbing",
    "absorption_page",
    "case_table",
    "label_table",
    "load_result",
    "result_keys",
    "sweep_figure",
]
