"""The paper's integrated-gradients variant (saelab.absorption.ig) on a small decoder, and its errors."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from saelab.absorption import (
    FIRST_LETTER_TEMPLATE,
    AbsorptionError,
    LabelScore,
    PromptStyle,
    ig_absorption,
    labelled_vocabulary,
)
from saelab.dictionaries import SAE, SAEConfig


def test_integrated_gradients_variant(decoder, bpe_tokenizer, minilm):
    hook = "blocks.0.hook_resid_post"
    words = [w for w in labelled_vocabulary(bpe_tokenizer) if w.label == "a"][:4]  # " A" is one token here
    sae = SAE.from_config(SAEConfig(d_in=64, d_sae=128, k=4))
    label = LabelScore("a", 1.0, [], [], len(words), 0, 0.0, 0.0, 0, True)  # no split latents: every word is tested
    style = PromptStyle(FIRST_LETTER_TEMPLATE, 2)
    out = ig_absorption(
        decoder,
        sae,
        hook,
        words=words,
        label=label,
        direction=torch.randn(64),
        style=style,
        rng=random.Random(0),
        examples=labelled_vocabulary(bpe_tokenizer),
        steps=3,
    )
    assert out["tested"] == len(words) and out["absorbed"] == len(out["cases"]) <= len(words)
    assert out["absorption_rate"] == (1.0 if out["absorbed"] else 0.0)  # no split true positives
    with pytest.raises(AbsorptionError, match="needs a decoder"):
        ig_absorption(
            minilm,
            sae,
            hook,
            words=words,
            label=label,
            direction=torch.randn(384),
            style=style,
            rng=random.Random(0),
            examples=words,
        )
    with pytest.raises(AbsorptionError, match="' S' is 2 tokens"):
        ig_absorption(
            decoder,
            sae,
            hook,
            words=words,
            label=dataclasses.replace(label, label="s"),
            direction=torch.randn(64),
            style=style,
            rng=random.Random(0),
            examples=words,
        )
