"""Feature absorption ("A is for Absorption", Chanin et al. 2024), measured the way SAEBench measures it.

An SAE latent that seems to track a concept (words starting with S) can fail to fire on some tokens that have
the concept, because a more specific latent (the token "short") has absorbed the concept's direction into its
own decoder row. The first-letter task finds such cases:

1. Vocabulary: every alphabetic token (`alpha_tokens`, SAEBench `vocab.get_alpha_tokens`), split 80/20 by
   token into train and test (`split_vocabulary`, SAEBench `probing.create_dataset_probe_training`).
2. Prompts: decoders read the word token's residual in an in-context prompt of up to 10 examples
   "{word} has the first letter: X" (`icl_prompt`, SAEBench `prompting.create_icl_prompt`); encoders read it
   in the bare template, no examples (see `PromptStyle`).
3. Ground truth: a 26-way one-vs-rest logistic probe on the residuals (`train_probe`, SAEBench
   `probing.train_multi_probe`: BCE with pos_weight = neg/pos, Adam at 1e-2 decaying exponentially to 1e-5
   over 50 epochs, batch 64, weight decay 1e-4).
4. Feature splitting (`k_sparse_probing`, SAEBench `k_sparse_probing.train_k_sparse_probes` and
   `add_feature_splits_to_metrics_df`): an L1 probe on the SAE latents ranks latents by signed weight; for
   k = 1..10 a logistic probe on the top k; k grows while test F1 rises by more than 0.03. The accepted
   latents are the label's "split" (main) latents.
5. For every probe true positive (`absorption_scores`, SAEBench
   `FeatureAbsorptionCalculator.calculate_absorption`): p the unit probe direction, c_i the cosine of
   decoder row i with p, pi_i = a_i c_i (a_i with the decoder row's norm folded in, as SAEBench folds
   W_dec norms). Absorbers: latents outside the split with c_i >= 0.1 and pi_i > 0, the top 3 by pi_i.
   The absorption fraction and full absorption follow SAEBench exactly (thresholds in `AbsorptionSettings`).
6. Per label: mean absorption fraction and full-absorption rate over its true positives; the SAE's score
   is their mean over labels whose probe has test F1 > 0.6 (SAEBench `main._aggregate_results_df`,
   `min_GT_probe_f1`; SAEBench reports nothing with fewer than 20 such labels, `enough_labels` says so).

`ig_absorption` is the paper's own variant for decoders: integrated-gradients attribution of each latent at the
word token to the logit of the answer letter; a false negative is absorption when the top latent by |effect|
hurts the answer when ablated, clearly dominates the next one, and is aligned with the probe.

Any token-level labels work in place of first letters (`labels=` a function or a table token -> class), and
`planted_absorption` gives synthetic activations with a known hierarchy for checking the metric.
"""

from __future__ import annotations

import csv
import json
import math
import random
import string
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab.config import StrictModel
from saelab.errors import AbsorptionError
from saelab.models import Model, capture, device_of, forward_to, is_encoder, load_model, resolve_hooks
from saelab.resultfile import read_json, write_json
from saelab.sae import SAE, SAEConfig
from saelab.text import SpecialTokens

LETTERS = string.ascii_lowercase
ABSORPTION_DIR = "absorption"
FIRST_LETTER_TEMPLATE = "{word} has the first letter:"
EPS = 1e-8

Labeler = Union[Callable[[str], "str | None"], Mapping[str, str]]


# ------------------------------------------------------------------------------ vocabulary and labels


