"""Moved to `saelab.toys.synthetic` (synthetic activations with a known dictionary); this module re-exports it for
this release."""

from __future__ import annotations

from saelab.toys.synthetic import SyntheticData, make_synthetic, max_cosines, recovery

__all__ = ["SyntheticData", "make_synthetic", "max_cosines", "recovery"]
