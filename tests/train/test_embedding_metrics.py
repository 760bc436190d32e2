"""`embedding_metrics` on MiniLM: a stand-in transcoder that gives the MLP's true output leaves the mean-pooled
sentence embeddings as they are (cosine 1 to 1e-5); one that gives zeros scores as the zero-ablation baseline."""

from __future__ import annotations

from typing import cast

import pytest
import torch
from torch import Tensor

from saelab.dictionaries import SAE
from saelab.train.metrics import embedding_metrics

LAYER = 2
MLP_IN, MLP_OUT = f"blocks.{LAYER}.hook_mlp_in", f"blocks.{LAYER}.hook_mlp_out"


class TrueMLP:
    """Stands in for a transcoder: returns the MLP output that the unedited model computed on these contexts, once it
    is given that MLP's input (checked), or zeros (`zero`)."""

    def __init__(self, mlp_in: Tensor, mlp_out: Tensor, *, zero: bool = False):
        self.mlp_in, self.mlp_out, self.zero = mlp_in, mlp_out, zero

    def __call__(self, x: Tensor) -> Tensor:
        assert torch.equal(x, self.mlp_in.float()), "the splice gave the transcoder something else than the MLP input"
        return torch.zeros_like(self.mlp_out) if self.zero else self.mlp_out.float()


@pytest.fixture(scope="module")
def contexts(minilm):
    """Four contexts of 24 tokens, and the MLP input and output of layer 2 on them."""
    tokens = torch.randint(1000, 20000, (4, 24), generator=torch.Generator().manual_seed(0))
    got: dict[str, Tensor] = {}

    def keeper(name: str):
        def keep(act: Tensor, hook) -> None:
            got[name] = act.detach().clone()

        return keep

    minilm.run_with_hooks(tokens, fwd_hooks=[(h, keeper(h)) for h in (MLP_IN, MLP_OUT)], return_type=None)
    return tokens, got[MLP_IN], got[MLP_OUT]


def test_the_true_mlp_output_keeps_the_embeddings(minilm, contexts):
    tokens, mlp_in, mlp_out = contexts
    exact = cast(SAE, TrueMLP(mlp_in, mlp_out))
    metrics = embedding_metrics(minilm, exact, input_hook=MLP_IN, output_hook=MLP_OUT, tokens=tokens)
    assert metrics["embedding_cos"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["embedding_cos_zero"] < 0.999  # ablating an MLP moves the embeddings


def test_zeros_score_as_the_ablation(minilm, contexts):
    tokens, mlp_in, mlp_out = contexts
    zero = cast(SAE, TrueMLP(mlp_in, mlp_out, zero=True))
    metrics = embedding_metrics(minilm, zero, input_hook=MLP_IN, output_hook=MLP_OUT, tokens=tokens)
    assert metrics["embedding_cos"] == pytest.approx(metrics["embedding_cos_zero"], abs=1e-6)
