"""A decoder with MLPs whose attribution graph has a known answer, its weights set by hand.

Vocabulary: the induction toy's character tokenizer (`saelab.toys.induction.induction_tokenizer`, 65 ids), of which
the model uses `A` (id 0), `B` (1), the fillers `C`, `D`, `E` (2..4) and BOS (64). In layer 0, MLP neuron 0 fires on `A` and
writes an "A was here" direction; neurons 1..3 fire on the fillers. In layer 1, head 0 (`KNOWN_HEAD`) attends from
every position to the positions where "A was here" is written and moves it to a "carried" direction; head 1 attends
uniformly and copies filler `C`. Layer 1's neuron 0 reads "carried" and writes the direction that the unembedding
reads as `B`; its neuron 1 reads head 1's output and predicts `C`. So on a prompt with `A` at position `i` the model
predicts `B`, and the attribution graph's top path is: token `A` at `i` -> layer 0 latent 0 at `i` -> (through head
1.0) -> layer 1 latent 0 at the last position -> logit `B`. The transcoders are the MLPs themselves (their neurons
the latents), with optional noise on their decoders so that the error nodes carry something.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, cast

import torch
from torch import Tensor
from transformer_lens import HookedTransformer, HookedTransformerConfig

from saelab.dictionaries import SAE, SAEConfig
from saelab.models import save_model
from saelab.run import RunDir
from saelab.toys.induction import induction_tokenizer

A, B, C = 0, 1, 2
BOS = 64
VOCAB = 65
_DIM = {BOS: 0, A: 1, B: 2, C: 3, C + 1: 4, C + 2: 5}
"""The residual direction each token's embedding writes."""
KNOWN_HEAD = (1, 0)
"""(layer, head) that carries the known edge."""
_D = 16
_D_MLP = 8
_A_HERE, _CARRIED, _FILLER_HERE, _H1_OUT, _PREDICT_B, _PREDICT_C = 6, 7, 8, 11, 12, 13


class MLPGraphToy(NamedTuple):
    """The hand-built model, its transcoders and a prompt with the known path."""

    model: HookedTransformer
    """The two-layer decoder."""
    transcoders: list[SAE]
    """One ReLU transcoder per layer's MLP."""
    tokens: Tensor
    """`[n_pos]` a prompt with `A` at `a_pos` and fillers elsewhere."""
    a_pos: int
    """Where `A` is."""
    path: list[str]
    """The known top path's node labels (`AttributionGraph.node_label`), token first."""


def mlp_graph_model(n_ctx: int = 64, tokenizer: Any = None) -> HookedTransformer:
    """The hand-built decoder (no LayerNorm, standard positions with a zero positional embedding), with `tokenizer`
    (`induction_tokenizer(folder)`) when one is given."""
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=_D, n_heads=2, d_head=4, d_mlp=_D_MLP, d_vocab=VOCAB, n_ctx=n_ctx, act_fn="relu",
        normalization_type=None, positional_embedding_type="standard", model_name="mlp-graph-toy",
    )  # fmt: skip
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for token, dim in _DIM.items():
            model.W_E[token, dim] = 1.0
        mlp0, mlp1 = cast(Any, model.blocks[0].mlp), cast(Any, model.blocks[1].mlp)
        mlp0.W_in[_DIM[A], 0], mlp0.W_out[0, _A_HERE] = 1.0, 1.0
        for j in range(3):  # filler detectors
            mlp0.W_in[_DIM[C + j], 1 + j], mlp0.W_out[1 + j, _FILLER_HERE + j] = 1.0, 1.0
        attn = cast(Any, model.blocks[1].attn)
        attn.b_Q[0, 0], attn.W_K[0, _A_HERE, 0] = 20.0, 1.0  # head 1.0 looks for "A was here"
        attn.W_V[0, _A_HERE, 0], attn.W_O[0, 0, _CARRIED] = 1.0, 1.0
        attn.W_V[1, _DIM[C], 0], attn.W_O[1, 0, _H1_OUT] = 1.0, 1.0  # head 1.1: uniform, copies C
        mlp1.W_in[_CARRIED, 0], mlp1.b_in[0], mlp1.W_out[0, _PREDICT_B] = 1.0, -0.2, 1.0
        mlp1.W_in[_H1_OUT, 1], mlp1.W_out[1, _PREDICT_C] = 1.0, 1.0
        model.W_U[_PREDICT_B, B], model.W_U[_PREDICT_C, C] = 10.0, 4.0
        for j in range(3):
            model.W_U[_FILLER_HERE + j, C + j] = 1.0
    return model.eval()


def mlp_transcoder(model: HookedTransformer, layer: int, *, noise: float = 0.0, seed: int = 0) -> SAE:
    """A ReLU transcoder that is layer `layer`'s MLP, its decoder rows plus Gaussian noise of standard deviation
    `noise` per entry."""
    mlp: Any = model.blocks[layer].mlp
    cfg = SAEConfig(
        arch="relu", d_in=_D, d_sae=_D_MLP, d_out=_D, hook_name=f"blocks.{layer}.hook_mlp_in",
        hook_name_out=f"blocks.{layer}.hook_mlp_out", dtype="float32",
    )  # fmt: skip
    sae = SAE.from_config(cfg).eval()
    gen = torch.Generator().manual_seed(seed + layer)
    with torch.no_grad():
        for mine, its in ((sae.W_enc, mlp.W_in), (sae.b_enc, mlp.b_in), (sae.W_dec, mlp.W_out), (sae.b_dec, mlp.b_out)):
            mine.copy_(its)
        sae.W_dec += noise * torch.randn(sae.W_dec.shape, generator=gen)
    return sae


def mlp_graph_prompts(n: int, *, n_pos: int = 8, a_pos: int = 2, seed: int = 0) -> Tensor:
    """`[n, n_pos]` prompts of the toy's task: BOS, then random fillers with `A` at `a_pos` (held-out prompts for a
    graph found on one of them)."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(C, C + 3, (n, n_pos), generator=gen)
    tokens[:, 0], tokens[:, a_pos] = BOS, A
    return tokens


def mlp_graph_toy(n_pos: int = 8, a_pos: int = 2, *, noise: float = 0.0, seed: int = 0) -> MLPGraphToy:
    """The toy on a prompt of `n_pos` tokens (BOS, then random fillers with `A` at `a_pos`)."""
    tokens = mlp_graph_prompts(1, n_pos=n_pos, a_pos=a_pos, seed=seed)[0]
    model = mlp_graph_model(max(64, n_pos))
    tcs = [mlp_transcoder(model, layer, noise=noise, seed=seed) for layer in range(2)]
    path = [f"tok {A}@{a_pos}", f"L0/0@{a_pos}", f"L1/0@{n_pos - 1}", f"logit {B}"]
    return MLPGraphToy(model, tcs, tokens, a_pos, path)


def mlp_graph_run(root: Path, *, noise: float = 0.01) -> Path:
    """A run folder at `root` holding the toy's model (`root/model`, with the induction toy's tokenizer) and its two
    transcoders (`blocks.{layer}.hook_mlp_in`, named `exact`, decoder noise `noise`), ready for `saelab graph`."""
    model = mlp_graph_model(tokenizer=induction_tokenizer(root / "tok"))
    save_model(model, root / "model")
    for layer in range(2):
        mlp_transcoder(model, layer, noise=noise).save(RunDir(root).sae(f"blocks.{layer}.hook_mlp_in", "exact"))
    return root
