"""Model diffing with a crosscoder over the same hook in two models, A and B: which latents are shared, which are
exclusive to one model, by relative decoder norm and by latent scaling.

- Relative decoder norm (Lindsey et al. 2024, "Sparse Crosscoders"): `delta = |d_B| / (|d_A| + |d_B|)` per latent,
  0 for a latent A alone decodes, 1 for B's alone, 1/2 for one both decode equally. A latent is A-only at
  `delta <= exclusive`, B-only at `delta >= 1 - exclusive`, shared between (Minder et al. take 0.1).
- Latent scaling (Minder et al. 2025, "Overcoming Sparsity Artifacts in Crosscoders to Interpret Chat-Tuning"),
  following their `tools/latent_scaler/closed_form.py` and `scripts/compute_scalers.py`: for a latent `j` with codes
  `f_j` and the decoder `d_j` of its dominant model `t` (B for `delta >= 1/2`, else A), the `beta` that best
  explains a target `y` of each model `M` as `beta * f_j * d_j + c` in least squares over the rows, for two
  targets: the reconstruction error with `j`'s own
  contribution put back (`y = x_M - x_hat_M + f_j d_j^M`; "error") and the reconstruction (`y = x_hat_M`,
  "reconstruction"). Their ratios, the other model's over `t`'s, are `nu_error` (the other model's activations
  still hold `j`: Complete Shrinkage) and `nu_recon` (the other model reconstructs `j` through other latents: Latent
  Decoupling). A latent exclusive by norm whose `max(nu_error, nu_recon) >= nu_threshold` is shared after all.
  One departure from the reference: the constant offset `c` fitted alongside `beta` (the reference fits `beta`
  alone, through the origin), so that what every row holds along `d_j` (the decoder bias, other latents' mean) is
  not counted as `j`'s: `beta = sum_i (f_ij - mean f_j) <y_i, d_j> / (|d_j|^2 sum_i (f_ij - mean f_j)^2)`.

Both models are assumed to write into one space (a base model and its fine-tuned copy), so one model's decoder
direction can be read in the other's activations; betas are computed in the crosscoder's normalised units.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from scipy.stats import rankdata
from torch import Tensor

from saelab.dictionaries.crosscoder import CrossCoder
from saelab.errors import ConfigError

SHARED, A_ONLY, B_ONLY = 0, 1, 2
"""The classes of a latent (or a true feature): in both models, in A's alone, in B's alone."""
CLASS_NAMES = ("shared", "a_only", "b_only")
"""The name of each class, by its value."""


def relative_norms(cc: CrossCoder, a: int = 0, b: int = 1) -> Tensor:
    """`[d_sae]` `|d_b| / (|d_a| + |d_b|)` per latent, of the crosscoder's sources `a` and `b`."""
    norms = cc.decoder_norms()
    return norms[:, b] / (norms[:, a] + norms[:, b]).clamp_min(torch.finfo(norms.dtype).tiny)


def norm_classes(delta: Tensor, exclusive: float = 0.1) -> Tensor:
    """`[d_sae]` long: `A_ONLY` where `delta <= exclusive`, `B_ONLY` where `delta >= 1 - exclusive`, else
    `SHARED`."""
    if not 0 < exclusive < 0.5:
        raise ConfigError(f"exclusive={exclusive} must be in (0, 0.5); Minder et al. take 0.1")
    classes = torch.full(delta.shape, SHARED, dtype=torch.long)
    classes[delta <= exclusive] = A_ONLY
    classes[delta >= 1 - exclusive] = B_ONLY
    return classes


