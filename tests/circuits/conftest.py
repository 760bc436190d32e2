"""The induction model, its SAEs, the induction task, its integrated-gradient node effects and its circuit, shared
by the circuits tests (computed once for the package)."""

from __future__ import annotations

import pytest

from saelab.circuits import find_circuit, induction_task, node_effects
from saelab.models import load_model
from saelab.sae import SAE
from saelab.toys.induction import INDUCTION_HOOKS
from tests.circuits.helpers import LENGTH, POS, sae_folder


@pytest.fixture(scope="package")
def model(induction_run):
    return load_model(str(induction_run / "model"), device="cpu")


@pytest.fixture(scope="package")
def saes(induction_run):
    return {h: SAE.load(sae_folder(induction_run, h)).eval() for h in INDUCTION_HOOKS}


@pytest.fixture(scope="package")
def task(model):
    return induction_task(model, n=8, length=LENGTH, position=POS)


@pytest.fixture(scope="package")
def ig(model, saes, task):
    return node_effects(model, saes, task, method="ig", ig_steps=10, baseline="patch", progress=False)


@pytest.fixture(scope="package")
def circuit(model, saes, task, induction_run):
    return find_circuit(
        model, saes, task, sae_paths={h: str(sae_folder(induction_run, h)) for h in INDUCTION_HOOKS}, progress=False
    )
