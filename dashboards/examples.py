"""Highlighted token contexts of a latent's examples: how each token of a vocab shows (`ContextTokens`, worked out
once per analysis) and the rows of examples on the feature page (`examples`), as plain element dicts."""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np

from saelab.analysis import FeatureStore
from saelab.dashboards.components import Element, data, element
from saelab.dashboards.data import context_vocab, token_text
from saelab.plots import HIGHLIGHT, NEGATIVE


def _display(token: str) -> str:
    """Show newlines and tabs as symbols, so every example stays on one line."""
    return token.replace("\r", "").replace("\n", "↵").replace("\t", "⇥")


class Piece(NamedTuple):
    """How an example's context shows one token (`examples`)."""

    quiet: str
    """The token where the latent is off (newlines and tabs as symbols)."""
    lead: str
    """Its leading spaces: where the latent is on they stay unshaded, before the shaded span."""
    shown: str
    """The rest of it, in the shaded span."""
    title: str
    """The start of the shaded span's hover text (the token's `repr`), before the value's label."""


def _piece(text: str) -> Piece:
    stripped = text.lstrip(" ")
    return Piece(_display(text), text[: len(text) - len(stripped)], _display(stripped), f"{text!r}  ")


class ContextTokens:
    """A vocab's tokens as `examples` shows them, worked out once for every token id (`context_tokens`)."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab
        self.pieces = [_piece(text) for text in vocab]
        self._quiet = np.array([p.quiet for p in self.pieces] + [""], dtype=object)  # [-1]: padding shows nothing

    def __getitem__(self, token_id: int) -> Piece:
        """The token's `Piece` (`<id>` outside the vocab, as `token_text` shows it)."""
        if 0 <= token_id < len(self.pieces):
            return self.pieces[token_id]
        return _piece(token_text(self.vocab, token_id))

    def quiet(self, ids: np.ndarray) -> list[list[str]]:
        """`Piece.quiet` of every token of `ids` `[example, position]`, "" for padding (ids below 0)."""
        if (ids >= len(self.pieces)).any():  # ids outside the vocab: one at a time
            return [[self[t].quiet if t >= 0 else "" for t in row] for row in ids.tolist()]
        return self._quiet[np.where(ids >= 0, ids, -1)].tolist()


@functools.lru_cache(maxsize=16)
def context_tokens(fs: FeatureStore) -> ContextTokens:
    """The `ContextTokens` of an analysis's vocab for running text (`context_vocab`), once per analysis."""
    return ContextTokens(context_vocab(fs))


class Example(NamedTuple):
    """One example's tokens, as `_context` shows them."""

    ids: list[int]
    """Its token ids (below 0: padding)."""
    acts: list[float]
    """The latent's activation on each."""
    quiet: list[str]
    """Each as shown unshaded (`Piece.quiet`; "" for padding)."""
    shaded: list[int]
    """The positions shown shaded: where the latent is on, and the example's own token."""


def _context(tokens: ContextTokens, example: Example, *, centre: int, scale: float, label: str) -> Element:
    """One example's tokens (an `html.Span` as an `element`): the shaded ones in spans shaded by their value's size
    (`HIGHLIGHT` for a positive value, `NEGATIVE` for a negative one), which shows on hover after `label`, the
    example's own token (at `centre`) outlined, and the runs of tokens between them as plain text (fewer
    components)."""
    spans: list[Element | str] = []
    start = 0
    for pos in example.shaded:
        piece, act = tokens[example.ids[pos]], example.acts[pos]
        if text := "".join(example.quiet[start:pos]) + piece.lead:  # a word's leading space stays unshaded
            spans.append(text)
        alpha = min(abs(act) / scale, 1.0) if scale > 0 else 0.0
        spans.append(
            element(
                "Span",
                piece.shown,
                title=f"{piece.title}{label} {act:.3f}",
                style={"backgroundColor": f"rgba({HIGHLIGHT if act >= 0 else NEGATIVE}, {0.1 + 0.8 * alpha:.2f})"},
                className="tok centre" if pos == centre else "tok",
            )
        )
        start = pos + 1
    if text := "".join(example.quiet[start:]):
        spans.append(text)
    return element("Span", spans, className="context")


def examples(
    tokens: ContextTokens,
    acts: np.ndarray,
    ids: np.ndarray,
    *,
    token_acts: np.ndarray,
    centre: int,
    scale: float,
    testid: str,
    label: str = "activation",
) -> Element:
    """Rows of examples (`ids` and `token_acts` `[example, position]`), strongest first: activation, context
    highlighted by `token_acts` (the latent's activation on each token, or, `label`led otherwise, any signed value
    such as each source token's attribution); padding rows (no token) are skipped."""
    real = ids >= 0
    on = np.nonzero(real & ((token_acts != 0) | (np.arange(ids.shape[1]) == centre)))
    shaded: list[list[int]] = [[] for _ in ids]
    for i, pos in zip(on[0].tolist(), on[1].tolist()):
        shaded[i].append(pos)
    each = [Example(*row) for row in zip(ids.tolist(), token_acts.tolist(), tokens.quiet(ids), shaded)]
    values, shown = acts.tolist(), set(np.flatnonzero(real.any(axis=1)).tolist())
    rows = [
        element(
            "Div",
            [
                element("Span", f"{values[i]:.2f}", className="act"),
                _context(tokens, each[i], centre=centre, scale=scale, label=label),
            ],
            className="example",
        )
        for i in np.argsort(-acts, kind="stable").tolist()
        if i in shown
    ]
    return element("Div", rows or element("Div", "No examples.", className="muted"), **data(testid=testid))
