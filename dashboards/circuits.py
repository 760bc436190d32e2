"""Moved: the circuits page is `saelab.dashboards.pages.circuits`, its figures `saelab.plots` (`graph_figure`,
`curve_figure`), and the circuit loaders `saelab.dashboards.data`. This module re-exports their names for this
release."""

from __future__ import annotations

from saelab.dashboards.data import circuit_names, load_circuit
from saelab.dashboards.pages.circuits import layout as circuits_page
from saelab.dashboards.pages.circuits import node_link, register
from saelab.plots import EDGE_WIDTHS, SPREAD, curve_figure, graph_figure

__all__ = [
    "EDGE_WIDTHS",
    "SPREAD",
    "circuit_names",
    "circuits_page",
    "curve_figure",
    "graph_figure",
    "load_circuit",
    "node_link",
    "register",
]