@dataclass
class LatentScaling:
    """Latent scaling's betas of some latents, each against the decoder of its target source (`latent_scaling`)."""

    latents: Tensor
    """`[n]` the latents."""
    target: Tensor
    """`[n]` the source whose decoder direction each latent is scaled along (its dominant model)."""
    beta_error: Tensor
    """`[n, S]` per source, the beta of its reconstruction error with the latent's own contribution put back."""
    beta_recon: Tensor
    """`[n, S]` per source, the beta of its reconstruction."""
    fired: Tensor
    """`[n]` how many rows the latent fired on (betas are NaN where it never did)."""

    def nu(self, other: Tensor) -> tuple[Tensor, Tensor]:
        """`nu_error` and `nu_recon` `[n]`: the betas of source `other[i]` over those of each latent's target."""
        rows = torch.arange(len(self.latents))
        return (
            self.beta_error[rows, other] / self.beta_error[rows, self.target],
            self.beta_recon[rows, other] / self.beta_recon[rows, self.target],
        )


@torch.no_grad()
def latent_scaling(cc: CrossCoder, batches: Iterable[Tensor], *, latents: Tensor, target: Tensor) -> LatentScaling:
    """Latent scaling (see the module docstring) of `latents` `[n]`, each along the decoder of its source `target`
    `[n]`, accumulated in one pass over `batches` of raw activations `[rows, S, d_in]` (the crosscoder's inference
    codes: batchtopk's threshold, as the reference's `use_threshold=True`)."""
    latents, target = latents.to(torch.long), target.to(torch.long)
    if latents.shape != target.shape:
        raise ConfigError(f"give one target per latent; got {len(latents)} latents and {len(target)} targets")
    dirs = cc.W_dec[latents, target]  # [n, d]
    own = torch.einsum("nsd,nd->ns", cc.W_dec[latents], dirs)  # <d_j^M, d_j^t>: the latent's own part, put back
    zeros = torch.zeros(len(latents), cc.cfg.n_sources, dtype=dirs.dtype, device=dirs.device)
    f_recon, f_error = zeros.clone(), zeros.clone()  # sum_i f_ij <y_i, d_j> per source
    sum_recon = torch.zeros(cc.cfg.n_sources, cc.cfg.d_in, dtype=dirs.dtype, device=dirs.device)  # sum_i y_i
    sum_error = torch.zeros_like(sum_recon)
    f_sum, f_sq = zeros[:, 0].clone(), zeros[:, 0].clone()
    fired = torch.zeros(len(latents), dtype=torch.long, device=dirs.device)
    rows = 0
    for x in batches:
        xs = cc.prepare_input(x)
        f = cc.activation(cc.pre_acts(xs))
        recon = cc.decode_scaled(f)  # [rows, S, d]
        error = xs.view_as(recon) - recon
        fj = f[:, latents]  # [rows, n]
        f_recon += torch.einsum("rn,rsd,nd->ns", fj, recon, dirs)
        f_error += torch.einsum("rn,rsd,nd->ns", fj, error, dirs)
        sum_recon += recon.sum(0)
        sum_error += error.sum(0)
        f_sum += fj.sum(0)
        f_sq += fj.square().sum(0)
        fired += (fj > 0).sum(0)
        rows += len(f)
    # The error target puts the latent's own contribution back: y = error + f_j d_j^M.
    f_error += f_sq[:, None] * own
    y_error = torch.einsum("sd,nd->ns", sum_error, dirs) + f_sum[:, None] * own
    y_recon = torch.einsum("sd,nd->ns", sum_recon, dirs)
    f_mean = (f_sum / max(rows, 1))[:, None]
    denom = ((f_sq - f_sum * f_mean[:, 0]) * dirs.square().sum(1))[:, None]
    return LatentScaling(
        latents, target, (f_error - f_mean * y_error) / denom, (f_recon - f_mean * y_recon) / denom, fired
    )


class LatentDiff(NamedTuple):
    """One latent's model diff (`ModelDiff.latent`)."""

    latent: int
    """The latent."""
    delta_norm: float
    """`|d_B| / (|d_A| + |d_B|)`."""
    norm_class: str
    """Its class by decoder norms alone: a name of `CLASS_NAMES`."""
    nu_error: float
    """Latent scaling's error ratio (the other model's beta over the dominant model's); NaN if it never fired."""
    nu_recon: float
    """Latent scaling's reconstruction ratio; NaN if it never fired."""
    scaling_class: str
    """Its class once latent scaling has been read: exclusive by norm and `max(nu) >= nu_threshold` is shared."""
    fired: int
    """How many rows of the data it fired on."""


