"""`saelab diff`: a run's crosscoder over the same hook point in two models, classified latent by latent (shared,
exclusive to one model) on the store's held-out rows, and written to `RUN/model_diff/<hook>/<variant>.json` for the
app's model-diff page. The classification is `saelab.evals.model_diff.model_diff`'s (decoder norms, then latent
scaling); `enrichment` checks it against which documents a fine-tuned model was tuned on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from saelab.dictionaries.crosscoder import CrossCoder
from saelab.errors import ConfigError, RunError, StoreError
from saelab.evals.model_diff import B_ONLY, CLASS_NAMES, model_diff
from saelab.resultfile import JsonResult
from saelab.run import RunDir
from saelab.store import ActivationStore

DIFF_ROWS = 16_384
"""Rows the classification reads when the run records no `eval_rows` (its training config's held-out rows)."""
CHUNK_ROWS = 4096
"""Rows encoded at a time."""


@dataclass
class ModelDiffResult(JsonResult):
    """A crosscoder's model diff: every latent's class and the evidence for it."""

    what: ClassVar[str] = "model diff"
    command: ClassVar[str] = "saelab diff RUN --sae HOOK/VARIANT"
    error: ClassVar[type[Exception]] = RunError

    hook: str
    """The crosscoder's folder under `RUN/saes/` (its first source, a model alias's `/` written `__`)."""
    variant: str
    """Its variant name."""
    sources: list[str]
    """The two sources compared, A then B (`<alias>/<hook>`)."""
    rows: list[int]
    """The store rows `[start, stop)` it was computed on."""
    delta_norm: list[float]
    """Per latent, `|d_B| / (|d_A| + |d_B|)`."""
    norm_class: list[str]
    """Per latent, its class by decoder norms alone (`shared`, `a_only`, `b_only`)."""
    scaling_class: list[str]
    """Per latent, its class once latent scaling is read."""
    nu_error: list[float | None]
    """Per latent, latent scaling's error ratio (None: it never fired on the rows)."""
    nu_recon: list[float | None]
    """Per latent, latent scaling's reconstruction ratio."""
    fired: list[int]
    """Per latent, the rows it fired on."""
    config: dict[str, Any] = field(default_factory=dict)
    """The settings that made it (`exclusive`, `nu_threshold`)."""
    tuned_on: str | None = None
    """The package of the embedded corpus model B was fine-tuned on (`saelab diff --tuned-on`), or None."""
    enrichment: dict[str, float | None] = field(default_factory=dict)
    """With `tuned_on`: per class after latent scaling, the mean firing rate of its latents on the rows of the
    tuned documents over their rate on the other rows, over every row of the store (`doc_enrichment`; None where
    a class has no latents or they never fire off those rows)."""

    def counts(self, *, scaled: bool = True) -> dict[str, int]:
        """How many latents each class has, by latent scaling (`scaled`) or by decoder norms alone."""
        classes = self.scaling_class if scaled else self.norm_class
        return {name: classes.count(name) for name in CLASS_NAMES}

    def exclusive(self, side: str, *, scaled: bool = True) -> list[int]:
        """The latents exclusive to `side` (`a_only` or `b_only`), most exclusive first."""
        classes = self.scaling_class if scaled else self.norm_class
        found = [j for j, name in enumerate(classes) if name == side]
        return sorted(found, key=lambda j: self.delta_norm[j], reverse=side == CLASS_NAMES[B_ONLY])

    def summary(self) -> str:
        """One line: the crosscoder and its class counts after latent scaling (and by decoder norms alone)."""
        scaled, by_norm = self.counts(), self.counts(scaled=False)
        a, b = self.sources
        return (
            f"{self.hook}/{self.variant}: {scaled['shared']} shared, {scaled['a_only']} only in {a}, "
            f"{scaled['b_only']} only in {b} (by decoder norms alone: {by_norm['shared']}, {by_norm['a_only']}, "
            f"{by_norm['b_only']})"
            + "".join(
                f"; on {self.tuned_on}'s documents {name} latents fire {v:.2f}x as often as elsewhere"
                for name, v in self.enrichment.items()
                if v is not None
            )
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelDiffResult:
        """The result from its parsed JSON."""
        return ModelDiffResult(**data)


def _batches(store: ActivationStore, sources: list[str], rows: tuple[int, int]) -> Iterator[Tensor]:
    """Raw activations `[rows, S, d]` of every source over store rows `rows`, `CHUNK_ROWS` at a time."""
    for start in range(rows[0], rows[1], CHUNK_ROWS):
        part = slice(start, min(start + CHUNK_ROWS, rows[1]))
        yield torch.stack([store.activations(s, part) for s in sources], 1)


def _trained_on(run: RunDir) -> tuple[str, int]:
    """The store the run's dictionaries were trained on and the rows held out at its end (`train_config.json`'s
    `store` and `eval_rows`); without that file, the run's own store and `DIFF_ROWS`."""
    if not run.train_config.is_file():
        return str(run.store), DIFF_ROWS
    saved = json.loads(run.train_config.read_text())
    return run.resolve(saved.get("store") or str(run.store)), int(saved.get("eval_rows", DIFF_ROWS))


def _nan_to_none(t: Tensor) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in t.tolist()]


def diff_run(
    run: str | Path,
    hook: str,
    variant: str,
    *,
    a: int = 0,
    b: int = 1,
    exclusive: float = 0.1,
    nu_threshold: float = 0.3,
    tuned_on: str | None = None,
) -> tuple[ModelDiffResult, Path]:
    """Classify every latent of the run's crosscoder `hook`/`variant` over its sources `a` and `b` on the held-out
    rows of the store it was trained on (the last `eval_rows`, as the training config records them) and write the
    result into the run; returns it and its path. `tuned_on`: the package of the embedded corpus that model B was
    fine-tuned on (`saelab.toys.finetune`); the result then holds each class's enrichment on those documents
    (`doc_enrichment`)."""
    run_dir = RunDir(run)
    folder = run_dir.find_sae(hook, variant).path
    cc = CrossCoder.load(folder)
    path, held_out = _trained_on(run_dir)
    store = ActivationStore.open(path)
    missing = [s for s in cc.cfg.sources if s not in store.hooks]
    if missing:
        raise StoreError(f"the store {path} has no {missing}, which the crosscoder reads; it has {store.hooks}")
    rows = (store.n_tokens - min(held_out, store.n_tokens), store.n_tokens)
    with torch.no_grad():
        diff = model_diff(
            cc, _batches(store, cc.cfg.sources, rows), a=a, b=b, exclusive=exclusive, nu_threshold=nu_threshold
        )
    result = ModelDiffResult(
        hook=hook,
        variant=variant,
        sources=list(diff.sources),
        rows=list(rows),
        delta_norm=diff.delta_norm.tolist(),
        norm_class=[CLASS_NAMES[int(c)] for c in diff.norm_class],
        scaling_class=[CLASS_NAMES[int(c)] for c in diff.scaling_class],
        nu_error=_nan_to_none(diff.nu_error),
        nu_recon=_nan_to_none(diff.nu_recon),
        fired=diff.fired.long().tolist(),
        config={"exclusive": exclusive, "nu_threshold": nu_threshold, "a": a, "b": b},
    )
    if tuned_on is not None:
        from saelab.toys.finetune import package_doc_ids

        if store.text.get("source") != "embedded":
            raise ConfigError(
                f"--tuned-on {tuned_on} marks documents of the embedded corpus, but the store {path} was made from "
                f"{store.text.get('source', 'unknown')} text; harvest the embedded corpus (`text: {{source: "
                "embedded}`) or compute `doc_enrichment` with the store's own document ids"
            )
        result.tuned_on = tuned_on

        figures = doc_enrichment(cc, store, result.scaling_class, docs=package_doc_ids(tuned_on))
        result.enrichment = {k: None if np.isnan(v) else v for k, v in figures.items()}
    return result, result.save(run_dir.model_diff(hook, variant))


def class_enrichment(on: Tensor, off: Tensor, classes: list[str]) -> dict[str, float]:
    """For each latent class, the mean of its latents' firing rates `on` (`[d_sae]`, on marked rows) over the mean of
    their rates `off` (on the other rows); NaN for a class with no latents or whose latents never fire off."""
    out = {}
    for name in CLASS_NAMES:
        members = torch.tensor([c == name for c in classes])
        rate_off = float(off[members].mean()) if members.any() else 0.0
        out[name] = float(on[members].mean()) / rate_off if rate_off > 0 else float("nan")
    return out


def enrichment(codes: Tensor, marked: Tensor, classes: list[str]) -> dict[str, float]:
    """For each latent class (`classes[j]`: latent j's, e.g. `ModelDiffResult.scaling_class`), the mean firing rate
    of its latents on the rows of `marked` (`[rows]` bool: say, tokens of the documents a model was fine-tuned on)
    over their mean rate on the other rows (`class_enrichment`); `codes` `[rows, d_sae]`."""
    if codes.shape[0] != marked.shape[0] or codes.shape[1] != len(classes):
        raise ConfigError(
            f"codes {tuple(codes.shape)} do not match {marked.shape[0]} row marks and {len(classes)} latent classes"
        )
    if marked.all() or not marked.any():
        raise ConfigError("enrichment compares marked rows with the others: mark some rows, not all")
    fires = (codes > 0).float()
    return class_enrichment(fires[marked].mean(0), fires[~marked].mean(0), classes)


class FiringRates(NamedTuple):
    """Each latent's firing rate on marked rows and on the others."""

    on: Tensor
    """`[d_sae]` the share of the marked rows where each latent fires."""
    off: Tensor
    """`[d_sae]` the share of the other rows."""


def doc_firing_rates(cc: CrossCoder, store: ActivationStore, *, docs: np.ndarray) -> FiringRates:
    """How often each latent fires on the rows of the store whose `doc_id` is one of `docs` (say, the documents a
    model was fine-tuned on) and on the other rows, over every row of the store: a fine-tune's documents can sit
    anywhere in the corpus, the held-out rows only at its end. Firing counts are summed a chunk at a time, so no
    `[rows, d_sae]` array is held."""
    ids = np.asarray(docs)
    on, off = torch.zeros(cc.cfg.d_sae), torch.zeros(cc.cfg.d_sae)
    n_on = n_off = 0
    with torch.no_grad():
        for start, x in zip(
            range(0, store.n_tokens, CHUNK_ROWS), _batches(store, cc.cfg.sources, (0, store.n_tokens)), strict=True
        ):
            marked = torch.from_numpy(np.isin(store.doc_ids(slice(start, start + len(x))), ids))
            fires = (cc.encode(x) > 0).float()
            on += fires[marked].sum(0)
            off += fires[~marked].sum(0)
            n_on, n_off = n_on + int(marked.sum()), n_off + int((~marked).sum())
    if not n_on or not n_off:
        raise ConfigError(
            f"the store has {n_on} rows of the documents given and {n_off} others; enrichment needs both: harvest "
            "enough of the corpus to reach them (`max_tokens`)"
        )
    return FiringRates(on / n_on, off / n_off)


def doc_enrichment(cc: CrossCoder, store: ActivationStore, classes: list[str], *, docs: np.ndarray) -> dict[str, float]:
    """`enrichment` of the latent classes on the rows of the store whose `doc_id` is one of `docs`, over every row of
    the store (`doc_firing_rates`)."""
    rates = doc_firing_rates(cc, store, docs=docs)
    return class_enrichment(rates.on, rates.off, classes)
