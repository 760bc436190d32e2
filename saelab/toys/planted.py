"""Planted absorption: synthetic activations with a known hierarchy and the SAE that sparsity favours over them,
the known answer that checks `saelab.absorption`'s metric (tests, `notebooks/02_absorption.ipynb`, the README)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from saelab.absorption.config import AbsorptionSettings
from saelab.absorption.data import ProbeData, fit_probe
from saelab.dictionaries import SAE, SAEConfig
from saelab.errors import AbsorptionError


@dataclass
class Planted:
    """Synthetic activations with a known hierarchy and an SAE over them.

    Each row has one parent feature (its label); with probability `child_prob` it also has one child feature,
    drawn from that parent's children (`hierarchy=True`: a child never fires without its parent) or from any
    parent's (`hierarchy=False`: children independent of the label). Feature directions are orthonormal.

    The SAE is the one sparsity favours on each: with a hierarchy every child latent absorbs its parent (decoder
    row (u_parent + u_child) / sqrt 2, and the parent latent is suppressed whenever a child fires), so the
    child latents are the absorbers and the parent latent is the split; without one, one latent per feature."""

    x: Tensor
    """The activations [n_rows, d]."""
    y: np.ndarray
    """Each row's parent (its label; -1: none, see `parent_prob`)."""
    child: np.ndarray
    """Each row's child feature (-1: none)."""
    words: list[str]
    """Each row's name, `p<parent>` or `p<parent>.c<child>`."""
    classes: list[str]
    """The labels, `p0`, `p1`, ..."""
    sae: SAE
    """The SAE sparsity favours on these activations."""
    parent_latent: list[int]
    """The SAE latent of each parent."""
    child_latent: list[int]
    """The SAE latent of each child."""
    children_of: list[list[int]]
    """Each parent's children."""
    directions: Tensor
    """The feature directions: the parents', then the children's."""


def planted_absorption(
    n_rows: int = 40_000,
    n_parents: int = 4,
    n_children: int = 20,
    *,
    child_prob: float = 0.4,
    hierarchy: bool = True,
    child_norm: float = 1.0,
    parent_prob: float = 1.0,
    d: int = 128,
    noise: float = 0.01,
    seed: int = 0,
) -> Planted:
    """Planted absorption (`hierarchy=True`) or its control with independent features (`hierarchy=False`).

    A child feature enters a row with norm `child_norm` (a parent's is 1). The returned SAE is the one sparsity
    favours at `child_norm=1`; below 1 children are weaker than their parents, the regime where a Matryoshka SAE's
    first prefix keeps the parents whole (`tests/dictionaries/test_matryoshka.py`). A row has a parent (and so a
    label) with probability `parent_prob`; the others hold noise alone, label -1 (`planted_probe_data` leaves them
    out). Below 1 the parents are sparse too, so the data's mean (an SAE's `b_dec`) no longer holds a share of each
    parent's direction."""
    n_feats = n_parents * (1 + n_children)
    if n_feats > d:
        raise AbsorptionError(f"{n_feats} orthonormal features need d >= {n_feats}; give a larger d")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(d, n_feats, generator=g))[0].T  # orthonormal rows
    parents, children = dirs[:n_parents], dirs[n_parents:]
    children_of = [list(range(p * n_children, (p + 1) * n_children)) for p in range(n_parents)]
    y = torch.randint(0, n_parents, (n_rows,), generator=g)
    has_child = torch.rand(n_rows, generator=g) < child_prob
    pick = torch.randint(0, n_children, (n_rows,), generator=g)
    owner = y if hierarchy else torch.randint(0, n_parents, (n_rows,), generator=g)
    child = torch.where(has_child, owner * n_children + pick, torch.full_like(y, -1))
    x = parents[y] + torch.where(has_child[:, None], child_norm * children[child.clamp_min(0)], torch.zeros(1))
    if parent_prob < 1:  # drawn only then, so the default rows are those of earlier releases
        present = torch.rand(n_rows, generator=g) < parent_prob
        x, y, child = x * present[:, None], torch.where(present, y, -1), torch.where(present, child, -1)
    x = x + noise * torch.randn(x.shape, generator=g)
    sae = SAE.from_config(SAEConfig(arch="relu", d_in=d, d_sae=n_feats, k=1))
    with torch.no_grad():
        sae.b_dec.zero_()
        parent_enc = 2 * parents.clone()
        child_dec = children.clone()
        if hierarchy:  # the parent latent is off whenever one of its children fires; children carry the parent
            for p, kids in enumerate(children_of):
                parent_enc[p] -= 4 * children[kids].sum(0)
                child_dec[kids] = (children[kids] + parents[p]) / math.sqrt(2)
        child_scale = math.sqrt(2) if hierarchy else 1.0  # activation = the norm of what the latent reconstructs
        sae.W_enc.copy_(torch.cat([parent_enc, 2 * child_scale * children]).T)
        sae.b_enc.copy_(torch.cat([torch.full((n_parents,), -1.0), torch.full((len(children),), -child_scale)]))
        sae.W_dec.copy_(torch.cat([parents, child_dec]))
    words = [f"p{p}" + (f".c{c}" if c >= 0 else "") if p >= 0 else "none" for p, c in zip(y.tolist(), child.tolist())]
    return Planted(
        x,
        y.numpy(),
        child.numpy(),
        words,
        [f"p{p}" for p in range(n_parents)],
        sae.eval(),
        list(range(n_parents)),
        list(range(n_parents, n_feats)),
        children_of,
        dirs,
    )


def planted_probe_data(
    planted: Planted,
    train_fraction: float = 0.8,
    s: AbsorptionSettings = AbsorptionSettings(),
    *,
    progress: bool = False,
) -> ProbeData:
    """The probe step on planted activations with a label (a parent), split by row."""
    rows = np.nonzero(planted.y >= 0)[0]
    x, y, words = planted.x[rows], planted.y[rows], [planted.words[i] for i in rows]
    cut = int(len(rows) * train_fraction)
    return fit_probe(
        x[:cut],
        y[:cut],
        x[cut:],
        test_y=y[cut:],
        classes=planted.classes,
        test_words=words[cut:],
        s=s,
        progress=progress,
    )