@dataclass(frozen=True)
class Word:
    """A vocabulary token: its id, its text (as the tokenizer writes it alone) and its class."""

    token: int
    text: str
    label: str


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
    writes them (e.g. " cat" for GPT-2's "Ġcat")."""
    if labels is None:
        return [Word(i, w, first_letter(w)) for i, w in alpha_tokens(tokenizer)]
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


# ------------------------------------------------------------------------------------------- prompts


def answer_text(label: str, first_letter_task: bool) -> str:
    """The answer after the template (SAEBench `first_letter_formatter`: " X", capitalised)."""
    return " " + (label.upper() if first_letter_task else label)


def icl_prompt(
    word: Word,
    examples: list[Word],
    template: str,
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
    icl_examples: int

    @staticmethod
    def for_model(model: Model, template: str | None = None, icl_examples: int = 10) -> PromptStyle:
        return PromptStyle(template or FIRST_LETTER_TEMPLATE, 0 if is_encoder(model) else icl_examples)


def _encode_prompts(
    model: Model, words: list[Word], prompts: list[str], template: str
) -> tuple[list[list[int]], list[int], list[int]]:
    """Token ids of each prompt (with the model's special tokens) and the word token's position; prompts in
    which the word is not one token at the expected place are dropped (their indices are not returned)."""
    special = SpecialTokens.for_tokenizer(model.tokenizer, is_encoder(model))
    after = template.split("{word}", 1)[1]
    n_after = len(model.tokenizer(after, add_special_tokens=False)["input_ids"]) + len(special.suffix)
    ids, positions, kept = [], [], []
    for i, (word, prompt) in enumerate(zip(words, prompts)):
        toks = special.frame(model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        pos = len(toks) - n_after - 1
        if pos >= 0 and toks[pos] == word.token:
            ids.append(toks)
            positions.append(pos)
            kept.append(i)
    return ids, positions, kept


@torch.no_grad()
def word_activations(
    model: Model,
    hook: str,
    words: list[Word],
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
    ids, positions, kept = _encode_prompts(model, words, prompts, template)
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


# -------------------------------------------------------------------------------------------- probes


class AbsorptionSettings(StrictModel):
    """SAEBench's defaults (`AbsorptionEvalConfig`, `train_and_save_probes`, `FeatureAbsorptionCalculator`)."""

    probe_epochs: int = Field(50, ge=1)
    probe_batch_size: int = Field(64, ge=1)
    probe_lr: float = 1e-2
    probe_end_lr: float = 1e-5
    probe_weight_decay: float = 1e-4
    l1_decay: float = 0.01
    l1_epochs: int = 50
    l1_batch_size: int = 4096
    l1_weight_decay: float = 1e-6
    max_k: int = Field(10, ge=1)
    f1_jump_threshold: float = 0.03
    min_probe_f1: float = 0.6
    min_labels: int = 20
    absorber_cos_threshold: float = 0.1  # absorption_fraction_probe_cos_sim_threshold
    full_absorption_cos_threshold: float = 0.025  # full_absorption_probe_cos_sim_threshold
    projection_proportion_threshold: float = 0.4
    max_absorbers: int = 3  # absorption_fraction_max_absorbing_latents
    top_latents: int = 10  # topk_feats
    seed: int = 42


def train_probe(
    x: Tensor,
    y: Tensor,
    epochs: int = 50,
    batch_size: int = 64,
    lr: float = 1e-2,
    end_lr: float = 1e-5,
    weight_decay: float = 1e-4,
    l1: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> nn.Linear:
    """One-vs-rest logistic probes [n_classes] on `x` [n, d] for multi-hot `y` [n, n_classes] (SAEBench
    `train_multi_probe`): BCE with pos_weight = negatives / positives per class, Adam with weight decay, the
    learning rate decaying exponentially from `lr` to `end_lr` over the epochs, shuffled batches; `l1` adds
    SAEBench's sparse-probe penalty l1 * mean over classes of sum |w| (`train_sparse_multi_probe`)."""
    with single_thread():
        return _train_probe(x, y, epochs, batch_size, lr, end_lr, weight_decay, l1, seed, progress)


@contextmanager
def single_thread() -> Iterator[None]:
    """One CPU thread inside: a probe step multiplies small matrices, too small to share between threads,
    and spinning worker threads slow them down many times over on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train_probe(
    x: Tensor,
    y: Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    end_lr: float,
    weight_decay: float,
    l1: float,
    seed: int,
    progress: bool,
) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    y = y.float()
    probe = nn.Linear(x.shape[1], y.shape[1]).to(x.device)
    positives = y.sum(0)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=((len(y) - positives) / positives).to(x.device))
    opt = torch.optim.Adam(probe.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=math.exp(math.log(end_lr / lr) / epochs))
    for _ in tqdm(range(epochs), desc="probe epochs", disable=not progress):
        for rows in torch.randperm(len(x), generator=g).split(batch_size):
            loss = loss_fn(probe(x[rows]), y[rows].to(x.device))
            if l1:
                loss = loss + l1 * probe.weight.abs().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return probe.eval()


def f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Binary F1 of boolean predictions (0 when there are no positives predicted or present)."""
    tp = float((y & pred).sum())
    return 2 * tp / float(y.sum() + pred.sum()) if y.sum() + pred.sum() else 0.0


@dataclass
class KSparse:
    """A label's k-sparse probes: latents, F1 on the test words and test scores for each k = 1..max_k."""

    latents: list[list[int]]
    f1: list[float]
    scores: list[np.ndarray]

    def split(self, jump: float) -> list[int]:
        """The split latents: k grows while F1 rises by more than `jump` (SAEBench `add_feature_splits_to_metrics_df`)."""
        best, chosen = -100.0, []
        for feats, score in zip(self.latents, self.f1):
            if score <= best + jump:
                break
            best, chosen = score, feats
        return chosen


def k_sparse_probing(
    codes_train: Tensor,
    y_train: np.ndarray,
    codes_test: Tensor,
    y_test: np.ndarray,
    n_classes: int,
    s: AbsorptionSettings,
    progress: bool = False,
) -> list[KSparse]:
    """SAEBench `train_k_sparse_probes` + `build_metrics_df`: an L1-penalised one-vs-rest probe on the latents
    ranks them per class by signed weight (topk, not |w|: only latents that predict the label); for each k a
    balanced sklearn logistic regression (max_iter 500) on the top k latents, scored by F1 of score > 0."""
    from sklearn.linear_model import LogisticRegression

    onehot = torch.nn.functional.one_hot(torch.from_numpy(y_train), n_classes)
    l1_probe = train_probe(
        codes_train,
        onehot,
        s.l1_epochs,
        s.l1_batch_size,
        s.probe_lr,
        s.probe_end_lr,
        s.l1_weight_decay,
        l1=s.l1_decay,
        seed=s.seed,
        progress=progress,
    )
    weights = l1_probe.weight.detach().cpu()
    train_np, test_np = codes_train.cpu().numpy(), codes_test.cpu().numpy()
    out = []
    for c in tqdm(range(n_classes), desc="k-sparse probes", disable=not progress):
        ks = KSparse([], [], [])
        for k in range(1, min(s.max_k, weights.shape[1]) + 1):
            feats = weights[c].topk(k).indices.tolist()
            target = (y_train == c).astype(np.int64)
            if target.min() == target.max():  # one class only: sklearn cannot fit
                score = np.full(len(y_test), 1.0 if target[0] else -1.0)
            else:
                lr = LogisticRegression(max_iter=500, class_weight="balanced").fit(train_np[:, feats], target)
                score = test_np[:, feats] @ lr.coef_[0] + lr.intercept_[0]
            ks.latents.append(feats)
            ks.f1.append(f1(y_test == c, score > 0))
            ks.scores.append(score)
        out.append(ks)
    return out


# ------------------------------------------------------------------------------------------ absorption


@dataclass
class Case:
    """One probe true positive: the word, the activation's projection on the probe direction, the split
    latents' activations, the potential absorbers (up to 3: [latent, activation, cosine, projection]), the
    top latents by projection (same fields), its absorption fraction and whether it is full absorption."""

    word: str
    probe_projection: float
    split_acts: list[float]
    absorbers: list[list[float]]
    top: list[list[float]]
    absorption_fraction: float
    full_absorption: bool


def decoder_cosines(sae: SAE, direction: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine of every decoder row with `direction`, and the rows' norms (folded into activations)."""
    w = sae.W_dec.detach().float().cpu()
    norms = w.norm(dim=1)
    return (w @ (direction / direction.norm())) / norms.clamp_min(EPS), norms


def absorption_scores(
    codes: Tensor,
    x: Tensor,
    direction: Tensor,
    cos: Tensor,
    norms: Tensor,
    split: list[int],
    s: AbsorptionSettings,
    words: list[str],
) -> list[Case]:
    """SAEBench `FeatureAbsorptionCalculator.calculate_absorption` for activations `x` [n, d] with codes [n, d_sae]:
    with p = direction / |p| and pi_i = a_i |d_i| c_i,

    - fraction: 0 if the split latents' sum pi >= x.p or the top-3 absorbers' sum < 0.4 x.p; 1 if the split's
      sum <= 0; otherwise min(absorbers, x.p - split) / (that + split);
    - full absorption: every split activation is 0, the top latent by pi has c >= 0.025, x.p >= 0, and that
      latent's pi is at least 0.4 x.p."""
    p = direction / direction.norm()
    total = (x @ p).tolist()
    folded = codes * norms
    proj = folded * cos
    outside = torch.ones(len(cos), dtype=torch.bool)
    outside[split] = False
    cases = []
    for i, word in enumerate(words):
        main = float(proj[i, split].sum())
        mask = outside & (cos >= s.absorber_cos_threshold) & (proj[i] > 0)
        cand = mask.nonzero()[:, 0]
        top_abs = cand[proj[i, cand].topk(min(s.max_absorbers, len(cand))).indices]
        absorbed = float(proj[i, top_abs].sum())
        ratio = absorbed / total[i] if total[i] else -math.inf
        if main >= total[i] or ratio < s.projection_proportion_threshold:
            fraction = 0.0
        elif main <= 0:
            fraction = 1.0
        else:
            absorbed = min(absorbed, total[i] - main)
            fraction = float(np.clip(absorbed / (absorbed + main), 0.0, 1.0))
        top = proj[i].topk(min(s.top_latents, len(cos))).indices
        full = (
            bool((folded[i, split].abs() < EPS).all())
            and float(cos[top[0]]) >= s.full_absorption_cos_threshold
            and total[i] >= 0
            and float(proj[i, top[0]]) / total[i] >= s.projection_proportion_threshold
            if total[i]
            else False
        )

        def rows(latents: Tensor) -> list[list[float]]:
            return [[int(j), float(folded[i, j]), float(cos[j]), float(proj[i, j])] for j in latents]

        cases.append(
            Case(word, total[i], [float(folded[i, j]) for j in split], rows(top_abs), rows(top[:3]), fraction, full)
        )
    return cases


@dataclass
class LabelScore:
    """A label's result: the probe's test F1, the split latents and the k-sparse F1 by k, the probe's true
    positives (and how many the split's k-sparse probe also finds), the mean absorption fraction and
    full-absorption rate over the true positives, whether the label counts in the SAE's score (`scored`), its
    cases with absorption (fraction > 0 or full), and the integrated-gradients variant's numbers (`ig`)."""

    label: str
    probe_f1: float
    split_latents: list[int]
    k_sparse_f1: list[float]
    true_positives: int
    split_true_positives: int
    mean_absorption_fraction: float
    full_absorption_rate: float
    n_full_absorption: int
    scored: bool
    cases: list[Case] = field(default_factory=list)
    ig: dict[str, Any] | None = None


@dataclass
class AbsorptionResult:
    """Absorption of one SAE: per label, and the means over scored labels (SAEBench's
    `mean_absorption_fraction_score`, `mean_full_absorption_score`, `mean_num_split_features`)."""

    hook: str
    variant: str
    sae: str
    model: str
    task: str
    d_sae: int
    l0: float
    labels: list[LabelScore]
    mean_absorption_fraction: float | None
    mean_full_absorption_rate: float | None
    mean_num_split_features: float | None
    n_scored: int
    enough_labels: bool
    n_train: int = 0
    n_test: int = 0
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        note = "" if self.enough_labels else " (too few labels pass the probe-F1 bar for SAEBench to score this SAE)"
        return (
            f"{self.hook}/{self.variant}: mean absorption fraction {fmt(self.mean_absorption_fraction)}, "
            f"full-absorption rate {fmt(self.mean_full_absorption_rate)}, split latents "
            f"{fmt(self.mean_num_split_features)}, over {self.n_scored} of {len(self.labels)} labels{note}; "
            f"L0 {self.l0:.1f}, width {self.d_sae}"
        )

    def save(self, path: str | Path) -> Path:
        return write_json(path, asdict(self))

    @staticmethod
    def load(path: str | Path) -> AbsorptionResult:
        return read_json(
            path, _absorption_result, AbsorptionError, "absorption result", "saelab absorption CONFIG.yaml"
        )


def _absorption_result(data: dict) -> AbsorptionResult:
    labels = [LabelScore(**(lab | {"cases": [Case(**c) for c in lab["cases"]]})) for lab in data.pop("labels")]
    return AbsorptionResult(labels=labels, **data)


@dataclass
class ProbeData:
    """What the probe step produces for one hook point, shared by every SAE there: activations and classes of the
    train and test words, the probe, and which test words are its true positives. `absorb_x` are the activations
    the absorption step reads for the test words (SAEBench re-prompts them with fresh examples)."""

    classes: list[str]
    train_x: Tensor
    train_y: np.ndarray
    test_x: Tensor
    test_y: np.ndarray
    test_words: list[str]
    probe: nn.Linear
    absorb_x: Tensor
    test_tokens: list[int] = field(default_factory=list)

    def scores(self) -> np.ndarray:
        with torch.no_grad():
            return self.probe(self.test_x).numpy()


def fit_probe(
    train_x: Tensor,
    train_y: np.ndarray,
    test_x: Tensor,
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
    probe = train_probe(
        train_x,
        onehot,
        s.probe_epochs,
        s.probe_batch_size,
        s.probe_lr,
        s.probe_end_lr,
        s.probe_weight_decay,
        seed=s.seed,
        progress=progress,
    )
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


@torch.no_grad()
def _codes(sae: SAE, x: Tensor, batch: int = 4096) -> Tensor:
    device = sae.W_dec.device
    return torch.cat([sae.encode(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])


def measure_absorption(
    sae: SAE, data: ProbeData, s: AbsorptionSettings = AbsorptionSettings(), progress: bool = False
) -> tuple[list[LabelScore], dict[str, Any]]:
    """k-sparse probing, feature splits and absorption of every label; returns the label scores and the SAE-level
    means (over labels with true positives and probe F1 > `min_probe_f1`)."""
    if sae.cfg.d_in != data.train_x.shape[1]:
        raise AbsorptionError(
            f"the SAE reads d_in={sae.cfg.d_in} but the activations have width "
            f"{data.train_x.shape[1]}; give an SAE trained on this hook point"
        )
    codes_train, codes_test, codes_abs = _codes(sae, data.train_x), _codes(sae, data.test_x), _codes(sae, data.absorb_x)
    ks = k_sparse_probing(codes_train, data.train_y, codes_test, data.test_y, len(data.classes), s, progress)
    probe_scores = data.scores()
    labels = []
    for c, name in enumerate(data.classes):
        truth = data.test_y == c
        probe_f1 = f1(truth, probe_scores[:, c] > 0)
        split = ks[c].split(s.f1_jump_threshold)
        tp = np.nonzero(truth & (probe_scores[:, c] > 0))[0]
        split_tp = int((ks[c].scores[max(len(split), 1) - 1][tp] > 0).sum()) if split else 0
        cos, norms = decoder_cosines(sae, data.probe.weight[c].detach().cpu())
        cases = absorption_scores(
            codes_abs[tp],
            data.absorb_x[tp],
            data.probe.weight[c].detach().cpu(),
            cos,
            norms,
            split,
            s,
            [data.test_words[i] for i in tp],
        )
        n = max(len(tp), 1)
        labels.append(
            LabelScore(
                name,
                probe_f1,
                split,
                ks[c].f1,
                len(tp),
                split_tp,
                sum(x.absorption_fraction for x in cases) / n,
                sum(x.full_absorption for x in cases) / n,
                sum(x.full_absorption for x in cases),
                len(tp) > 0 and probe_f1 > s.min_probe_f1,
                [x for x in cases if x.absorption_fraction > 0 or x.full_absorption],
            )
        )
    scored = [lab for lab in labels if lab.scored]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    summary = {
        "mean_absorption_fraction": mean([lab.mean_absorption_fraction for lab in scored]),
        "mean_full_absorption_rate": mean([lab.full_absorption_rate for lab in scored]),
        "mean_num_split_features": mean([float(len(lab.split_latents)) for lab in scored]),
        "n_scored": len(scored),
        "enough_labels": len(scored) >= s.min_labels,
        "l0": float((codes_test != 0).sum(1).float().mean()) if len(codes_test) else 0.0,
    }
    return labels, summary


# --------------------------------------------------------------------------------- planted absorption


@dataclass
class Planted:
    """Synthetic activations with a known hierarchy and an SAE over them.

    Each row has one parent feature (its label); with probability `child_prob` it also has one child feature,
    drawn from that parent's children (`hierarchy=True`: a child never fires without its parent) or from any
    parent's (`hierarchy=False`: children independent of the label). Feature directions are orthonormal.

    The SAE is the one sparsity favours on each: with a hierarchy every child latent absorbs its parent (decoder
    row (u_parent + u_child) / sqrt 2, and the parent latent is suppressed whenever a child fires), so the
    child latents are the absorbers and the parent latent is the split; without one, one latent per feature.
    `parent_latent[p]` and `child_latent[c]` index its latents; `child[r]` is row r's child (-1: none);
    `directions` are the parents' then the children's feature directions."""

    x: Tensor
    y: np.ndarray
    child: np.ndarray
    words: list[str]
    classes: list[str]
    sae: SAE
    parent_latent: list[int]
    child_latent: list[int]
    children_of: list[list[int]]
    directions: Tensor


def planted_absorption(
    n_rows: int = 40_000,
    n_parents: int = 4,
    n_children: int = 20,
    child_prob: float = 0.4,
    hierarchy: bool = True,
    d: int = 128,
    noise: float = 0.01,
    seed: int = 0,
) -> Planted:
    """Planted absorption (`hierarchy=True`) or its control with independent features (`hierarchy=False`)."""
    n_feats = n_parents * (1 + n_children)
    if n_feats > d:
        raise AbsorptionError(f"{n_feats} orthonormal features need d >= {n_feats}; give a larger d")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.linalg.qr(torch.randn(d, n_feats, generator=g))[0].T  # orthonormal rows
    parents, children = dirs[:n_parents], dirs[n_parents:]
    children_of = [list(range(p * n_children, (p + 1) * n_children)) for p in range(n_parents)]
    y = torch.randint(0, n_parents, (n_rows,), generator=g)
    has_child = torch.rand(n_rows, generator=g) < child_prob
    pick = torch.randint(0, n_children, (n_rows,), generator=g)
    owner = y if hierarchy else torch.randint(0, n_parents, (n_rows,), generator=g)
    child = torch.where(has_child, owner * n_children + pick, torch.full_like(y, -1))
    x = parents[y] + torch.where(has_child[:, None], children[child.clamp_min(0)], torch.zeros(1))
    x = x + noise * torch.randn(x.shape, generator=g)
    sae = SAE.from_config(SAEConfig(arch="relu", d_in=d, d_sae=n_feats, k=1))
    with torch.no_grad():
        sae.b_dec.zero_()
        parent_enc = 2 * parents.clone()
        child_dec = children.clone()
        if hierarchy:  # the parent latent is off whenever one of its children fires; children carry the parent
            for p, kids in enumerate(children_of):
                parent_enc[p] -= 4 * children[kids].sum(0)
                child_dec[kids] = (children[kids] + parents[p]) / math.sqrt(2)
        child_scale = math.sqrt(2) if hierarchy else 1.0  # activation = the norm of what the latent reconstructs
        sae.W_enc.copy_(torch.cat([parent_enc, 2 * child_scale * children]).T)
        sae.b_enc.copy_(torch.cat([torch.full((n_parents,), -1.0), torch.full((len(children),), -child_scale)]))
        sae.W_dec.copy_(torch.cat([parents, child_dec]))
    words = [f"p{p}" + (f".c{c}" if c >= 0 else "") for p, c in zip(y.tolist(), child.tolist())]
    return Planted(
        x,
        y.numpy(),
        child.numpy(),
        words,
        [f"p{p}" for p in range(n_parents)],
        sae.eval(),
        list(range(n_parents)),
        list(range(n_parents, n_feats)),
        children_of,
        dirs,
    )


def planted_probe_data(
    planted: Planted, train_fraction: float = 0.8, s: AbsorptionSettings = AbsorptionSettings(), progress: bool = False
) -> ProbeData:
    """The probe step on planted activations, split by row."""
    cut = int(len(planted.x) * train_fraction)
    return fit_probe(
        planted.x[:cut],
        planted.y[:cut],
        planted.x[cut:],
        planted.y[cut:],
        planted.classes,
        planted.words[cut:],
        s,
        progress=progress,
    )


# ------------------------------------------------------------------------------- the model's words


def probe_data(
    model: Model,
    hook: str,
    labels: Labeler | None = None,
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
    if model.tokenizer is None:
        raise AbsorptionError("the model has no tokenizer; absorption needs one to find its vocabulary")
    style = style or PromptStyle.for_model(model)
    rng = random.Random(s.seed)
    words = labelled_vocabulary(model.tokenizer, labels)
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
        if style.icl_examples == 0:
            return [style.template.format(word=w.text) for w in split]
        return [
            icl_prompt(w, examples, style.template, style.icl_examples, rng, task_first_letter, prepend) for w in split
        ]

    def read(split: list[Word], text: list[str]) -> tuple[Tensor, list[Word]]:
        x, kept = word_activations(model, hook, split, text, style.template, batch_size, progress)
        return x, [split[i] for i in kept]

    train_x, train = read(train, prompts(train, False, train))
    test_x, test = read(test, prompts(test, False, test))
    absorb_x = None
    if style.icl_examples:
        absorb_x, kept = word_activations(
            model, hook, test, prompts(test, True, words), style.template, batch_size, progress
        )
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
        np.array([index[w.label] for w in test], dtype=np.int64),
        classes,
        [w.text for w in test],
        s,
        absorb_x,
        progress,
        [w.token for w in test],
    )


# ------------------------------------------------------------------- the paper's integrated gradients


def ig_absorption(
    model: Model,
    sae: SAE,
    hook: str,
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
) -> dict[str, Any]:
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
    answer = model.tokenizer(answer_text(label.label, first), add_special_tokens=False)["input_ids"]
    if len(answer) != 1:
        raise AbsorptionError(
            f"the answer {answer_text(label.label, first)!r} is {len(answer)} tokens; the "
            "integrated-gradients variant needs single-token answers"
        )
    prompts = [icl_prompt(w, examples, style.template, style.icl_examples, rng, first, True) for w in words]
    ids, positions, kept = _encode_prompts(model, words, prompts, style.template)
    cos, _ = decoder_cosines(sae, direction)
    device = device_of(model)
    split = label.split_latents
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
        alphas = ((torch.arange(steps, device=device) + 0.5) / steps)[:, None]
        latents = (alphas * f).requires_grad_()

        def patch(act: Tensor, hook: Any) -> Tensor:
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


# ------------------------------------------------------------------------------------- config and run


class AbsorptionConfig(StrictModel):
    """What `saelab absorption` computes: the absorption of `saes` (SAE folders; default every SAE under
    `run`/saes) in `model`, written to `<run>/absorption/<hook>/<variant>.json`. `labels`: None for the
    first-letter task, or a token -> class table (.json object, or .csv/.tsv rows token,class)."""

    run: str
    model: str = "minilm"
    saes: list[str] = []
    labels: str | None = None
    template: str | None = None
    icl_examples: int = Field(10, ge=1)
    max_words: int | None = Field(None, ge=10)
    train_fraction: float = Field(0.8, gt=0, lt=1)
    batch_size: int = Field(64, ge=1)
    integrated_gradients: bool = False
    ig_steps: int = Field(6, ge=1)
    ig_words: int = Field(20, ge=1)
    settings: AbsorptionSettings = AbsorptionSettings()
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> AbsorptionConfig:
        if not Path(self.run).is_dir():
            raise ValueError(
                f"no run directory {self.run!r}; give the folder with saes/ (results go to RUN/absorption)"
            )
        missing = [p for p in self.saes if not Path(p).is_dir()]
        if missing:
            raise ValueError(f"no SAE folder {missing}; give folders with cfg.json and sae_weights.safetensors")
        if self.labels is not None and not Path(self.labels).is_file():
            raise ValueError(f"no label table {self.labels!r}; give a .json or .csv/.tsv file of token,class")
        if self.template is not None and "{word}" not in self.template:
            raise ValueError("the template needs a {word} placeholder, e.g. '{word} has the first letter:'")
        return self


def result_path(run: str | Path, hook: str, variant: str) -> Path:
    return Path(run) / ABSORPTION_DIR / hook / f"{variant}.json"


def _sae_folders(cfg: AbsorptionConfig) -> list[Path]:
    if cfg.saes:
        return [Path(p) for p in cfg.saes]
    folders = sorted(p.parent for p in (Path(cfg.run) / "saes").glob("*/*/cfg.json"))
    if not folders:
        raise AbsorptionError(f"no SAEs under {Path(cfg.run) / 'saes'}; train some (`saelab train`) or list `saes:`")
    return folders


def _load_sae(path: Path, device: torch.device) -> SAE:
    sae = SAE.load(path, device=device).eval()
    if not sae.cfg.hook_name:
        raise AbsorptionError(
            f"the SAE at {path} does not say which hook point it reads (hook_name); set it in cfg.json"
        )
    return sae


def absorption_result(
    sae: SAE,
    data: ProbeData,
    hook: str,
    variant: str,
    s: AbsorptionSettings = AbsorptionSettings(),
    sae_path: str = "",
    model: str = "",
    task: str = "first_letter",
    progress: bool = False,
) -> AbsorptionResult:
    """`measure_absorption` packed as a result that the app and `AbsorptionResult.load` read."""
    labels, summary = measure_absorption(sae, data, s, progress)
    return AbsorptionResult(
        hook,
        variant,
        sae_path,
        model,
        task,
        sae.cfg.d_sae,
        summary.pop("l0"),
        labels,
        n_train=len(data.train_y),
        n_test=len(data.test_y),
        config=s.model_dump(),
        **summary,
    )


def run_absorption(cfg: AbsorptionConfig, progress: bool = True) -> list[tuple[AbsorptionResult, Path]]:
    """Load the model and SAEs; for each hook point train the probe once, then score every SAE there."""
    model = load_model(cfg.model, device=cfg.device)
    device = device_of(model)
    saes = [(p, _load_sae(p, device)) for p in _sae_folders(cfg)]
    table = load_label_table(cfg.labels) if cfg.labels else None
    style = PromptStyle.for_model(model, cfg.template, cfg.icl_examples)
    task = "first_letter" if table is None else Path(cfg.labels).stem
    out = []
    for hook in sorted({sae.cfg.hook_name for _, sae in saes}):
        data = probe_data(
            model, hook, table, style, cfg.max_words, cfg.train_fraction, cfg.batch_size, cfg.settings, progress
        )
        for path, sae in [(p, sae) for p, sae in saes if sae.cfg.hook_name == hook]:
            result = absorption_result(
                sae, data, hook, path.name, cfg.settings, str(path.resolve()), cfg.model, task, progress
            )
            result.config = cfg.model_dump(mode="json")
            if cfg.integrated_gradients:
                _add_ig(model, sae, hook, data, result, style, cfg)
            out.append((result, result.save(result_path(cfg.run, hook, path.name))))
    return out


def _add_ig(
    model: Model,
    sae: SAE,
    hook: str,
    data: ProbeData,
    result: AbsorptionResult,
    style: PromptStyle,
    cfg: AbsorptionConfig,
) -> None:
    scores = data.scores()
    vocab = labelled_vocabulary(model.tokenizer, load_label_table(cfg.labels) if cfg.labels else None)
    rng = random.Random(cfg.settings.seed)
    for c, label in enumerate(result.labels):
        if not label.scored:
            continue
        tp = np.nonzero((data.test_y == c) & (scores[:, c] > 0))[0][: cfg.ig_words]
        words = [Word(data.test_tokens[i], data.test_words[i], label.label) for i in tp]
        try:
            label.ig = ig_absorption(
                model, sae, hook, words, label, data.probe.weight[c].detach().cpu(), style, rng, vocab, cfg.ig_steps
            )
        except AbsorptionError as err:  # e.g. an answer letter that is two tokens: say so for this label only
            label.ig = {"error": str(err)}
