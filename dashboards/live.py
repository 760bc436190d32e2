"""The app's live computations: the run's model and SAEs loaded once per process, and run on text a user types.

Text comes checked by `saelab.dashboards.params.text` (its length in characters); `framed` checks its length in
tokens against the model's context, and refuses with a `RequestError` saying how long it may be.

Concurrent requests. TransformerLens hooks are state of the model's modules, so two forward passes with hooks
on one model instance at the same time see each other's hooks (measured before this module took turns: 4 clients
got 32 of 48 prompt and steering answers wrong, 20 of them errors). Each request therefore runs the model inside
`live_model(run)`, which lends it one of `COPIES` copies of the model for its own use: its hooks are on that copy
alone. Measured on this repository's 2-core CPU, 8 threads running MiniLM on a 20-token prompt: one copy behind a
lock 37-54 ms per request, two copies 26-28 ms, four 26 ms (the machine was shared; torch releases the GIL inside
its kernels, so a second copy overlaps the Python between them). Two copies is where that stops paying, and each
copy costs the model's size in memory (90 MB for MiniLM). At most `MAX_WAITING` requests wait for a copy, each at
most `MAX_WAIT_S`; one more is told with a `RequestError` that the model is busy and to retry, so a burst of
requests queues in bounded memory instead of piling up.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch

from saelab.dashboards.data import SaeInfo, check_model, feature_store, open_store, token_text
from saelab.dictionaries import SAE
from saelab.errors import RequestError, RunError
from saelab.models import Model, capture, device_of, is_encoder, load_model, resolve_hooks, tokenizer_of
from saelab.store import split_array
from saelab.text import SpecialTokens

COPIES = 2  # copies of the run's model that requests run at the same time (see the module docstring)
MAX_WAITING = 16  # requests that may wait for a copy; one more is told the model is busy
MAX_WAIT_S = 60.0  # seconds a request waits for a copy before it is told the model is busy


class ModelPool:
    """`COPIES` copies of one model, each lent to one request at a time (`turn`)."""

    def __init__(self, model: Model, copies: int) -> None:
        self.model = model
        """The model as loaded (the first copy): read its config and tokenizer freely, run it only in a `turn`."""
        self._free: queue.Queue[Model] = queue.Queue()
        for replica in [model, *(copy.deepcopy(model) for _ in range(copies - 1))]:
            self._free.put(replica)
        self._waiting = 0
        self._count = threading.Lock()
        self._held = threading.local()

    @contextmanager
    def turn(self) -> Iterator[Model]:
        """A copy of the model for this request alone until the block ends (the same copy again when the request
        is already in a turn, so helpers it calls may take turns too)."""
        held: Model | None = getattr(self._held, "model", None)
        if held is not None:
            yield held
            return
        with self._count:
            if self._waiting >= MAX_WAITING:
                raise RequestError(
                    f"The model is busy: {MAX_WAITING} requests are already waiting for it. Retry in a moment."
                )
            self._waiting += 1
        try:
            model = self._free.get(timeout=MAX_WAIT_S)
        except queue.Empty:
            raise RequestError(
                f"The model is busy: other requests have held it for {MAX_WAIT_S:g} s. Retry in a moment."
            ) from None
        finally:
            with self._count:
                self._waiting -= 1
        self._held.model = model
        try:
            yield model
        finally:
            self._held.model = None
            self._free.put(model)


@lru_cache(maxsize=4)
def load_sae(path: str) -> SAE:
    """The SAE in folder `path` on the CPU, in eval mode (once per process)."""
    return SAE.load(path, device="cpu").eval()


@lru_cache(maxsize=2)
def _load_model(spec: str) -> ModelPool:
    return ModelPool(load_model(spec, device="cpu"), COPIES)


def run_model(run: str, array: str = "") -> Model:
    """The model that made the run's activations (for its config and tokenizer: run it inside `live_model`): the one
    whose activations the store's array `array` holds (`ActivationStore.spec_of`: in a store of several models, an
    `<alias>/<hook>` array's alias's; any of them for `""`)."""
    return _model_pool(run, array).model


@contextmanager
def live_model(run: str, array: str = "") -> Iterator[Model]:
    """The run's model (`run_model`'s for `array`) for this request alone, while the block runs (`ModelPool.turn`)."""
    with _model_pool(run, array).turn() as model:
        yield model


def _model_pool(run: str, array: str) -> ModelPool:
    """The copies of the model that made the run's array `array`, from the spec in the store's harvest config."""
    store = open_store(run)
    spec = store.spec_of(array) if array else next(iter(store.model_specs.values()), store.model_spec)
    if not spec:
        raise RunError(
            "The activation store does not record which model made it (it was imported, not harvested), "
            "so text cannot be run through it."
        )
    try:
        return _load_model(str(spec))
    except Exception as err:
        raise RunError(f"Cannot load the run's model {spec!r} ({type(err).__name__}: {err}).") from None


def one_model(info: SaeInfo, what: str) -> tuple[str, str]:
    """The store's array the SAE reads and the model's own hook point of it (`split_array`), for the `what` (a page
    that runs the model live); `RequestError` for a crosscoder, which reads several arrays at once."""
    if info.kind == "crosscoder":
        raise RequestError(
            f"{info.hook}/{info.variant} is a crosscoder: it reads {', '.join(info.reads)} at once, and the {what} "
            "runs one model at one hook point. Browse its feature pages, or pick an SAE of one of those arrays."
        )
    return info.array, split_array(info.array)[1]


class TokenMatch(NamedTuple):
    """One token of a search text and the latents that involve it."""

    id: int
    """The token's id."""
    text: str
    """Its display string (the analysis vocab)."""
    latents: list[int]
    """The latents that have it among their top examples or logit effects."""


