"""Composition between attention heads in different layers, from the weights alone.

Composition scores (Elhage et al. 2021, "A Mathematical Framework for Transformer Circuits"): a writer head's
`W_OV = W_V W_O` (`[d_model, d_model]`, acting on row vectors as TransformerLens writes them: `x @ W_OV`) feeds a
later reader head's query (Q: `W_QK = W_Q W_K^T`), key (K: `W_QK^T`) or value (V: its `W_OV`), and the score is
`||W_OV R||_F / (||W_OV||_F ||R||_F)` for that reader matrix `R`. It follows TransformerLens's
`HookedTransformer.all_composition_scores` (`utils.composition_scores`; the same transposes, zero where the reader's
layer is not after the writer's; like it, it reads the raw weights, so rotary positions and LayerNorm scales are not
part of `W_QK`), and equals it within float32 rounding (`tests/heads/test_composition.py`). The norms are taken
through `d_head x d_head` Gram matrices, `||A M D||_F^2 = tr(M^T (A^T A) M (D D^T))`, one reader layer at a time, so
every pair of a large model costs `d_head^3`, not `d_model^3`. Grouped-query models are read through TransformerLens's
`W_K` and `W_V`, which repeat each key/value head over the query heads that share it.

Communication channels (Merullo et al. 2024, "Talking Heads: Understanding Inter-layer Communication in Transformer
Language Models"): the writer's `W_OV = sum_i s_i u_i v_i^T` and the reader's `R = sum_j s'_j u'_j v'_j^T` (SVD); the
paper's score of writer component `i` is the composition score of the rank-1 matrix `s_i u_i v_i^T` with `R` (its
code, github.com/jmerullo/talking_heads, `exhaustive_heatmap` with `re_get_single_component`; against one reader
component `j` when it decomposes the reader too). For rank-1 matrices these are plain cosines: component `i` against
`R` scores `||v_i^T R||_F / ||R||_F`, against reader component `j` `|v_i . u'_j|` (the direction the writer writes
against the direction the reader reads). How much of the composition lives in the top directions is measured exactly:
`||W_OV R||_F^2 = sum_ij s_i^2 s'_j^2 (v_i . u'_j)^2` (the rank-1 products are orthogonal), so `Channel.energy[i, j]`,
each pair's term over the sum, adds up to 1, and `Channel.share(r)` is the part carried by the writer's top `r`
components (and the reader's top `r`, when given).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, get_args

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from saelab.errors import HeadsError
from saelab.resultfile import JsonResult

Mode = Literal["Q", "K", "V"]
MODES: tuple[Mode, ...] = get_args(Mode)


class Head(NamedTuple):
    """One attention head: its layer and its index in the layer."""

    layer: int
    head: int

    @property
    def label(self) -> str:
        """`L{layer}H{head}`, as TransformerLens's `all_head_labels`."""
        return f"L{self.layer}H{self.head}"


class HeadPair(NamedTuple):
    """A writer head composing into a later reader head."""

    mode: Mode
    """Which input of the reader the writer's output feeds: its query (Q), key (K) or value (V)."""
    writer: Head
    reader: Head
    score: float
    """The composition score, in [0, 1]."""


def _factors(model: HookedTransformer, mode: Mode | Literal["OV"]) -> tuple[Tensor, Tensor]:
    """Every head's matrix as a product `A @ B` (`A [n_layers, n_heads, d_model, d_head]`, `B [.., d_head, d_model]`),
    in float64: the writer's `W_OV` (`OV`) or the reader matrix of `mode`."""
    W_Q, W_K, W_V, W_O = (w.detach().double() for w in (model.W_Q, model.W_K, model.W_V, model.W_O))
    if mode == "Q":
        return W_Q, W_K.transpose(-1, -2)
    if mode == "K":
        return W_K, W_Q.transpose(-1, -2)
    return W_V, W_O


