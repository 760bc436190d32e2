"""`saelab eval`: the evals of `saelab.evals` on every dictionary of a run, each written to
`RUN/evals/<hook>/<variant>/<eval>.json`.

- `sparse_probing`: the built-in tasks of `saelab.evals.sparse_probing` on the first `max_rows` rows of the run's
  store: the package of each docstring (document level; stores of the embedded corpus) and code literals (token
  level; needs the model's vocabulary, from `RUN/analysis/vocab.json` or the model's tokenizer). A task the rows
  cannot support (too few documents of a package, no backtick token) is left out, with the reason in `skipped`.
  `labels` adds a token-level task of your own, a table token -> class in the absorption eval's format
  (`saelab.absorption.vocab.load_label_table`: JSON object or `token,class` CSV); it must fit the rows.
- `hedging`: Chanin et al.'s protocol with the run's dictionary as the initial SAE: a control copy and a copy with
  `new_latents` more latents (`d_in / 16` by default: their span must leave most of the space out, or a random
  subspace of their dimension catches as much of any change as theirs does) are each trained `hedging_steps` further steps on
  the same batches of the store's rows, and `saelab.evals.hedging.hedging` compares them. Plain SAEs only: a
  transcoder's steps would need its output hook's rows too, new latents would change a Matryoshka SAE's prefixes,
  and ICFL's codes are signed; those are listed in `EvalsDone.skipped`.
- `families`: the co-occurrence of the dictionary's latents over the first `max_rows` rows, streamed from the store
  in blocks through its encoder, and the parent -> child links and families of `saelab.evals.families` (thresholds
  `EvalSettings.families`). Dictionaries with signed codes (ICFL) are skipped: "fires" is a positive code.
- `labels`: the embedding-detection score of each latent's contrastive label (`saelab.analysis.labels`, written by
  `saelab analyze`): for the first `label_latents` latents that fired, the AUROC of MiniLM's cosine between the label
  and the latent's top contexts against `label_negatives` random contexts of the rows read. With an `endpoint`
  (`saelab.evals.endpoint`), an LLM also explains each of them and scores its explanation by detection; an endpoint
  that does not answer leaves the MiniLM scores written and the LLM part listed in `EvalsDone.skipped`.

Crosscoders are left out of all of them (they read several sources; `saelab diff` reads them).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from saelab.absorption.vocab import load_label_table
from saelab.analysis.features import FeatureStore
from saelab.analysis.labels import context_windows, detection_aurocs, join_pieces, label_query, label_text
from saelab.dictionaries import SAE
from saelab.errors import ConfigError, RunError
from saelab.evals.endpoint import Endpoint, EndpointError, detect, explain
from saelab.evals.families import FamiliesResult, FamilyThresholds, cooccurrence, families_result
from saelab.evals.hedging import hedging, train_hedging_pair
from saelab.evals.sparse_probing import (
    ProbingTask,
    SparseProbingConfig,
    SparseProbingResult,
    code_literal_task,
    package_task,
    sparse_probing,
    token_label_task,
)
from saelab.evals.table import write_run_by_config
from saelab.models import MINILM, Model, load_model
from saelab.resultfile import JsonResult
from saelab.run import RunDir, saved_kind
from saelab.store import ActivationStore

EVALS = ("sparse_probing", "hedging", "families", "labels")
"""The evals `saelab eval` knows, in order."""
DEFAULT_EVALS = ("sparse_probing", "hedging", "families")
"""The evals it runs unless told otherwise (`labels` needs `saelab analyze` to have run, and loads MiniLM)."""


@dataclass(frozen=True)
class EvalSettings:
    """What `saelab eval` reads and how it runs each eval."""

    only: tuple[str, ...] = DEFAULT_EVALS
    """The evals to run (names of `EVALS`)."""
    max_rows: int = 65_536
    """The store rows the evals read, from the first."""
    probing: SparseProbingConfig = SparseProbingConfig()
    """The sparse probes' sampling and fit."""
    n_packages: int = 5
    """The package task's labels: this many of the largest packages, one-vs-rest."""
    min_documents: int = 20
    """The package task takes packages with at least this many documents among the rows."""
    new_latents: int | None = None
    """Hedging: latents the extended SAE adds, fewer than the input width (None: `d_in // 16`, at least 1)."""
    hedging_steps: int = 200
    """Hedging: steps each of the control and the extended SAE trains on."""
    hedging_batch: int = 1024
    """Hedging: rows per step, drawn from the rows read."""
    hedging_lr: float = 1e-3
    """Hedging: the Adam learning rate of those steps."""
    families: FamilyThresholds = FamilyThresholds()
    """Families: what makes a pair of latents a parent -> child link."""
    seed: int = 0
    """Seeds the hedging batches, the new latents and the random baselines."""
    labels: str | None = None
    """A label table (JSON or CSV, token text -> class, the absorption eval's format) for a token-level task of
    your own, `labels`, beside the built-in ones; None: the built-in tasks alone."""

    label_latents: int = 64
    """Labels: how many latents to score (the first that fired, by id)."""
    label_negatives: int = 50
    """Labels: random contexts each label must tell from its latent's top contexts."""
    endpoint: Endpoint | None = None
    """Labels: an OpenAI-compatible endpoint for the LLM explainer and detection scorer (None: MiniLM alone)."""

    def __post_init__(self) -> None:
        unknown = [name for name in self.only if name not in EVALS]
        if unknown or not self.only:
            raise ConfigError(f"unknown evals {unknown or '(none given)'}; choose from {', '.join(EVALS)}")
        if self.max_rows < 1 or self.hedging_steps < 1 or self.hedging_batch < 1:
            raise ConfigError("max_rows, hedging_steps and hedging_batch must be positive")


