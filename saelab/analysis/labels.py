"""Labels for every latent, offline: the tokens and bigrams that distinguish a latent's top contexts from background
text, with a score, computed in the analysis pass and stored with the feature pages.

**Contrastive label** (`contrastive_labels`): the foreground of a latent is its top examples' own tokens (the token
where it fired) and the bigrams ending there; the background is the same n-grams over the analysed store's rows
(never across a context boundary). Each candidate n-gram is scored by the log-odds ratio with an informative
Dirichlet prior (Monroe, Colaresi & Quinn 2008, "Fightin' Words", eq. 22): with foreground counts `y_f` (total
`n_f`), background counts `y_b` (total `n_b`) and the prior `a_w = prior * p_b(w)` (`a_0 = prior`, the background's
frequencies as the prior, the paper's informative prior),

    delta = log((y_f + a_w) / (n_f + a_0 - y_f - a_w)) - log((y_b + a_w) / (n_b + a_0 - y_b - a_w))
    z = delta / sqrt(1 / (y_f + a_w) + 1 / (y_b + a_w))

and a latent's label is its `n_labels` n-grams of highest z (`label_tokens [d_sae, n_labels, 2]`, -1 padded;
`label_scores [d_sae, n_labels]`, NaN where there is none).

**Embedding-detection score** (`embedding_auroc`), in the spirit of delphi's embedding scorer (EleutherAI/delphi,
`delphi/scorers/embedding`): the label's text is the query, the latent's top contexts the positives and random
contexts of the same store the negatives; all are embedded by MiniLM (`saelab.steering.search.embed`, sentence-
transformers' pooling) and each context scored by its cosine to the label. The AUROC of that score separating
positives from negatives is the latent's score: 1 when the label picks out exactly where the latent fires, 0.5 when
it says nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from saelab.errors import ConfigError
from saelab.models import Model

PRIOR = 100.0
"""`a_0`, the prior's total count: the background's frequencies weigh as much as this many foreground tokens."""


class Labels(NamedTuple):
    """Each latent's contrastive label."""

    tokens: np.ndarray
    """`[d_sae, n_labels, 2]` int32: each label n-gram's token ids (a unigram's second is -1; -1 -1: none)."""
    scores: np.ndarray
    """`[d_sae, n_labels]` float32: each n-gram's z-scored log-odds (NaN: none)."""


def _ngrams(tokens: np.ndarray, same_context: np.ndarray) -> np.ndarray:
    """Keys of the unigrams and bigrams ending at each position of `tokens [...]` (a bigram's previous token is
    `tokens[..., i - 1]` where `same_context` says it is in the same context): `[..., 2]` int64, -1 where none.
    A unigram's key is its id; a bigram's `(a + 1) * 2**31 + b`, never a unigram's."""
    uni = tokens.astype(np.int64)
    prev = np.concatenate([np.full_like(uni[..., :1], -1), uni[..., :-1]], axis=-1)
    ok = same_context & (prev >= 0) & (uni >= 0)
    bi = np.where(ok, (prev + 1) * 2**31 + uni, -1)
    return np.stack([np.where(uni >= 0, uni, -1), bi], axis=-1)


