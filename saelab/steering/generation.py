"""Steering decoders: steered generation, steered and unsteered continuations side by side (`compare`), and a
coefficient `sweep` measuring the latent's activation, the KL from the unsteered model and its perplexity."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

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
    temperature 0, else sampled with `seed`)."""
    _decoder_only(model)
    tokens = prompt_tokens(model, prompt) if isinstance(prompt, str) else prompt
    if tokens.shape[1] + max_new_tokens > model.cfg.n_ctx:
        raise SteeringError(
            f"{tokens.shape[1]} prompt tokens + {max_new_tokens} new ones exceed the model's context "
            f"of {model.cfg.n_ctx}; shorten the prompt or generate fewer tokens"
        )
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


@torch.no_grad()
def steered_metrics(
    model: Model, tokens: Tensor, prompt_length: int, *, intervention: Intervention
) -> dict[str, float]:
    """For a steered text `tokens` [1, n] whose first `prompt_length` tokens are the prompt, with the model run
    on it steered and unsteered: `kl`, the mean KL(unsteered || steered) of the next-token distributions that
    chose the generated tokens; `perplexity`, the unsteered model's on the generated tokens; for a latent's
    intervention, its mean activation over the generated tokens at its hook after the edit (`latent_act`) and
    when the unsteered model reads the text (`latent_act_text`). A dict, as it goes into the sweep's JSON rows."""
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
    out = {"kl": float(kl), "perplexity": float(nll.exp())}
    if intervention.latents:
        latent, sae = intervention.latents[0], intervention.sae
        natural = hook_acts(model, tokens, intervention.hook)
        out |= {
            "latent_act": float(sae.encode(edited[0][0, prompt_length:])[:, latent].mean()),
            "latent_act_text": float(sae.encode(natural[0, prompt_length:])[:, latent].mean()),
        }
    return out


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
) -> list[dict[str, Any]]:
    """For each coefficient, each prompt steered by `intervention` at that coefficient: its continuation and
    `steered_metrics` (mean over prompts in `mean`). Rows as they are written to JSON: `coefficient`, `value`
    (in activation units), `mean` and `prompts` (per prompt: `prompt`, `text` and the metrics)."""
    _decoder_only(model)
    if not prompts:
        raise SteeringError("no prompts: give at least one prompt to continue")
    rows = []
    with tqdm(total=len(coefficients) * len(prompts), desc="steering sweep", disable=not progress) as bar:
        for c in coefficients:
            iv = replace(intervention, coefficient=float(c))
            per_prompt = []
            for i, prompt in enumerate(prompts):
                n = prompt_tokens(model, prompt).shape[1]
                tokens = generate(
                    model, prompt, [iv], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i
                )
                per_prompt.append(
                    {"prompt": prompt, "text": continuation(model, tokens, n)}
                    | steered_metrics(model, tokens, n, intervention=iv)
                )
                bar.update()
            keys = [k for k in per_prompt[0] if k not in ("prompt", "text")]
            rows.append(
                {
                    "coefficient": float(c),
                    "value": iv.value,
                    "mean": {k: float(np.mean([r[k] for r in per_prompt])) for k in keys},
                    "prompts": per_prompt,
                }
            )
    return rows
