"""The induction model and its layer-1 SAE (on `blocks.1.attn.hook_z`), shared by the heads tests."""

from __future__ import annotations

import pytest
from transformer_lens import HookedTransformer, HookedTransformerConfig

from saelab.models import load_model
from saelab.run import RunDir
from saelab.sae import SAE


@pytest.fixture(scope="package")
def model(induction_run):
    return load_model(str(induction_run / "model"), device="cpu")


@pytest.fixture(scope="package")
def induction_sae(induction_run):
    (entry,) = [s for s in RunDir(induction_run).saes() if s.hook == "blocks.1.attn.hook_z"]
    return SAE.load(entry.path).eval()


@pytest.fixture(scope="package")
def multihead():
    """A random three-layer model of four heads per layer, with LayerNorm and MLPs."""
    cfg = HookedTransformerConfig(
        n_layers=3, d_model=48, n_heads=4, d_head=12, d_mlp=96, d_vocab=50, n_ctx=16, act_fn="gelu", seed=1
    )
    return HookedTransformer(cfg, move_to_device=False).eval()