class Framed(NamedTuple):
    """A text as the model's input."""

    body: list[int]
    """The text's own token ids."""
    tokens: torch.Tensor
    """[1, n] on the model's device: the body framed with the model's special tokens, as the harvest framed
    contexts."""
    start: int
    """Where the body starts in `tokens`."""


def framed(model: Model, text: str, what: str, *, keep: int = 0, context: int | None = None) -> Framed:
    """`text` (the `what`: "prompt", "query") tokenised and framed; `RequestError` naming the limit when its tokens,
    with the framing and `keep` more (tokens to generate), do not fit in `context` (the model's by default)."""
    tokenizer = tokenizer_of(model, RunError)
    special = SpecialTokens.for_tokenizer(tokenizer, is_encoder(model))
    body = tokenizer(text, add_special_tokens=False)["input_ids"]
    frame = len(special.prefix) + len(special.suffix)
    context = model.cfg.n_ctx if context is None else min(context, model.cfg.n_ctx)
    room = context - frame - keep
    if len(body) > room:
        held = f"{frame} framing token{'' if frame == 1 else 's'}" + (f" and {keep} to generate" if keep else "")
        raise RequestError(
            f"The {what} has {len(body):,} tokens; this model reads at most {room:,}: more would exceed the model's "
            f"context of {context:,} ({held} included). Shorten it."
        )
    tokens = torch.tensor([special.frame(body)], dtype=torch.long, device=device_of(model))
    return Framed(body, tokens, len(special.prefix))


def search_token(run: str, info: SaeInfo, text: str) -> list[TokenMatch]:
    """Tokenise `text` with the run's tokenizer; for each distinct token, the latents that involve it.

    Falls back to matching the analysis vocab's strings when the model cannot be loaded.
    """
    if not text.strip():
        raise RequestError("Type a token or some text to search for.")
    fs = feature_store(run, info)
    try:
        ids = framed(run_model(run, info.array), text, "search text").body
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
    array, hook = one_model(info, "prompt")
    with live_model(run, array) as model:
        prompt = framed(model, text, "prompt")
        (point,) = resolve_hooks(model, [hook])
        acts = capture(model, prompt.tokens, [point])[hook][0]
    body_acts = acts[prompt.start : prompt.start + len(prompt.body)].float().cpu()
    with torch.inference_mode():
        f = load_sae(str(info.path)).encode(body_acts)
    values, indices = f.topk(min(top, f.shape[-1]), dim=-1)
    tokenizer = tokenizer_of(model, RunError)
    strings = tokenizer.convert_ids_to_tokens(prompt.body)
    return [
        TokenLatents(tokenizer.convert_tokens_to_string([s]), [(int(i), float(v)) for i, v in zip(idx, val) if v > 0])
        for s, idx, val in zip(strings, indices.tolist(), values.tolist())
    ]
