"""Moved to `saelab.ops.topk`; this module re-exports its names for this release."""

from __future__ import annotations

from saelab.ops.topk import match_torch_threads, topk_rows

__all__ = ["match_torch_threads", "topk_rows"]
