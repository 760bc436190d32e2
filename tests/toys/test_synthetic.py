"""Synthetic activations with a known dictionary: what `make_synthetic` refuses, and the old import path."""

from __future__ import annotations

import pytest

from saelab.errors import ConfigError
from saelab.toys.synthetic import make_synthetic


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_features": 8, "n_pairs": 8}, "fewer pairs"),
        ({"n_features": 16, "mean_active": 16.0, "n_pairs": 2}, "too dense"),
    ],
)
def test_impossible_dictionaries_are_refused_with_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        make_synthetic(**changes)


def test_the_old_module_re_exports_it():
    from saelab import synthetic

    assert synthetic.make_synthetic is make_synthetic
    assert synthetic.make_synthetic(n_features=64, d=16, n_pairs=4).directions.shape == (64, 16)
