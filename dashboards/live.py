"""The app's live computations: the run's model and SAEs loaded once per process, and run on text a user types.

Text comes checked by `saelab.dashboards.params.text`; what does not fit the model (more tokens than its
context) is refused here with a `RequestError` saying how long it may be.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch

from saelab.dashboards.data import SaeInfo, check_model, feature_store, open_store, token_text
from saelab.dictionaries import SAE
from saelab.errors import RequestError, RunError
from saelab.models import Model, capture, device_of, is_encoder, load_model, resolve_hooks, tokenizer_of
from saelab.text import SpecialTokens


@lru_cache(maxsize=4)
def load_sae(path: str) -> SAE:
    """The SAE in folder `path` on the CPU, in eval mode (once per process)."""
    return SAE.load(path, device="cpu").eval()


@lru_cache(maxsize=2)
def _load_model(spec: str) -> Model:
    return load_model(spec, device="cpu")


def run_model(run: str) -> Model:
    """The model that made the run's activations, from the spec in the store's harvest config."""
    spec = open_store(run).config.get("model")
    if not spec:
        raise RunError(
            "The activation store does not record which model made it (it was imported, not harvested), "
            "so text cannot be run through it."
        )
    try:
        return _load_model(str(spec))
    except Exception as err:
        raise RunError(f"Cannot load the run's model {spec!r} ({type(err).__name__}: {err}).") from None


class TokenMatch(NamedTuple):
    """One token of a search text and the latents that involve it."""

    id: int
    """The token's id."""
    text: str
    """Its display string (the analysis vocab)."""
    latents: list[int]
    """The latents that have it among their top examples or logit effects."""


def search_token(run: str, info: SaeInfo, text: str) -> list[TokenMatch]:
    """Tokenise `text` with the run's tokenizer; for each distinct token, the latents that involve it.

    Falls back to matching the analysis vocab's strings when the model cannot be loaded.
    """
    if not text.strip():
        raise RequestError("Type a token or some text to search for.")
    fs = feature_store(run, info)
    try:
        ids = tokenizer_of(run_model(run), RunError)(text, add_special_tokens=False)["input_ids"]
    except RunError:
        ids = [i for i, s in enumerate(fs.vocab) if s.strip() == text.strip()]
    if not ids:
        raise RequestError(f"{text!r} matches no token of the vocabulary.")
    return [
        TokenMatch(int(t), token_text(fs.vocab, int(t)), [int(f) for f in fs.search_token(int(t))])
        for t in dict.fromkeys(ids)
    ]


@dataclass(frozen=True)
class TokenLatents:
    """One prompt token and its most active latents."""

    token: str
    """The token as text."""
    latents: list[tuple[int, float]]
    """(latent, activation) of its most active latents, strongest first (active ones only)."""


def prompt_latents(run: str, info: SaeInfo, text: str, *, top: int = 5) -> list[TokenLatents]:
    """Run the model and the SAE on `text` live; the top latents of every token of the text."""
    if not text.strip():
        raise RequestError("The prompt is empty: type some text to see which latents fire on it.")
    check_model(run, info)
    model = run_model(run)
    tokenizer = tokenizer_of(model, RunError)
    special = SpecialTokens.for_tokenizer(tokenizer, is_encoder(model))
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    room = model.cfg.n_ctx - len(special.prefix) - len(special.suffix)
    if len(body) > room:
        raise RequestError(f"The prompt has {len(body)} tokens; this model reads at most {room}. Shorten it.")
    tokens = torch.tensor([special.frame(body)], dtype=torch.long)
    (point,) = resolve_hooks(model, [info.hook])
    acts = capture(model, tokens.to(device_of(model)), [point])[info.hook][0]
    body_acts = acts[len(special.prefix) : len(special.prefix) + len(body)].float().cpu()
    with torch.inference_mode():
        f = load_sae(str(info.path)).encode(body_acts)
    values, indices = f.topk(min(top, f.shape[-1]), dim=-1)
    strings = tokenizer.convert_ids_to_tokens(body)
    return [
        TokenLatents(tokenizer.convert_tokens_to_string([s]), [(int(i), float(v)) for i, v in zip(idx, val) if v > 0])
        for s, idx, val in zip(strings, indices.tolist(), values.tolist())
    ]
