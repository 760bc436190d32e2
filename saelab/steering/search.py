"""Steering encoders: sentence embeddings (`embed`, as sentence-transformers' all-MiniLM-L6-v2), edits of the
embedding itself (hook `EMBEDDING`), per-document latent activations, and semantic `search` before and after
steering the query."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.dictionaries import SAE
from saelab.errors import SteeringError
from saelab.models import Model, device_of, forward_to, is_encoder, tokenizer_of
from saelab.steering.generation import hook_acts
from saelab.steering.interventions import EMBEDDING, Intervention, check_interventions, steer
from saelab.text import SpecialTokens


def _encode_texts(model: Model, texts: Sequence[str], max_length: int) -> list[list[int]]:
    tokenizer = tokenizer_of(model, SteeringError)
    special = SpecialTokens.for_tokenizer(tokenizer, is_encoder(model))
    room = min(max_length, model.cfg.n_ctx) - len(special.prefix) - len(special.suffix)
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [special.frame(t[:room]) for t in ids]


class _Batch(NamedTuple):
    """Texts of similar length, padded to one width."""

    indices: list[int]
    """Their indices in the texts given."""
    tokens: Tensor
    """Their framed tokens [batch, pos], padded with 0."""
    mask: Tensor
    """The attention mask [batch, pos]: 1 at a real token, 0 at padding."""


def _padded(model: Model, texts: Sequence[str], batch_size: int, max_length: int) -> Iterator[_Batch]:
    """Batches of texts of similar length."""
    ids = _encode_texts(model, texts, max_length)
    device = device_of(model)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        tokens = torch.tensor([ids[i] + [0] * (width - len(ids[i])) for i in idx], device=device)
        mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in idx], device=device)
        yield _Batch(idx, tokens, mask)


def _pool(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def embed(
    model: Model,
    texts: Sequence[str],
    interventions: Sequence[Intervention] = (),
    *,
    batch_size: int = 64,
    max_length: int = 256,
    grad: bool = False,
    progress: bool = False,
) -> Tensor:
    """Sentence embeddings [len(texts), d_model]: the last layer's output mean-pooled over each text's tokens
    ([CLS] and [SEP] included) and L2-normalised, as sentence-transformers computes all-MiniLM-L6-v2's.

    Interventions at hook points act inside the model; those at `EMBEDDING` act on the (normalised) sentence
    embedding itself, which is normalised again after the edit. `grad` keeps the graph (for `optimise_code`)."""
    if not is_encoder(model):
        raise SteeringError("sentence embeddings come from an encoder (e.g. minilm); this model is a decoder")
    inside = [iv for iv in interventions if iv.hook != EMBEDDING]
    outside = [iv for iv in interventions if iv.hook == EMBEDDING]
    check_interventions(model, outside, embedding=True)
    order, rows = [], []
    with torch.set_grad_enabled(grad):
        for idx, tokens, mask in tqdm(
            list(_padded(model, texts, batch_size, max_length)), desc="embed", disable=not progress
        ):
            with steer(model, inside):
                last = forward_to(
                    model, tokens, f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", attention_mask=mask
                )
                e = torch.nn.functional.normalize(_pool(last.float(), mask), dim=-1)
            rows.append(edit_embedding(e, outside))
            order += idx
        return torch.cat(rows)[torch.tensor(order, device=rows[0].device).argsort()]


def edit_embedding(e: Tensor, interventions: Sequence[Intervention]) -> Tensor:
    """Sentence embeddings [n, d] edited by interventions at `EMBEDDING`, normalised again. Identity edits
    (`Intervention.is_identity`) are skipped: the embeddings come back exactly as given."""
    for iv in interventions:
        if not iv.is_identity:
            e = torch.nn.functional.normalize(iv.edit(e[:, None], e.new_ones(1, dtype=torch.bool))[:, 0], dim=-1)
    return e


@torch.no_grad()
def doc_latent_acts(
    model: Model, sae: SAE, hook: str, *, texts: Sequence[str], batch_size: int = 64, max_length: int = 256
) -> Tensor:
    """Every latent's activation on each text [len(texts), d_sae]: on its sentence embedding for `EMBEDDING`, else
    the mean over its tokens at `hook` (unsteered)."""
    if hook == EMBEDDING:
        return sae.encode(embed(model, texts, batch_size=batch_size, max_length=max_length)).cpu()
    out = torch.zeros(len(texts), sae.cfg.d_sae)
    for idx, tokens, mask in _padded(model, texts, batch_size, max_length):
        out[idx] = _pool(sae.encode(hook_acts(model, tokens, hook, mask=mask)), mask).cpu()
    return out


@dataclass
class SearchResult:
    """A query's nearest documents, best first, without and with steering the query's embedding."""

    query: str
    """The query text."""
    before: list[tuple[int, float]]
    """(index into the corpus, cosine similarity) of its neighbours unsteered."""
    after: list[tuple[int, float]]
    """The same with the query's embedding steered."""

    @property
    def entered(self) -> list[int]:
        """Documents among the neighbours after steering that were not before."""
        was = {i for i, _ in self.before}
        return [i for i, _ in self.after if i not in was]

    @property
    def left(self) -> list[int]:
        """Documents that steering removed from the neighbours."""
        now = {i for i, _ in self.after}
        return [i for i, _ in self.before if i not in now]


@torch.no_grad()
def search(
    model: Model, query: str, corpus: Tensor, interventions: Sequence[Intervention], *, k: int = 10
) -> SearchResult:
    """The `k` documents of `corpus` (their `embed`dings [n, d]) nearest to `query`, before and after steering
    the query's embedding with the interventions (the corpus stays unsteered). A steered embedding that is not
    finite (so neither are its cosines) is a `SteeringError`, never a result."""
    if not query.strip():
        raise SteeringError("the query is empty: type some text to search for")
    if not 1 <= k <= len(corpus):
        raise SteeringError(f"k={k} neighbours asked of a corpus of {len(corpus)} documents; use 1 to {len(corpus)}")
    plain = embed(model, [query])
    if all(iv.hook == EMBEDDING for iv in interventions):
        check_interventions(model, interventions, embedding=True)
        steered = edit_embedding(plain, interventions)
    else:
        steered = embed(model, [query], interventions)
    if not bool(steered.isfinite().all()):
        raise SteeringError(
            "steering made the query's embedding non-finite (NaN or inf), so its cosines would be too: the edit "
            "overflows float32; use a smaller coefficient, or an SAE whose decoder weights are finite"
        )
    before, after = (_nearest(corpus, e[0], k) for e in (plain, steered))
    return SearchResult(query, before, after)


def _nearest(corpus: Tensor, e: Tensor, k: int) -> list[tuple[int, float]]:
    top = (corpus.float() @ e).topk(k)
    return [(int(i), float(s)) for i, s in zip(top.indices, top.values)]
