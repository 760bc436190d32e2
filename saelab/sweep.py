"""Moved to `saelab.train.sweep`; this module re-exports it for this release."""

from __future__ import annotations

from saelab.train.sweep import COLUMNS, pareto_figure, read_results, write_results, write_sweep_outputs

__all__ = ["COLUMNS", "pareto_figure", "read_results", "write_results", "write_sweep_outputs"]
