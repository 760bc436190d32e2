"""Input preprocessing that an SAE trains under and folds into its saved weights: PCA whitening.

PCA whitening follows Donhauser et al. 2025 ("Towards scientific discovery with dictionary learning: Extracting
biological concepts from microscopy foundation models"): the mean `mu` and covariance `C = U diag(lam) U^T` of a
sample (of the training activations, or of a separate control set, as the paper whitens with control wells) give
`z = (x - mu) @ M` with `M = U diag(lam)^(-1/2)`, so `z` has zero mean and identity covariance. The paper states no
regulariser for a singular covariance; saelab refuses one instead of regularising it: whitening needs more sample
rows than dimensions, and a smallest eigenvalue above `rcond` times the largest (a condition number below
`1 / rcond`), since the directions below it would be blown up to unit variance from almost no signal.

Folding (`fold_whitening`): an SAE that computes `pre = (z - b) @ W_enc + b_enc` and `z_hat = f @ W_dec + b` on
whitened inputs computes, on raw ones, `pre = (x - b') @ (M @ W_enc) + b_enc` and `x_hat = f @ (W_dec @ M^-1) + b'`
with `b' = mu + b @ M^-1`: the SAELens form `(x - b_dec) @ W_enc + b_enc` with one `b_dec`, so the folded weights
load in SAELens and give the same codes. Its decoder rows are the raw-space directions, which are not unit norm.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from saelab.errors import ConfigError, StoreError
from saelab.store import ActivationStore

WHITENING_ROWS = 32_768
"""Rows sampled for the whitening statistics (or all of a smaller store)."""


class Whitening(NamedTuple):
    """PCA whitening statistics of one hook point: `z = (x - mean) @ matrix`."""

    mean: Tensor
    """`[d]` mean of the sample."""
    matrix: Tensor
    """`[d, d]` `U diag(lam)^(-1/2)`, columns the principal axes over their standard deviations."""
    inverse: Tensor
    """`[d, d]` `diag(lam)^(1/2) U^T`, so that `x = z @ inverse + mean`."""
    eigenvalues: Tensor
    """`[d]` the covariance's eigenvalues, ascending."""


def pca_whitening(x: Tensor, *, rcond: float = 1e-6, source: str = "the sample") -> Whitening:
    """The PCA whitening of the rows of `x` `[n, d]`, computed in float64.

    `ConfigError` naming the fix when the covariance is singular: `n <= d` rows, or a smallest eigenvalue at most
    `rcond` times the largest (`source` says where the rows came from, for the message)."""
    x = x.reshape(-1, x.shape[-1]).double()
    n, d = x.shape
    if n <= d:
        raise ConfigError(
            f"whitening needs more rows than the {d} dimensions, but {source} has {n}: its covariance is singular; "
            "give a store (or `whiten_store`) with more rows, or set `sae.whiten: false`"
        )
    mean = x.mean(0)
    centred = x - mean
    eigenvalues, axes = torch.linalg.eigh(centred.T @ centred / (n - 1))
    smallest, largest = eigenvalues[0].item(), eigenvalues[-1].item()
    if not smallest > rcond * largest:
        raise ConfigError(
            f"the covariance of {source} is singular: its smallest eigenvalue is {smallest:.3g}, at most "
            f"whiten_rcond={rcond:g} times the largest ({largest:.3g}), so whitening would blow up directions the "
            "data barely spans; whiten with a `whiten_store` that spans every direction, lower `sae.whiten_rcond` "
            "if those directions are real, or set `sae.whiten: false`"
        )
    scale = eigenvalues.sqrt()
    return Whitening(mean, axes / scale, scale[:, None] * axes.T, eigenvalues)


def whitening_sample(path: str, widths: dict[str, int], *, seed: int = 0) -> dict[str, Tensor]:
    """Up to `WHITENING_ROWS` shuffled rows of every hook point of `widths` (hook -> d) from the control store at
    `path`; `StoreError` if it lacks one of them or holds it at another width."""
    store = ActivationStore.open(path)
    for hook, d in widths.items():
        if hook not in store.hooks:
            raise StoreError(
                f"the whitening control store {path!r} has no hook {hook!r} (it has {store.hooks}); give a "
                "`whiten_store` harvested at the hook points you train on"
            )
        if store.d(hook) != d:
            raise StoreError(
                f"the whitening control store {path!r} holds {hook!r} at d={store.d(hook)}, but the SAEs read "
                f"d={d}; give a `whiten_store` harvested from the same model at the same hook point"
            )
    batch = next(iter(store.batches(list(widths), min(WHITENING_ROWS, store.n_tokens), seed=seed)))
    assert isinstance(batch, dict)  # a list of hooks gives a dict per batch
    return batch


class Folded(NamedTuple):
    """An SAE's weights with the whitening folded in: they read and write raw activations."""

    W_enc: Tensor
    """`[d_in, d_sae]` `M @ W_enc`."""
    W_dec: Tensor
    """`[d_sae, d_in]` `W_dec @ M^-1`: the latents' raw-space directions (not unit norm)."""
    b_dec: Tensor
    """`[d_in]` `mean + b_dec @ M^-1`, subtracted before encoding and added after decoding."""


@torch.no_grad()
def fold_whitening(
    W_enc: Tensor, W_dec: Tensor, b_dec: Tensor, *, mean: Tensor, matrix: Tensor, inverse: Tensor
) -> Folded:
    """Weights of an SAE trained on inputs whitened by `z = (x - mean) @ matrix` (`inverse` = `matrix^-1`; its input
    scale already folded), folded so that they act on raw activations with the same codes and reconstructions;
    computed in float64, returned in the weights' dtypes."""
    return Folded(
        (matrix.double() @ W_enc.double()).to(W_enc.dtype),
        (W_dec.double() @ inverse.double()).to(W_dec.dtype),
        (mean.double() + b_dec.double() @ inverse.double()).to(b_dec.dtype),
    )
