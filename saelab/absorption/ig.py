"""The paper's own absorption test for decoders: integrated-gradients ablation effects on the answer's logit."""

from __future__ import annotations

import random
from typing import Any, TypedDict

import torch
from torch import Tensor

from saelab.absorption.prompts import PromptStyle, answer_text, encode_prompts, style_prompts
from saelab.absorption.scoring import EPS, LabelScore, decoder_cosines
from saelab.absorption.vocab import LETTERS, Word
from saelab.dictionaries import SAE
from saelab.errors import AbsorptionError
from saelab.models import Model, device_of, forward_to, is_encoder, tokenizer_of


class IgAbsorption(TypedDict):
    """What `ig_absorption` finds for one label (stored as `LabelScore.ig`)."""

    tested: int
    """True positives whose split latents do not fire at the word token (the ones tested)."""
    absorbed: int
    """How many of them are absorption."""
    absorption_rate: float
    """absorbed / (absorbed + the true positives the split's k-sparse probe finds); 0 when both are 0."""
    cases: list[list[Any]]
    """Each absorbed word: `[word, latent, effect, cosine]` of its top latent."""


def ig_absorption(
    model: Model,
    sae: SAE,
    hook: str,
    *,
    words: list[Word],
    label: LabelScore,
    direction: Tensor,
    style: PromptStyle,
    rng: random.Random,
    examples: list[Word],
    steps: int = 6,
    top: int = 10,
    cos_threshold: float = 0.025,
    delta_threshold: float = 1.0,
) -> IgAbsorption:
    """The paper's absorption test for decoders (sae-spelling `FeatureAbsorptionCalculator.calculate_absorption_
    sampled`). For each of the label's probe true positives whose split latents do not fire at the word token:
    integrated gradients (`steps` points from zero to the clean latents and SAE error at the word token, the
    error kept) of the answer letter's logit after the prompt give each latent's ablation effect
    grad x (0 - a). It is absorption when the top latent by |effect| lowers the answer when ablated, beats the
    next one by at least `delta_threshold` in |effect|, and its decoder has cosine >= `cos_threshold` with the probe.
    The rate is absorbed / (absorbed + true positives the split's k-sparse probe finds)."""
    if is_encoder(model):
        raise AbsorptionError(
            "the integrated-gradients variant reads next-token logits, so it needs a decoder; "
            "use the SAEBench metrics for encoders"
        )
    first = label.label in LETTERS
    answer = tokenizer_of(model, AbsorptionError)(answer_text(label.label, first), add_special_tokens=False)[
        "input_ids"
    ]
    if len(answer) != 1:
        raise AbsorptionError(
            f"the answer {answer_text(label.label, first)!r} is {len(answer)} tokens; the "
            "integrated-gradients variant needs single-token answers"
        )
    prompts = style_prompts(words, examples, style, rng=rng, first_letter_task=first, prepend_separator=True)
    ids, positions, kept = encode_prompts(model, words, prompts, template=style.template)
    cos, _ = decoder_cosines(sae, direction)
    device = device_of(model)
    split = label.split_latents
    alphas = ((torch.arange(steps, device=device) + 0.5) / steps)[:, None]
    absorbed, tested, found = 0, 0, []
    for toks, pos, i in zip(ids, positions, kept):
        tokens = torch.tensor([toks] * steps, device=device)
        with torch.no_grad():
            x = forward_to(model, tokens[:1], hook)[0, pos].float()
        f = sae.encode(x[None])[0].detach()
        if float(f[split].sum()) >= EPS:
            continue
        tested += 1
        err = (x - sae.decode(f[None])[0]).detach()
        latents = (alphas * f).requires_grad_()

        def patch(act: Tensor, hook: Any, pos: int = pos, err: Tensor = err, latents: Tensor = latents) -> Tensor:
            act = act.clone()
            act[:, pos] = (sae.decode(latents) + alphas * err).to(act.dtype)
            return act

        with model.hooks(fwd_hooks=[(hook, patch)]):
            logits = model(tokens, return_type="logits")
        grad = torch.autograd.grad(logits[:, -1, answer[0]].sum(), latents)[0].mean(0)
        effect = (grad * -f).detach().float().cpu()
        order = effect.abs().topk(min(top, len(effect))).indices
        lead, second = int(order[0]), int(order[1]) if len(order) > 1 else int(order[0])
        hit = (
            float(effect[lead]) <= 0
            and abs(float(effect[lead])) - abs(float(effect[second])) >= delta_threshold
            and float(cos[lead]) >= cos_threshold
        )
        if hit:
            absorbed += 1
            found.append([words[i].text, lead, float(effect[lead]), float(cos[lead])])
    rate = absorbed / (absorbed + label.split_true_positives) if absorbed + label.split_true_positives else 0.0
    return {"tested": tested, "absorbed": absorbed, "absorption_rate": rate, "cases": found}