def _gram_norms(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`A^T A`, `B B^T` (`[.., d_head, d_head]`) and `||A B||_F` of each head."""
    gram_a, gram_b = A.transpose(-1, -2) @ A, B @ B.transpose(-1, -2)
    return gram_a, gram_b, (gram_a * gram_b).sum((-1, -2)).clamp(min=0).sqrt()


def _check_mode(mode: str) -> Mode:
    if mode not in MODES:
        raise HeadsError(f"composition mode must be one of {list(MODES)}, not {mode!r}")
    return mode  # pyright: ignore[reportReturnType]  (checked above)


def mode_scores(model: HookedTransformer, mode: Mode) -> Tensor:
    """Composition scores `[n_layers, n_heads, n_layers, n_heads]` (writer layer and head, reader layer and head)
    of one `mode`, zero unless the reader's layer comes after the writer's: TransformerLens's
    `model.all_composition_scores(mode)`, computed through Gram matrices."""
    mode = _check_mode(mode)
    A, B = _factors(model, "OV")  # the writer's W_OV = A B
    C, D = _factors(model, mode)  # the reader's R = C D
    gram_a, _, ov_norm = _gram_norms(A, B)
    _, gram_d, r_norm = _gram_norms(C, D)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    scores = torch.zeros(n_layers, n_heads, n_layers, n_heads, dtype=torch.float64, device=A.device)
    for reader in range(1, n_layers):  # one reader layer at a time: [writers, heads, d_head, d_head] in memory
        middle = torch.einsum("lhdm,gme->lhgde", B[:reader], C[reader])  # M = B_w C_r for every earlier writer
        left = torch.einsum("lhde,lhgef->lhgdf", gram_a[:reader], middle)  # (A^T A) M
        right = torch.einsum("lhgde,gef->lhgdf", middle, gram_d[reader])  # M (D D^T)
        product = (left * right).sum((-1, -2)).clamp(min=0).sqrt()  # ||A M D||_F
        scores[:reader, :, reader] = product / ov_norm[:reader, :, None] / r_norm[reader][None, None]
    return scores.float().cpu()


@dataclass
class CompositionScores(JsonResult):
    """Q-, K- and V-composition scores between every pair of heads of a model (`composition_scores`)."""

    what: ClassVar[str] = "composition result"
    command: ClassVar[str] = "saelab.heads.composition_scores(model).save(path)"
    error: ClassVar[type[Exception]] = HeadsError

    model: str
    """The model's `cfg.model_name`."""
    scores: dict[str, Tensor]
    """Per mode (`Q`, `K`, `V`): `[n_layers, n_heads, n_layers, n_heads]`, writer layer and head first, zero unless
    the reader's layer comes after the writer's."""

    @property
    def n_layers(self) -> int:
        """The model's number of layers."""
        return self.scores["K"].shape[0]

    @property
    def n_heads(self) -> int:
        """The model's number of heads per layer."""
        return self.scores["K"].shape[1]

    @property
    def labels(self) -> list[str]:
        """Every head's label, layer-major (`L0H0`, `L0H1`, ...): the rows and columns of `matrix`."""
        return [Head(layer, head).label for layer in range(self.n_layers) for head in range(self.n_heads)]

    def matrix(self, mode: Mode) -> Tensor:
        """The scores of `mode` as `[writer, reader]` over every head, layer-major (`labels`)."""
        n = self.n_layers * self.n_heads
        return self.scores[_check_mode(mode)].reshape(n, n)

    def top_pairs(self, n: int = 10, modes: tuple[Mode, ...] = MODES) -> list[HeadPair]:
        """The `n` highest-scoring (mode, writer, reader) pairs over `modes`, highest first."""
        pairs = [
            HeadPair(mode, Head(wl, wh), Head(rl, rh), float(self.scores[mode][wl, wh, rl, rh]))
            for mode in map(_check_mode, modes)
            for wl, wh, rl, rh in torch.nonzero(self.scores[mode] > 0).tolist()
        ]
        return sorted(pairs, key=lambda p: -p.score)[:n]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "scores": {mode: s.tolist() for mode, s in self.scores.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CompositionScores:
        scores = {_check_mode(mode): torch.tensor(s, dtype=torch.float32) for mode, s in data["scores"].items()}
        if set(scores) != set(MODES) or len({s.shape for s in scores.values()}) != 1 or scores["K"].ndim != 4:
            raise ValueError(f"expected scores of modes {list(MODES)}, all [n_layers, n_heads, n_layers, n_heads]")
        return cls(str(data["model"]), scores)


def composition_scores(model: HookedTransformer) -> CompositionScores:
    """Q-, K- and V-composition scores between every pair of heads in different layers of `model` (Elhage et al.
    2021; TransformerLens's `all_composition_scores` for each mode)."""
    return CompositionScores(model.cfg.model_name, {mode: mode_scores(model, mode) for mode in MODES})


@dataclass
class Channel:
    """How one writer head's output reaches one reader's input, decomposed by the singular vectors of both
    (Merullo et al. 2024; `channel`). Components are in decreasing order of singular value, `d_head` of each."""

    mode: Mode
    writer: Head
    reader: Head
    score: float
    """The pair's composition score, `||W_OV R||_F / (||W_OV||_F ||R||_F)`."""
    writer_singular_values: Tensor
    """`s_i` of the writer's `W_OV` `[d_head]`."""
    reader_singular_values: Tensor
    """`s'_j` of the reader matrix `R` `[d_head]` (`W_QK` for Q, `W_QK^T` for K, `W_OV` for V)."""
    component_scores: Tensor
    """`[d_head]`: the composition score of writer component `s_i u_i v_i^T` with the whole `R` (the paper's score
    per component), `||v_i^T R||_F / ||R||_F`."""
    pair_scores: Tensor
    """`[d_head, d_head]`: the composition score of writer component `i` with reader component `j`, `|v_i . u'_j|`."""
    energy: Tensor
    """`[d_head, d_head]`: the share of `||W_OV R||_F^2` carried by writer component `i` and reader component `j`,
    `s_i^2 s'_j^2 (v_i . u'_j)^2 / ||W_OV R||_F^2`; it sums to 1."""

    def share(self, writer_rank: int, reader_rank: int | None = None) -> float:
        """The share of `||W_OV R||_F^2` carried by the writer's top `writer_rank` components (and the reader's top
        `reader_rank`; all of the reader's when `None`)."""
        return float(self.energy[:writer_rank, :reader_rank].sum())


def _check_head(model: HookedTransformer, head: Head | tuple[int, int], role: str) -> Head:
    layer, index = head
    if not (0 <= layer < model.cfg.n_layers and 0 <= index < model.cfg.n_heads):
        raise HeadsError(
            f"{role} head {tuple(head)} is not in the model ({model.cfg.n_layers} layers of {model.cfg.n_heads} heads)"
        )
    return Head(layer, index)


def _svd(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top `rank` singular triples `U [d_model, rank]`, `S [rank]`, `V [d_model, rank]` of `A @ B` (float64)."""
    U, S, Vh = torch.linalg.svd(A @ B)
    return U[:, :rank], S[:rank], Vh[:rank].T


def channel(
    model: HookedTransformer, writer: Head | tuple[int, int], reader: Head | tuple[int, int], *, mode: Mode = "K"
) -> Channel:
    """The communication channel from `writer`'s output into `reader`'s query, key or value input (`mode`): the
    SVD of the writer's `W_OV` and the reader's matrix, each pair of components' composition score and its share
    of the composition (`Channel`)."""
    mode = _check_mode(mode)
    w, r = _check_head(model, writer, "writer"), _check_head(model, reader, "reader")
    if r.layer <= w.layer:
        raise HeadsError(f"the reader {r.label} must be in a later layer than the writer {w.label}")
    A, B = _factors(model, "OV")
    C, D = _factors(model, mode)
    rank = model.cfg.d_head
    _, s_w, v_w = _svd(A[w], B[w], rank)  # the writer writes along v_i (x @ W_OV = (x @ U) S V^T)
    u_r, s_r, _ = _svd(C[r], D[r], rank)  # the reader reads along u'_j
    cosines = v_w.T @ u_r  # [i, j]: v_i . u'_j
    terms = (s_w[:, None] * s_r[None, :] * cosines) ** 2
    total = terms.sum()
    r_norm = s_r.norm()
    return Channel(
        mode=mode,
        writer=w,
        reader=r,
        score=float(total.sqrt() / (s_w.norm() * r_norm)),
        writer_singular_values=s_w.float().cpu(),
        reader_singular_values=s_r.float().cpu(),
        component_scores=((cosines**2 * s_r[None, :] ** 2).sum(1).sqrt() / r_norm).float().cpu(),
        pair_scores=cosines.abs().float().cpu(),
        energy=(terms / total).float().cpu(),
    )


def _channel_json(c: Channel) -> dict[str, Any]:
    return {
        "mode": c.mode,
        "writer": list(c.writer),
        "reader": list(c.reader),
        "score": c.score,
        **{name: getattr(c, name).tolist() for name in _CHANNEL_TENSORS},
    }


_CHANNEL_TENSORS = ("writer_singular_values", "reader_singular_values", "component_scores", "pair_scores", "energy")


@dataclass
class Channels(JsonResult):
    """The communication channels (`channel`) of a model's top composing pairs of heads (`top_channels`)."""

    what: ClassVar[str] = "channels result"
    command: ClassVar[str] = "saelab heads RUN"
    error: ClassVar[type[Exception]] = HeadsError

    model: str
    """The model's `cfg.model_name`."""
    channels: list[Channel]
    """One per pair, highest composition score first."""

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "channels": [_channel_json(c) for c in self.channels]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Channels:
        channels = [
            Channel(
                mode=_check_mode(c["mode"]),
                writer=Head(*c["writer"]),
                reader=Head(*c["reader"]),
                score=float(c["score"]),
                **{name: torch.tensor(c[name], dtype=torch.float32) for name in _CHANNEL_TENSORS},
            )
            for c in data["channels"]
        ]
        return cls(str(data["model"]), channels)


def top_channels(model: HookedTransformer, scores: CompositionScores, n: int = 10) -> Channels:
    """The channels of the `n` highest-scoring pairs of `scores` (`CompositionScores.top_pairs`), of `model`."""
    return Channels(
        model.cfg.model_name,
        [channel(model, p.writer, p.reader, mode=p.mode) for p in scores.top_pairs(n)],
    )
