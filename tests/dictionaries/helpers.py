"""Helpers shared by the dictionary tests."""

from __future__ import annotations

import torch

from saelab.dictionaries import SAE, BatchTopKSAE, JumpReLUSAE, SAEConfig

ARCHS = ["topk", "batchtopk", "jumprelu", "relu"]


def make_sae(arch: str = "topk", dtype: str = "float64", seed: int = 0, **kw) -> SAE:
    """An SAE with non-trivial biases, thresholds and input scale."""
    torch.manual_seed(seed)
    cfg = SAEConfig(**({"arch": arch, "d_in": 12, "d_sae": 48, "k": 5, "dtype": dtype} | kw))
    sae = SAE.from_config(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        sae.input_scale.fill_(1.7)
        if isinstance(sae, (JumpReLUSAE, BatchTopKSAE)):
            sae.threshold.fill_(0.4)
    return sae
