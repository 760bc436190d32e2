"""SAEBench's absorption scores (saelab.absorption.scoring) on hand-computed cases: the absorption fraction, at most
three absorbers, and decoder norms folded into the activations."""

from __future__ import annotations

import pytest
import torch

from saelab.absorption import AbsorptionSettings, absorption_scores


def _one(codes, x, cos, split, s=AbsorptionSettings()):
    """absorption_scores for one row, with unit decoder norms and probe direction e0."""
    cos = torch.tensor(cos)
    return absorption_scores(
        torch.tensor([codes]),
        torch.tensor([x]),
        torch.tensor([1.0, 0.0]),
        cos=cos,
        norms=torch.ones(len(cos)),
        split=split,
        s=s,
        words=["w"],
    )[0]


def test_absorption_fraction_follows_saebench_by_hand():
    # latents: 0 the split latent, 1-4 candidates; projections pi = a * c
    partial = _one([0.3, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0], [1.0, 0.5, 0.0, 0.0, 0.0], [0])
    assert partial.absorption_fraction == pytest.approx(0.5 / 0.8)  # min(0.5, 1 - 0.3) / (0.5 + 0.3)
    assert not partial.full_absorption  # the split latent fires
    capped = _one([0.3, 2.0, 0.0, 0.0, 0.0], [1.0, 0.0], [1.0, 0.5, 0.0, 0.0, 0.0], [0])
    assert capped.absorption_fraction == pytest.approx(0.7 / 1.0)  # absorbers capped at x.p - split
    full = _one([0.0, 1.0, 0.0, 0.0, 0.0], [0.9, 0.0], [1.0, 0.9, 0.0, 0.0, 0.0], [0])
    assert full.absorption_fraction == 1.0 and full.full_absorption
    assert full.absorbers == [[1, 1.0, pytest.approx(0.9), pytest.approx(0.9)]]
    # split explains it all / absorbers below 40% / cosine below 0.1 / negative projection: no absorption
    assert _one([1.0, 1.0, 0, 0, 0], [1.0, 0.0], [1.0, 0.5, 0, 0, 0], [0]).absorption_fraction == 0.0
    assert _one([0.0, 1.0, 0, 0, 0], [1.0, 0.0], [1.0, 0.39, 0, 0, 0], [0]).absorption_fraction == 0.0
    low_cos = _one([0.0, 10.0, 0, 0, 0], [1.0, 0.0], [1.0, 0.09, 0, 0, 0], [0])
    assert low_cos.absorption_fraction == 0.0 and not low_cos.absorbers
    assert low_cos.full_absorption  # full absorption only needs cosine >= 0.025 (and 0.9 >= 0.4 of x.p)
    assert _one([0.0, 1.0, 0, 0, 0], [-1.0, 0.0], [1.0, 0.9, 0, 0, 0], [0]).absorption_fraction == 0.0


def test_at_most_three_absorbers_count():
    case = _one([0.0, 0.2, 0.2, 0.2, 0.2], [1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0], [0])
    assert len(case.absorbers) == 3 and case.absorption_fraction == 1.0  # 0.6 >= 0.4, split 0
    weak = _one([0.0, 0.12, 0.12, 0.12, 0.12], [1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0], [0])
    assert weak.absorption_fraction == 0.0  # three carry 0.36 < 0.4 even though all four carry 0.48


def test_decoder_norms_fold_into_activations():
    cos = torch.tensor([1.0, 0.5])
    case = absorption_scores(
        torch.tensor([[0.0, 1.0]]),
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([2.0, 0.0]),
        cos=cos,
        norms=torch.tensor([1.0, 2.0]),
        split=[0],
        s=AbsorptionSettings(),
        words=["w"],
    )[0]
    assert case.absorbers == [[1, 2.0, 0.5, 1.0]] and case.probe_projection == 1.0  # x.p with p normalised
