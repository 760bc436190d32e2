"""Steering decoders: steered generation, steered and unsteered continuations side by side (`compare`), and a
coefficient `sweep` measuring the latent's activation, the KL from the unsteered model and its perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.errors import SteeringError
from saelab.models import Model, device_of, forward_to, is_encoder, resolve_hooks, tokenizer_of
from saelab.steering.interventions import Intervention, steer
from saelab.text import SpecialTokens


def prompt_tokens(model: Model, prompt: str) -> Tensor:
    """`prompt` as model input [1, n], framed as the harvest frames contexts: BOS + its tokens for decoders,
    [CLS] + its tokens + [SEP] for encoders."""
    if not prompt.strip():
        raise SteeringError("the prompt is empty: give some text to continue")
    tokenizer = tokenizer_of(model, SteeringError)
    special = SpecialTokens.for_tokenizer(tokenizer, is_encoder(model))
    ids = special.frame(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return torch.tensor([ids], device=device_of(model))


def new_token_budget(model: Model, prompt_tokens: int | Tensor) -> int:
    """How many tokens may be generated after a prompt of `prompt_tokens` tokens (a count, or the prompt's tokens
    [1, n]): the rest of the model's context, `n_ctx - n`. A prompt that leaves no room is a `SteeringError` naming
    the context; `generate` and `sweep` refuse (never clamp) a `max_new_tokens` past the budget."""
    n = prompt_tokens if isinstance(prompt_tokens, int) else int(prompt_tokens.shape[-1])
    n_ctx = model.cfg.n_ctx
    if n >= n_ctx:
        raise SteeringError(
            f"the prompt has {n} tokens and fills the model's context of {n_ctx}, leaving no room to generate; "
            f"shorten it to at most {n_ctx - 1} tokens"
        )
    return n_ctx - n


def _check_new_tokens(model: Model, tokens: Tensor, max_new_tokens: int) -> None:
    budget = new_token_budget(model, tokens)
    if max_new_tokens > budget:
        raise SteeringError(
            f"{tokens.shape[1]} prompt tokens + {max_new_tokens} new ones exceed the model's context of "
            f"{model.cfg.n_ctx}; generate at most {budget} new tokens after this prompt, or shorten it"
        )
    if max_new_tokens < 1:
        raise SteeringError(f"max_new_tokens={max_new_tokens}: generate at least one token (at most {budget} here)")


def _decoder_only(model: Model) -> None:
    if is_encoder(model):
        raise SteeringError("this is an encoder: it generates no text; steer its embeddings with `search`")


@torch.no_grad()
def generate(
    model: Model,
    prompt: str | Tensor,
    interventions: Sequence[Intervention] = (),
    *,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
    use_past_kv_cache: bool = True,
) -> Tensor:
    """The prompt's tokens [1, n] followed by `max_new_tokens` generated with the interventions (greedy at
    temperature 0, else sampled with `seed`). `max_new_tokens` past `new_token_budget` is refused."""
    _decoder_only(model)
    tokens = prompt_tokens(model, prompt) if isinstance(prompt, str) else prompt
    _check_new_tokens(model, tokens, max_new_tokens)
    torch.manual_seed(seed)
    with steer(model, interventions, tokens.shape[1]):
        return model.generate(  # pyright: ignore[reportReturnType]  # return_type="tokens": a Tensor
            tokens,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=max(temperature, 1e-6),
            use_past_kv_cache=use_past_kv_cache,
            stop_at_eos=False,
            verbose=False,
            return_type="tokens",
        )


def continuation(model: Model, tokens: Tensor, prompt_length: int) -> str:
    """The generated part of `tokens` [1, n] as text, up to the first end-of-text token."""
    tokenizer = tokenizer_of(model, SteeringError)
    ids = tokens[0, prompt_length:].tolist()
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids)


@dataclass
class Comparison:
    """A prompt continued without and with steering."""

    prompt: str
    """The prompt."""
    unsteered: str
    """Its continuation by the model as it is."""
    steered: str
    """Its continuation with the interventions, from the same seed."""


def compare(
    model: Model,
    prompt: str,
    interventions: Sequence[Intervention],
    *,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
) -> Comparison:
    """Steered and unsteered continuations of `prompt`, from the same seed."""
    n = prompt_tokens(model, prompt).shape[1]
    unsteered, steered = (
        continuation(
            model,
            generate(model, prompt, ivs, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed),
            n,
        )
        for ivs in ((), interventions)
    )
    return Comparison(prompt, unsteered, steered)


def hook_acts(model: Model, tokens: Tensor, hook: str, *, mask: Tensor | None = None) -> Tensor:
    """The unsteered activations [batch, pos, d] at `hook` (flattened over heads; the pass stops there)."""
    resolve_hooks(model, [hook])
    with torch.no_grad():
        return forward_to(model, tokens, hook, attention_mask=mask).float()


class SteeredMetrics(NamedTuple):
    """What steering did to a generated text (see `steered_metrics`); `as_json` gives the sweep's JSON record."""

    kl: float
    """The mean KL(unsteered || steered) of the next-token distributions that chose the generated tokens."""
    perplexity: float
    """The unsteered model's perplexity on the generated tokens."""
    latent_act: float | None = None
    """The steered latent's mean activation over the generated tokens at its hook, after the edit (None for an
    intervention without a latent: an added code)."""
    latent_act_text: float | None = None
    """The same latent's mean activation when the unsteered model reads the text (None without a latent)."""

    def as_json(self) -> dict[str, float]:
        """The metrics as the sweep's JSON writes them: `kl`, `perplexity`, and the latent's two when it has one."""
        return {k: v for k, v in self._asdict().items() if v is not None}

    @staticmethod
    def mean(each: Sequence[SteeredMetrics]) -> SteeredMetrics:
        """Each metric's mean over `each` (metrics of one intervention, so all have the same ones)."""

        def mean(values: list[float | None]) -> float | None:
            known = [v for v in values if v is not None]  # all of them, or none (an intervention without a latent)
            return float(np.mean(known)) if known else None

        return SteeredMetrics(
            float(np.mean([m.kl for m in each])),
            float(np.mean([m.perplexity for m in each])),
            mean([m.latent_act for m in each]),
            mean([m.latent_act_text for m in each]),
        )


