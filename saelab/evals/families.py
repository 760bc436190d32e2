"""Feature families (O'Neill et al. 2024, "Disentangling Dense Embeddings with Sparse Autoencoders", section on
feature families, and the authors' released code: `get_norm_cooc`, `make_MST`): a parent latent fires wherever
its children fire, and more widely; the hierarchy is read off how latents co-occur.

What it follows: the co-occurrence matrix `C[i, j]`, the number of rows where latents `i` and `j` both fire, and
each latent's count `n[i] = C[i, i]`, over a stream of codes; `C` normalised by the occurrence counts and
thresholded (the paper's `0.1`); the maximum spanning tree (forest) of the graph of the remaining pairs; each tree
edge directed from the denser latent (the parent) to the sparser (the child); families as the latents with several
children in that directed forest.

Where it differs:

- The weight of a pair is the containment of the sparser latent's firing in the denser's, `C[i, j] / min(n[i],
  n[j])`, the share of the child's rows where the parent fires too (the paper normalises by one latent's count,
  `C[i, j] / (n[i] + 1)`, an asymmetric matrix that its undirected spanning tree symmetrises implicitly, and
  exponentiates the weights, which leaves the tree as it is).
- A pair must also co-occur above chance: its lift `C[i, j] * rows / (n[i] n[j])` at least `min_lift` (2). The
  paper's 0.1 threshold alone links every latent to any latent that fires on more than a tenth of the rows, by chance.
- A family is every latent with at least `min_children` children in the forest (the paper takes the roots with
  more than two children, then removes them and repeats to find the families below; every parent at once is the
  same list without the repetition).
- The matrix is accumulated in blocks of rows (`cooccurrence`), so any number of rows streams through; it is dense,
  `[d_sae, d_sae]` float64 (2 GB at 16k latents), and is not written out: the result holds the links.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from saelab.errors import ConfigError, RunError
from saelab.resultfile import JsonResult

MIN_CONTAINMENT = 0.1
"""The paper's threshold on the normalised co-occurrence."""
MIN_LIFT = 2.0
"""Co-occurrence at least this many times what independent latents would give."""


@dataclass(frozen=True)
class FamilyThresholds:
    """What makes a pair of latents an edge of the forest, and a latent a family's parent (`feature_families`)."""

    min_containment: float = MIN_CONTAINMENT
    """The least share of the sparser latent's rows where the denser fires too."""
    min_lift: float = MIN_LIFT
    """The least co-occurrence over what independent latents would give."""
    min_count: int = 5
    """Latents that fire on fewer rows are left out."""
    min_children: int = 2
    """A family's parent has at least this many children."""


SPARSE_BELOW = 0.05
"""`cooccurrence` multiplies a block's firing as a sparse matrix when fewer than this share of its entries fire."""


class CoOccurrence(NamedTuple):
    """How often latents fire, alone and together, over some rows."""

    joint: Tensor
    """`[d_sae, d_sae]` float64: the rows where both latents fire (the diagonal: where each fires)."""
    rows: int
    """The rows counted."""


def cooccurrence(blocks: Iterable[Tensor], *, fire_above: float = 0.0) -> CoOccurrence:
    """The co-occurrence of the latents over a stream of code blocks `[rows, d_sae]`: a latent fires on a row where its
    code is above `fire_above`. Each block adds `F^T F` (`F` its 0/1 firing; `F^T` sparse where under `SPARSE_BELOW`
    of it fires), exact in float32 for blocks under 2^24 rows, accumulated in float64."""
    joint: Tensor | None = None
    rows = 0
    for codes in blocks:
        fired = (codes.detach() > fire_above).float()
        if fired.mean() < SPARSE_BELOW:  # a TopK SAE's codes: `nnz x d_sae` multiply-adds instead of `rows x d_sae^2`
            part = torch.sparse.mm(fired.T.to_sparse(), fired).double().cpu()
        else:
            part = (fired.T @ fired).double().cpu()
        joint = part if joint is None else joint + part
        rows += len(codes)
    if joint is None or rows == 0:
        raise ConfigError("no rows of codes to count co-occurrences over; give at least one non-empty block")
    return CoOccurrence(joint, rows)


class Link(NamedTuple):
    """One parent -> child edge of the directed forest."""

    parent: int
    """The denser latent."""
    child: int
    """The sparser latent."""
    containment: float
    """The share of the child's rows where the parent fires too."""
    lift: float
    """Their co-occurrence over what independent latents would give."""


class Family(NamedTuple):
    """A parent latent and the latents below it in the forest."""

    parent: int
    """The parent latent."""
    children: list[int]
    """Its children (one edge down), by containment, highest first."""
    descendants: list[int]
    """Everything below it (children, their children, ...), in breadth-first order."""


class Families(NamedTuple):
    """The hierarchy of a dictionary's latents."""

    links: list[Link]
    """Every parent -> child edge, by parent then child."""
    families: list[Family]
    """The latents with at least `min_children` children, largest family first."""


