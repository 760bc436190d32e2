"""k-sparse probing (Gurnee et al. 2023, "Finding Neurons in a Haystack"): how well the `k` dictionary latents that
best separate a binary label predict it, against the same probe on `k` raw activation dimensions.

It follows SAEBench's `sparse_probing` eval (github.com/adamkarvonen/SAEBench, `sae_bench/evals/sparse_probing/`,
`probe_training.py`):

- balanced sets: per label, as many negatives as positives, drawn at random (`prepare_probe_data`), capped at
  `max_train` and `max_test` units (SAEBench's `probe_train_set_size` 4000 and `probe_test_set_size` 1000);
- selection by mean difference: the `k` features with the largest `|mean(positives) - mean(negatives)|` on the
  training set (`get_top_k_mean_diff_mask`), for the latents and for the raw dimensions alike;
- an L2 logistic regression on those `k` features alone, unstandardised, as sklearn's `LogisticRegression(C=1)`
  fits it (`train_sklearn_probe`); test accuracy, and here also the positive class's F1 and the accuracy's 95%
  Wilson interval (SAEBench reports none);
- document level: token activations, and the codes of each token, mean-pooled over each document
  (`create_meaned_model_activations`, `get_sae_meaned_activations`).

Where it differs: the logistic regression is fitted in float64 by full-batch L-BFGS in torch (the same objective,
sum of log-losses + `||w||^2 / (2 C)` with the intercept unpenalised, so no sklearn is needed and the fit is
deterministic); negatives come from the rest of the units at random, not evenly from each other class (a binary
label set has no other classes); the split into train and test is by document, at both levels, so no document's
tokens are on both sides; `k` runs over (1, 2, 5, 10, 20) (SAEBench: 1, 2, 5); and there is a token level, where
every labelled token is a unit (SAEBench probes documents only). The probes on every feature (`full_probes`) are the
same L2 logistic regression; SAEBench fits those with Adam (100 epochs, learning rate 1e-2, no penalty) and keeps
the epoch of best test accuracy, which reads the test set.

Built-in tasks from the embedded corpus (docstrings of the standard library), both with labels that come from where
the text is, never from a model:

- `package_task` (document level): which package a docstring comes from, one-vs-rest for the largest packages.
  It is a topic classification like SAEBench's ag_news and bias-in-bios tasks: `asyncio`'s docstrings speak of
  event loops and futures, `email`'s of headers and MIME parts, and a model that reads the text can tell them apart.
- `code_literal_task` (token level): whether a token sits inside a code literal (between backticks, the ``x`` of
  reStructuredText and the `x` of Markdown) or in the prose around it. Identifiers, arguments and expressions
  inside literals are code, not English; the backticks are the ground truth of which is which, and the backtick
  tokens themselves are left out, so the label must be read from the tokens between them and their context.

`token_label_task` takes labels in the absorption eval's format (`saelab.absorption.vocab.Labeler`: a function of
a token's text, or a table token text -> class), one-vs-rest per class over the labelled tokens.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.absorption.probes import f1, single_thread
from saelab.absorption.vocab import Labeler
from saelab.errors import ConfigError, RunError
from saelab.resultfile import JsonResult
from saelab.text import EMBEDDED_CORPUS

K_VALUES = (1, 2, 5, 10, 20)
"""The numbers of features the sparse probes read."""
ENCODE_ROWS = 4096
"""Rows encoded at a time."""
Level = Literal["token", "document"]


@dataclass(frozen=True)
class SparseProbingConfig:
    """How the sparse probes are sampled and fitted."""

    k_values: tuple[int, ...] = K_VALUES
    """The numbers of features each probe reads (a `k` above the features there are reads them all)."""
    train_fraction: float = 0.8
    """The share of documents whose units train the probes; the rest test them."""
    max_train: int = 4000
    """At most this many training units per label, half positive (SAEBench's `probe_train_set_size`)."""
    max_test: int = 1000
    """At most this many test units per label, half positive (SAEBench's `probe_test_set_size`)."""
    min_units: int = 4
    """Fewest positive (and negative) units a label needs on each side of the split."""
    c: float = 1.0
    """The inverse L2 strength of the logistic regression (sklearn's `C`)."""
    max_iter: int = 500
    """L-BFGS iterations of each logistic regression."""
    seed: int = 42
    """Seeds the split and the balanced sampling (SAEBench's `random_seed`)."""
    full_probes: bool = True
    """Also fit the same logistic regression on every feature, the ceiling the sparse probes approach (SAEBench's
    `llm_test_accuracy` and `sae_test_accuracy`)."""

    def __post_init__(self) -> None:
        if not self.k_values or min(self.k_values) < 1:
            raise ConfigError(f"k_values {self.k_values} must be positive numbers of features, e.g. (1, 2, 5)")
        if not 0 < self.train_fraction < 1:
            raise ConfigError(f"train_fraction {self.train_fraction} must lie strictly between 0 and 1, e.g. 0.8")


@dataclass
class ProbingTask:
    """Binary label sets over the units of one level: store rows (token level) or documents (document level)."""

    name: str
    """The task's name (`package`, `code_literal`, ...)."""
    level: Level
    """`token`: a unit is one row of the activations; `document`: all rows of one document, mean-pooled."""
    units: np.ndarray
    """The units the labels describe: row indices into the activations (token level) or document ids (document
    level)."""
    labels: dict[str, np.ndarray]
    """Per label, a bool per unit: whether the unit has it (one-vs-rest labels of one classification, or any)."""

    def __post_init__(self) -> None:
        if self.level not in ("token", "document"):
            raise ConfigError(f"task {self.name!r}: level {self.level!r} must be 'token' or 'document'")
        if not self.labels:
            raise ConfigError(f"task {self.name!r} has no labels; give at least one")
        self.labels = {
            label: as_marks(marks, f"task {self.name!r}: label {label!r}") for label, marks in self.labels.items()
        }
        for label, marks in self.labels.items():
            if marks.shape != self.units.shape:
                raise ConfigError(
                    f"task {self.name!r}: label {label!r} marks {marks.shape[0] if marks.ndim else 0} units, but the "
                    f"task has {len(self.units)}; give one bool per unit"
                )


def as_marks(marks: np.ndarray, what: str) -> np.ndarray:
    """`marks` as a bool array: bools as they are, 0/1 numbers converted; anything else is refused (a class index
    would otherwise be read as a row index)."""
    marks = np.asarray(marks)
    if marks.dtype == bool:
        return marks
    values = np.unique(marks)
    if marks.dtype.kind not in "iuf" or not set(values.tolist()) <= {0, 1}:
        raise ConfigError(
            f"{what} must mark each unit True or False (or 1 or 0), not {values[:5].tolist()}; give one-vs-rest bools"
        )
    return marks.astype(bool)


class KProbe(NamedTuple):
    """One sparse probe of one label."""

    k: int
    """The number of features it reads."""
    features: list[int]
    """The features it reads (latents or raw dimensions), largest mean difference first."""
    accuracy: float
    """Its accuracy on the balanced test set (chance: 0.5)."""
    f1: float
    """Its F1 on the positive class of the test set."""
    accuracy_low: float
    """The lower end of the accuracy's 95% Wilson score interval over the test units (`wilson_interval`)."""
    accuracy_high: float
    """Its upper end: with the small test sets of document tasks (tens of documents) the interval is wide."""


@dataclass
class LabelProbes:
    """A label's sparse probes, on the dictionary's latents and on the raw dimensions."""

    label: str
    """The label."""
    n_train: int
    """Balanced training units (half positive)."""
    n_test: int
    """Balanced test units (half positive)."""
    latents: list[KProbe]
    """One probe per `k` on the dictionary's latents."""
    raw: list[KProbe]
    """One probe per `k` on the raw activation dimensions: the baseline."""
    latents_all: KProbe | None = None
    """The probe on every latent (`k`: their number; `features` left empty), with `full_probes`."""
    raw_all: KProbe | None = None
    """The probe on every raw dimension, with `full_probes`."""


@dataclass
class TaskProbes:
    """A task's sparse probes, label by label."""

    task: str
    """The task's name."""
    level: Level
    """`token` or `document`."""
    labels: list[LabelProbes]
    """Each label's probes, in the task's order."""

    def mean(self, k: int, *, metric: Literal["accuracy", "f1"] = "accuracy", raw: bool = False) -> float:
        """The mean over labels of the `k`-feature probes' `metric`, on the latents or (`raw`) the raw dimensions."""
        values = [getattr(p, metric) for lab in self.labels for p in (lab.raw if raw else lab.latents) if p.k == k]
        if not values:
            raise ConfigError(f"task {self.task!r} has no {k}-sparse probes; it has k in {self.k_values()}")
        return float(np.mean(values))

    def k_values(self) -> list[int]:
        """The `k`s probed."""
        return [p.k for p in self.labels[0].latents] if self.labels else []

    def mean_all(self, *, raw: bool = False) -> float | None:
        """The mean over labels of the accuracy of the probes on every latent (or every raw dimension); None
        without them (`full_probes` off)."""
        probes = [lab.raw_all if raw else lab.latents_all for lab in self.labels]
        return float(np.mean([p.accuracy for p in probes if p is not None])) if all(probes) else None

    def summary(self) -> str:
        """One line: each `k`'s mean test accuracy on the latents and on the raw dimensions (and on all of them)."""
        cells = ", ".join(f"k={k} {self.mean(k):.3f} (raw {self.mean(k, raw=True):.3f})" for k in self.k_values())
        every, every_raw = self.mean_all(), self.mean_all(raw=True)
        if every is not None and every_raw is not None:
            cells += f", all {every:.3f} (raw {every_raw:.3f})"
        return f"{self.task} ({self.level}, {len(self.labels)} labels): accuracy {cells}"

    @staticmethod
    def from_json(data: dict[str, Any]) -> TaskProbes:
        """The task's probes from their parsed JSON."""
        labels = [
            LabelProbes(
                lab["label"],
                lab["n_train"],
                lab["n_test"],
                [KProbe(**p) for p in lab["latents"]],
                [KProbe(**p) for p in lab["raw"]],
                *(None if lab.get(key) is None else KProbe(**lab[key]) for key in ("latents_all", "raw_all")),
            )
            for lab in data["labels"]
        ]
        return TaskProbes(data["task"], data["level"], labels)

    def to_json(self) -> dict[str, Any]:
        """The task's probes as JSON."""
        return {
            "task": self.task,
            "level": self.level,
            "labels": [
                {
                    "label": lab.label,
                    "n_train": lab.n_train,
                    "n_test": lab.n_test,
                    "latents": [p._asdict() for p in lab.latents],
                    "raw": [p._asdict() for p in lab.raw],
                    "latents_all": None if lab.latents_all is None else lab.latents_all._asdict(),
                    "raw_all": None if lab.raw_all is None else lab.raw_all._asdict(),
                }
                for lab in self.labels
            ],
        }


@dataclass
class SparseProbingResult(JsonResult):
    """A dictionary's sparse probing over several tasks, as `saelab eval` writes it."""

    what: ClassVar[str] = "sparse probing result"
    command: ClassVar[str] = "saelab eval RUN --only sparse_probing"
    error: ClassVar[type[Exception]] = RunError

    hook: str
    """The dictionary's hook point."""
    variant: str
    """Its variant name."""
    tasks: list[TaskProbes]
    """Each task's probes."""
    config: dict[str, Any] = field(default_factory=dict)
    """The settings that made it (`SparseProbingConfig`'s fields, and the rows read)."""

    def summary(self) -> str:
        """The dictionary and each task's line (`TaskProbes.summary`)."""
        return f"{self.hook}/{self.variant}: " + "; ".join(t.summary() for t in self.tasks)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SparseProbingResult:
        """The result from its parsed JSON."""
        tasks = [TaskProbes.from_json(t) for t in data["tasks"]]
        return SparseProbingResult(data["hook"], data["variant"], tasks, data.get("config", {}))

    def to_json(self) -> dict[str, Any]:
        """The result as written to its file."""
        return {
            "hook": self.hook,
            "variant": self.variant,
            "tasks": [t.to_json() for t in self.tasks],
            "config": self.config,
        }


# --------------------------------------------------------------------------------------------- probes


def fit_logistic(x: Tensor, y: Tensor, *, c: float = 1.0, max_iter: int = 500) -> tuple[Tensor, Tensor]:
    """Weights `[d]` and intercept `[]` of an L2 logistic regression of bool `y` `[n]` on `x` `[n, d]` (float64):
    the minimum of the summed log-loss plus `||w||^2 / (2 c)`, the intercept unpenalised, which is what sklearn's
    `LogisticRegression(C=c)` fits; full-batch L-BFGS from zero, so the same data give the same weights."""
    x, target = x.double(), y.double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe"
    )
    n = len(target)

    def loss() -> Tensor:
        opt.zero_grad()
        value = (F.binary_cross_entropy_with_logits(x @ w + b, target, reduction="sum") + w.dot(w) / (2 * c)) / n
        value.backward()
        return value

    with torch.enable_grad():
        opt.step(loss)  # pyright: ignore[reportArgumentType]  (LBFGS calls the closure for the loss)
    return w.detach(), b.detach()


