"""Probes (saelab.absorption.probes): feature splitting by F1 jumps, binary F1 and the one-vs-rest probe by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saelab.absorption import KSparse, f1, train_probe
from saelab.absorption.config import ProbeSchedule


def test_feature_splitting_accepts_k_while_f1_jumps():
    ks = KSparse([[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]], [0.5, 0.6, 0.62, 0.9], [])
    assert ks.split(0.03) == [1, 2]  # 0.62 is not more than 0.6 + 0.03, so k stops at 2 even though k=4 is better
    assert KSparse([[7], [7, 8]], [0.5, 0.52], []).split(0.03) == [7]


def test_f1_and_probe_by_hand():
    y = np.array([1, 1, 0, 0], bool)
    assert f1(y, np.array([1, 0, 1, 0], bool)) == pytest.approx(0.5)  # tp 1, fp 1, fn 1
    assert f1(np.zeros(3, bool), np.zeros(3, bool)) == 0.0
    g = torch.Generator().manual_seed(0)
    y = torch.stack([torch.rand(800, generator=g) < 0.1, torch.rand(800, generator=g) < 0.5], 1)  # rare, balanced
    x = torch.randn(800, 8, generator=g)
    x[:, :2] += 8 * y  # class c shifts dimension c
    probe = train_probe(x, y, ProbeSchedule(epochs=30))
    score = probe(x).detach()
    for c in range(2):  # positives rank above negatives (AUC), and pos_weight keeps the rare class's recall at 1
        auc = (score[y[:, c], c][:, None] > score[~y[:, c], c][None]).float().mean()
        assert auc > 0.99 and (score[y[:, c], c] > 0).all()
    assert probe.weight[0].argmax() == 0 and probe.weight[1].argmax() == 1
