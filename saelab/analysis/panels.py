"""Dictionary panels, computed from the weights alone: residual directions, logit effects, decoder neighbours."""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
import torch

from saelab.dictionaries import SAE, CrossCoder
from saelab.models import Model, is_encoder


class LogitEffects(NamedTuple):
    """The tokens each direction promotes and suppresses most, `[n_directions, n]` each, strongest first."""

    kind: Literal["embedding_cosine", "unembedding"]
    """`unembedding` (decoders: through the final norm and `W_U`) or `embedding_cosine` (encoders: `W_E`)."""
    top_ids: np.ndarray
    """Token ids of the largest effects (int32)."""
    top_vals: np.ndarray
    """The largest effects (float32)."""
    bottom_ids: np.ndarray
    """Token ids of the smallest effects (int32)."""
    bottom_vals: np.ndarray
    """The smallest effects (float32)."""


def residual_directions(model: Model, sae: SAE | CrossCoder, hook: str, *, source: int = 0) -> torch.Tensor:
    """Decoder rows as residual-stream directions of `model` at its hook point `hook` (`attn.hook_z` rows go through
    `W_O`); a crosscoder's rows of its source `source`, in the raw units of its activations (its input scale undone,
    as `CrossCoder.decode` does)."""
    if isinstance(sae, CrossCoder):
        w = (sae.W_dec.detach()[:, source] / sae.input_scale[source]).float().cpu()
    else:
        w = sae.W_dec.detach().float().cpu()
    if hook.endswith("attn.hook_z"):
        layer = int(hook.split(".")[1])
        W_O = model.blocks[layer].attn.W_O.detach().float().cpu()  # [n_heads, d_head, d_model]
        w = w.view(-1, *W_O.shape[:2]).flatten(1) @ W_O.flatten(0, 1)
    return w


def logit_effects(model: Model, dirs: torch.Tensor, n: int, *, block: int = 1024) -> LogitEffects:
    """Top and bottom tokens of each direction: through the final norm and unembedding for decoders,
    by cosine with the token embeddings for encoders (whose MLM head may be untrained)."""
    kind: Literal["embedding_cosine", "unembedding"]
    if is_encoder(model):
        kind = "embedding_cosine"
        W = model.W_E.detach().float().cpu()
        W = (W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)).T
        dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-8)
    else:
        kind = "unembedding"
        W = model.W_U.detach().float().cpu()
        ln = getattr(model, "ln_final", None)
        if getattr(model.cfg, "normalization_type", None) in ("LN", "LNPre"):
            dirs = dirs - dirs.mean(1, keepdim=True)  # LayerNorm removes the mean, then scales by w
        if ln is not None and hasattr(ln, "w"):
            dirs = dirs * ln.w.detach().float().cpu()
    out: list[list[np.ndarray]] = [[], [], [], []]
    for i in range(0, len(dirs), block):
        e = dirs[i : i + block] @ W
        tv, ti = e.topk(n, dim=1)
        bv, bi = e.topk(n, dim=1, largest=False)
        for lst, t in zip(out, (ti, tv, bi, bv)):
            lst.append(t.numpy())
    top_i, top_v, bot_i, bot_v = (np.concatenate(x) for x in out)
    return LogitEffects(
        kind, top_i.astype(np.int32), top_v.astype(np.float32), bot_i.astype(np.int32), bot_v.astype(np.float32)
    )


def decoder_neighbours(sae: SAE | CrossCoder, n: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Nearest latents by decoder cosine over the whole dictionary (excluding the latent itself): ids, cosines. A
    crosscoder's decoder rows are its sources' laid end to end (`[d_sae, S * d_in]`)."""
    w = sae.W_dec.detach().float().flatten(1)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)
    ids, cos = [], []
    for i in range(0, len(w), block):
        c = w[i : i + block] @ w.T
        c[torch.arange(len(c)), torch.arange(i, i + len(c))] = -2
        v, j = c.topk(min(n, len(w) - 1), dim=1)
        ids.append(j.cpu().numpy().astype(np.int32))
        cos.append(v.cpu().numpy())
    return np.concatenate(ids), np.concatenate(cos)