def mean_difference_order(x: Tensor, y: np.ndarray) -> Tensor:
    """The features of `x` `[n, d]` ordered by `|mean over y - mean over not y|`, largest first (SAEBench
    `get_top_k_mean_diff_mask`); ties go to the lower index."""
    mask = torch.from_numpy(y)
    diff = (x[mask].double().mean(0) - x[~mask].double().mean(0)).abs()
    return torch.from_numpy(np.argsort(-diff.numpy(), kind="stable"))


def k_sparse_probes(
    train_x: Tensor,
    train_y: np.ndarray,
    test_x: Tensor,
    *,
    test_y: np.ndarray,
    config: SparseProbingConfig = SparseProbingConfig(),
) -> list[KProbe]:
    """One probe per `k` of `config.k_values`: the `k` features of largest mean difference on the training set,
    then a logistic regression on them alone, scored on the test set."""
    train_y, test_y = as_marks(train_y, "train_y"), as_marks(test_y, "test_y")
    order = mean_difference_order(train_x, train_y)
    with single_thread():
        return [
            fitted_probe(train_x, train_y, test_x, test_y=test_y, features=order[:k], config=config)._replace(k=k)
            for k in config.k_values
        ]


def fitted_probe(
    train_x: Tensor,
    train_y: np.ndarray,
    test_x: Tensor,
    *,
    test_y: np.ndarray,
    features: Tensor | None,
    config: SparseProbingConfig = SparseProbingConfig(),
) -> KProbe:
    """The logistic regression on `features` of `train_x` (None: every one, recorded as `features=[]`), scored on
    `test_x`."""
    if features is not None:
        train_x, test_x = train_x[:, features], test_x[:, features]
    w, b = fit_logistic(train_x, torch.from_numpy(train_y), c=config.c, max_iter=config.max_iter)
    pred = ((test_x.double() @ w + b) > 0).numpy()
    correct = int((pred == test_y).sum())
    low, high = wilson_interval(correct, len(test_y))
    chosen = [] if features is None else features.tolist()
    return KProbe(train_x.shape[1], chosen, correct / len(test_y), f1(test_y, pred), low, high)


