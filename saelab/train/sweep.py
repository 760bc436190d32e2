"""Sweep outputs: a results table (CSV), the same grouped by config across seeds with t-intervals
(`results_by_config.csv`, `saelab.evals.intervals`) and a Pareto figure (FVU against L0) as HTML."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import plotly.graph_objects as go

from saelab.evals.intervals import group_by_config, write_by_config
from saelab.run import RunDir

COLUMNS = [
    "hook",
    "arch",
    "k",
    "width",
    "lr",
    "seed",
    "tokens",
    "fvu",
    "mse",
    "l0",
    "dead_frac",
    "dead_frac_eval",
    "dense_frac",
    "ce_loss_score",
    "kl_div_score",
    "stopped",
    "path",
]
METRICS = ["fvu", "mse", "l0", "dead_frac", "dead_frac_eval", "dense_frac", "ce_loss_score", "kl_div_score"]
"""The core metrics of `COLUMNS`, whose means and intervals across seeds `results_by_config.csv` holds."""


def write_results(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """One CSV row per SAE (`TrainedSAE.row()`, or a `metrics.json`), in a fixed column order (empty where a
    metric does not apply)."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_results(path: str | Path) -> list[dict[str, str]]:
    """The rows of a table `write_results` wrote, every value a string (empty where it did not apply)."""
    with Path(path).open() as f:
        return list(csv.DictReader(f))


def pareto_figure(rows: Sequence[Mapping[str, Any]]) -> go.Figure:
    """FVU against L0, one series per (hook, arch, width), points labelled by k, lr and seed (where the row has one:
    tables written before seeds were recorded have none)."""
    fig = go.Figure()
    series: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("fvu") not in (None, ""):
            series.setdefault(f"{r['hook']} {r['arch']} w{r['width']}", []).append(r)
    for name, points in sorted(series.items()):
        points.sort(key=lambda r: float(r["l0"]))
        fig.add_trace(
            go.Scatter(
                x=[float(r["l0"]) for r in points],
                y=[float(r["fvu"]) for r in points],
                mode="lines+markers",
                name=name,
                text=[_label(r) for r in points],
                hovertemplate="%{text}<br>L0=%{x:.1f}<br>FVU=%{y:.4f}<extra>" + name + "</extra>",
            )
        )
    fig.update_layout(
        title="Sparsity-fidelity frontier",
        xaxis_title="L0 (active latents per token)",
        yaxis_title="FVU (1 - explained variance)",
        xaxis_type="log",
        template="plotly_white",
    )
    return fig


def _label(row: Mapping[str, Any]) -> str:
    """A point's hover label: its k, learning rate and seed."""
    seed = row.get("seed")
    return f"k={row['k']} lr={float(row['lr']):.2g}" + ("" if seed in (None, "") else f" seed={seed}")


def write_sweep_outputs(rows: Sequence[Mapping[str, Any]], out: str | Path) -> tuple[Path, Path]:
    """Write the results table, its configs across seeds (`results_by_config.csv`: `METRICS`' means and t-intervals)
    and the Pareto plot of `rows` (`TrainedSAE.row()`s, or `metrics.json`s) into run directory `out`; return the
    table's and the plot's paths."""
    run = RunDir(out).prepare()
    table = write_results(rows, run.sweep_table)
    write_by_config(group_by_config(rows, METRICS), run.sweep_by_config, metrics=METRICS)
    pareto_figure(rows).write_html(str(run.sweep_plot), include_plotlyjs="cdn")
    return table, run.sweep_plot
