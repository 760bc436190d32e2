"""The task's words: alphabetic tokens labelled by first letter, or any token-level labels, and the split by token."""

from __future__ import annotations

import csv
import json
import random
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from saelab.errors import AbsorptionError

LETTERS = string.ascii_lowercase

Labeler = Union[Callable[[str], "str | None"], Mapping[str, str]]


@dataclass(frozen=True)
class Word:
    """A vocabulary token: its id, its text (as the tokenizer writes it alone) and its class."""

    token: int
    """The token id."""
    text: str
    """The token's text, as `convert_tokens_to_string` writes it alone (e.g. `" cat"`)."""
    label: str
    """Its class: a lower-case first letter, or the label a function or table gave it."""


def first_letter(word: str) -> str | None:
    """The first alphabetic character, lower-cased (SAEBench `prompting.first_letter`); None if there is none."""
    chars = [c for c in word.strip() if c.isalpha()]
    return chars[0].lower() if chars else None


def alpha_tokens(tokenizer: Any) -> list[tuple[int, str]]:
    """Tokens made only of ASCII letters, with one leading space allowed (SAEBench `vocab.get_alpha_tokens`)."""
    out = []
    for token, index in tokenizer.get_vocab().items():
        word = tokenizer.convert_tokens_to_string([token])
        bare = word[1:] if word.startswith(" ") else word
        if bare and all(c in string.ascii_letters for c in bare):
            out.append((index, word))
    return sorted(out)


def load_label_table(path: str | Path) -> dict[str, str]:
    """A table token -> class from a JSON object or a two-column CSV/TSV file (`token,class`, no header)."""
    path = Path(path)
    if not path.is_file():
        raise AbsorptionError(f"no label table {path}; give a .json object or a .csv/.tsv of token,class rows")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise AbsorptionError(f"{path} must hold a JSON object {{token: class}}, not a {type(data).__name__}")
        return {str(k): str(v) for k, v in data.items()}
    rows = list(csv.reader(path.open(newline=""), delimiter="\t" if path.suffix == ".tsv" else ","))
    bad = [i + 1 for i, r in enumerate(rows) if len(r) != 2]
    if bad:
        raise AbsorptionError(f"{path} lines {bad[:5]} do not have exactly two columns (token, class)")
    return {token: label for token, label in rows}


def labelled_vocabulary(tokenizer: Any, labels: Labeler | None = None) -> list[Word]:
    """The words the task uses: alphabetic tokens labelled by first letter (the default), or the tokens a
    function labels (non-None) or a table lists. A table's keys are token texts as `convert_tokens_to_string`
    writes them (e.g. `" cat"` for GPT-2's `"Ġcat"`)."""
    if labels is None:
        return [Word(i, w, first_letter(w) or "") for i, w in alpha_tokens(tokenizer)]
    if callable(labels):
        words = []
        for token, index in tokenizer.get_vocab().items():
            text = tokenizer.convert_tokens_to_string([token])
            label = labels(text)
            if label is not None:
                words.append(Word(index, text, str(label)))
        return sorted(words, key=lambda w: w.token)
    vocab = {tokenizer.convert_tokens_to_string([t]): i for t, i in tokenizer.get_vocab().items()}
    missing = [t for t in labels if t not in vocab]
    if missing:
        raise AbsorptionError(
            f"{len(missing)} tokens of the label table are not single tokens of this tokenizer, "
            f"e.g. {missing[:5]}; list tokens as the tokenizer writes them (with their leading space)"
        )
    return sorted((Word(vocab[t], t, str(c)) for t, c in labels.items()), key=lambda w: w.token)


def split_vocabulary(words: list[Word], train_fraction: float, rng: random.Random) -> tuple[list[Word], list[Word]]:
    """Shuffle and split by token (SAEBench `create_dataset_probe_training`: `random.sample`, then the first 80%)."""
    shuffled = rng.sample(words, len(words))
    cut = int(len(shuffled) * train_fraction)
    return shuffled[:cut], shuffled[cut:]
