"""Prompts and word positions (saelab.absorption.prompts): the first-letter vocabulary, in-context prompts, and the
activation at the word token of a decoder."""

from __future__ import annotations

import random

import pytest
import torch

from saelab.absorption import (
    FIRST_LETTER_TEMPLATE,
    AbsorptionError,
    Word,
    alpha_tokens,
    first_letter,
    icl_prompt,
    labelled_vocabulary,
    word_activations,
)
from saelab.models import capture, resolve_hooks


def test_vocabulary_and_prompts(bpe_tokenizer):
    words = labelled_vocabulary(bpe_tokenizer)
    assert words and all(w.label == w.text.strip()[0].lower() for w in words)
    assert all(w.text.strip().isalpha() and w.text.strip().isascii() for w in words)
    assert len(words) == len(alpha_tokens(bpe_tokenizer)) and first_letter(" Cat") == "c" and first_letter("12") is None
    cat, dog, eel = Word(1, " cat", "c"), Word(2, "dog", "d"), Word(3, " eel", "e")
    prompt = icl_prompt(
        cat, [cat, dog, eel], FIRST_LETTER_TEMPLATE, max_examples=2, rng=random.Random(0), first_letter_task=True
    )
    lines = prompt.split("\n")
    assert lines[-1] == " cat has the first letter:" and len(lines) == 3
    assert sorted(lines[:2]) == [" eel has the first letter: E", "dog has the first letter: D"]  # never the word
    assert (
        icl_prompt(
            cat,
            [dog],
            FIRST_LETTER_TEMPLATE,
            max_examples=10,
            rng=random.Random(0),
            first_letter_task=True,
            prepend_separator=True,
        )
        == "\ndog has the first letter: D\n cat has the first letter:"
    )


def _prompt(w, words, n):
    return icl_prompt(w, words, FIRST_LETTER_TEMPLATE, max_examples=n, rng=random.Random(0), first_letter_task=True)


def test_decoder_reads_the_word_token(decoder, bpe_tokenizer):
    words = [w for w in labelled_vocabulary(bpe_tokenizer) if w.text.startswith(" ")][:6]
    prompts = [_prompt(w, words, 2) for w in words]
    x, kept = word_activations(
        decoder, "blocks.0.hook_resid_post", words, prompts=prompts, template=FIRST_LETTER_TEMPLATE
    )
    assert kept == list(range(6))
    for row, (w, prompt) in enumerate(zip(words, prompts)):
        toks = [bpe_tokenizer.bos_token_id, *bpe_tokenizer(prompt)["input_ids"]]
        pos = len(toks) - 1 - len(bpe_tokenizer(" has the first letter:")["input_ids"])  # GPT-2: 5, SAEBench's -6
        assert toks[pos] == w.token
        ref = capture(decoder, torch.tensor([toks]), resolve_hooks(decoder, ["blocks.0.hook_resid_post"]))
        assert torch.allclose(x[row], ref["blocks.0.hook_resid_post"][0, pos], atol=1e-5)
    with pytest.raises(AbsorptionError, match="use fewer in-context examples"):
        long = [_prompt(w, words, 5) * 3 for w in words]
        word_activations(decoder, "blocks.0.hook_resid_post", words, prompts=long, template=FIRST_LETTER_TEMPLATE)
