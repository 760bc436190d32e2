"""Cross-dictionary matching: which latents of two dictionaries over the same hook point are the same, by the cosine
of their decoder directions (other seeds, other widths, Matryoshka prefixes (`W_dec[:m]`), other architectures).

- `best_matches(a, b)`: each latent of `a`'s nearest latent of `b`, with the cosine (what the app's feature page shows).
- `one_to_one(a, b)`: the Hungarian matching (maximum total cosine, each latent used at most once), and `share` of
  latents matched above a cosine. We follow Paulo & Belrose 2025 ("Sparse Autoencoders Trained on the Same Data
  Learn Different Features", EleutherAI), who match the latents of two seeds with `scipy.optimize.linear_sum_assignment`
  on the cosine matrix and call a latent shared above 0.7; they require the encoders to agree as well, we use the
  decoders alone, which every architecture (and a transcoder's output side) has in the same form.
- `splits(narrow, wide)`: the 1:n view of feature splitting (Bricken et al. 2023, "Towards Monosemanticity"): a
  latent of the narrower dictionary splits into the latents of the wider one whose nearest latent in the narrower
  one it is, at a cosine of at least `threshold`.

Memory: nothing of size `n_a x n_b` is held except by the exact Hungarian step. Nearest latents are found in blocks
of rows (`BLOCK_ENTRIES` cosines at a time, 256 MiB of float32), so two 131k-latent dictionaries are compared in
~512-row blocks. The exact Hungarian step needs the dense cosine matrix in float64 and O(n^3) time, so it runs up to
`DENSE_LIMIT` entries (4096 x 8192: 256 MiB, seconds); above that `one_to_one` solves the same assignment restricted
to each latent's `candidates` nearest partners (both ways) with `scipy.sparse.csgraph.min_weight_full_bipartite_matching`
(memory ~ `candidates x (n_a + n_b)`), exact whenever every pair of the optimum is among those candidates, as the pairs
that matter (cosine well above the rest) are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.sparse
import torch
from safetensors import SafetensorError, safe_open
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from torch import Tensor

from saelab.dictionaries import SAE
from saelab.errors import ConfigError, SAELoadError
from saelab.run import SAE_WEIGHTS

BLOCK_ENTRIES = 2**26
"""Cosines computed at a time when looking for nearest latents (float32: 256 MiB)."""
DENSE_LIMIT = 2**25
"""Largest `n_a x n_b` that `one_to_one` solves exactly on the dense cosine matrix (float64: 256 MiB)."""

Decoder = SAE | Tensor
"""A dictionary to match: an SAE, or its decoder directions `[n_latents, d]` (any norms; e.g. a Matryoshka prefix)."""


def directions(decoder: Decoder) -> Tensor:
    """Unit decoder rows `[n_latents, d]` in float32 (rows of norm zero stay zero)."""
    w = decoder.W_dec.detach() if isinstance(decoder, SAE) else decoder.detach()
    if w.ndim != 2:
        raise ConfigError(f"decoder directions must be a 2-D [n_latents, d] tensor, got shape {tuple(w.shape)}")
    w = w.float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)


def load_decoder(folder: str | Path) -> Tensor:
    """The decoder directions `W_dec` of a saved SAE (saelab or SAELens layout), read alone from its weights file."""
    path = Path(folder) / SAE_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("W_dec")
    except (OSError, SafetensorError) as err:
        raise SAELoadError(
            f"cannot read the decoder W_dec of {path} ({err}); give the folder of a saved SAE, or save it again"
        ) from None


class Nearest(NamedTuple):
    """Each latent of one dictionary's nearest latents in another, by decoder cosine."""

    index: Tensor
    """`[n_a, c]` long: the other dictionary's latents, nearest first (`c` = 1 for `best_matches`)."""
    cosine: Tensor
    """`[n_a, c]` float32: their cosines."""


def _checked(a: Decoder, b: Decoder) -> tuple[Tensor, Tensor]:
    """Both dictionaries' unit directions, on `a`'s device; `ConfigError` if they live in spaces of other sizes."""
    da, db = directions(a), directions(b)
    if da.shape[1] != db.shape[1]:
        raise ConfigError(
            f"cannot match dictionaries over different spaces: their decoders write d={da.shape[1]} and "
            f"d={db.shape[1]}; match dictionaries over the same hook point (the same d)"
        )
    return da, db.to(da.device)


