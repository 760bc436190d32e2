"""A synthetic MLP with known answers for transcoders: its input is a sparse sum of known input directions, and its
output the same sparse code applied to known output directions, plus (for skip transcoders) a known dense linear map
of the input.

Token `t` has codes `a_t` (features fire independently with power-law frequencies and log-normal magnitudes, as in
`saelab.toys.synthetic`), input `x_t = a_t @ inputs + in_bias + dense_t` (`dense_t` an isotropic Gaussian part no sparse
code explains) and output `y_t = a_t @ outputs + x_t @ linear.T + out_bias`. A transcoder's encoder columns should
match `inputs` and its decoder rows `outputs`; a skip transcoder's `W_skip` should match `linear`, the only map that
explains the dense part of the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.errors import ConfigError
from saelab.toys.synthetic import SyntheticData, make_synthetic


class MLPRows(NamedTuple):
    """Row-aligned input and output rows of the synthetic MLP."""

    x: Tensor
    """`[n, d_in]` what the MLP reads."""
    y: Tensor
    """`[n, d_out]` what it writes."""


@dataclass
class SyntheticMLP:
    """The known dictionary of a synthetic MLP and its code distribution."""

    codes: SyntheticData
    """The sparse input side: its `directions` are the input directions `[n_features, d_in]`, its `freqs`, magnitudes
    and bias those of the codes and of the input."""
    outputs: Tensor
    """The output direction of each feature `[n_features, d_out]`, unit rows."""
    linear: Tensor | None
    """The dense linear part of the output `[d_out, d_in]` (in `W_skip`'s layout), `None` when there is none."""
    out_bias: Tensor
    """The constant offset of every output `[d_out]`."""
    dense: float
    """The standard deviation of the input's dense Gaussian part (per dimension)."""

    @property
    def inputs(self) -> Tensor:
        """The input direction of each feature `[n_features, d_in]`, unit rows."""
        return self.codes.directions

    def sample(self, n: int, generator: torch.Generator) -> MLPRows:
        """`n` tokens' inputs and outputs, built sparsely from their active (token, feature) pairs."""
        rows, feats = self.codes.sample_fires(n, generator).nonzero(as_tuple=True)
        magnitudes = (torch.randn(len(feats), generator=generator) * self.codes.magnitude_sigma).exp()
        offsets = torch.searchsorted(rows, torch.arange(n))

        def sparse(directions: Tensor) -> Tensor:
            return F.embedding_bag(feats, directions, offsets, mode="sum", per_sample_weights=magnitudes)

        x = (
            sparse(self.inputs)
            + self.codes.bias
            + self.dense * torch.randn(n, self.inputs.shape[1], generator=generator)
        )
        y = sparse(self.outputs) + self.out_bias
        return MLPRows(x, y if self.linear is None else y + x @ self.linear.T)


def make_synthetic_mlp(
    n_features: int = 64,
    d_in: int = 32,
    d_out: int = 24,
    mean_active: float = 3.0,
    *,
    orthogonal: bool = False,
    linear_scale: float = 0.0,
    dense: float = 0.0,
    magnitude_sigma: float = 0.3,
    seed: int = 0,
) -> SyntheticMLP:
    """Random unit input and output directions for `n_features` features (`make_synthetic`'s frequencies, no
    correlated pairs), the input directions orthonormal when `orthogonal` (then `n_features <= d_in`: without
    interference between input features the ideal encoder column of each is its direction), and with `linear_scale > 0` a random dense linear part whose entries have standard deviation
    `linear_scale / sqrt(d_in)` (so it maps a unit input to an output of norm about `linear_scale * sqrt(d_out /
    d_in)`); `dense` is the standard deviation of the input's dense Gaussian part."""
    codes = make_synthetic(
        n_features, d_in, mean_active, n_pairs=0, noise=0.0, magnitude_sigma=magnitude_sigma, seed=seed
    )
    gen = torch.Generator().manual_seed(seed + 1)
    if orthogonal:
        if n_features > d_in:
            raise ConfigError(f"{n_features} orthogonal input directions do not fit d_in={d_in}; give fewer features")
        codes.directions = torch.linalg.qr(torch.randn(d_in, n_features, generator=gen)).Q.T.contiguous()
    outputs = torch.randn(n_features, d_out, generator=gen)
    outputs /= outputs.norm(dim=1, keepdim=True)
    linear = torch.randn(d_out, d_in, generator=gen) * linear_scale / d_in**0.5 if linear_scale > 0 else None
    out_bias = torch.randn(d_out, generator=gen) / d_out**0.5
    return SyntheticMLP(codes, outputs, linear, out_bias, dense)