def wilson_interval(successes: int, n: int, *, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion `successes / n` (95% at the default `z`): unlike the normal
    approximation it stays inside [0, 1] and is not empty at 0 or `n` successes."""
    if n <= 0:
        raise ConfigError("a proportion needs at least one trial; give n >= 1")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


# ------------------------------------------------------------------------------------ the whole eval


class BalancedSplit(NamedTuple):
    """A label's balanced training and test units: indices into the task's units."""

    train: np.ndarray
    """Training units, half positive."""
    test: np.ndarray
    """Test units, half positive."""


def _balanced(pool: np.ndarray, marks: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Equal numbers of positive and negative units of `pool`, at most `cap` in all, in random order."""
    pos, neg = pool[marks[pool]], pool[~marks[pool]]
    n = min(len(pos), len(neg), cap // 2)
    return rng.permutation(np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]))


def balanced_splits(task: ProbingTask, unit_docs: np.ndarray, config: SparseProbingConfig) -> dict[str, BalancedSplit]:
    """Per label, balanced training and test units, the documents split `train_fraction` : rest at random (seeded)."""
    rng = np.random.default_rng(config.seed)
    docs = np.unique(unit_docs)
    train_docs = rng.permutation(docs)[: int(round(len(docs) * config.train_fraction))]
    in_train = np.isin(unit_docs, train_docs)
    train_pool, test_pool = np.nonzero(in_train)[0], np.nonzero(~in_train)[0]
    out = {}
    for label, marks in task.labels.items():
        counts = {
            side: (int(marks[pool].sum()), int((~marks[pool]).sum()))
            for side, pool in (("training", train_pool), ("test", test_pool))
        }
        short = {side: c for side, c in counts.items() if min(c) < config.min_units}
        if short:
            said = "; ".join(f"{p} positive and {n} negative {side} units" for side, (p, n) in short.items())
            raise ConfigError(
                f"task {task.name!r}: label {label!r} has {said} ({len(docs)} documents, {len(task.units)} units); "
                f"each side needs at least {config.min_units} of each: give more rows or documents, or drop the label"
            )
        out[label] = BalancedSplit(
            _balanced(train_pool, marks, config.max_train, rng), _balanced(test_pool, marks, config.max_test, rng)
        )
    return out


