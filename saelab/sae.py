"""Moved to `saelab.dictionaries` (`base`, `topk_family`, `dense_family`, `saelens`, `registry`); this module
re-exports its names for this release.

The old `CFG_FILENAME` / `WEIGHTS_FILENAME` are `saelab.run.SAE_CONFIG` / `SAE_WEIGHTS`.
"""

from __future__ import annotations

from saelab.dictionaries.base import SAE, DType, SAEConfig, geometric_median, train_step
from saelab.dictionaries.dense_family import JumpReLUSAE, ReLUSAE
from saelab.dictionaries.registry import ARCHITECTURES, Arch
from saelab.dictionaries.saelens import SAELENS_ARCH, SAELENS_FORMAT_VERSION
from saelab.dictionaries.topk_family import BatchTopKSAE, TopKSAE

__all__ = ["SAE", "DType", "SAEConfig", "geometric_median", "train_step"]  # saelab.dictionaries.base
__all__ += ["BatchTopKSAE", "JumpReLUSAE", "ReLUSAE", "TopKSAE"]  # the TopK and dense families
__all__ += ["ARCHITECTURES", "Arch", "SAELENS_ARCH", "SAELENS_FORMAT_VERSION"]  # registry and SAELens format
