"""`TrainedSAE`: what training returns for each SAE, and the flat row its `metrics.json` and `results.csv` hold."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saelab.run import RunDir
from saelab.train.metrics import EmbeddingMetrics, ReconstructionMetrics, SplicedMetrics


@dataclass(frozen=True)
class TrainedSAE:
    """One SAE a training run made (`saelab.train.train`)."""

    hook: str
    """The hook point it reads."""
    arch: str
    """Its architecture (`topk`, `batchtopk`, `jumprelu`, `relu`; a transcoder's `transcoder-topk`, ..., a skip
    transcoder's `skiptranscoder-topk`, ..., a crosscoder's `crosscoder-topk`, `crosscoder-batchtopk`), so that a
    sweep's table and Pareto plot tell them apart from the SAEs of the hook point they read."""
    k: int
    """Active latents per token (`batchtopk`: on average)."""
    width: int
    """Its number of latents (`d_sae`)."""
    lr: float
    """The peak learning rate."""
    seed: int
    """The seed of its initialisation: its `grid.seed`, or `TrainConfig.seed` when the grid has none (the batch order
    is always `TrainConfig.seed`'s)."""
    tokens: int
    """Training tokens seen."""
    path: Path
    """Its folder `RUN/saes/<hook>/<variant>/`, whose name is the variant."""
    run: Path
    """The run folder it belongs to (the row records `path` relative to it)."""
    stopped: str | None = None
    """Why it was stopped (its loss became NaN/inf), or `None`; a stopped SAE is not saved and has no metrics."""
    reconstruction: ReconstructionMetrics | None = None
    """Its held-out reconstruction metrics (a crosscoder's `CrossCoderMetrics`; `None` when it was stopped)."""
    spliced: SplicedMetrics | None = None
    """CE loss recovered and KL with it spliced into a decoder, a transcoder in place of its MLP (`None`: no decoder
    run, a crosscoder, or stopped)."""
    embedding: EmbeddingMetrics | None = None
    """The encoder's sentence embeddings with it spliced in, a transcoder in place of its MLP (`None`: no encoder
    run, a crosscoder, or stopped)."""

    @property
    def variant(self) -> str:
        """Its variant name (the folder under its hook point's)."""
        return self.path.name

    def row(self) -> dict[str, Any]:
        """The flat row that its `metrics.json` and a sweep's `results.csv` hold: `hook`, `arch`, `k`, `width`,
        `lr`, `seed`, `tokens`, `path` (relative to the run), then `stopped` or the metrics' keys."""
        row: dict[str, Any] = {
            "hook": self.hook,
            "arch": self.arch,
            "k": self.k,
            "width": self.width,
            "lr": self.lr,
            "seed": self.seed,
            "tokens": self.tokens,
            "path": RunDir(self.run).relative(self.path),
        }
        if self.stopped is not None:
            row["stopped"] = self.stopped
        return row | dict(self.reconstruction or {}) | dict(self.spliced or {}) | dict(self.embedding or {})
