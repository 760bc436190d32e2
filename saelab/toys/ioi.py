"""An indirect-object-identification toy: a three-layer attention-only decoder over the induction toy's character
tokenizer, trained offline on prompts in the shape of Wang et al. 2022's IOI task, whose heads are named by their
attention patterns (`ioi_heads`).

A prompt is BOS, two names `A B` (upper-case letters), a run of filler letters (lower case) with the subject, one
of the two names, repeated at a random place among them, and the end token `+`: `<s>AB xqAzk+` (no spaces) asks
for `B`, the indirect object (IO), the name that is not repeated. Because the repeat's place varies, no positional
shortcut finds it; the model has to mark the repeated name, bring it to the end and copy the other one, the roles of
IOI's duplicate-token, S-inhibition and name-mover heads. Its negative prompt (O'Neill & Bui 2024's, and Wang et
al.'s ABC baseline) puts a third name `C` where the repeat was, so nothing says which of `A` and `B` is the answer;
every negative prompt has the same tokens as its positive one but the one name.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from saelab.absorption.probes import single_thread
from saelab.circuits.tasks import Prompt
from saelab.errors import CircuitError
from saelab.models import save_model
from saelab.toys.induction import ALPHABET, char_decoder

NAMES = string.ascii_uppercase[:16]
"""The names: 16 upper-case letters (one token each)."""
FILLERS = string.ascii_lowercase
"""The filler letters between the names and the end."""
END = "+"
"""The token after which the model names the IO."""
SLOTS = 5
"""Places after `A B` for the fillers and the repeated subject: a prompt is `BOS A B` + 5 tokens + `END`."""
N_CTX = SLOTS + 4
"""Tokens of a prompt with its BOS."""
TARGET_ACCURACY = 0.95
"""The IO accuracy at the end token that `train_ioi_model` trains until."""
IOI_ARCHITECTURE = {"n_layers": 2, "n_heads": 3, "d_head": 16, "model_name": "ioi-2l"}
"""The IOI model's changes to the induction toy's `ARCHITECTURE`: two layers of three heads."""
TRAINED_HEADS = 1
"""Heads of each layer that learn (the first); the others stay at their random initialisation: distractors that are
live and read the tokens but were never fitted to the task."""
HEAD_WEIGHTS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")


class IOIPrompts(NamedTuple):
    """Positive and negative IOI prompts as token ids ([n, N_CTX], BOS first), and where each name sits."""

    positive: Tensor
    """`BOS A B ..S.. END`: the subject `S` repeated among the fillers."""
    negative: Tensor
    """The same prompts with the repeat replaced by a third name."""
    io: Tensor
    """The IO token of each prompt [n] (the answer on the positive prompt)."""
    subject: Tensor
    """The subject token of each prompt [n] (the repeated name)."""
    s2: Tensor
    """The position of the repeat in each prompt [n]."""


def _id(char: str) -> int:
    return ALPHABET.index(char)


def ioi_prompts(n: int, seed: int = 0) -> IOIPrompts:
    """`n` positive IOI prompts and their negatives, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    names = torch.tensor([_id(c) for c in NAMES])
    picks = torch.stack([torch.randperm(len(NAMES), generator=g)[:3] for _ in range(n)])
    a, b, c = (names[picks[:, i]] for i in range(3))
    subject_first = torch.rand(n, generator=g) < 0.5
    subject = torch.where(subject_first, a, b)
    io = torch.where(subject_first, b, a)
    fillers = torch.tensor([_id(ch) for ch in FILLERS])
    slots = fillers[torch.randint(0, len(FILLERS), (n, SLOTS), generator=g)]
    s2 = torch.randint(0, SLOTS, (n,), generator=g)
    rows = torch.arange(n)
    positive_slots, negative_slots = slots.clone(), slots.clone()
    positive_slots[rows, s2] = subject
    negative_slots[rows, s2] = c
    bos = torch.full((n, 1), len(ALPHABET))
    end = torch.full((n, 1), _id(END))

    def prompt(middle: Tensor) -> Tensor:
        return torch.cat([bos, a[:, None], b[:, None], middle, end], 1)

    return IOIPrompts(prompt(positive_slots), prompt(negative_slots), io, subject, s2 + 3)


def ioi_texts(prompts: IOIPrompts) -> list[Prompt]:
    """The prompts as text `Prompt`s (positive `clean`, negative `patch`, target the IO, distractor the subject), for
    `saelab.circuits.prompt_task` and the heads config."""

    def text(row: Tensor) -> str:
        return "".join(ALPHABET[t] for t in row[1:].tolist())

    return [
        Prompt(clean=text(p), patch=text(q), target=ALPHABET[i], distractor=ALPHABET[s])
        for p, q, i, s in zip(prompts.positive, prompts.negative, prompts.io.tolist(), prompts.subject.tolist())
    ]


def _freeze_distractors(model: HookedTransformer) -> None:
    """Zero the gradients of every head past `TRAINED_HEADS` in each layer (under Adam without weight decay, a zero
    gradient leaves a weight where it is)."""
    for block in model.blocks:
        for name in HEAD_WEIGHTS:
            grad = getattr(block.attn, name).grad
            if grad is not None:
                grad[TRAINED_HEADS:] = 0


def ioi_accuracy(model: HookedTransformer, *, n: int = 512, seed: int = 1) -> float:
    """How often the model's top next token at the end of fresh positive prompts is their IO."""
    prompts = ioi_prompts(n, seed)
    with torch.no_grad():
        pred = model(prompts.positive.to(model.cfg.device))[:, -1].argmax(-1).cpu()
    return float((pred == prompts.io).float().mean())


def train_ioi_model(
    folder: str | Path,
    steps: int = 3000,
    *,
    target_accuracy: float = TARGET_ACCURACY,
    seed: int = 0,
    progress: bool = True,
) -> HookedTransformer:
    """Train the IOI toy (the induction toy's architecture with `IOI_ARCHITECTURE`'s three layers of two heads) on
    fresh positive prompts, next-token loss at the end token only, until `target_accuracy` (checked every 100 steps);
    save it to `folder` and return it."""
    folder = Path(folder)
    torch.manual_seed(seed)
    model = char_decoder(folder / "tokenizer", n_ctx=N_CTX, seed=seed, **IOI_ARCHITECTURE)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    accuracy = 0.0
    bar = tqdm(range(steps), desc="train IOI model", disable=not progress)
    with single_thread():
        for step in bar:
            batch = ioi_prompts(128, seed=seed * 1_000_003 + step + 10_000)
            loss = torch.nn.functional.cross_entropy(model(batch.positive)[:, -1], batch.io)
            loss.backward()
            _freeze_distractors(model)
            opt.step()
            opt.zero_grad()
            if (step + 1) % 100 == 0:
                accuracy = ioi_accuracy(model)
                bar.set_postfix(loss=f"{loss.item():.3f}", accuracy=f"{accuracy:.3f}")
                if accuracy >= target_accuracy:
                    break
    bar.close()
    if accuracy < target_accuracy:
        raise CircuitError(
            f"the IOI model reached accuracy {accuracy:.3f} < {target_accuracy} in {steps} steps; give more steps"
        )
    save_model(model.eval(), folder)
    return model
