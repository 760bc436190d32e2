"""What the benchmark scripts share: their command line, the note on machine load, round-robin timing and the JSON
they write. Standard library only, so that `bench_analysis_sd.py` (in sae-dashboard's own venv) imports it too;
scripts/ is on the path when a script runs."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from typing import Any


def parser(doc: str | None, *, json_option: bool = True, **ints: int) -> argparse.ArgumentParser:
    """A parser that shows `doc` as written, with an integer option per keyword of `ints` defaulting to its value
    (`-k` for a one-letter name, `--d-sae` for `d_sae`), and `--json PATH` for the figures unless `json_option` is
    false."""
    out = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in ints.items():
        flag = f"-{name}" if len(name) == 1 else "--" + name.replace("_", "-")
        out.add_argument(flag, type=int, default=default, help=f"default {default}")
    if json_option:
        out.add_argument("--json", help="write the figures to this JSON file")
    return out


def load_note() -> str:
    """The machine's load average, to print beside CPU timings."""
    return f"load average {os.getloadavg()[0]:.2f} (other processes skew CPU timings)"


def time_round_robin(steps: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn (so background load hits all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def write_json(path: str | None, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """The command line, the load averages and `results` as JSON at `path` (nothing when `path` is None)."""
    if path:
        with open(path, "w") as f:
            json.dump({"config": vars(args), "load_average": os.getloadavg(), "results": results}, f, indent=2)


def step_figures(sec: dict[str, float], batch: int) -> dict[str, float]:
    """From the seconds per step of `saelab`, `sae_lens`, `sparsify` and the bare encoder `matmul` on batches of
    `batch` rows: each step in ms, the libraries' tokens/s, saelab's speed-ups and its step over the matmul."""
    out = {f"{name}_ms": 1e3 * s for name, s in sec.items()}
    out |= {f"{name}_tokens_per_s": batch / sec[name] for name in ("saelab", "sae_lens", "sparsify")}
    return out | {
        "speedup_vs_sae_lens": sec["sae_lens"] / sec["saelab"],
        "speedup_vs_sparsify": sec["sparsify"] / sec["saelab"],
        "saelab_step_over_matmul": sec["saelab"] / sec["matmul"],
    }
