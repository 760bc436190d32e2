"""Effect-estimate agreement: Pearson and Spearman correlation against scipy's on known inputs, and on the induction
model attribution patching's rank agreement with exact patching beating integrated gradients'."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from saelab.circuits.agreement import agreement, effect_agreement, estimate_agreement, ranks
from saelab.errors import CircuitError


def test_ranks_average_ties_as_scipy_does():
    x = torch.tensor([3.0, 1.0, 3.0, -2.0, 1.0, 3.0, 0.5])
    assert ranks(x).tolist() == stats.rankdata(x.numpy()).tolist()


@pytest.mark.parametrize("seed", [0, 1])
def test_correlations_match_scipy(seed):
    g = np.random.default_rng(seed)
    x = g.normal(size=200)
    y = np.round(np.exp(2 * x) + 0.1 * g.normal(size=200), 1)  # near-monotone, with ties after rounding
    got = agreement(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    assert got.pearson == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-5)
    assert got.spearman == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-5)
    assert got.spearman > got.pearson  # a monotone, non-linear relation: ranks agree better than values


def test_known_answers_and_bad_input():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert agreement(x, 2 * x + 1) == pytest.approx((1.0, 1.0))
    assert agreement(x, x**3).spearman == pytest.approx(1.0) and agreement(x, x**3).pearson < 1 - 1e-3
    assert agreement(x, -x) == pytest.approx((-1.0, -1.0))
    with pytest.raises(CircuitError, match="constant"):
        agreement(x, torch.ones(4))
    with pytest.raises(CircuitError, match="at least 2"):
        agreement(x[:1], x[:1])


def test_effect_agreement_counts_the_nodes_either_moves():
    estimate = {"h": torch.tensor([[0.0, 1.0, 2.0, 0.0], [0.0, 0.0, 3.0, 5.0]])}
    exact = {"h": torch.tensor([[0.0, 1.5, 2.0, 0.0], [0.0, 0.5, 0.0, 4.0]])}
    x, y = np.array([1.0, 2.0, 0.0, 3.0, 5.0]), np.array([1.5, 2.0, 0.5, 0.0, 4.0])
    got = effect_agreement(estimate, exact)
    assert got.pearson == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-6)
    assert got.spearman == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-6)


def test_on_the_induction_model_attribution_patching_ranks_nodes_better(model, saes, task):
    """The measured agreement (IG's values closer, attribution patching's order closer: issue 18's finding)."""
    found = estimate_agreement(model, saes, task)
    assert found["ig"].pearson > 0.85 and found["ig"].pearson > found["atp"].pearson, found
    assert found["atp"].spearman > 0.9 and found["atp"].spearman > found["ig"].spearman, found
