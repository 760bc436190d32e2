"""Spread of faithfulness over examples: bootstrap intervals and per-example ranges on per-example metrics with
known answers."""

from __future__ import annotations

import pytest
import torch

from saelab.circuits.spread import _summary, at_size, default_sizes
from saelab.errors import CircuitError


def test_identical_examples_have_no_spread():
    m, empty, full = torch.full((2, 6), 3.0), torch.zeros(6), torch.full((6,), 4.0)
    m[1] = 1.0
    out = _summary(m, empty, full, resamples=50, seed=0)
    assert out.value == pytest.approx([0.75, 0.25])
    torch.testing.assert_close(torch.tensor(out.ci), torch.tensor([[0.75, 0.75], [0.25, 0.25]]))
    torch.testing.assert_close(torch.tensor(out.range), torch.tensor([[0.75, 0.75], [0.25, 0.25]]))


def test_per_example_range_and_interval():
    """Per example: (m - empty) / (full - empty) = 0.5, 1, 2, and an example whose full model equals its ablated one
    (left out of the range); the figure itself is the ratio of the means."""
    empty = torch.tensor([0.0, 1.0, 0.0, 2.0])
    full = torch.tensor([2.0, 3.0, 1.0, 2.0])
    m = torch.tensor([[1.0, 3.0, 2.0, 5.0]])
    out = _summary(m, empty, full, resamples=2000, seed=0)
    assert out.value[0] == pytest.approx((11 / 4 - 3 / 4) / (8 / 4 - 3 / 4))
    assert out.range[0] == pytest.approx([0.5, 2.0])
    low, high = out.ci[0]
    assert low < out.value[0] < high


def test_sizes_and_lookup():
    assert default_sizes(20) == [0, 1, 2, 4, 8, 16, 20]
    spread = {"n": [0, 4, 9]}
    assert at_size(spread, 9) == 2  # pyright: ignore[reportArgumentType]
    with pytest.raises(CircuitError, match="curve_sizes"):
        at_size(spread, 5)  # pyright: ignore[reportArgumentType]
    assert default_sizes(1) == [0, 1]