def nearest(a: Decoder, b: Decoder, *, count: int = 1) -> Nearest:
    """For every latent of `a`, its `count` nearest latents of `b` by decoder cosine (on CPU), `BLOCK_ENTRIES` cosines
    at a time."""
    da, db = _checked(a, b)
    block = max(1, BLOCK_ENTRIES // max(1, len(db)))
    index, cosine = [], []
    for start in range(0, len(da), block):
        cos = da[start : start + block] @ db.T
        top = cos.max(dim=1, keepdim=True) if count == 1 else torch.topk(cos, min(count, len(db)), dim=1)
        index.append(top.indices)
        cosine.append(top.values)
    return Nearest(torch.cat(index).cpu(), torch.cat(cosine).cpu())


class BestMatches(NamedTuple):
    """Each latent of `a`'s nearest latent of `b` (`best_matches`)."""

    index: Tensor
    """`[n_a]` long: the latent of `b`."""
    cosine: Tensor
    """`[n_a]` float32: its decoder cosine."""


def best_matches(a: Decoder, b: Decoder) -> BestMatches:
    """Each latent of `a`'s nearest latent of `b` and their cosine (several latents of `a` may share one of `b`)."""
    found = nearest(a, b)
    return BestMatches(found.index[:, 0], found.cosine[:, 0])


@dataclass(frozen=True)
class OneToOne:
    """A 1:1 matching of the latents of `a` with those of `b` that maximises the summed decoder cosine."""

    partner: Tensor
    """`[n_a]` long: each latent of `a`'s partner in `b`; -1 where it has none (`a` wider than `b`, or none among its
    candidates in the sparse solve)."""
    cosine: Tensor
    """`[n_a]` float32: the pair's cosine (NaN where there is no partner)."""
    exact: bool
    """Whether it was solved on the whole cosine matrix (`DENSE_LIMIT`) rather than on each latent's candidates."""

    def share(self, threshold: float = 0.7) -> float:
        """The fraction of `a`'s latents whose partner's cosine is at least `threshold`."""
        return (self.cosine >= threshold).float().mean().item()


def one_to_one(a: Decoder, b: Decoder, *, candidates: int = 16, dense_limit: int = DENSE_LIMIT) -> OneToOne:
    """The Hungarian matching of `a`'s latents with `b`'s: each used at most once, the summed cosine maximal
    (`min(n_a, n_b)` pairs). Exact on the dense cosine matrix up to `dense_limit` entries; above it, over each latent's
    `candidates` nearest partners in the other (see the module's docstring)."""
    da, db = _checked(a, b)
    if len(da) * len(db) <= dense_limit:
        cos = (da @ db.T).double().cpu().numpy()
        rows, cols = linear_sum_assignment(cos, maximize=True)
        partner = torch.full((len(da),), -1, dtype=torch.long)
        partner[torch.from_numpy(rows)] = torch.from_numpy(cols).long()
        return OneToOne(partner, _pair_cosines(da, db, partner), exact=True)
    partner = _sparse_assignment(da, db, candidates)
    return OneToOne(partner, _pair_cosines(da, db, partner), exact=False)


def _pair_cosines(da: Tensor, db: Tensor, partner: Tensor) -> Tensor:
    """The cosine of each latent of `a` with its partner (NaN for none)."""
    has = partner >= 0
    cos = torch.full((len(da),), float("nan"))
    cos[has] = torch.linalg.vecdot(da[has.to(da.device)], db[partner[has].to(db.device)]).cpu()
    return cos


def _sparse_assignment(da: Tensor, db: Tensor, candidates: int) -> Tensor:
    """`one_to_one`'s partners over candidate pairs: each latent's `candidates` nearest partners both ways, plus one
    private "no partner" column per row of the smaller side (the cost of a cosine of 0), so a full matching always
    exists; edge costs are `2 - cosine` (positive: the solver reads a stored zero as no edge)."""
    swap = len(da) > len(db)
    small, large = (db, da) if swap else (da, db)
    forward, backward = nearest(small, large, count=candidates), nearest(large, small, count=candidates)
    none = torch.arange(len(small))
    rows = torch.cat([none.repeat_interleave(forward.index.shape[1]), backward.index.flatten(), none])
    cols = torch.cat(
        [
            forward.index.flatten(),
            torch.arange(len(large)).repeat_interleave(backward.index.shape[1]),
            len(large) + none,
        ]
    )
    cosine = torch.cat([forward.cosine.flatten(), backward.cosine.flatten(), torch.zeros(len(small))])
    n_cols = len(large) + len(small)
    _, first = np.unique((rows * n_cols + cols).numpy(), return_index=True)  # a pair found both ways is one edge
    graph = scipy.sparse.csr_matrix(
        ((2 - cosine.double()).numpy()[first], (rows.numpy()[first], cols.numpy()[first])), shape=(len(small), n_cols)
    )
    matched_rows, matched_cols = min_weight_full_bipartite_matching(graph)
    real = matched_cols < len(large)
    small_partner = torch.full((len(small),), -1, dtype=torch.long)
    small_partner[torch.from_numpy(matched_rows[real])] = torch.from_numpy(matched_cols[real]).long()
    if not swap:
        return small_partner
    partner = torch.full((len(da),), -1, dtype=torch.long)
    has = small_partner >= 0
    partner[small_partner[has]] = none[has]
    return partner


@dataclass(frozen=True)
class Splits:
    """The 1:n matching of a narrower dictionary's latents with a wider one's (`splits`)."""

    parent: Tensor
    """`[n_wide]` long: each wide latent's nearest narrow latent, where their cosine is at least `threshold`; -1
    elsewhere."""
    cosine: Tensor
    """`[n_wide]` float32: each wide latent's cosine with its nearest narrow latent (whether or not above)."""
    threshold: float
    """The cosine a wide latent needs with its nearest narrow latent to count as part of it."""

    def children(self, latent: int) -> list[int]:
        """The wide latents that narrow latent `latent` splits into (nearest to it, above `threshold`), ascending."""
        return (self.parent == latent).nonzero().flatten().tolist()

    def groups(self, min_children: int = 2) -> dict[int, list[int]]:
        """Every narrow latent with at least `min_children` children, and its children: the latents that split."""
        counts = torch.bincount(self.parent[self.parent >= 0])
        return {int(i): self.children(int(i)) for i in (counts >= min_children).nonzero().flatten()}


def splits(narrow: Decoder, wide: Decoder, *, threshold: float = 0.5) -> Splits:
    """Which latents of `wide` each latent of `narrow` splits into: the wide latents whose nearest narrow latent (by
    decoder cosine) it is, at a cosine of at least `threshold`. A latent with one child persists; with several, it
    split; a wide latent with no parent is new in the wider dictionary (or matches nothing closely enough)."""
    found = best_matches(wide, narrow)
    parent = torch.where(found.cosine >= threshold, found.index, -1)
    return Splits(parent, found.cosine, threshold)
