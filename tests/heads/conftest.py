"""The induction model and its SAEs, a copy of it with a second head per layer and an SAE on that copy's layer-1
`hook_z`, and a random multi-head model, shared by the heads tests."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from saelab.circuits import repeated_tokens
from saelab.dictionaries import SAE, SAEConfig, train_step
from saelab.models import load_model
from saelab.run import RunDir


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


@pytest.fixture(scope="package")
def two_heads(model):
    """The induction model with a second head in each layer that changes nothing downstream (`W_O = 0`): layer 1's
    second head is a copy of layer 0's previous-token head, so layer 1's `hook_z` holds the induction head's output
    (the token after the earlier occurrence of the current one) next to the previous token's."""
    cfg = HookedTransformerConfig(**(model.cfg.to_dict() | {"n_heads": 2}))
    two = HookedTransformer(cfg, move_to_device=False)
    weights = model.state_dict()
    state = {
        k: weights[k].clone() if k in weights and weights[k].shape == v.shape else v
        for k, v in two.state_dict().items()
    }
    for layer in range(2):
        for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V"):
            key = f"blocks.{layer}.attn.{name}"
            state[key] = torch.zeros_like(state[key])
            state[key][0] = weights[key][0]
    for name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V"):
        state[f"blocks.1.attn.{name}"][1] = weights[f"blocks.0.attn.{name}"][0]
    two.load_state_dict(state)
    return two.eval()


@pytest.fixture(scope="package")
def two_heads_sae(two_heads):
    """A TopK SAE (k=2, 128 latents) trained for a few seconds on `two_heads`' `blocks.1.attn.hook_z` over BOS + R + R
    sequences."""
    with torch.no_grad():
        _, cache = two_heads.run_with_cache(repeated_tokens(2000, 10, seed=7), names_filter="blocks.1.attn.hook_z")
    z = cache["blocks.1.attn.hook_z"].flatten(2).reshape(-1, two_heads.cfg.n_heads * two_heads.cfg.d_head)
    torch.manual_seed(0)
    sae = SAE.from_config(SAEConfig(arch="topk", d_in=z.shape[1], d_sae=128, k=2, hook_name="blocks.1.attn.hook_z"))
    sae.init_from_sample(z[:4096])
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    rows = torch.Generator().manual_seed(0)
    for _ in range(600):
        train_step(sae, optimizer, z[torch.randint(0, len(z), (512,), generator=rows)])
    return sae.eval()


@pytest.fixture(scope="package")
def grouped_query(multihead):
    """`multihead` with grouped-query attention: its four query heads share two key/value heads."""
    cfg = HookedTransformerConfig(**(multihead.cfg.to_dict() | {"n_key_value_heads": 2}))
    return HookedTransformer(cfg, move_to_device=False).eval()
