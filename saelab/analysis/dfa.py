"""Direct feature attribution of each latent's top examples, for dictionaries on `blocks.L.attn.hook_z`: the
feature page's bar chart of the heads and its source-token highlighting (as Neuronpedia and SAEDashboard show DFA).

The pass itself never runs the model; this panel does, once per context that holds a top example (batched, every
latent of a context at once, `saelab.heads.attribution_at`), after the code is in. It is part of the pass rather
than computed by the page because the page then reads one latent's numbers, as for every other panel, instead of
running the model on 20 contexts per view (seconds for a large model, and the app lends its model copies one
request at a time).

A top example's context is rebuilt from the store: its rows' tokens at their positions; positions the store left out
(`drop_special_tokens`, the default) hold the framing tokens the harvest put there (`SpecialTokens`: the prefix at the
start, the suffix at the end, the document separator in between), so the model reads the context as it did then.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from transformer_lens import HookedTransformer

from saelab.dictionaries import SAE
from saelab.errors import StoreError
from saelab.heads import attribution_at, encoder_map
from saelab.models import is_encoder
from saelab.store import ActivationStore
from saelab.text import SpecialTokens

CONTEXTS_PER_PASS = 32
"""Contexts the model reads at a time for the DFA panels."""


class DfaPanels(NamedTuple):
    """Each latent's direct feature attribution at its top examples (the analysis panels `dfa_heads`, `dfa_sources`)."""

    heads: np.ndarray
    """`[d_sae, n_top, n_heads]`: each head's term in the latent's pre-activation at the example (0 for padding)."""
    sources: np.ndarray
    """`[d_sae, n_top, 2 * window + 1]`: each source token's term (summed over the heads), for the tokens of the
    example's context window (`top_tokens`), 0 outside the context; the sources outside the window are not kept
    (with the window's, they add up to the heads' total)."""


class _Contexts(NamedTuple):
    """The store's rows `[0, n)` that hold every top example's context: their context ids, positions and tokens."""

    ids: np.ndarray
    positions: np.ndarray
    tokens: np.ndarray


def _model_input(contexts: _Contexts, model: HookedTransformer, spans: np.ndarray, length: int) -> np.ndarray:
    """The model's input `[len(spans), length]`: the contexts whose rows are `spans[i, 0]:spans[i, 1]`."""
    out = np.full((len(spans), length), -1, dtype=np.int64)
    for i, (first, end) in enumerate(spans.tolist()):
        out[i, contexts.positions[first:end]] = contexts.tokens[first:end]
    if (out >= 0).all():
        return out
    if model.tokenizer is None:
        raise StoreError(
            "the store left out some positions of its contexts (`drop_special_tokens`) and the model has no "
            "tokenizer to say which tokens were there; harvest with `drop_special_tokens: false` for the DFA panels"
        )
    special = SpecialTokens.for_tokenizer(model.tokenizer, is_encoder(model))
    fill = np.full(length, -1 if special.separator is None else special.separator, dtype=np.int64)
    fill[: len(special.prefix)] = special.prefix
    if special.suffix:
        fill[length - len(special.suffix) :] = special.suffix
    out = np.where(out < 0, fill[None], out)
    if (out < 0).any():
        raise StoreError(
            "the store left out positions inside its contexts and the model has no document separator to fill them; "
            "harvest with `drop_special_tokens: false` for the DFA panels"
        )
    return out


def dfa_panels(
    store: ActivationStore,
    sae: SAE,
    model: HookedTransformer,
    *,
    hook: str,
    top_rows: np.ndarray,
    window: int,
) -> DfaPanels:
    """`DfaPanels` of the top examples `top_rows` `[d_sae, n_top]` (store rows, -1 padded) of `sae`, which reads the
    model's `hook` (`blocks.L.attn.hook_z`)."""
    d_sae, n_top = top_rows.shape
    heads = np.zeros((d_sae, n_top, model.cfg.n_heads), np.float32)
    sources = np.zeros((d_sae, n_top, 2 * window + 1), np.float32)
    latent, slot = np.nonzero(top_rows >= 0)
    rows = top_rows[latent, slot]
    if not len(rows):
        return DfaPanels(heads, sources)
    length = int(store.config.get("context_length") or model.cfg.n_ctx)
    span = slice(0, min(store.n_tokens, int(rows.max()) + max(length, window) + 1))
    held = _Contexts(store.contexts(span), store.positions(span), store.tokens(span))
    if (np.diff(held.ids) < 0).any():
        raise StoreError(f"the rows of the store {store.path} are not in context order; harvest it again")
    contexts, which = np.unique(held.ids[rows], return_inverse=True)
    spans = np.stack([np.searchsorted(held.ids, contexts), np.searchsorted(held.ids, contexts, side="right")], 1)
    around = rows[:, None] + np.arange(-window, window + 1)
    inside = (around >= 0) & (around < len(held.ids))
    safe = np.where(inside, around, 0)
    inside &= held.ids[safe] == held.ids[rows][:, None]
    src = np.where(inside, held.positions[safe], 0).astype(np.int64)
    dest = held.positions[rows].astype(np.int64)
    encoder = encoder_map(sae)  # once: it costs a d_in x d_in x d_sae product
    for start in range(0, len(contexts), CONTEXTS_PER_PASS):
        items = np.flatnonzero((which >= start) & (which < start + CONTEXTS_PER_PASS))
        tokens = torch.from_numpy(_model_input(held, model, spans[start : start + CONTEXTS_PER_PASS], length))
        found = attribution_at(
            model,
            sae,
            tokens,
            rows=torch.from_numpy(which[items] - start),
            dests=torch.from_numpy(dest[items]),
            latents=torch.from_numpy(latent[items].astype(np.int64)),
            hook=hook,
            encoder=encoder,
        )
        heads[latent[items], slot[items]] = found.per_head.numpy()
        shown = np.take_along_axis(found.by_source.numpy(), src[items], axis=1)
        sources[latent[items], slot[items]] = np.where(inside[items], shown, 0)
    return DfaPanels(heads, sources)
