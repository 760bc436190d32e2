"""Moved to `saelab.dictionaries` (`base`, `topk_family`, `dense_family`, `saelens`, `registry`); this module
re-exports its names for this release.

`CFG_FILENAME` / `WEIGHTS_FILENAME` are `saelab.run.SAE_CONFIG` / `SAE_WEIGHTS`: use those.
"""

from __future__ import annotations

from saelab.dictionaries.base import SAE, DType, SAEConfig, geometric_median, train_step
from saelab.dictionaries.dense_family import JumpReLUSAE, ReLUSAE
from saelab.dictionaries.registry import ARCHITECTURES, Arch
from saelab.dictionaries.saelens import SAELENS_ARCH, SAELENS_FORMAT_VERSION
from saelab.dictionaries.topk_family import BatchTopKSAE, TopKSAE
from saelab.run import SAE_CONFIG as CFG_FILENAME
from saelab.run import SAE_WEIGHTS as WEIGHTS_FILENAME

__all__ = [
    "ARCHITECTURES",
    "CFG_FILENAME",
    "SAE",
    "SAELENS_ARCH",
    "SAELENS_FORMAT_VERSION",
    "WEIGHTS_FILENAME",
    "Arch",
    "BatchTopKSAE",
    "DType",
    "JumpReLUSAE",
    "ReLUSAE",
    "SAEConfig",
    "TopKSAE",
    "geometric_median",
    "train_step",
]
