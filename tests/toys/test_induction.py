"""The induction toy: a two-layer attention-only decoder that does induction with a previous-token head."""

from __future__ import annotations

import pytest
import torch

from saelab.circuits import repeated_tokens
from saelab.models import load_model
from saelab.toys.induction import induction_accuracy

LENGTH = 10


@pytest.fixture(scope="module")
def model(induction_run):
    return load_model(str(induction_run / "model"), device="cpu")


def test_the_model_does_induction_with_a_previous_token_head(model):
    assert induction_accuracy(model, LENGTH) > 0.9
    tokens = repeated_tokens(64, LENGTH, seed=5)
    _, cache = model.run_with_cache(tokens)
    previous = cache["blocks.0.attn.hook_pattern"][:, 0].diagonal(-1, dim1=-2, dim2=-1).mean()
    second = torch.arange(LENGTH + 1, 2 * LENGTH + 1)
    induction = cache["blocks.1.attn.hook_pattern"][:, 0, second[:-1], second[:-1] - LENGTH + 1].mean()
    assert previous > 0.5 and induction > 0.7, (float(previous), float(induction))


def test_the_circuits_package_still_offers_the_toy():
    """`from saelab.circuits import induction_run` (README, configs) reaches the toy without circuits importing it."""
    import saelab.circuits
    import saelab.toys.induction

    assert saelab.circuits.induction_run is saelab.toys.induction.induction_run
    assert saelab.circuits.ALPHABET == saelab.toys.induction.ALPHABET
    with pytest.raises(AttributeError, match="no attribute"):
        _ = saelab.circuits.no_such_name
