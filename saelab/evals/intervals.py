"""Confidence intervals across seeds: a sweep that trains several seeds of one config (`grid.seed`) gives each metric
a mean and a Student-t interval over them; a config trained with one seed has a mean and no interval, and says so.

Rows are grouped by everything but the seed (`CONFIG_KEYS`: hook, architecture, k, width, learning rate, tokens);
`results_by_config.csv` (`RunDir.sweep_by_config`, beside `results.csv`) holds one row per config: the config,
`n_seeds`, `seeds`, and for each metric `<metric>_mean`, `<metric>_low`, `<metric>_high` (the last two empty with
one seed)."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from scipy import stats

CONFIG_KEYS = ("hook", "arch", "k", "width", "lr", "tokens")
"""The columns that name a config: a row's every setting but its seed."""
CONFIDENCE = 0.95
"""The intervals' confidence level."""
ONE_SEED = "1 seed: no interval"
"""What a config trained with one seed shows in place of an interval."""


class Interval(NamedTuple):
    """A metric's mean over seeds and its Student-t confidence interval."""

    mean: float
    """The mean over the seeds."""
    low: float | None
    """The interval's lower end; None with one seed (no spread to estimate)."""
    high: float | None
    """Its upper end; None with one seed."""
    n: int
    """The number of seeds."""

    def text(self, digits: int = 4) -> str:
        """`mean [low, high] (n seeds)`, or the mean and `ONE_SEED`."""
        if self.low is None or self.high is None:
            return f"{self.mean:.{digits}g} ({ONE_SEED})"
        return f"{self.mean:.{digits}g} [{self.low:.{digits}g}, {self.high:.{digits}g}] ({self.n} seeds)"


def t_interval(values: Sequence[float], *, confidence: float = CONFIDENCE) -> Interval:
    """The mean of `values` (one per seed) and its two-sided Student-t interval at `confidence`:
    `mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n)`, `s` the sample standard deviation (ddof 1). One value: the
    mean alone (`low`, `high` None). `ValueError` for no values or a non-finite one."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("no values to take an interval over; give one per seed")
    if not np.isfinite(x).all():
        raise ValueError(f"the values {x.tolist()} are not all finite numbers")
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, None, None, 1)
    half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return Interval(mean, mean - half, mean + half, int(x.size))


@dataclass(frozen=True)
class ConfigGroup:
    """The rows of one config (every setting but the seed) and their metrics' intervals."""

    config: dict[str, str]
    """The config's `CONFIG_KEYS`, as the rows give them (strings)."""
    seeds: list[str]
    """The seeds of its rows, in the rows' order ("" for a row that records none)."""
    rows: list[Mapping[str, Any]]
    """Its rows."""
    intervals: dict[str, Interval]
    """Each metric's interval over the rows that have it."""


def number(value: Any) -> float | None:
    """A cell as a finite float, None when it is empty, not a number, or not finite."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def group_by_config(rows: Iterable[Mapping[str, Any]], metrics: Sequence[str]) -> list[ConfigGroup]:
    """`rows` (results.csv rows, metrics.json objects) grouped by `CONFIG_KEYS`, in the order each config first
    appears, each with the t-interval over its rows of every metric of `metrics` that some of them have."""
    groups: dict[tuple[str, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(k, "")) for k in CONFIG_KEYS), []).append(row)
    out = []
    for key, members in groups.items():
        intervals = {}
        for m in metrics:
            values = [v for v in (number(r.get(m)) for r in members) if v is not None]
            if values:
                intervals[m] = t_interval(values)
        seeds = [str(r.get("seed", "")) for r in members]
        out.append(ConfigGroup(dict(zip(CONFIG_KEYS, key)), seeds, members, intervals))
    return out


def write_by_config(groups: Sequence[ConfigGroup], path: str | Path, *, metrics: Sequence[str]) -> Path:
    """`results_by_config.csv`: one row per config, its `CONFIG_KEYS`, `n_seeds`, `seeds` (`;`-separated) and
    `<metric>_mean`, `_low`, `_high` for each of `metrics` (the interval's ends empty with one seed, the three empty
    where no row of the config has the metric)."""
    columns = [*CONFIG_KEYS, "n_seeds", "seeds"] + [f"{m}_{end}" for m in metrics for end in ("mean", "low", "high")]
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for g in groups:
            row: dict[str, Any] = dict(g.config) | {"n_seeds": len(g.rows), "seeds": ";".join(g.seeds)}
            for m, iv in g.intervals.items():
                row |= {f"{m}_mean": iv.mean, f"{m}_low": iv.low, f"{m}_high": iv.high}
            writer.writerow({c: "" if row.get(c) is None else row[c] for c in columns})
    return path
