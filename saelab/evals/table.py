"""The run's dictionaries x evals: each dictionary's core metrics (its `metrics.json`) and the headline number of
each eval `saelab eval` wrote for it, with the latents each number comes from, so the app can link them to their
feature pages; grouped by config across seeds (`saelab.evals.intervals`) for the Evals page and
`results_by_config.csv`.

Headlines (`Headline.name`):

- `probing:<task>`: the mean over the task's labels of the test accuracy of the 1-sparse probe on the latents;
  its latents are each label's probe latent (the latent that best separates the label by itself).
- `hedging`: the SAE's hedging rate; its latents are the five with the highest per-latent rate.
- `families`: the number of families (`saelab.evals.families`; not the number of links, since the spanning forest
  links nearly every live latent); its latents are the parents of the largest families.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from saelab.errors import RunError, SaelabError
from saelab.evals.intervals import ConfigGroup, group_by_config, write_by_config
from saelab.evals.sparse_probing import SparseProbingResult
from saelab.resultfile import read_json
from saelab.run import RunDir, saved_kind

CORE = ("l0", "width", "fvu", "mse", "dead_frac")
"""The core metrics the table shows, from each dictionary's `metrics.json` (`width` from its config)."""
LOWER_IS_BETTER = frozenset({"hedging", "fvu", "mse", "dead_frac"})
"""The headlines and metrics where less is better (the Pareto fronts are taken that way)."""
SHOWN_LATENTS = 5
"""Latents linked from one number."""


class Headline(NamedTuple):
    """One eval's number for one dictionary, and the latents it comes from."""

    value: float
    """The number."""
    latents: list[int]
    """The latents it comes from, most telling first (linked to their feature pages)."""


@dataclass
class DictionaryEvals:
    """One dictionary of the run: its config, its core metrics and its evals' headlines."""

    hook: str
    """Its hook point."""
    variant: str
    """Its variant name."""
    row: dict[str, Any]
    """Its `metrics.json` (config: `arch`, `k`, `width`, `lr`, `seed`, `tokens`; core metrics), empty when it has
    none."""
    headlines: dict[str, Headline] = field(default_factory=dict)
    """Each eval's headline, by `Headline` name (see the module's docstring)."""
    problems: list[str] = field(default_factory=list)
    """Each result file that could not be read, with the reason."""

    def flat(self) -> dict[str, Any]:
        """Its row with every headline's value as a column, for grouping across seeds."""
        return dict(self.row) | {name: h.value for name, h in self.headlines.items()}


def _probing(result: SparseProbingResult) -> dict[str, Headline]:
    out = {}
    for task in result.tasks:
        firsts = [next((p for p in lab.latents if p.k == 1), None) for lab in task.labels]
        probes = [p for p in firsts if p is not None]
        if probes:
            out[f"probing:{task.task}"] = Headline(
                float(np.mean([p.accuracy for p in probes])), [p.features[0] for p in probes if p.features]
            )
    return out


def _hedging(data: dict[str, Any]) -> dict[str, Headline]:
    per = np.asarray(data["per_latent"], dtype=np.float64)
    top = np.argsort(-per, kind="stable")[:SHOWN_LATENTS]
    return {"hedging": Headline(float(data["rate"]), [int(i) for i in top if per[i] > 0])}


def _families(data: dict[str, Any]) -> dict[str, Headline]:
    families = data["families"][:SHOWN_LATENTS]  # largest (most latents below it) first, as the result holds them
    return {"families": Headline(float(len(data["families"])), [int(f["parent"]) for f in families])}


READERS = {
    "sparse_probing": lambda data: _probing(SparseProbingResult.from_json(data)),
    "hedging": _hedging,
    "families": _families,
}
"""How each eval's JSON gives its headlines."""


def _row(run: RunDir, hook: str, variant: str, problems: list[str]) -> dict[str, Any]:
    path = run.sae_metrics(hook, variant)
    if not path.is_file():
        return {}
    try:
        return read_json(path, dict, RunError, what="metrics file", command="saelab train")
    except SaelabError as err:
        problems.append(str(err))
        return {}


def run_table(run: str | Path) -> list[DictionaryEvals]:
    """Every dictionary of the run (crosscoders left out) with its core metrics and the headlines of the evals it
    has; a result that cannot be read is left out of its headlines and named in `problems`."""
    run_dir = RunDir(run)
    out = []
    for entry in run_dir.saes():
        if saved_kind(entry.path) == "crosscoder":
            continue
        problems: list[str] = []
        found = DictionaryEvals(entry.hook, entry.variant, _row(run_dir, entry.hook, entry.variant, problems))
        found.problems = problems
        for name in run_dir.eval_results(entry.hook, entry.variant):
            if name not in READERS:
                continue
            path = run_dir.eval_result(entry.hook, entry.variant, name)
            try:
                found.headlines |= read_json(
                    path, READERS[name], RunError, what=f"{name} result", command=f"saelab eval RUN --only {name}"
                )
            except SaelabError as err:
                problems.append(str(err))
        out.append(found)
    return out


def headline_names(table: Sequence[DictionaryEvals]) -> list[str]:
    """Every headline some dictionary of `table` has, sorted."""
    return sorted({name for d in table for name in d.headlines})


def by_config(table: Sequence[DictionaryEvals]) -> list[ConfigGroup]:
    """The table's dictionaries grouped by config (every setting but the seed), with the intervals of the core
    metrics and of every headline across the seeds."""
    return group_by_config([d.flat() for d in table], [*CORE, *headline_names(table)])


def write_run_by_config(run: str | Path) -> Path:
    """Rewrite `RUN/results_by_config.csv` from the run's dictionaries: core metrics and every eval's headline, each
    with its mean and t-interval across seeds (`saelab.evals.intervals.write_by_config`)."""
    table = run_table(run)
    metrics = [*CORE, *headline_names(table)]
    return write_by_config(by_config(table), RunDir(run).sweep_by_config, metrics=metrics)


def pareto_front(xs: Sequence[float], ys: Sequence[float], *, lower_is_better: bool) -> list[int]:
    """The indices of the points not dominated by another (one with no larger `x` and a `y` at least as good, one of
    the two strictly), by increasing `x`: the front of each eval against L0 or width, where less of `x` is better."""
    sign = 1.0 if lower_is_better else -1.0
    order = sorted(range(len(xs)), key=lambda i: (xs[i], sign * ys[i]))
    front, best = [], float("inf")
    for i in order:
        if sign * ys[i] < best:
            front.append(i)
            best = sign * ys[i]
    return front