def _root(parent: np.ndarray, i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = int(parent[i])
    return i


def feature_families(
    co: CoOccurrence,
    *,
    min_containment: float = MIN_CONTAINMENT,
    min_lift: float = MIN_LIFT,
    min_count: int = 5,
    min_children: int = 2,
) -> Families:
    """The parent -> child links and the families of `co` (see the module's docstring): the maximum spanning forest
    (Kruskal) of the pairs of latents that fire at least `min_count` times each, whose containment is at least
    `min_containment` and whose lift is at least `min_lift`, each edge from the denser latent to the sparser (ties:
    the lower index is the parent)."""
    if not 0 < min_containment <= 1 or min_lift <= 0 or min_children < 1:
        raise ConfigError(
            f"min_containment {min_containment} must be in (0, 1], min_lift {min_lift} positive and min_children "
            f"{min_children} at least 1"
        )
    joint = co.joint.numpy()
    n = np.diag(joint).copy()
    counted = n >= min_count
    i, j = np.nonzero(np.triu(joint > 0, k=1) & counted[:, None] & counted[None, :])  # pairs that ever co-fire
    both = joint[i, j]
    containment = both / np.minimum(n[i], n[j])
    lift = both * co.rows / (n[i] * n[j])
    keep = (containment >= min_containment) & (lift >= min_lift)
    i, j, containment, lift = i[keep], j[keep], containment[keep], lift[keep]
    forest = np.arange(len(n))
    links = []
    for e in np.argsort(-containment, kind="stable"):
        a, b = int(i[e]), int(j[e])
        ra, rb = _root(forest, a), _root(forest, b)
        if ra == rb:
            continue
        forest[ra] = rb
        parent, child = (a, b) if n[a] >= n[b] else (b, a)
        links.append(Link(parent, child, float(containment[e]), float(lift[e])))
    links.sort(key=lambda link: (link.parent, link.child))
    below: dict[int, list[Link]] = {}
    for link in links:
        below.setdefault(link.parent, []).append(link)
    families = []
    for parent, edges in below.items():
        if len(edges) < min_children:
            continue
        children = [e.child for e in sorted(edges, key=lambda e: -e.containment)]
        order, queue, seen = [], list(children), {parent}
        while queue:
            node = queue.pop(0)
            if node in seen:
                continue
            seen.add(node)
            order.append(node)
            queue.extend(e.child for e in below.get(node, []))
        families.append(Family(parent, children, order))
    families.sort(key=lambda f: (-len(f.descendants), f.parent))
    return Families(links, families)


class FamilySizes(NamedTuple):
    """What a dictionary's families amount to: how many, how large, and how much of the dictionary they hold (the
    spanning forest links nearly every live latent to something, so its number of links says little)."""

    families: int
    """Parents with at least `min_children` children."""
    members: int
    """Latents in a family: the parents and everything below them."""
    live: int
    """Latents that fire on at least `min_count` rows (those the forest could link)."""
    median_children: float
    """The median number of children of a family (0 without families)."""
    largest: int
    """The most latents below one parent (0 without families)."""


@dataclass
class FamiliesResult(JsonResult):
    """A dictionary's feature families, as `saelab eval --only families` writes them."""

    what: ClassVar[str] = "feature families result"
    command: ClassVar[str] = "saelab eval RUN --only families"
    error: ClassVar[type[Exception]] = RunError

    hook: str
    """The dictionary's hook point."""
    variant: str
    """Its variant name."""
    rows: int
    """The rows counted."""
    counts: list[int]
    """The rows where each latent fires."""
    links: list[Link]
    """Every parent -> child link."""
    families: list[Family]
    """The families, largest first."""
    config: dict[str, Any] = field(default_factory=dict)
    """The settings that made it (thresholds, rows read)."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FamiliesResult:
        """The result from its parsed JSON."""
        return FamiliesResult(
            data["hook"],
            data["variant"],
            data["rows"],
            data["counts"],
            [Link(**link) for link in data["links"]],
            [Family(**f) for f in data["families"]],
            data.get("config", {}),
        )

    def to_json(self) -> dict[str, Any]:
        """The result as written to its file."""
        return {
            "hook": self.hook,
            "variant": self.variant,
            "rows": self.rows,
            "counts": self.counts,
            "links": [link._asdict() for link in self.links],
            "families": [f._asdict() for f in self.families],
            "config": self.config,
        }

    def parents_of(self, latent: int) -> list[Link]:
        """The links down to `latent` (its parents)."""
        return [link for link in self.links if link.child == latent]

    def children_of(self, latent: int) -> list[Link]:
        """The links down from `latent` (its children), by containment, highest first."""
        return sorted((link for link in self.links if link.parent == latent), key=lambda link: -link.containment)

    def sizes(self) -> FamilySizes:
        """How many families, how large, and how many of the live latents they hold."""
        members = {f.parent for f in self.families} | {i for f in self.families for i in f.descendants}
        live = sum(n >= int(self.config.get("min_count", 5)) for n in self.counts)
        children = [len(f.children) for f in self.families]
        return FamilySizes(
            len(self.families),
            len(members),
            live,
            float(np.median(children)) if children else 0.0,
            max((len(f.descendants) for f in self.families), default=0),
        )

    def summary(self) -> str:
        """One line: links, families, the largest."""
        largest = self.families[0] if self.families else None
        top = f"; largest: #{largest.parent} with {len(largest.descendants)} below it" if largest else ""
        return (
            f"{self.hook}/{self.variant}: {len(self.links)} parent->child links, {len(self.families)} families over "
            f"{self.rows} rows{top}"
        )


def families_result(
    co: CoOccurrence, *, hook: str, variant: str, thresholds: FamilyThresholds = FamilyThresholds()
) -> FamiliesResult:
    """`feature_families` of `co` at `thresholds` as a result of dictionary `hook`/`variant` (its config: the
    thresholds)."""
    found = feature_families(co, **asdict(thresholds))
    counts = [int(x) for x in torch.diagonal(co.joint).tolist()]
    return FamiliesResult(hook, variant, co.rows, counts, found.links, found.families, asdict(thresholds))
