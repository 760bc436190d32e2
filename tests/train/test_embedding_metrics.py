"""`embedding_metrics` on MiniLM: an exact transcoder (layer 2's MLP computed from its own weights, on the input
that saelab's `blocks.2.hook_mlp_in` names) leaves the mean-pooled sentence embeddings as they are (cosine 1 to
1e-5); one that gives zeros scores as the zero-ablation baseline. An SAE spliced at `blocks.2.hook_mlp_out` (its input
and output hook the same) that reconstructs exactly keeps them too, and one that reconstructs zeros is the same
baseline."""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.dictionaries import SAE
from saelab.train.metrics import embedding_metrics

LAYER = 2
MLP_IN, MLP_OUT = f"blocks.{LAYER}.hook_mlp_in", f"blocks.{LAYER}.hook_mlp_out"


class ExactMLP:
    """Stands in for a transcoder: BERT's MLP, `out(gelu(in(x)))`, from the model's weights (or zeros: `zero`)."""

    def __init__(self, mlp: Any, *, zero: bool = False):
        self.first, self.second = getattr(mlp, "in")._original_component, mlp.out._original_component
        self.zero = zero

    def __call__(self, x: Tensor) -> Tensor:
        y = F.linear(F.gelu(F.linear(x, self.first.weight, self.first.bias)), self.second.weight, self.second.bias)
        return torch.zeros_like(y) if self.zero else y


@pytest.fixture(scope="module")
def tokens() -> Tensor:
    """Four contexts of 24 tokens."""
    return torch.randint(1000, 20000, (4, 24), generator=torch.Generator().manual_seed(0))


def test_the_exact_mlp_keeps_the_embeddings(minilm, tokens):
    exact = cast(SAE, ExactMLP(minilm.blocks[LAYER].mlp))
    metrics = embedding_metrics(minilm, exact, input_hook=MLP_IN, output_hook=MLP_OUT, tokens=tokens)
    assert metrics["embedding_cos"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["embedding_cos_zero"] < 0.999  # ablating an MLP moves the embeddings


def test_zeros_score_as_the_ablation(minilm, tokens):
    zero = cast(SAE, ExactMLP(minilm.blocks[LAYER].mlp, zero=True))
    metrics = embedding_metrics(minilm, zero, input_hook=MLP_IN, output_hook=MLP_OUT, tokens=tokens)
    assert metrics["embedding_cos"] == pytest.approx(metrics["embedding_cos_zero"], abs=1e-6)


class Reconstruction:
    """Stands in for an SAE: it returns its input (`exact`) or zeros."""

    def __init__(self, *, exact: bool):
        self.exact = exact

    def __call__(self, x: Tensor) -> Tensor:
        return x.clone() if self.exact else torch.zeros_like(x)


def test_an_sae_splices_its_reconstruction_at_its_hook(minilm, tokens):
    hooks = {"input_hook": MLP_OUT, "output_hook": MLP_OUT}
    exact = embedding_metrics(minilm, cast(SAE, Reconstruction(exact=True)), **hooks, tokens=tokens)
    zero = embedding_metrics(minilm, cast(SAE, Reconstruction(exact=False)), **hooks, tokens=tokens)
    ablated = embedding_metrics(
        minilm,
        cast(SAE, ExactMLP(minilm.blocks[LAYER].mlp, zero=True)),
        input_hook=MLP_IN,
        output_hook=MLP_OUT,
        tokens=tokens,
    )
    assert exact["embedding_cos"] == pytest.approx(1.0, abs=1e-6)
    assert zero["embedding_cos"] == pytest.approx(zero["embedding_cos_zero"], abs=1e-6)
    assert zero["embedding_cos_zero"] == pytest.approx(ablated["embedding_cos_zero"], abs=1e-6)
    assert zero["embedding_cos"] < 0.999
