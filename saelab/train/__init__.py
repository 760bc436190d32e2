"""Training: many SAEs per pass over an activation store, their held-out metrics, and sweep outputs.

`config` (`Grid`, `TrainConfig`, the learning rate and its schedule), `trainer` (`Trainer`, `Member`, `train`),
`result` (`TrainedSAE`, what `train` returns per SAE), `checkpoint` (exact resume state), `loggers`
(TensorBoard, Weights & Biases), `metrics` (reconstruction, per-source crosscoder, spliced-in and sentence-embedding
metrics), `sweep` (results table and Pareto plot).
"""

from __future__ import annotations

from saelab.run import CHECKPOINT as CHECKPOINT_DIR
from saelab.train.config import CrossCoderSpec, Grid, TrainConfig, TranscoderPair, default_lr, lr_factor, variant_name
from saelab.train.metrics import (
    DENSE_THRESHOLD,
    CrossCoderMetrics,
    EmbeddingMetrics,
    ReconstructionMetrics,
    SplicedMetrics,
    crosscoder_metrics,
    embedding_metrics,
    eval_tokens,
    reconstruction_metrics,
    spliced_metrics,
)
from saelab.train.result import TrainedSAE
from saelab.train.sweep import COLUMNS, pareto_figure, read_results, write_results, write_sweep_outputs
from saelab.train.trainer import Member, Trainer, train

__all__ = [
    "CHECKPOINT_DIR",
    "COLUMNS",
    "DENSE_THRESHOLD",
    "CrossCoderMetrics",
    "CrossCoderSpec",
    "EmbeddingMetrics",
    "Grid",
    "Member",
    "ReconstructionMetrics",
    "SplicedMetrics",
    "TrainConfig",
    "TrainedSAE",
    "Trainer",
    "TranscoderPair",
    "crosscoder_metrics",
    "default_lr",
    "embedding_metrics",
    "eval_tokens",
    "lr_factor",
    "pareto_figure",
    "read_results",
    "reconstruction_metrics",
    "spliced_metrics",
    "train",
    "variant_name",
    "write_results",
    "write_sweep_outputs",
]
