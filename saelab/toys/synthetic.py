"""Synthetic activations with a known overcomplete dictionary, for ground-truth tests.

Each token is `x = codes @ directions + bias + noise`: features fire independently with
power-law frequencies, some features fire together in correlated pairs, and active
magnitudes are heavy-tailed (log-normal). A good SAE's decoder rows should match
`directions`; `recovery` measures how many it found.

`decoder_config` is a small GPT-2-style decoder to build at random initialisation, for harvesting activations
whose shape is all that matters: the tests' tiny decoder, and the benchmarks' larger ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from transformer_lens import HookedTransformerConfig

from saelab.errors import ConfigError


class LabelledSample(NamedTuple):
    """Activations with the true features that fired on each row."""

    x: Tensor
    """`[n, d]` activations."""
    fires: Tensor
    """`[n, n_features]` bool: which true features fired on each row."""


@dataclass
class SyntheticData:
    """A known dictionary and the sparse code distribution over it."""

    directions: Tensor
    """The true dictionary [n_features, d], unit rows."""
    freqs: Tensor
    """Each feature's firing probability [n_features]."""
    pairs: Tensor
    """Correlated pairs [n_pairs, 2] (leader, follower): the follower also fires with `pair_prob` when the leader does."""
    pair_prob: float
    """The probability that a follower fires with its leader."""
    bias: Tensor
    """The constant offset of every token [d]."""
    noise: float
    """The standard deviation of the isotropic Gaussian noise."""
    magnitude_sigma: float
    """The log-normal sigma of active magnitudes."""

    @property
    def n_features(self) -> int:
        """How many true features there are."""
        return self.directions.shape[0]

    def sample_fires(self, n: int, generator: torch.Generator) -> Tensor:
        """Which features fire on each of `n` tokens, `[n, n_features]` bool."""
        fires = torch.rand(n, self.n_features, generator=generator) < self.freqs
        leaders, followers = self.pairs.unbind(1)
        follow = torch.rand(n, len(self.pairs), generator=generator) < self.pair_prob
        fires[:, followers] |= fires[:, leaders] & follow
        return fires

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Activations `[n, d]`, built sparsely from the active (token, feature) pairs."""
        return self.sample_labelled(n, generator).x

    def sample_labelled(self, n: int, generator: torch.Generator) -> LabelledSample:
        """`sample`'s activations (the same ones for the same generator state) with the features that fired."""
        fires = self.sample_fires(n, generator)
        rows, feats = fires.nonzero(as_tuple=True)
        magnitudes = (torch.randn(len(feats), generator=generator) * self.magnitude_sigma).exp()
        offsets = torch.searchsorted(rows, torch.arange(n))
        x = F.embedding_bag(feats, self.directions, offsets, mode="sum", per_sample_weights=magnitudes)
        return LabelledSample(x + self.bias + self.noise * torch.randn(x.shape, generator=generator), fires)


def make_synthetic(
    n_features: int = 1024,
    d: int = 128,
    mean_active: float = 8.0,
    *,
    freq_exponent: float = 0.5,
    n_pairs: int = 64,
    pair_prob: float = 0.5,
    noise: float = 0.01,
    magnitude_sigma: float = 0.5,
    seed: int = 0,
) -> SyntheticData:
    """Random unit directions; feature `i` fires with probability `∝ (i + 1) ** -freq_exponent`
    (in a random order), scaled so `mean_active` features fire per token before pairing."""
    if 2 * n_pairs > n_features:
        raise ConfigError(
            f"n_pairs={n_pairs} needs at least {2 * n_pairs} features, got {n_features}; give fewer pairs or more features"
        )
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    freqs = torch.arange(1, n_features + 1, dtype=torch.float32) ** -freq_exponent
    freqs = (freqs * mean_active / freqs.sum())[torch.randperm(n_features, generator=gen)]
    if freqs.max() >= 1:
        raise ConfigError(
            f"mean_active={mean_active} is too dense for {n_features} features; give a smaller mean_active or more features"
        )
    pairs = torch.randperm(n_features, generator=gen)[: 2 * n_pairs].view(n_pairs, 2)
    bias = torch.randn(d, generator=gen) / d**0.5
    return SyntheticData(directions, freqs, pairs, pair_prob, bias, noise, magnitude_sigma)


def max_cosines(true_dirs: Tensor, learned_dirs: Tensor) -> Tensor:
    """For each true direction `[n, d]`, its best cosine with any learned row `[m, d]`."""
    true_dirs = true_dirs / true_dirs.norm(dim=1, keepdim=True)
    learned_dirs = learned_dirs / learned_dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (true_dirs @ learned_dirs.T).amax(1)


def recovery(true_dirs: Tensor, learned_dirs: Tensor, threshold: float = 0.9) -> float:
    """Fraction of true directions matched by a learned row with cosine >= `threshold`."""
    return (max_cosines(true_dirs, learned_dirs.to(true_dirs.dtype)) >= threshold).float().mean().item()


TINY_DECODER: dict[str, Any] = {
    "n_layers": 2,
    "d_model": 64,
    "n_heads": 4,
    "d_head": 16,
    "d_mlp": 128,
    "n_ctx": 64,
    "act_fn": "gelu",
    "normalization_type": "LN",
    "seed": 0,
    "model_name": "tiny-decoder",
}
"""The tests' tiny decoder: the `HookedTransformerConfig` fields besides its vocabulary size."""


def decoder_config(d_vocab: int, **changes: Any) -> HookedTransformerConfig:
    """`TINY_DECODER` over a vocabulary of `d_vocab` tokens, with `changes` to its fields (another shape or name);
    `saelab.load_model(config, tokenizer=...)` builds it at random initialisation."""
    return HookedTransformerConfig(**(TINY_DECODER | changes), d_vocab=d_vocab)
