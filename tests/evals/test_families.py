"""Feature families on a planted hierarchy (codes made here: parents, children that fire only inside their parent,
independent latents, a little noise): the links are recovered, few are spurious; the result round-trips its file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelab.errors import ConfigError
from saelab.evals.families import FamiliesResult, FamilyThresholds, cooccurrence, families_result, feature_families

N_PARENTS, N_CHILDREN, N_FREE = 8, 4, 16


def planted_codes(rows: int = 20_000, *, seed: int = 0) -> tuple[torch.Tensor, set[tuple[int, int]]]:
    """Codes `[rows, 8 + 32 + 16]`: each parent fires on 10% of rows, independently; where it fires, one of its four
    children fires on 60% of them (children of a parent exclude each other); 16 free latents fire on 5% each; every
    child also fires on 0.2% of rows at random, parent or not. The true links: parent -> each of its children."""
    rng = np.random.default_rng(seed)
    width = N_PARENTS * (1 + N_CHILDREN) + N_FREE
    fired = np.zeros((rows, width), dtype=bool)
    truth = set()
    for p in range(N_PARENTS):
        on = rng.random(rows) < 0.1
        fired[:, p] = on
        kids = [N_PARENTS + p * N_CHILDREN + c for c in range(N_CHILDREN)]
        truth |= {(p, k) for k in kids}
        has = on & (rng.random(rows) < 0.6)
        pick = rng.integers(0, N_CHILDREN, rows)
        for c, k in enumerate(kids):
            fired[:, k] = (has & (pick == c)) | (rng.random(rows) < 0.002)
    fired[:, N_PARENTS * (1 + N_CHILDREN) :] = rng.random((rows, N_FREE)) < 0.05
    codes = torch.from_numpy(fired * rng.uniform(0.5, 2.0, fired.shape)).float()
    return codes, truth


def test_planted_hierarchy_is_recovered_with_few_spurious_links():
    codes, truth = planted_codes()
    co = cooccurrence(codes.split(4096))  # streamed in blocks
    assert co.rows == len(codes) and torch.equal(torch.diagonal(co.joint), (codes > 0).sum(0).double())
    found = feature_families(co)
    links = {(link.parent, link.child) for link in found.links}
    recall, spurious = len(links & truth) / len(truth), len(links - truth) / max(len(links), 1)
    assert recall >= 0.9 and spurious <= 0.1, (recall, spurious)
    assert {f.parent for f in found.families} == set(range(N_PARENTS))
    assert all(sorted(f.children) == [N_PARENTS + f.parent * N_CHILDREN + c for c in range(4)] for f in found.families)
    sizes = families_result(co, hook="h", variant="v").sizes()  # 8 families of 4, 40 of the 56 live latents in one
    assert sizes == (N_PARENTS, N_PARENTS * (1 + N_CHILDREN), codes.shape[1], N_CHILDREN, N_CHILDREN)


def test_sparse_and_dense_products_count_the_same():
    """Planted codes fire on about 4% of entries (the sparse product); with the parents' 10% repeated, over 5%
    (the dense one): both count exactly `F^T F`."""
    codes, _ = planted_codes(3000)
    for block in (codes, codes[:, :N_PARENTS].repeat(1, 4)):
        fired = (block > 0).double()
        assert torch.equal(cooccurrence([block]).joint, fired.T @ fired)


def test_the_papers_threshold_alone_links_latents_by_chance():
    codes, truth = planted_codes()
    found = feature_families(cooccurrence([codes]), min_lift=0.0001)  # containment >= 0.1 alone, as the paper
    links = {(link.parent, link.child) for link in found.links}
    assert len(links - truth) > 0.1 * len(links)  # parents (10% of rows) pass 0.1 against every latent


def test_result_round_trips_and_answers_per_latent(tmp_path):
    codes, _ = planted_codes(5000)
    result = families_result(cooccurrence([codes]), hook="h", variant="v", thresholds=FamilyThresholds(min_count=3))
    again = FamiliesResult.load(result.save(tmp_path / "families.json"))
    assert again == result and again.config["min_count"] == 3
    child = N_PARENTS  # parent 0's first child
    assert 0 in [link.parent for link in again.parents_of(child)]
    assert {link.child for link in again.children_of(0)} >= {child}
    assert "parent->child links" in again.summary()


def test_bad_thresholds_and_no_rows_say_what_to_give():
    with pytest.raises(ConfigError, match="at least one non-empty block"):
        cooccurrence([])
    with pytest.raises(ConfigError, match="min_containment"):
        feature_families(cooccurrence([torch.ones(3, 2)]), min_containment=0)
