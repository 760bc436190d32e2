"""The probe step: labelled activations of the model's words (or any labelled activations) and the ground-truth
probe trained on them, shared by every SAE of a hook point."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from saelab.absorption.config import AbsorptionSettings
from saelab.absorption.probes import train_probe
from saelab.absorption.prompts import PromptStyle, style_prompts, word_activations
from saelab.absorption.vocab import LETTERS, Labeler, Word, labelled_vocabulary, split_vocabulary
from saelab.errors import AbsorptionError
from saelab.models import Model, tokenizer_of


@dataclass
class ProbeData:
    """What the probe step produces for one hook point, shared by every SAE there."""

    classes: list[str]
    """The labels, in the order of the probe's outputs."""
    train_x: Tensor
    """Activations of the training words [n_train, d]."""
    train_y: np.ndarray
    """Their classes (indices into `classes`)."""
    test_x: Tensor
    """Activations of the test words [n_test, d]."""
    test_y: np.ndarray
    """Their classes."""
    test_words: list[str]
    """The test words' texts."""
    probe: nn.Linear
    """The ground-truth one-vs-rest probe, trained on the training words."""
    absorb_x: Tensor
    """The activations the absorption step reads for the test words (SAEBench re-prompts decoders with fresh
    examples; otherwise `test_x`)."""
    test_tokens: list[int] = field(default_factory=list)
    """The test words' token ids (empty for data that has no tokens, e.g. planted activations)."""

    def scores(self) -> np.ndarray:
        """The probe's scores of the test words [n_test, n_classes]."""
        with torch.no_grad():
            return self.probe(self.test_x).numpy()


def fit_probe(
    train_x: Tensor,
    train_y: np.ndarray,
    test_x: Tensor,
    *,
    test_y: np.ndarray,
    classes: list[str],
    test_words: list[str],
    s: AbsorptionSettings = AbsorptionSettings(),
    absorb_x: Tensor | None = None,
    progress: bool = False,
    test_tokens: list[int] | None = None,
) -> ProbeData:
    """Train the ground-truth probe on labelled activations (any source: a model, planted data)."""
    if len(train_x) != len(train_y) or len(test_x) != len(test_y) or len(test_words) != len(test_y):
        raise AbsorptionError("activations, labels and words must have the same number of rows")
    missing = sorted(set(range(len(classes))) - set(train_y.tolist()))
    if missing:
        raise AbsorptionError(
            f"labels {[classes[i] for i in missing]} have no training words; every label needs "
            "some (drop those labels or give more words)"
        )
    onehot = torch.nn.functional.one_hot(torch.from_numpy(train_y), len(classes))
    probe = train_probe(train_x, onehot, s.probe_schedule, progress=progress)
    return ProbeData(
        classes,
        train_x,
        train_y,
        test_x,
        test_y,
        test_words,
        probe,
        test_x if absorb_x is None else absorb_x,
        test_tokens or [],
    )


def probe_data(
    model: Model,
    hook: str,
    labels: Labeler | None = None,
    *,
    style: PromptStyle | None = None,
    max_words: int | None = None,
    train_fraction: float = 0.8,
    batch_size: int = 64,
    s: AbsorptionSettings = AbsorptionSettings(),
    progress: bool = False,
) -> ProbeData:
    """Words, prompts, activations at `hook` and the ground-truth probe, for first letters (`labels=None`) or any
    token-level labels. `max_words` keeps a random subset of the vocabulary (for quick looks; SAEBench uses all).
    Decoder test words are prompted again with fresh examples for the absorption step, as SAEBench does."""
    tokenizer = tokenizer_of(model, AbsorptionError)
    style = style or PromptStyle.for_model(model)
    rng = random.Random(s.seed)
    words = labelled_vocabulary(tokenizer, labels)
    if max_words is not None and len(words) > max_words:
        words = rng.sample(words, max_words)
    task_first_letter = labels is None
    classes = list(LETTERS) if task_first_letter else sorted({w.label for w in words})
    if len(classes) < 2:
        raise AbsorptionError(f"the labels give {len(classes)} class(es) over {len(words)} tokens; give at least two")
    train, test = split_vocabulary(words, train_fraction, rng)
    if not train or not test:
        raise AbsorptionError(f"{len(words)} words cannot be split into train and test; give more words")

    def prompts(split: list[Word], prepend: bool, examples: list[Word]) -> list[str]:
        return style_prompts(
            split, examples, style, rng=rng, first_letter_task=task_first_letter, prepend_separator=prepend
        )

    def activations(split: list[Word], text: list[str]) -> tuple[Tensor, list[int]]:
        return word_activations(
            model, hook, split, prompts=text, template=style.template, batch_size=batch_size, progress=progress
        )

    train_x, kept = activations(train, prompts(train, False, train))
    train = [train[i] for i in kept]
    test_x, kept = activations(test, prompts(test, False, test))
    test = [test[i] for i in kept]
    absorb_x = None
    if style.icl_examples:
        absorb_x, kept = activations(test, prompts(test, True, words))
        test, test_x = [test[i] for i in kept], test_x[kept]
    seen = {w.label for w in train}
    classes = [c for c in classes if c in seen]  # e.g. letters no training token starts with
    rows = [i for i, w in enumerate(test) if w.label in seen]
    test, test_x = [test[i] for i in rows], test_x[rows]
    absorb_x = None if absorb_x is None else absorb_x[rows]
    index = {c: i for i, c in enumerate(classes)}
    return fit_probe(
        train_x,
        np.array([index[w.label] for w in train]),
        test_x,
        test_y=np.array([index[w.label] for w in test], dtype=np.int64),
        classes=classes,
        test_words=[w.text for w in test],
        s=s,
        absorb_x=absorb_x,
        progress=progress,
        test_tokens=[w.token for w in test],
    )