def _encoded(x: Tensor, encode: Callable[[Tensor], Tensor]) -> Tensor:
    with torch.no_grad():
        return torch.cat([encode(part).float() for part in x.split(ENCODE_ROWS)])


def _pooled(
    x: Tensor, docs: np.ndarray, wanted: np.ndarray, encode: Callable[[Tensor], Tensor]
) -> tuple[Tensor, Tensor]:
    """The raw rows and their codes, mean-pooled per document of `wanted` (in that order), a chunk at a time."""
    slot = {int(d): i for i, d in enumerate(wanted)}
    raw_sum = codes_sum = None
    counts = torch.zeros(len(wanted), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(x), ENCODE_ROWS):
            part_docs = docs[start : start + ENCODE_ROWS]
            rows = np.nonzero(np.isin(part_docs, wanted))[0]
            if not len(rows):
                continue
            where = torch.tensor([slot[int(d)] for d in part_docs[rows]])
            part = x[start : start + ENCODE_ROWS][rows]
            codes = encode(part).double()
            if raw_sum is None or codes_sum is None:
                raw_sum = torch.zeros(len(wanted), x.shape[1], dtype=torch.float64)
                codes_sum = torch.zeros(len(wanted), codes.shape[1], dtype=torch.float64)
            raw_sum.index_add_(0, where, part.double())
            codes_sum.index_add_(0, where, codes)
            counts.index_add_(0, where, torch.ones(len(rows), dtype=torch.float64))
    if raw_sum is None or codes_sum is None or (counts == 0).any():
        missing = wanted[(counts == 0).numpy()]
        raise ConfigError(f"documents {missing[:5].tolist()} have no rows in the activations; give their rows")
    return (raw_sum / counts[:, None]).float(), (codes_sum / counts[:, None]).float()


