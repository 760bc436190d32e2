"""The whole job on the offline default: harvest MiniLM, train TopK SAEs on one layer, analyse."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from saelab.analysis import AnalysisConfig, analyze
from saelab.config import HarvestConfig
from saelab.harvest import harvest
from saelab.run import RunDir
from saelab.train import Grid, TrainConfig, train


def quickstart_configs(
    out: str | Path, *, layer: int = 2, train_tokens: int = 1_000_000, expansion: int = 8
) -> tuple[HarvestConfig, TrainConfig]:
    """The harvest and training configs the quickstart runs (MiniLM, embedded corpus, one layer) into run `out`."""
    hooks = [f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.hook_mlp_out", f"blocks.{layer}.attn.hook_z"]
    run = RunDir(out)
    return (
        HarvestConfig(
            model="minilm", hooks=hooks, out=str(run.store), context_length=128, batch_size=32, dtype="float16"
        ),
        TrainConfig(
            run=str(out),
            tokens=train_tokens,
            batch_size=4096,
            eval_rows=16_384,
            grid=Grid(arch=["topk"], k=[32], expansion=[expansion]),
            sae={"dead_tokens": 500_000},
        ),
    )


def quickstart(
    out: str | Path = "runs/quickstart",
    *,
    layer: int = 2,
    train_tokens: int = 1_000_000,
    expansion: int = 8,
    analysis: AnalysisConfig | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Harvest, train and analyse into `out` (each stage resumes or skips finished work); return seconds per stage."""
    harvest_cfg, train_cfg = quickstart_configs(out, layer=layer, train_tokens=train_tokens, expansion=expansion)
    analysis_cfg = analysis if analysis is not None else AnalysisConfig()
    stages: dict[str, Callable[[], object]] = {
        "harvest": lambda: harvest(harvest_cfg, progress=progress),
        "train": lambda: train(train_cfg, progress=progress),
        "analyze": lambda: analyze(out, analysis_cfg, progress=progress, skip_existing=True),
    }
    seconds = {}
    for name, stage in stages.items():
        start = time.perf_counter()
        stage()
        seconds[name] = time.perf_counter() - start
    return seconds
