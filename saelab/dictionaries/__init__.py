"""Sparse dictionaries: the SAE interface (`base`), its config (`config`) and batch (`batch`), the TopK family
(`topk_family`), the dense family (`dense_family`), SAELens-format checkpoints (`saelens`) and the architecture
registry (`registry`)."""

from __future__ import annotations

from saelab.dictionaries.base import SAE, DType, LossTerms, SAEConfig, geometric_median, train_step
from saelab.dictionaries.crosscoder import CrossCoder, CrossCoderConfig
from saelab.dictionaries.dense_family import JumpReLUSAE, ReLUSAE
from saelab.dictionaries.icfl import ICFLSAE
from saelab.dictionaries.registry import ARCHITECTURES, Arch, load_dictionary, register, sae_class
from saelab.dictionaries.saelens import SAELENS_ARCH, SAELENS_FORMAT_VERSION, load_sae, saelens_cfg, save_sae
from saelab.dictionaries.topk_family import BatchTopKSAE, TopKSAE

__all__ = [
    "ARCHITECTURES",
    "SAE",
    "SAELENS_ARCH",
    "SAELENS_FORMAT_VERSION",
    "Arch",
    "BatchTopKSAE",
    "CrossCoder",
    "CrossCoderConfig",
    "DType",
    "ICFLSAE",
    "JumpReLUSAE",
    "LossTerms",
    "ReLUSAE",
    "SAEConfig",
    "TopKSAE",
    "geometric_median",
    "load_dictionary",
    "load_sae",
    "register",
    "sae_class",
    "save_sae",
    "saelens_cfg",
    "train_step",
]