def _decode_key(key: np.ndarray) -> np.ndarray:
    """`_ngrams`' keys back to `[..., 2]` token ids (-1 padded)."""
    first = np.where(key >= 2**31, key // 2**31 - 1, key)
    second = np.where(key >= 2**31, key % 2**31, -1)
    return np.stack([np.where(key < 0, -1, first), np.where(key < 0, -1, second)], axis=-1).astype(np.int32)


def background_counts(tokens: np.ndarray, context: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The background: sorted n-gram keys of the store's rows `tokens [n]` (contexts `context [n]`) and their counts."""
    if len(tokens) == 0:
        raise ConfigError("contrastive labels need background text; the store has no rows")
    same = np.concatenate([[False], context[1:] == context[:-1]])
    keys = _ngrams(tokens, same).reshape(-1)
    return np.unique(keys[keys >= 0], return_counts=True)


def contrastive_labels(
    top_tokens: np.ndarray,
    background: tuple[np.ndarray, np.ndarray],
    *,
    n_labels: int = 3,
    prior: float = PRIOR,
) -> Labels:
    """Each latent's label from its top examples' windows `top_tokens [d_sae, n_top, 2 window + 1]` (the analysis
    pass's `top_tokens`, -1 outside a context, the example's own token in the middle) against `background`
    (`background_counts`); see the module docstring."""
    if top_tokens.ndim != 3 or top_tokens.shape[2] % 2 == 0:
        raise ConfigError(f"top_tokens must be [d_sae, n_top, 2 window + 1], got shape {top_tokens.shape}")
    d_sae, mid = top_tokens.shape[0], top_tokens.shape[2] // 2
    bg_keys, bg_counts = background
    here = top_tokens[:, :, mid]
    prev = top_tokens[:, :, mid - 1] if mid > 0 else np.full_like(here, -1)
    keys = _ngrams(np.stack([prev, here], -1), np.ones((*here.shape, 2), bool))[:, :, 1]  # [d_sae, n_top, 2]
    latent = np.broadcast_to(np.arange(d_sae)[:, None, None], keys.shape)
    ok = keys >= 0
    pairs, fg = np.unique(np.stack([latent[ok], keys[ok]], 1), axis=0, return_counts=True)
    is_bi = pairs[:, 1] >= 2**31
    totals = np.stack([np.bincount(pairs[:, 0], weights=fg * (is_bi == b), minlength=d_sae) for b in (False, True)])
    n_f = totals[is_bi.astype(int), pairs[:, 0]]  # the latent's count of n-grams of the same length
    where = np.clip(np.searchsorted(bg_keys, pairs[:, 1]), 0, len(bg_keys) - 1)
    y_b = np.where(bg_keys[where] == pairs[:, 1], bg_counts[where], 0).astype(np.float64)
    bg_bi = bg_keys >= 2**31
    n_b = np.where(is_bi, bg_counts[bg_bi].sum(), bg_counts[~bg_bi].sum()).astype(np.float64)
    kinds = np.where(is_bi, bg_bi.sum(), (~bg_bi).sum())  # distinct background n-grams of the same length
    a_w = prior * (y_b + 0.5) / (n_b + 0.5 * kinds)  # add-half smoothing: an n-gram the background lacks
    y_f = fg.astype(np.float64)
    delta = np.log((y_f + a_w) / (n_f + prior - y_f - a_w)) - np.log((y_b + a_w) / (n_b + prior - y_b - a_w))
    z = delta / np.sqrt(1 / (y_f + a_w) + 1 / (y_b + a_w))
    order = np.lexsort((-z, pairs[:, 0]))
    pairs, z = pairs[order], z[order]
    starts = np.searchsorted(pairs[:, 0], np.arange(d_sae))
    rank = np.arange(len(pairs)) - starts[pairs[:, 0]]
    keep = rank < n_labels
    label_keys = np.full((d_sae, n_labels), -1, np.int64)
    scores = np.full((d_sae, n_labels), np.nan, np.float32)
    label_keys[pairs[keep, 0], rank[keep]] = pairs[keep, 1]
    scores[pairs[keep, 0], rank[keep]] = z[keep]
    return Labels(_decode_key(label_keys), scores)


def context_windows(tokens: np.ndarray, context: np.ndarray, rows: np.ndarray, *, window: int) -> np.ndarray:
    """The analysis pass's `top_tokens` layout for `rows [n]` of a store's `tokens`/`context`: `[n, 2 window + 1]`,
    the row's token in the middle, -1 outside its context."""
    around = rows[:, None] + np.arange(-window, window + 1)
    safe = np.clip(around, 0, len(tokens) - 1)
    inside = (around >= 0) & (around < len(tokens)) & (context[safe] == context[rows][:, None])
    return np.where(inside, tokens[safe], -1)


def is_wordpiece(vocab: Sequence[str]) -> bool:
    """Whether `vocab` is WordPiece's (`##` continuations, as MiniLM's) rather than byte-level BPE's."""
    return any(v.startswith("##") for v in vocab[:5000])


def join_pieces(ids: Sequence[int], vocab: Sequence[str], *, wordpiece: bool | None = None) -> str:
    """Token ids as text: WordPiece vocabularies get a space before each word, others (byte-level BPE, whose pieces
    carry their own spaces) are concatenated; `wordpiece`: `is_wordpiece(vocab)`, given when joining many."""
    if wordpiece is None:
        wordpiece = is_wordpiece(vocab)
    out = ""
    for t in ids:
        piece = vocab[t] if 0 <= t < len(vocab) else f"<{t}>"
        if wordpiece:
            out += piece[2:] if piece.startswith("##") else f" {piece}"
        else:
            out += piece
    return out.strip()


def label_text(tokens: np.ndarray, vocab: Sequence[str], *, scores: np.ndarray | None = None) -> str:
    """One latent's label `[n_labels, 2]` as text: its n-grams quoted, `" | "` between them, each with its score
    when `scores` is given; empty when it has none."""
    parts = []
    for i, gram in enumerate(tokens):
        ids = [int(t) for t in gram if t >= 0]
        if ids:
            parts.append(repr(join_pieces(ids, vocab)) + (f" {scores[i]:.1f}" if scores is not None else ""))
    return " | ".join(parts)


def search_labels(tokens: np.ndarray, scores: np.ndarray, vocab: Sequence[str], text: str) -> list[int]:
    """The latents whose label (`Labels.tokens [d_sae, n_labels, 2]`, `Labels.scores`) has an n-gram holding `text`
    as whole words (case and spacing ignored: `value` finds `'absolute value'`, `val` does not), best matching
    n-gram's score first (ties: the lower id)."""
    query = " ".join(text.lower().split())
    if not query:
        raise ConfigError("the label search text is empty; type a word of a label, e.g. return")
    padded, wordpiece = f" {query} ", is_wordpiece(vocab)
    texts: dict[tuple[int, int], bool] = {}
    best: dict[int, float] = {}
    for latent, slot in zip(*np.nonzero((tokens >= 0).any(2)), strict=True):
        gram = (int(tokens[latent, slot, 0]), int(tokens[latent, slot, 1]))
        if gram not in texts:
            words = join_pieces([t for t in gram if t >= 0], vocab, wordpiece=wordpiece).lower().split()
            texts[gram] = padded in f" {' '.join(words)} "
        if texts[gram]:
            score = float(scores[latent, slot])
            best[int(latent)] = max(best.get(int(latent), -np.inf), score if np.isfinite(score) else -np.inf)
    return sorted(best, key=lambda i: (-best[i], i))


def label_query(tokens: np.ndarray, vocab: Sequence[str]) -> str:
    """The text a label `[n_labels, 2]` is embedded as: its n-grams' text, space-separated."""
    return " ".join(join_pieces([int(t) for t in gram if t >= 0], vocab) for gram in tokens if (gram >= 0).any())


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """The probability that a positive scores above a negative (ties count half): the Mann-Whitney AUROC."""
    if len(positive) == 0 or len(negative) == 0:
        raise ConfigError("AUROC needs at least one positive and one negative")
    above = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
    return float(above / (len(positive) * len(negative)))


def detection_aurocs(
    model: Model, queries: Sequence[str], positives: Sequence[Sequence[str]], negatives: Sequence[str]
) -> np.ndarray:
    """The embedding-detection score of each label (see the module docstring): for label `i`, the AUROC of the
    contexts' MiniLM cosine to `queries[i]`, `positives[i]` (where latent `i` fires) against `negatives` (random
    contexts, shared). Everything is embedded in one call. `[len(queries)]` float64."""
    from saelab.steering.search import embed

    if len(queries) != len(positives):
        raise ConfigError(f"{len(queries)} labels but {len(positives)} sets of positives; give one set per label")
    empty = [i for i, q in enumerate(queries) if not q]
    if empty:
        raise ConfigError(f"labels {empty} are empty (their latents never fired); score only latents that fired")
    flat = [text for group in positives for text in group]
    with torch.no_grad():
        e = embed(model, [*queries, *flat, *negatives]).cpu().numpy()
    q, pos, neg = e[: len(queries)], e[len(queries) : len(queries) + len(flat)], e[len(queries) + len(flat) :]
    out, start = np.zeros(len(queries)), 0
    for i, group in enumerate(positives):
        out[i] = auroc(pos[start : start + len(group)] @ q[i], neg @ q[i])
        start += len(group)
    return out
