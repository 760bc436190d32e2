"""The SAEBench side of scripts/bench_evals_saebench.py: `train_probe_on_activations(select_top_k=k)` of
`sae_bench.evals.sparse_probing.probe_training` on the arrays that script wrote, in SAEBench's own venv.

    python scripts/bench_evals_saebench_sb.py acts.pt out.json
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version

os.environ["JAXTYPING_DISABLE"] = "1"  # its shape memo binds a class's size, then fails on the 2x pooled set it makes

import torch

# sae-bench is installed only in its own venv (see bench_evals_saebench.py), not in the one pyright reads
from sae_bench.evals.sparse_probing.probe_training import (  # pyright: ignore[reportMissingImports]
    train_probe_on_activations,
)


def main() -> None:
    saved = torch.load(sys.argv[1])
    accuracy: dict[str, dict[str, list[float]]] = {}
    for kind, labels in saved["data"].items():
        accuracy[kind] = {}
        for label, split in labels.items():
            accuracy[kind][label] = [
                train_probe_on_activations(split["train"], split["test"], select_top_k=k)[1]["pos"]
                for k in saved["k_values"]
            ]
    versions = {name: version(name) for name in ("sae-bench", "scikit-learn", "torch")}
    with open(sys.argv[2], "w") as f:
        json.dump({"accuracy": accuracy, "versions": versions}, f)


if __name__ == "__main__":
    main()