@dataclass
class HedgingResult(JsonResult):
    """A dictionary's hedging rate by the protocol, as `saelab eval` writes it."""

    what: ClassVar[str] = "hedging result"
    command: ClassVar[str] = "saelab eval RUN --only hedging"
    error: ClassVar[type[Exception]] = RunError

    hook: str
    """The dictionary's hook point."""
    variant: str
    """Its variant name."""
    rate: float
    """The SAE's hedging rate (`saelab.evals.hedging.Hedging.rate`)."""
    per_latent: list[float]
    """Each latent's rate."""
    delta_proj: list[float]
    """Each latent's decoder change projected onto the new latents' span (norm)."""
    baseline_proj: list[float]
    """The same onto random subspaces, mean over the draws."""
    cosine: list[float]
    """Each latent's control-to-extended decoder cosine."""
    baseline_std: float
    """The standard deviation of the random baseline's mean."""
    config: dict[str, Any] = field(default_factory=dict)
    """The settings that made it (new latents, steps, batch, learning rate, seed, rows)."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HedgingResult:
        """The result from its parsed JSON."""
        return HedgingResult(**data)

    def summary(self) -> str:
        """One line: the rate against the random baseline."""
        mean = float(np.mean(self.delta_proj)) if self.delta_proj else float("nan")
        base = float(np.mean(self.baseline_proj)) if self.baseline_proj else float("nan")
        return (
            f"{self.hook}/{self.variant}: hedging rate {self.rate:.3f} (decoder change in the new latents' span "
            f"{mean:.3f} against {base:.3f} +- {self.baseline_std:.3f} at random)"
        )


@dataclass
class LabelsResult(JsonResult):
    """How well each scored latent's contrastive label picks out where it fires, as `saelab eval` writes it."""

    what: ClassVar[str] = "labels result"
    command: ClassVar[str] = "saelab eval RUN --only labels"
    error: ClassVar[type[Exception]] = RunError

    hook: str
    """The dictionary's hook point."""
    variant: str
    """Its variant name."""
    latents: list[int]
    """The latents scored."""
    labels: list[str]
    """Each one's label, as the feature page shows it."""
    auroc: list[float]
    """Each one's MiniLM embedding-detection AUROC (0.5: the label says nothing)."""
    llm_explanations: list[str] | None = None
    """The LLM's explanation of each (None: no endpoint, or it did not answer)."""
    llm_detection: list[float] | None = None
    """The balanced accuracy of the LLM's detection with its explanation."""
    config: dict[str, Any] = field(default_factory=dict)
    """The settings that made it."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabelsResult:
        """The result from its parsed JSON."""
        return LabelsResult(**data)

    def summary(self) -> str:
        """One line: the mean AUROC (and the LLM's mean detection accuracy)."""
        llm = f"; LLM detection {np.mean(self.llm_detection):.3f}" if self.llm_detection else ""
        return (
            f"{self.hook}/{self.variant}: label AUROC {np.mean(self.auroc):.3f} over {len(self.latents)} latents "
            f"(MiniLM embedding detection){llm}"
        )


@dataclass
class EvalRows:
    """The store rows the evals read."""

    x: Tensor
    """Activations `[rows, d]` of the dictionary's hook."""
    docs: np.ndarray
    """Each row's document."""
    tokens: np.ndarray
    """Each row's token id."""
    contexts: np.ndarray
    """Each row's context."""


class Tasks(NamedTuple):
    """The probing tasks some rows support, shared by every SAE of their hook."""

    tasks: list[ProbingTask]
    """The tasks to probe."""
    skipped: dict[str, str]
    """The reason for each built-in task left out."""


def probing_tasks(
    store: ActivationStore, rows: EvalRows, strings: list[str] | None, *, settings: EvalSettings
) -> Tasks:
    """The built-in probing tasks these rows of `store` support (and `settings.labels`'s), and the reason for each
    one left out; `strings[t]` is token `t`'s text (None: no vocabulary, so no token-level tasks)."""
    tasks: list[ProbingTask] = []
    skipped: dict[str, str] = {}
    if store.text.get("source") == "embedded":
        try:
            tasks.append(package_task(rows.docs, n_packages=settings.n_packages, min_documents=settings.min_documents))
        except ConfigError as err:
            skipped["package"] = str(err)
    else:
        skipped["package"] = f"the store holds {store.text.get('source', 'unknown')} text, not the embedded corpus"
    if strings is None:
        skipped["code_literal"] = "no vocabulary: the run has no analysis/vocab.json and the store names no model"
    else:
        try:
            tasks.append(code_literal_task(rows.tokens, rows.docs, strings))
        except ConfigError as err:
            skipped["code_literal"] = str(err)
    if settings.labels is not None:
        if strings is None:
            raise RunError(
                f"labels {settings.labels} name tokens by their text, but the run has no vocabulary (no "
                "analysis/vocab.json, and the store names no model); run `saelab analyze` on a harvested run first"
            )
        tasks.append(token_label_task(rows.tokens, strings, load_label_table(settings.labels), name="labels"))
    return Tasks(tasks, skipped)


def vocabulary(run: RunDir, store: ActivationStore) -> list[str] | None:
    """Each token's text: the run's `analysis/vocab.json`, else decoded by the store's model's tokenizer."""
    if run.vocab.is_file():
        return json.loads(run.vocab.read_text())
    spec = store.model_spec
    if not spec:
        return None
    from saelab.analysis.features import vocab_strings
    from saelab.models import load_model, tokenizer_of

    return vocab_strings(tokenizer_of(load_model(spec, device="cpu")))


def probe_sae(
    sae: SAE, rows: EvalRows, tasks: Tasks, *, hook: str, variant: str, settings: EvalSettings
) -> SparseProbingResult:
    """Sparse probing of `sae` on `tasks` over the rows; a built-in task the rows cannot probe joins `skipped`."""
    skipped = dict(tasks.skipped)
    probed = []
    for task in tasks.tasks:
        try:
            probed.append(sparse_probing(rows.x, rows.docs, task, encode=sae.encode, config=settings.probing))
        except ConfigError as err:
            if task.name == "labels":  # the user's own: a label the rows cannot probe is an error to fix
                raise
            skipped[task.name] = str(err)
    if not probed:
        raise RunError(
            f"no probing task fits the {len(rows.x)} rows read ("
            + "; ".join(f"{k}: {v}" for k, v in skipped.items())
            + "); harvest more of the embedded corpus or raise max_rows"
        )
    config = asdict(settings.probing) | {"rows": [0, len(rows.x)], "skipped": skipped}
    return SparseProbingResult(hook, variant, probed, config)


def hedge_sae(sae: SAE, rows: EvalRows, *, hook: str, variant: str, settings: EvalSettings) -> HedgingResult:
    """The hedging protocol on `sae` over the rows (see the module's docstring)."""
    new = settings.new_latents or max(1, sae.cfg.d_in // 16)
    if new >= sae.cfg.d_in:
        raise ConfigError(
            f"{new} new latents span all {sae.cfg.d_in} input dimensions, so every change lies in their span; give "
            f"fewer than {sae.cfg.d_in} (new_latents), e.g. {max(1, sae.cfg.d_in // 16)}"
        )
    g = torch.Generator().manual_seed(settings.seed)
    picks = torch.randint(len(rows.x), (settings.hedging_steps, settings.hedging_batch), generator=g)
    pair = train_hedging_pair(
        sae,
        lambda step: rows.x[picks[step]].float(),
        new_latents=new,
        steps=settings.hedging_steps,
        lr=settings.hedging_lr,
        seed=settings.seed,
    )
    h = hedging(pair.control, pair.extended, seed=settings.seed)
    config = {
        "new_latents": new,
        "steps": settings.hedging_steps,
        "batch": settings.hedging_batch,
        "lr": settings.hedging_lr,
        "seed": settings.seed,
        "rows": [0, len(rows.x)],
    }
    return HedgingResult(
        hook,
        variant,
        h.rate,
        h.per_latent.tolist(),
        h.delta_proj.tolist(),
        h.baseline_proj.tolist(),
        h.cosine.tolist(),
        h.baseline_std,
        config,
    )


FAMILY_BLOCK = 4096
"""Store rows encoded at a time for the families' co-occurrence."""


def families_sae(
    sae: SAE, store: ActivationStore, *, hook: str, variant: str, settings: EvalSettings
) -> FamiliesResult:
    """The feature families of `sae` over the store's first `settings.max_rows` rows of `hook`, streamed in blocks of
    `FAMILY_BLOCK` rows through its encoder."""
    end = min(settings.max_rows, store.n_tokens)

    def blocks():
        with torch.no_grad():
            for start in range(0, end, FAMILY_BLOCK):
                yield sae.encode(store.activations(hook, slice(start, min(start + FAMILY_BLOCK, end))).float())

    result = families_result(cooccurrence(blocks()), hook=hook, variant=variant, thresholds=settings.families)
    result.config["rows"] = [0, end]
    return result


Result = SparseProbingResult | HedgingResult | FamiliesResult | LabelsResult


def score_labels(
    run: RunDir,
    rows: EvalRows,
    *,
    hook: str,
    variant: str,
    settings: EvalSettings,
    model: Model,
    skipped: list[str],
) -> LabelsResult:
    """The labels eval of one SAE (see the module's docstring); an endpoint that fails appends its reason to
    `skipped` and leaves the MiniLM scores."""
    fs = FeatureStore.open(run.analysis(hook, variant))
    vocab = fs.vocab
    fs.column("label_tokens")  # an analysis written before labels: `StoreError` saying to run `saelab analyze` again
    if not vocab:
        raise RunError(f"the run {run.root} has no analysis/vocab.json; run `saelab analyze {run.root}` first")
    counts = fs.column("count")
    latents = np.flatnonzero(counts > 0)[: settings.label_latents]
    if len(latents) == 0:
        raise RunError(f"no latent of {hook}/{variant} fired on the analysed rows: there is no label to score")
    window = int(fs.attrs.get("window", 10))
    rng = np.random.default_rng(settings.seed)
    picks = rng.choice(len(rows.tokens), min(settings.label_negatives, len(rows.tokens)), replace=False)
    negatives = [
        join_pieces(w[w >= 0].tolist(), vocab)
        for w in context_windows(rows.tokens, rows.contexts, picks, window=window)
    ]
    features = [fs.feature(int(i)) for i in latents]
    positives = [[join_pieces(w[w >= 0].tolist(), vocab) for w in f["top_tokens"][f["top_acts"] > 0]] for f in features]
    queries = [label_query(f["label_tokens"], vocab) for f in features]
    aurocs = detection_aurocs(model, queries, positives, negatives)
    result = LabelsResult(
        hook,
        variant,
        latents.tolist(),
        [label_text(f["label_tokens"], vocab, scores=f["label_scores"]) for f in features],
        aurocs.tolist(),
        config={
            "latents": settings.label_latents,
            "negatives": len(negatives),
            "seed": settings.seed,
            "scorer": "all-MiniLM-L6-v2 embedding detection (AUROC)",
            "rows": [0, len(rows.tokens)],
            "endpoint": None if settings.endpoint is None else asdict(settings.endpoint),
        },
    )
    if settings.endpoint is not None:
        try:
            marked = [[_marked(w, vocab) for w in f["top_tokens"][f["top_acts"] > 0]] for f in features]
            explanations = [explain(settings.endpoint, m) for m in marked]
            result.llm_detection = [
                detect(settings.endpoint, e, p, negatives, seed=settings.seed)
                for e, p in zip(explanations, positives, strict=True)
            ]
            result.llm_explanations = explanations
        except EndpointError as err:
            skipped.append(f"labels (LLM explainer) of {hook}/{variant}: {err}")
    return result


def _marked(window: np.ndarray, vocab: list[str]) -> str:
    """A top context as text with its own (middle) token marked `<<like this>>`."""
    mid = len(window) // 2
    left = join_pieces(window[:mid][window[:mid] >= 0].tolist(), vocab)
    right = join_pieces(window[mid + 1 :][window[mid + 1 :] >= 0].tolist(), vocab)
    return f"{left} <<{join_pieces([int(window[mid])], vocab)}>> {right}".strip()


class EvalsDone(NamedTuple):
    """What `run_evals` wrote, and what it left out."""

    written: list[tuple[Result, Path]]
    """Each result and its file."""
    skipped: list[str]
    """A line for each eval left out of a dictionary, with the reason."""
    by_config: Path
    """`RUN/results_by_config.csv`, rewritten with every eval's headline across seeds (`saelab.evals.table`)."""


def _cannot_hedge(sae: SAE) -> str:
    """Why the hedging protocol cannot take `sae` (empty when it can)."""
    if sae.cfg.d_out is not None:
        return "it is a transcoder, whose steps need its output hook's rows"
    if sae.signed_codes:
        return f"its codes are signed ({sae.cfg.arch})"
    if sae.cfg.matryoshka_prefixes or sae.cfg.matryoshka_sample:
        return "it is a Matryoshka SAE, whose prefixes new latents would change"
    return ""


def run_evals(
    run: str | Path, *, settings: EvalSettings = EvalSettings(), saes: list[tuple[str, str]] | None = None
) -> EvalsDone:
    """Run `settings.only` on the run's SAEs (`saes`: those `(hook, variant)`s; default every SAE, crosscoders left
    out) and write each result to `RUN/evals/<hook>/<variant>/<eval>.json`."""
    run_dir = RunDir(run)
    if saes is None:
        entries = [e for e in run_dir.saes() if saved_kind(e.path) != "crosscoder"]
    else:
        entries = [run_dir.find_sae(hook, variant) for hook, variant in saes]
        crosscoders = [f"{e.hook}/{e.variant}" for e in entries if saved_kind(e.path) == "crosscoder"]
        if crosscoders:
            raise RunError(f"{crosscoders} are crosscoders, which `saelab eval` does not read; `saelab diff` does")
    if not entries:
        raise RunError(f"the run {run_dir.root} has no SAEs to evaluate; train some with `saelab train` first")
    store = ActivationStore.open(str(run_dir.store))
    out: list[tuple[Result, Path]] = []
    skipped: list[str] = []
    cache: dict[str, tuple[EvalRows, Tasks | None]] = {}
    probing = "sparse_probing" in settings.only
    scorer: Model | None = None
    strings = vocabulary(run_dir, store) if probing else None
    for entry in entries:
        if entry.hook not in store.hooks:
            raise RunError(f"the store {store.path} has no hook {entry.hook}, which {entry.variant} reads")
        if entry.hook not in cache:
            part = slice(0, min(settings.max_rows, store.n_tokens))
            rows = EvalRows(
                store.activations(entry.hook, part).float(),
                store.doc_ids(part),
                store.tokens(part),
                store.contexts(part),
            )
            cache[entry.hook] = rows, probing_tasks(store, rows, strings, settings=settings) if probing else None
        rows, tasks = cache[entry.hook]
        sae = SAE.load(entry.path).eval()
        for name in settings.only:
            result: Result
            if name == "sparse_probing" and tasks is not None:
                result = probe_sae(sae, rows, tasks, hook=entry.hook, variant=entry.variant, settings=settings)
            elif name == "families" and sae.signed_codes:
                skipped.append(f"families of {entry.hook}/{entry.variant}: its codes are signed ({sae.cfg.arch})")
                continue
            elif name == "families":
                result = families_sae(sae, store, hook=entry.hook, variant=entry.variant, settings=settings)
            elif name == "labels":
                if scorer is None:
                    scorer = load_model(MINILM, device="cpu")
                result = score_labels(
                    run_dir,
                    rows,
                    hook=entry.hook,
                    variant=entry.variant,
                    settings=settings,
                    model=scorer,
                    skipped=skipped,
                )
            elif why := _cannot_hedge(sae):
                skipped.append(f"hedging of {entry.hook}/{entry.variant}: {why}")
                continue
            else:
                result = hedge_sae(sae, rows, hook=entry.hook, variant=entry.variant, settings=settings)
            out.append((result, result.save(run_dir.eval_result(entry.hook, entry.variant, name))))
    return EvalsDone(out, skipped, write_run_by_config(run_dir.root))
