"""Prompts that put a word in the task's template, and the model's activation at the word's token."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.absorption.vocab import Word
from saelab.errors import AbsorptionError
from saelab.models import Model, capture, device_of, is_encoder, resolve_hooks, tokenizer_of
from saelab.text import SpecialTokens

FIRST_LETTER_TEMPLATE = "{word} has the first letter:"


def answer_text(label: str, first_letter_task: bool) -> str:
    """The answer after the template (SAEBench `first_letter_formatter`: `" X"`, capitalised)."""
    return " " + (label.upper() if first_letter_task else label)


def icl_prompt(
    word: Word,
    examples: list[Word],
    template: str,
    *,
    max_examples: int,
    rng: random.Random,
    first_letter_task: bool,
    prepend_separator: bool = False,
    separator: str = "\n",
) -> str:
    """In-context examples "template + answer" then the word's template, one per line (SAEBench
    `create_icl_prompt` with contamination check: the word itself is never an example)."""
    n = min(max_examples, len(examples))
    for _ in range(1000):
        chosen = rng.sample(examples, n)
        if word not in chosen:
            break
    else:
        raise AbsorptionError(f"cannot pick {n} in-context examples without {word.text!r}; give a larger vocabulary")
    lines = [template.format(word=e.text) + answer_text(e.label, first_letter_task) for e in chosen]
    base = separator.join([*lines, template.format(word=word.text)])
    return separator + base if prepend_separator else base


@dataclass(frozen=True)
class PromptStyle:
    """How a model reads a word. Decoders: `icl_examples` in-context examples before the word's template (the
    prompt SAEBench uses). Encoders: the template alone between [CLS] and [SEP], no examples and no answer:
    an encoder does no in-context learning, and bidirectional attention would mix the examples' answer letters
    into the word's residual; the word token also sees the template words after it (a decoder's does not)."""

    template: str
    """The prompt around the word, with a `{word}` placeholder."""
    icl_examples: int
    """How many in-context examples come before the word's template (0: none)."""

    @staticmethod
    def for_model(model: Model, template: str | None = None, icl_examples: int = 10) -> PromptStyle:
        """The style for `model`: in-context examples for decoders, none for encoders."""
        return PromptStyle(template or FIRST_LETTER_TEMPLATE, 0 if is_encoder(model) else icl_examples)


def style_prompts(
    words: list[Word],
    examples: list[Word],
    style: PromptStyle,
    *,
    rng: random.Random,
    first_letter_task: bool,
    prepend_separator: bool = False,
) -> list[str]:
    """Each word's prompt in `style`: `style.icl_examples` in-context examples drawn from `examples` (`icl_prompt`),
    then the word's template; with no examples, the template alone (after the separator with `prepend_separator`)."""
    return [
        icl_prompt(
            w,
            examples,
            style.template,
            max_examples=style.icl_examples,
            rng=rng,
            first_letter_task=first_letter_task,
            prepend_separator=prepend_separator,
        )
        for w in words
    ]


class EncodedPrompts(NamedTuple):
    """The prompts in which the word is one token at the expected place, tokenized (`encode_prompts`)."""

    ids: list[list[int]]
    """Each kept prompt's token ids, framed with the model's special tokens."""
    positions: list[int]
    """The word token's position in each kept prompt."""
    kept: list[int]
    """The indices (into the words given) of the kept prompts."""


def encode_prompts(model: Model, words: list[Word], prompts: list[str], *, template: str) -> EncodedPrompts:
    """Token ids of each prompt (with the model's special tokens) and the word token's position; prompts in
    which the word is not one token at the expected place are dropped (their indices are not in `kept`)."""
    tokenizer = tokenizer_of(model, AbsorptionError)
    special = SpecialTokens.for_tokenizer(tokenizer, is_encoder(model))
    after = template.split("{word}", 1)[1]
    n_after = len(tokenizer(after, add_special_tokens=False)["input_ids"]) + len(special.suffix)
    out = EncodedPrompts([], [], [])
    for i, (word, prompt) in enumerate(zip(words, prompts)):
        toks = special.frame(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        pos = len(toks) - n_after - 1
        if pos >= 0 and toks[pos] == word.token:
            out.ids.append(toks)
            out.positions.append(pos)
            out.kept.append(i)
    return out


@torch.no_grad()
def word_activations(
    model: Model,
    hook: str,
    words: list[Word],
    *,
    prompts: list[str],
    template: str,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[Tensor, list[int]]:
    """The activation at `hook` at each word's token [n_kept, d] (float32, CPU) and the indices of the words
    kept. Prompts run in batches of equal token length, so there is no padding to mask."""
    if "{word}" not in template:
        raise AbsorptionError(f"the template {template!r} has no {{word}} placeholder; e.g. {FIRST_LETTER_TEMPLATE!r}")
    point = resolve_hooks(model, [hook])
    ids, positions, kept = encode_prompts(model, words, prompts, template=template)
    if not kept:
        raise AbsorptionError(
            f"no word is a single token inside the template {template!r}; check the template and labels"
        )
    longest = max(len(t) for t in ids)
    if longest > model.cfg.n_ctx:
        raise AbsorptionError(
            f"prompts reach {longest} tokens but the model takes {model.cfg.n_ctx}; use fewer in-context "
            "examples (icl_examples) or a shorter template"
        )
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(ids):
        groups.setdefault(len(t), []).append(i)
    batches = [rows[s : s + batch_size] for rows in groups.values() for s in range(0, len(rows), batch_size)]
    device = device_of(model)
    out = torch.empty(len(ids), point[0].d)
    for rows in tqdm(batches, desc=f"activations at {hook}", disable=not progress):
        acts = capture(model, torch.tensor([ids[r] for r in rows], device=device), point)[hook]
        out[rows] = acts[torch.arange(len(rows)), torch.tensor([positions[r] for r in rows])].float().cpu()
    return out, kept
