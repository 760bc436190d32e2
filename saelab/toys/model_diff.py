"""Two synthetic models with known shared and exclusive features, for model diffing (`saelab.evals.model_diff`).

Both "models" write into one `d`-dimensional space, as a base model and its fine-tuned copy do at one hook. Each
true feature is a unit direction that fires independently (sparse, log-normal magnitudes) on the same rows in both
models; a shared feature adds its direction to both models' activations, an A-only one to A's alone, a B-only one
to B's alone.

Some shared features are *decoupled* (Minder et al. 2025's Latent Decoupling, the false exclusives that decoder
norms report): both models hold such a feature, but each writes it at a magnitude of its own, and on a fraction
`drop` of its rows one model leaves it out. One shared latent cannot reconstruct both models then, and a sparse
crosscoder gives the feature two latents, one decoding A alone and one decoding B alone: by decoder norms, one
A-only and one B-only latent, though the feature is in both models, which latent scaling's `nu_r` detects (each
model's reconstruction holds the direction that the other model's latent decodes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from saelab.errors import ConfigError
from saelab.evals.model_diff import A_ONLY, B_ONLY, SHARED


class TwoModelBatch(NamedTuple):
    """Rows of both models' activations and which features fired."""

    x: Tensor
    """`[rows, 2, d]`: model A's activations, then model B's (a crosscoder's two sources)."""
    fires: Tensor
    """`[rows, n_features]` bool: the features that fired on each row (in both models, but where one leaves a
    decoupled feature out)."""


@dataclass
class ModelDiffData:
    """Known features of two models and the distribution of their codes."""

    directions: Tensor
    """`[n_features, d]` unit directions, the same in both models."""
    kinds: Tensor
    """`[n_features]` long: `SHARED`, `A_ONLY` or `B_ONLY` (`saelab.evals.model_diff`'s classes)."""
    decoupled: Tensor
    """`[n_features]` bool: the shared features that each model writes at its own magnitude (see the module
    docstring)."""
    freqs: Tensor
    """`[n_features]` each feature's firing probability."""
    drop: float
    """On a row where a decoupled feature fires, the probability that each model leaves it out (independently)."""
    magnitude_sigma: float
    """The log-normal sigma of active magnitudes."""
    noise: float
    """The standard deviation of the isotropic Gaussian noise added to each model's activations."""
    bias: Tensor
    """`[2, d]` each model's constant offset."""

    @property
    def n_features(self) -> int:
        """How many true features there are."""
        return self.directions.shape[0]

    def sample(self, n: int, generator: torch.Generator) -> TwoModelBatch:
        """`n` rows of both models' activations, built from one draw of which features fire and how strongly."""
        fires = torch.rand(n, self.n_features, generator=generator) < self.freqs
        present = torch.stack([self.kinds != B_ONLY, self.kinds != A_ONLY]).expand(n, 2, -1).clone()  # [n, 2, F]
        dropped = torch.rand(n, 2, int(self.decoupled.sum()), generator=generator) < self.drop
        present[:, :, self.decoupled] &= ~dropped
        mags = (torch.randn(n, 2, self.n_features, generator=generator) * self.magnitude_sigma).exp()
        mags[:, 1, ~self.decoupled] = mags[:, 0, ~self.decoupled]  # one magnitude in both models but the decoupled
        x = (mags * present * fires[:, None]) @ self.directions + self.bias
        return TwoModelBatch(x + self.noise * torch.randn(x.shape, generator=generator), fires)


def make_model_diff(
    n_shared: int = 16,
    n_a_only: int = 8,
    n_b_only: int = 8,
    n_decoupled: int = 6,
    *,
    d: int = 32,
    mean_active: float = 3.0,
    drop: float = 0.4,
    magnitude_sigma: float = 0.3,
    noise: float = 0.01,
    seed: int = 0,
) -> ModelDiffData:
    """`n_shared` shared features, `n_a_only` A-only and `n_b_only` B-only ones, and `n_decoupled` decoupled shared
    ones (see the module docstring), with random unit directions in `d` dimensions and uniform frequencies such that
    `mean_active` features fire per row."""
    gen = torch.Generator().manual_seed(seed)
    kinds = torch.tensor([SHARED] * n_shared + [A_ONLY] * n_a_only + [B_ONLY] * n_b_only + [SHARED] * n_decoupled)
    n_features = len(kinds)
    decoupled = torch.arange(n_features) >= n_features - n_decoupled
    freq = mean_active / n_features
    if freq >= 1:
        raise ConfigError(f"mean_active={mean_active} is too dense for {n_features} features; give a smaller one")
    freqs = torch.full((n_features,), freq)
    directions = torch.randn(n_features, d, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    bias = torch.randn(2, d, generator=gen) / d**0.5
    return ModelDiffData(directions, kinds, decoupled, freqs, drop, magnitude_sigma, noise, bias)
