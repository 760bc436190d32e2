"""Feature hedging's known answers (Chanin et al. 2025's toy setting): parent features, each with one child feature
that fires only with it (or, as the control, independently of it), orthonormal directions; and the SAEs to train on
them, one latent per feature or one per parent, started at the true directions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.dictionaries import SAE, SAEConfig


@dataclass
class ParentChild:
    """`n_parents` parent features and one child each, with orthonormal `directions` (the parents', then the
    children's); a row holds each present feature at magnitude 1, plus Gaussian noise."""

    directions: Tensor
    """`[2 n_parents, d]`: unit, orthogonal rows, the parents first."""
    parent_prob: float
    """Each parent's firing probability."""
    child_prob: float
    """`correlated`: the probability that a child fires when its parent does (never without); otherwise each child
    fires independently with `parent_prob`."""
    correlated: bool
    """Whether children fire only with their parents (the setting where a too-narrow SAE hedges)."""
    noise: float
    """The standard deviation of the noise."""
    seed: int
    """Seeds every batch (with its step)."""

    @property
    def n_parents(self) -> int:
        """How many parents (and children) there are."""
        return len(self.directions) // 2

    def batch(self, step: int, rows: int = 512) -> Tensor:
        """Batch `step`'s activations `[rows, d]`, the same for the same step."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        parents = torch.rand(rows, self.n_parents, generator=g) < self.parent_prob
        if self.correlated:
            children = parents & (torch.rand(rows, self.n_parents, generator=g) < self.child_prob)
        else:
            children = torch.rand(rows, self.n_parents, generator=g) < self.parent_prob
        x = torch.cat([parents, children], 1).float() @ self.directions
        return x + self.noise * torch.randn(x.shape, generator=g)

    def sae(self, width: int, *, l1_coef: float = 0.1) -> SAE:
        """A ReLU SAE of `width` latents started at the first `width` true directions (encoder = decoder): all the
        features at `width = 2 n_parents`, the parents alone at `n_parents`."""
        sae = SAE.from_config(SAEConfig(arch="relu", d_in=self.directions.shape[1], d_sae=width, k=1, l1_coef=l1_coef))
        with torch.no_grad():
            sae.W_dec.copy_(self.directions[:width])
            sae.W_enc.copy_(self.directions[:width].T)
            sae.b_enc.zero_()
            sae.b_dec.zero_()
        return sae


def parent_child(
    n_parents: int = 4,
    *,
    correlated: bool = True,
    d: int = 64,
    parent_prob: float = 0.2,
    child_prob: float = 0.5,
    noise: float = 0.01,
    seed: int = 0,
) -> ParentChild:
    """Parent/child features with random orthonormal directions in `d` dimensions (see `ParentChild`)."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(d, 2 * n_parents, generator=g))[0].T.contiguous()
    return ParentChild(directions, parent_prob, child_prob, correlated, noise, seed)
