"""Which head each latent of a dictionary on `blocks.L.attn.hook_z` reads: the per-head census of the latents by their
direct feature attribution (Kissane et al. 2024 count, for each head, the latents whose attribution is mostly to it,
to tell monosemantic-looking heads from polysemantic ones), from the feature analysis's `dfa_heads` panel.

A latent belongs to head `h` when `h` carries more than `threshold` (half, by default) of the latent's absolute
per-head attribution summed over its top examples (`sum_examples |per_head[h]| / sum_examples sum_heads
|per_head|`); a latent with no such head is `mixed`, and one without top examples (it never fired) is `dead`. The
counts over the heads, `mixed` and `dead` add up to the dictionary's number of latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from saelab.errors import HeadsError
from saelab.heads.composition import Head
from saelab.heads.dfa import attention_layer

if TYPE_CHECKING:
    from saelab.analysis import FeatureStore


@dataclass
class HeadCensus:
    """How many latents of a dictionary on `attn.hook_z` read mostly each head (`head_census`)."""

    hook: str
    """The dictionary's hook point, `blocks.L.attn.hook_z`."""
    counts: list[int]
    """Per head of layer `L`: the latents that have more than `threshold` of their attribution on it."""
    mixed: int
    """Latents with no head over `threshold`."""
    dead: int
    """Latents without top examples."""
    head_of: np.ndarray
    """`[d_sae]`: each latent's head, -1 for a mixed or dead latent."""
    dead_latents: np.ndarray
    """`[d_sae]` bool: the latents without top examples."""
    threshold: float
    """The share of a latent's attribution that makes it its head's."""

    @property
    def heads(self) -> list[Head]:
        """The heads of `counts`, in order."""
        return [Head(attention_layer(self.hook), h) for h in range(len(self.counts))]


def head_census(dfa_heads: np.ndarray, top_rows: np.ndarray, *, hook: str, threshold: float = 0.5) -> HeadCensus:
    """The census (`HeadCensus`) of a dictionary on `hook` from its analysis's `dfa_heads` `[d_sae, n_top, n_heads]`
    and `top_rows` `[d_sae, n_top]` (-1 padded)."""
    attention_layer(hook)
    if not 0.5 <= threshold < 1:
        raise HeadsError(
            f"the census threshold must lie in [0.5, 1) (so a latent has one head at most), not {threshold}"
        )
    mass = (np.abs(dfa_heads) * (top_rows >= 0)[..., None]).sum(1)  # [d_sae, n_heads]
    total = mass.sum(1)
    dead = (top_rows >= 0).sum(1) == 0
    share = mass / np.where(total > 0, total, 1)[:, None]
    best = share.argmax(1)
    owned = ~dead & (share.max(1) > threshold)
    head_of = np.where(owned, best, -1)
    counts = np.bincount(head_of[owned], minlength=dfa_heads.shape[2])
    return HeadCensus(
        hook=hook,
        counts=counts.tolist(),
        mixed=int((~dead & ~owned).sum()),
        dead=int(dead.sum()),
        head_of=head_of,
        dead_latents=dead,
        threshold=threshold,
    )


def census_of(fs: FeatureStore, *, threshold: float = 0.5) -> HeadCensus:
    """The census of the dictionary whose feature analysis is `fs`; `HeadsError` naming the fix when it is not on
    `attn.hook_z` or its analysis has no DFA panels."""
    array = str(fs.attrs.get("hook", ""))
    hook = array.rsplit("/", 1)[-1]
    attention_layer(hook)
    if not fs.has("dfa_heads"):
        why = fs.attrs.get("dfa_status") or "the analysis is older than the DFA panels"
        raise HeadsError(
            f"the analysis {fs.path} has no DFA panels ({why}); run `saelab analyze {fs.run.root}` again "
            "(with the run's model recorded in its store)"
        )
    return head_census(fs.column("dfa_heads"), fs.column("top_rows"), hook=hook, threshold=threshold)