def sparse_probing(
    x: Tensor,
    docs: np.ndarray,
    task: ProbingTask,
    *,
    encode: Callable[[Tensor], Tensor],
    config: SparseProbingConfig = SparseProbingConfig(),
) -> TaskProbes:
    """k-sparse probes of every label of `task` on the codes `encode` gives (a dictionary's `encode`) and, as the
    baseline, on the raw activations `x` `[n_rows, d]`; `docs` `[n_rows]` is each row's document (rows of document
    -1, framing tokens, belong to none). Only the units the balanced sets draw are encoded."""
    if len(docs) != len(x):
        raise ConfigError(f"{len(x)} activation rows but {len(docs)} document ids; give one id per row")
    if task.level == "token":
        if len(task.units) and (task.units.min() < 0 or task.units.max() >= len(x)):
            raise ConfigError(f"task {task.name!r} names rows outside the {len(x)} activation rows; give rows inside")
        unit_docs = docs[task.units]
    else:
        unit_docs = task.units
    splits = balanced_splits(task, unit_docs, config)
    needed = np.unique(np.concatenate([np.concatenate(s) for s in splits.values()]))
    if task.level == "token":
        raw = x[task.units[needed]].float()
        codes = _encoded(raw, encode)
    else:
        raw, codes = _pooled(x, docs, task.units[needed], encode)
    position = np.full(len(task.units), -1)
    position[needed] = np.arange(len(needed))
    labels = []
    for label, split in splits.items():
        marks = task.labels[label]
        train, test = position[split.train], position[split.test]
        latents, raws = (
            k_sparse_probes(feats[train], marks[split.train], feats[test], test_y=marks[split.test], config=config)
            for feats in (codes, raw)
        )
        full: list[KProbe | None] = [None, None]
        if config.full_probes:
            with single_thread():
                full = [
                    fitted_probe(
                        feats[train],
                        marks[split.train],
                        feats[test],
                        test_y=marks[split.test],
                        features=None,
                        config=config,
                    )
                    for feats in (codes, raw)
                ]
        labels.append(LabelProbes(label, len(train), len(test), latents, raws, full[0], full[1]))
    return TaskProbes(task.name, task.level, labels)


