"""What the analysis tests share besides fixtures: the small analysis config and a seeded SAE."""

from __future__ import annotations

import torch

from saelab.analysis import AnalysisConfig
from saelab.dictionaries import SAE, Arch, SAEConfig

CFG = AnalysisConfig(
    n_top=5,
    window=3,
    quantile_bins=4,
    quantile_examples=3,
    hist_bins=8,
    n_logits=4,
    n_neighbours=3,
    cooc_min_density=0.01,
    batch_size=500,
)


def make_sae(arch: Arch, d_in: int = 64, d_sae: int = 48) -> SAE:
    torch.manual_seed(1)
    sae = SAE.from_config(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, k=6, hook_name="h"))
    with torch.no_grad():
        sae.b_enc.add_(0.3 * torch.randn_like(sae.b_enc) - (0.5 if arch == "relu" else 0))
    return sae