@dataclass
class ModelDiff:
    """Every latent's classification as shared, A-only or B-only (`model_diff`); tensors are `[d_sae]`."""

    sources: tuple[str, str]
    """The names of sources A and B."""
    delta_norm: Tensor
    """`|d_B| / (|d_A| + |d_B|)` per latent."""
    norm_class: Tensor
    """long: `SHARED`, `A_ONLY` or `B_ONLY` by decoder norms alone."""
    nu_error: Tensor
    """Latent scaling's error ratio, the other model's beta over the dominant model's (NaN: never fired)."""
    nu_recon: Tensor
    """Latent scaling's reconstruction ratio, the same way."""
    scaling_class: Tensor
    """long: `norm_class`, except that a latent exclusive by norm with `max(nu_error, nu_recon) >= nu_threshold` is
    `SHARED`."""
    fired: Tensor
    """How many rows each latent fired on."""

    def latent(self, j: int) -> LatentDiff:
        """Latent `j`'s row."""
        return LatentDiff(
            j,
            float(self.delta_norm[j]),
            CLASS_NAMES[int(self.norm_class[j])],
            float(self.nu_error[j]),
            float(self.nu_recon[j]),
            CLASS_NAMES[int(self.scaling_class[j])],
            int(self.fired[j]),
        )

    def exclusive(self, cls: int, *, scaled: bool = True) -> Tensor:
        """The latents of class `cls` (`A_ONLY` or `B_ONLY`) by latent scaling (`scaled`) or by norms alone."""
        return ((self.scaling_class if scaled else self.norm_class) == cls).nonzero().squeeze(1)


def model_diff(
    cc: CrossCoder,
    batches: Iterable[Tensor],
    *,
    a: int = 0,
    b: int = 1,
    exclusive: float = 0.1,
    nu_threshold: float = 0.3,
) -> ModelDiff:
    """Classify every latent of the crosscoder `cc` as shared, exclusive to its source `a` or to `b`, by relative
    decoder norm and by latent scaling over `batches` of raw activations `[rows, S, d_in]` (one pass; see the module
    docstring). `nu_threshold` is saelab's choice: a truly exclusive latent has `nu` near 0 (at most 0.13 on
    `saelab.toys.model_diff`'s data), one that the other model also holds on a fraction `q` of its rows about `q`
    (0.46 and up there, where `q = 0.6`)."""
    n = cc.cfg.n_sources
    if not (0 <= a < n and 0 <= b < n and a != b):
        raise ConfigError(f"sources a={a} and b={b} must be two different sources of the {n} in {cc.cfg.sources}")
    delta = relative_norms(cc, a, b)
    by_norm = norm_classes(delta, exclusive)
    dominant_b = delta >= 0.5
    target = torch.where(dominant_b, b, a)
    scaling = latent_scaling(cc, batches, latents=torch.arange(cc.cfg.d_sae), target=target)
    nu_error, nu_recon = scaling.nu(torch.where(dominant_b, a, b))
    held = torch.maximum(nu_error, nu_recon) >= nu_threshold
    by_scaling = torch.where((by_norm != SHARED) & held, SHARED, by_norm)
    return ModelDiff(
        (cc.cfg.sources[a], cc.cfg.sources[b]), delta, by_norm, nu_error, nu_recon, by_scaling, scaling.fired
    )


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve of `scores` `[n]` for the boolean `labels` `[n]` (the Mann-Whitney statistic, ties
    counted half); `ConfigError` if either class is empty."""
    labels = labels.bool()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if not (n_pos and n_neg):
        raise ConfigError(f"AUROC needs both classes; got {n_pos} positives and {n_neg} negatives")
    ranks = torch.from_numpy(rankdata(scores.detach().cpu().double().numpy()))
    return float((ranks[labels.cpu()].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