# ------------------------------------------------------------------------------------- built-in tasks


def corpus_packages() -> list[str]:
    """The top-level standard-library package of every document of the embedded corpus, in corpus order (which
    is a harvest store's `doc_id` order)."""
    with resources.files("saelab.data").joinpath(EMBEDDED_CORPUS).open("rb") as raw:
        return [json.loads(line)["source"].split(".")[0] for line in gzip.open(raw)]


def package_task(docs: np.ndarray, *, n_packages: int = 5, min_documents: int = 20) -> ProbingTask:
    """Document level: which standard-library package each document of `docs` (a store's `doc_id`s, from the
    embedded corpus) comes from, one-vs-rest for the `n_packages` packages with the most documents there (at least
    `min_documents` each)."""
    packages = corpus_packages()
    ids = np.unique(docs[docs >= 0])
    if len(ids) and ids.max() >= len(packages):
        raise ConfigError(
            f"document id {int(ids.max())} is past the embedded corpus's {len(packages)} documents; the package task "
            "reads stores harvested from the embedded corpus (`text: {source: embedded}`)"
        )
    names = np.array([packages[i] for i in ids])
    found, counts = np.unique(names, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:n_packages]
    chosen = [str(found[i]) for i in order if counts[i] >= min_documents]
    if not chosen:
        raise ConfigError(
            f"no package has {min_documents} documents among the {len(ids)} the activations cover; harvest more of "
            "the corpus (`max_tokens`)"
        )
    return ProbingTask("package", "document", ids, {p: names == p for p in chosen})


def _is_backticks(text: str) -> bool:
    bare = text.strip()
    return bool(bare) and set(bare) == {"`"}


def code_literal_task(tokens: np.ndarray, docs: np.ndarray, strings: Sequence[str]) -> ProbingTask:
    """Token level: whether each row's token lies inside a code literal. `tokens` and `docs` are the rows' token ids
    and documents, in text order; `strings[t]` is token `t`'s text. A run of backtick-only tokens opens or closes a
    literal (so ``x`` counts once), a document's end closes it; backtick tokens and framing rows (document -1) are
    no units."""
    ticks = np.array([_is_backticks(s) for s in strings])
    if not ticks.any():
        raise ConfigError("the tokenizer has no backtick token, so no code literal can be found; use another task")
    tick = ticks[tokens]
    inside = np.zeros(len(tokens), dtype=bool)
    state, prev_doc, prev_tick = False, None, False
    for i, (doc, t) in enumerate(zip(docs.tolist(), tick.tolist())):
        if doc != prev_doc:
            state, prev_tick = False, False
        if t and not prev_tick:
            state = not state
        inside[i] = state and not t
        prev_doc, prev_tick = doc, t
    units = np.nonzero(~tick & (docs >= 0))[0]
    return ProbingTask("code_literal", "token", units, {"code_literal": inside[units]})


def token_label_task(
    tokens: np.ndarray, strings: Sequence[str], labels: Labeler, *, name: str = "tokens"
) -> ProbingTask:
    """Token level, labels in the absorption eval's format: `labels` gives a token's class from its text (a function
    returning a class or None, or a table token text -> class); the rows whose token has a class are the units, and
    each class is one label, one-vs-rest among them."""
    classes = [(labels.get(s) if isinstance(labels, Mapping) else labels(s)) if s else None for s in strings]
    per_row = np.array([classes[t] or "" for t in tokens.tolist()], dtype=object)
    units = np.nonzero(per_row != "")[0]
    found = sorted(set(per_row[units].tolist()))
    if len(found) < 2:
        raise ConfigError(
            f"the labels give {len(found)} class(es) ({found}) over the {len(tokens)} rows' tokens; give labels "
            "that name tokens of the text, with at least two classes"
        )
    return ProbingTask(name, "token", units, {c: per_row[units] == c for c in found})
