"""Moved to `saelab.train.metrics`; this module re-exports it for this release."""

from __future__ import annotations

from saelab.train.metrics import DENSE_THRESHOLD, eval_tokens, reconstruction_metrics, spliced_metrics

__all__ = ["DENSE_THRESHOLD", "eval_tokens", "reconstruction_metrics", "spliced_metrics"]