@torch.no_grad()
def steered_metrics(model: Model, tokens: Tensor, prompt_length: int, *, intervention: Intervention) -> SteeredMetrics:
    """`SteeredMetrics` of a steered text `tokens` [1, n] whose first `prompt_length` tokens are the prompt, with
    the model run on it steered and unsteered. A metric that comes out non-finite (the steered model's arithmetic
    overflowed) is a `SteeringError` naming it, never a number in a result."""
    if tokens.shape[1] <= prompt_length:
        raise SteeringError("the text has no generated tokens to measure; generate at least one")
    edited: list[Tensor] = []
    with steer(model, [intervention], prompt_length, read=lambda hook, h, pos: edited.append(h)):
        steered = model(tokens, return_type="logits")[0].float().log_softmax(-1)
    unsteered = model(tokens, return_type="logits")[0].float().log_softmax(-1)
    rows = slice(prompt_length - 1, tokens.shape[1] - 1)
    p, q = unsteered[rows], steered[rows]
    kl = (p.exp() * (p - q)).sum(-1).mean()
    nll = -p.gather(-1, tokens[0, prompt_length:, None]).mean()
    latent_act = latent_act_text = None
    if intervention.latents:
        latent, sae = intervention.latents[0], intervention.sae
        natural = hook_acts(model, tokens, intervention.hook)
        latent_act = float(sae.encode(edited[0][0, prompt_length:])[:, latent].mean())
        latent_act_text = float(sae.encode(natural[0, prompt_length:])[:, latent].mean())
    # The perplexity in float64: exp overflows float32 past a mean NLL of 88.7 nats, a finite (if absurd) value.
    metrics = SteeredMetrics(float(kl), float(nll.double().exp()), latent_act, latent_act_text)
    bad = [k for k, v in metrics._asdict().items() if v is not None and not math.isfinite(v)]
    if bad:
        damaged = not all(bool(w.isfinite().all()) for w in intervention.sae.parameters())
        cause = (
            "the SAE's weights are not all finite; load an undamaged SAE"
            if damaged
            else "the steered model's arithmetic overflowed; use a smaller coefficient"
        )
        raise SteeringError(
            f"steering at coefficient {intervention.coefficient:g} (value {intervention.value:g}) made "
            f"{' and '.join(bad)} non-finite: {cause}"
        )
    return metrics


@dataclass
class SteeredPrompt:
    """One prompt continued with steering, and what the steering did."""

    prompt: str
    """The prompt."""
    text: str
    """Its steered continuation."""
    metrics: SteeredMetrics
    """`steered_metrics` of the continuation."""

    def as_json(self) -> dict[str, Any]:
        """As the sweep's JSON writes it: `prompt`, `text` and the metrics' keys."""
        return {"prompt": self.prompt, "text": self.text} | self.metrics.as_json()


@dataclass
class SweepRow:
    """One coefficient of a `sweep`."""

    coefficient: float
    """The coefficient, in units of the intervention's scale."""
    value: float
    """The coefficient in activation units (times the scale)."""
    mean: SteeredMetrics
    """Each metric's mean over the prompts."""
    prompts: list[SteeredPrompt]
    """Each prompt's continuation and metrics, in the order given."""

    def as_json(self) -> dict[str, Any]:
        """The row as `SteeringResult` writes it: `coefficient`, `value`, `mean` and `prompts`."""
        return {
            "coefficient": self.coefficient,
            "value": self.value,
            "mean": self.mean.as_json(),
            "prompts": [p.as_json() for p in self.prompts],
        }


def sweep(
    model: Model,
    intervention: Intervention,
    coefficients: Sequence[float],
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> list[SweepRow]:
    """For each coefficient, each prompt steered by `intervention` at that coefficient: its continuation and
    `steered_metrics`. Every coefficient (`check_coefficient`) and every prompt's room for `max_new_tokens`
    (`new_token_budget`) is checked before anything is generated."""
    _decoder_only(model)
    if not prompts:
        raise SteeringError("no prompts: give at least one prompt to continue")
    steered = [replace(intervention, coefficient=float(c)) for c in coefficients]
    framed = [prompt_tokens(model, prompt) for prompt in prompts]
    for tokens in framed:
        _check_new_tokens(model, tokens, max_new_tokens)
    rows = []
    with tqdm(total=len(steered) * len(prompts), desc="steering sweep", disable=not progress) as bar:
        for iv in steered:
            per_prompt = []
            for i, (prompt, tokens) in enumerate(zip(prompts, framed)):
                n = tokens.shape[1]
                out = generate(
                    model, tokens, [iv], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i
                )
                per_prompt.append(
                    SteeredPrompt(prompt, continuation(model, out, n), steered_metrics(model, out, n, intervention=iv))
                )
                bar.update()
            rows.append(
                SweepRow(iv.coefficient, iv.value, SteeredMetrics.mean([r.metrics for r in per_prompt]), per_prompt)
            )
    return rows
