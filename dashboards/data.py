"""What the app reads from a run directory: cached views over `saelab.run.RunDir`.

SAEs (`RunDir.saes()`), their metrics and feature analyses, the activation store, circuits and absorption results.
Everything expensive to open (stores, feature analyses, result files) is cached per process and per version of
what it reads, so a page costs only the reads of what it shows. Problems a user can fix raise a `SaelabError`
(`RunError` here) whose message names the problem and the fix; the app shows any `SaelabError` in an error box.

A broken SAE folder (an unreadable `cfg.json` or `metrics.json`, missing or damaged weights) stays local: it is
listed with its `SaeInfo.error`, its own pages show that error, and every other SAE's pages work. The model runs
(`run_model`, the live prompt) are in `saelab.dashboards.live`.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from safetensors import SafetensorError, safe_open

from saelab.absorption import AbsorptionResult
from saelab.analysis import FeatureStore
from saelab.circuits import Circuit
from saelab.dashboards.params import Params
from saelab.errors import RunError
from saelab.evals import BestMatches, best_matches, load_decoder
from saelab.evals.diff_run import ModelDiffResult
from saelab.evals.families import FamiliesResult
from saelab.evals.run_evals import HedgingResult
from saelab.run import SAE_CONFIG, SAE_WEIGHTS, RunDir, SaeEntry, array_folder, saved_kind
from saelab.store import ActivationStore

T = TypeVar("T")
NO_ANALYSIS = "no analysis yet"
"""`analysis_problem` of an SAE that `saelab analyze` has not run for."""


@dataclass(frozen=True)
class SaeInfo:
    """One trained SAE of the run: where it lives, what it was trained on, and its metrics."""

    hook: str
    """The hook point it reads."""
    variant: str
    """Its variant name (its folder under the hook's)."""
    path: Path
    """Its folder."""
    model_name: str
    """The model it was trained on, as its config records it ("" when it does not)."""
    metrics: dict[str, Any]
    """Its held-out metrics (empty when the run has none for it)."""
    error: str | None = None
    """Why it cannot be used, naming the file and the fix (an unreadable `cfg.json` or `metrics.json`, missing or
    damaged weights); None when it can. Its overview row and every page of it show this instead."""
    kind: str = "sae"
    """`sae` (the SAE family, transcoders included) or `crosscoder` (`saelab.run.saved_kind`)."""
    reads: tuple[str, ...] = ()
    """The store's arrays it reads: an SAE's (`<alias>/<hook>` for one model of a store of several, saved under
    `<alias>__<hook>`), a transcoder's input, a crosscoder's sources; empty when it cannot be read."""

    @property
    def array(self) -> str:
        """The store's array it reads (a crosscoder's first source)."""
        return self.reads[0] if self.reads else self.hook


def open_store(run: str) -> ActivationStore:
    """The run's activation store; `RunError` when it is missing or unreadable."""
    path = RunDir(run).store
    return _open_folder(
        ActivationStore.open,
        path,
        missing=f"No activation store at {path}. Is {run} a saelab run directory? "
        f"Run `saelab harvest` with `out` set to {path}.",
        damaged=f"The activation store {path} cannot be read",
        fix="Harvest it again.",
    )


def _open_folder(open_: Callable[[str], T], path: Path, *, missing: str, damaged: str, fix: str) -> T:
    """`open_(path)` for a folder of the run (the activation store, a feature analysis), once per version of it:
    `RunError(missing)` when there is no such folder, and `damaged` with the reason and `fix` when it cannot be
    opened (zarr raises many kinds of errors for damaged metadata)."""
    if not path.is_dir():
        raise RunError(missing)
    try:
        return cached_result(open_, path)
    except Exception as err:
        raise RunError(f"{damaged} ({type(err).__name__}: {err}). {fix}") from None


def _sae_file(path: Path) -> dict[str, Any]:
    """The JSON object in an SAE's file `path` (`cfg.json`, `metrics.json`); `ValueError` naming the file and
    what is wrong otherwise."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"its {path} cannot be read ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"its {path} holds a JSON {type(value).__name__}, not an object")
    return value


def _model_and_reads(config: Path, folder: str) -> tuple[str, tuple[str, ...]]:
    """The model a dictionary's `cfg.json` says it was trained on (saelab's and SAELens's keys; a crosscoder's
    config), or "", and the store arrays it reads (`SaeInfo.reads`) for a dictionary saved under `RUN/saes/<folder>/`:
    an SAE's `hook_name` where the folder is named for it (`array_folder`), else the folder's name."""
    raw = _sae_file(config)
    if raw.get("kind") == "crosscoder":
        own = raw.get("crosscoder_config")
        if not isinstance(own, dict) or not isinstance(own.get("sources"), list):
            raise ValueError(f"its {config} is not laid out as `CrossCoder.save` writes it")
        return str(own.get("model_name") or ""), tuple(str(s) for s in own["sources"])
    meta = raw.get("metadata") or {}
    own = (meta.get("saelab_config") or {}) if isinstance(meta, dict) else None
    if not isinstance(own, dict):
        raise ValueError(f"the `metadata` of its {config} is not laid out as saelab and SAELens write it")
    hook_name = str(own.get("hook_name") or meta.get("hook_name") or "")
    return str(own.get("model_name") or meta.get("model_name") or ""), (
        hook_name if hook_name and array_folder(hook_name) == folder else folder,
    )


def _check_weights(weights: Path) -> None:
    """`ValueError` when an SAE's weights file is missing or is not a whole safetensors file (its header must
    describe exactly the bytes that follow it); reads the header only."""
    if not weights.is_file():
        raise ValueError(f"it has no weights ({weights} is missing)")
    try:
        with safe_open(weights, framework="pt"):
            pass
    except (OSError, SafetensorError) as err:
        raise ValueError(f"its weights {weights} cannot be read ({err}): the file is damaged or cut short") from None


def _version(path: Path) -> tuple[int, int] | None:
    """A file's modification time and size, None when it is missing (or cannot be looked at)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _read_sae(run: RunDir, entry: SaeEntry) -> SaeInfo:
    """The SAE's `SaeInfo`; one that cannot be used has its `error` set (this reads its config, its metrics and its
    weights' header, never the weights themselves), once per version of those three files."""
    files = (entry.path / SAE_CONFIG, run.sae_metrics(entry.hook, entry.variant), entry.path / SAE_WEIGHTS)
    return _sae_from_files(entry, files, tuple(_version(f) for f in files))


@lru_cache(maxsize=256)
def _sae_from_files(entry: SaeEntry, files: tuple[Path, Path, Path], versions: tuple[Any, ...]) -> SaeInfo:
    """`_read_sae` of the SAE whose config, metrics and weights are `files`, at `versions` of them."""
    config, metrics_path, weights = files
    kind = "crosscoder" if saved_kind(entry.path) == "crosscoder" else "sae"
    try:
        model, reads = _model_and_reads(config, entry.hook)
        metrics = _sae_file(metrics_path) if metrics_path.is_file() else {}
        _check_weights(weights)
    except ValueError as err:
        error = (
            f"The SAE {entry.hook}/{entry.variant} cannot be used: {err}. Copy its folder {entry.path} again from "
            "where it came, or train it again with `saelab train`; removing the folder hides it from the app."
        )
        return SaeInfo(entry.hook, entry.variant, entry.path, "", {}, error, kind)
    return SaeInfo(entry.hook, entry.variant, entry.path, model, metrics, kind=kind, reads=reads)


def list_saes(run: str) -> list[SaeInfo]:
    """Every SAE of the run (`RunDir.saes()`), sorted, the broken ones with their `error`; `RunError` when there
    are none."""
    run_dir = RunDir(run)
    entries = run_dir.saes()
    if not entries:
        raise RunError(
            f"No SAEs under {run_dir.saes_dir}. Train some with `saelab train` or `saelab sweep` (set `run` to {run})."
        )
    return [_read_sae(run_dir, e) for e in entries]


def sae_info(run: str, hook: str | None, variant: str | None) -> SaeInfo:
    """The SAE `hook`/`variant` of the run; `RunError` naming the ones that exist if it is not there (and for
    names that are not plain names, or are too long to be one), or saying what is wrong with it if it is broken."""
    run_dir = RunDir(run)
    folder = run_dir.sae(hook or "", variant or "") if hook and variant else None
    if folder is not None and (folder / SAE_CONFIG).is_file():
        info = _read_sae(run_dir, SaeEntry(folder.parent.name, folder.name, folder))
        if info.error:
            raise RunError(info.error)
        return info
    known = ", ".join(f"{s.hook}/{s.variant}" for s in list_saes(run))
    raise RunError(f"The run has no SAE {hook}/{variant}. It has: {known}.")


def default_sae(run: str) -> SaeInfo:
    """The SAE a page shows when its URL names none: the first usable SAE trained on the run's own model (any
    usable SAE if none is), preferring one whose feature analysis can be read; `RunError` with the first SAE's
    problem when none can be used."""
    saes = list_saes(run)
    usable = [s for s in saes if s.error is None]
    if not usable:
        raise RunError(f"None of the run's {len(saes)} SAEs can be used. {saes[0].error}")
    own = [s for s in usable if s.model_name in ("", made_by(run, s))] or usable
    return next((s for s in own if analysis_problem(run, s) is None), own[0])


def chosen_sae(run: str, params: Params) -> SaeInfo:
    """The SAE the URL names (`hook`, `sae`), or the run's first SAE of its own model."""
    if "hook" in params or "sae" in params:
        return sae_info(run, params.get("hook"), params.get("sae"))
    return default_sae(run)


def made_by(run: str, info: SaeInfo) -> str:
    """The short name of the model that made the arrays the SAE reads, as the run's store records it: an
    `<alias>/<hook>` array's alias's (`ActivationStore.model_of`), the store's `model` for a crosscoder and for a
    store of one model."""
    store = open_store(run)
    return store.model if info.kind == "crosscoder" else store.model_of(info.array)


def check_model(run: str, info: SaeInfo) -> None:
    """Refuse an SAE trained on another model than the one that made the run's activations it reads."""
    store_model = made_by(run, info)
    if info.model_name and store_model and info.model_name != store_model:
        raise RunError(
            f"SAE {info.hook}/{info.variant} was trained on model {info.model_name!r}, but this run's "
            f"activations come from {store_model!r}. Its latents do not apply to this model; "
            "train an SAE on this run's store instead."
        )


@dataclass(frozen=True)
class LatentMatch:
    """A latent's nearest latent, by decoder cosine, in another SAE of the run over the same hook point."""

    sae: SaeInfo
    """The other SAE."""
    index: int
    """Its latent nearest to the one asked about."""
    cosine: float
    """The cosine of their decoder directions."""


def same_latent(run: str, info: SaeInfo, index: int) -> list[LatentMatch]:
    """Latent `index` of SAE `info`'s nearest latent in every other usable SAE of the run that reads the same hook
    point, trained on the same model, into the same space (other seeds, widths, architectures; a crosscoder's: the
    other crosscoders starting with its first source), in the run's order.

    Each pair of SAEs is matched once per process and version of their weights files (`saelab.evals.best_matches`
    over all the latents of `info`, in blocks), so a page costs one lookup per other SAE after the first."""
    others = [
        s
        for s in list_saes(run)
        if s.hook == info.hook
        and s.variant != info.variant
        and s.error is None
        and (s.model_name, s.kind) == (info.model_name, info.kind)
    ]
    found = []
    for other in others:
        mine, theirs = info.path / SAE_WEIGHTS, other.path / SAE_WEIGHTS
        best = _pair_matches(mine, theirs, (_version(mine), _version(theirs)))
        if best is not None:
            found.append(LatentMatch(other, int(best.index[index]), float(best.cosine[index])))
    return found


@lru_cache(maxsize=64)
def _pair_matches(mine: Path, theirs: Path, versions: tuple[Any, ...]) -> BestMatches | None:
    """Each latent of the SAE whose weights are `mine` matched in the one whose weights are `theirs`, at `versions`
    of the two files (a crosscoder's decoder rows: its sources' laid end to end); None when their decoders write
    spaces of other sizes (e.g. a transcoder's output, or an SAE's and a crosscoder's)."""
    a, b = load_decoder(mine.parent).flatten(1), load_decoder(theirs.parent).flatten(1)  # a crosscoder's sources
    return best_matches(a, b) if a.shape[1] == b.shape[1] else None


# ---------------------------------------------------------------------------------------- feature analyses
def analysis_path(run: str, info: SaeInfo) -> Path:
    """Where the feature analysis of the SAE is (it need not exist)."""
    return RunDir(run).analysis(info.hook, info.variant)


def feature_store(run: str, info: SaeInfo) -> FeatureStore:
    """The SAE's feature analysis (`saelab.analysis.FeatureStore`), opened once per process and version of it."""
    path = analysis_path(run, info)
    return _open_folder(
        FeatureStore.open,
        path,
        missing=f"SAE {info.hook}/{info.variant} has no feature analysis yet (no {path}). "
        f"Run `saelab analyze {run}` to compute it.",
        damaged=f"The feature analysis {path} of SAE {info.hook}/{info.variant} cannot be read",
        fix=f"Run `saelab analyze {run}` again to recompute it.",
    )


def analysis_problem(run: str, info: SaeInfo) -> str | None:
    """Why the SAE's features cannot be browsed, or None when they can: `NO_ANALYSIS` when `saelab analyze` has
    not run for it, the `RunError` message when its analysis cannot be read."""
    if not analysis_path(run, info).is_dir():
        return NO_ANALYSIS
    try:
        feature_store(run, info)
    except RunError as err:
        return str(err)
    return None


def token_text(vocab: list[str], token_id: int) -> str:
    """A token's display string (the analysis vocab), or `<id>` if it is outside the vocab."""
    return vocab[token_id] if 0 <= token_id < len(vocab) else f"<{token_id}>"


@lru_cache(maxsize=16)
def context_vocab(fs: FeatureStore) -> list[str]:
    """The analysis vocab for running text: with a WordPiece vocab (`##ing` pieces), pieces join the previous
    token and every other token starts a new word, so contexts read as words rather than run together."""
    vocab = fs.vocab
    if sum(s.startswith("##") for s in vocab) <= len(vocab) // 100:
        return vocab
    return [s[2:] if s.startswith("##") else " " + s for s in vocab]


def finite(x: Any) -> float | None:
    """A metric as a float, or None when it is missing or not a finite number."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def valid_ids(ids: np.ndarray, values: np.ndarray) -> list[tuple[int, float]]:
    """(id, value) pairs without the -1 padding."""
    return [(i, v) for i, v in zip(ids.tolist(), values.tolist()) if i >= 0]


# --------------------------------------------------------------------------------------------- results
def cached_result(load: Callable[[str], T], path: Path) -> T:
    """`load(path)` once per process and version of `path` (its modification time): a circuit, an absorption
    result, a store. The `SaelabError` it raises for a broken file reaches the page, which shows it."""
    return _cached_result(load, str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=64)
def _cached_result(load: Callable[[str], T], path: str, mtime: int) -> T:
    return load(path)


def circuit_names(run: str) -> list[str]:
    """The circuits of the run, by name."""
    return RunDir(run).circuits()


def load_circuit(run: str, name: str | None) -> Circuit:
    """The circuit `name` (default: the first); `RunError` naming the command or the circuits there are."""
    names = circuit_names(run)
    if not names:
        raise RunError(
            f"No circuits in the run {run}. Compute one with `saelab circuit CONFIG.yaml` "
            f"(set `run: {run}`; see configs/circuit_induction.yaml)."
        )
    name = name or names[0]
    path = RunDir(run).circuit(name)
    if name not in names:
        raise RunError(f"The run has no circuit {name!r}. It has: {', '.join(names)}.")
    return cached_result(Circuit.load, path)


def absorption_keys(run: str) -> list[tuple[str, str]]:
    """(hook, variant) of every absorption result of the run."""
    return [(r.hook, r.variant) for r in RunDir(run).absorption_results()]


def _per_sae_result(
    key: tuple[str | None, str | None],
    *,
    keys: list[tuple[str, str]],
    path: Callable[[str, str], Path],
    load: Callable[[str], T],
    what: str,
    none: str,
) -> T:
    """The result of SAE `key` (hook, variant; default: the run's first) among the run's `keys`, at `path(hook,
    variant)`, read by `load`; `RunError` saying `none` when the run has none, or naming the ones there are."""
    hook, variant = key
    if hook and variant:
        path(hook, variant)  # refuses names that are not plain names before anything is looked up
    if not keys:
        raise RunError(none)
    chosen = (hook or "", variant or "") if hook or variant else keys[0]
    if chosen not in keys:
        raise RunError(f"The run has no {what} for {hook}/{variant}. It has: {', '.join(f'{h}/{v}' for h, v in keys)}.")
    return cached_result(load, path(*chosen))


def load_absorption(run: str, hook: str | None, variant: str | None) -> AbsorptionResult:
    """The absorption result of `hook`/`variant` (default: the first); `RunError` naming the command or the
    results there are."""
    none = (
        f"No absorption results in the run {run}. Compute them with "
        f"`saelab absorption CONFIG.yaml` (set `run: {run}`; see configs/absorption_minilm.yaml)."
    )
    keys, path = absorption_keys(run), RunDir(run).absorption
    return _per_sae_result(
        (hook, variant), keys=keys, path=path, load=AbsorptionResult.load, what="absorption result", none=none
    )


def model_diff_keys(run: str) -> list[tuple[str, str]]:
    """(hook, variant) of every model diff of the run."""
    return [(r.hook, r.variant) for r in RunDir(run).model_diffs()]


def load_model_diff(run: str, hook: str | None, variant: str | None) -> ModelDiffResult:
    """The model diff of crosscoder `hook`/`variant` (default: the first); `RunError` naming the command or the
    diffs there are."""
    none = (
        f"No model diffs in the run {run}. Train a crosscoder over one hook point of two models "
        f"(`crosscoders:` in the train config) and classify its latents with `saelab diff {run}`."
    )
    keys, path = model_diff_keys(run), RunDir(run).model_diff
    return _per_sae_result(
        (hook, variant), keys=keys, path=path, load=ModelDiffResult.load, what="model diff", none=none
    )


def model_diff_of(run: str, info: SaeInfo) -> ModelDiffResult | None:
    """The model diff that `saelab diff` wrote for the crosscoder `info` (once per version of its file), or None when
    it has not run for it (or `info` is not a crosscoder)."""
    path = RunDir(run).model_diff(info.hook, info.variant)
    if info.kind != "crosscoder" or not path.is_file():
        return None
    return cached_result(ModelDiffResult.load, path)


def families_keys(run: str) -> list[tuple[str, str]]:
    """(hook, variant) of every SAE of the run with a feature-families result (`saelab eval --only families`)."""
    run_dir = RunDir(run)
    return [(e.hook, e.variant) for e in run_dir.saes() if run_dir.eval_result(e.hook, e.variant, "families").is_file()]


def load_families(run: str, hook: str | None, variant: str | None) -> FamiliesResult:
    """The feature families of `hook`/`variant` (default: the first); `RunError` naming the command or the results
    there are."""
    none = f"No feature families in the run {run}. Compute them with `saelab eval {run} --only families`."
    run_dir = RunDir(run)
    return _per_sae_result(
        (hook, variant),
        keys=families_keys(run),
        path=lambda h, v: run_dir.eval_result(h, v, "families"),
        load=FamiliesResult.load,
        what="feature families",
        none=none,
    )


def families_of(run: str, info: SaeInfo) -> FamiliesResult | None:
    """The feature families `saelab eval` wrote for the SAE `info` (once per version of the file), or None when it
    has not run for it."""
    path = RunDir(run).eval_result(info.hook, info.variant, "families")
    return cached_result(FamiliesResult.load, path) if path.is_file() else None


def hedging_of(run: str, info: SaeInfo) -> HedgingResult | None:
    """The hedging result `saelab eval` wrote for the SAE `info` (once per version of the file), or None."""
    path = RunDir(run).eval_result(info.hook, info.variant, "hedging")
    return cached_result(HedgingResult.load, path) if path.is_file() else None


def absorption_of(run: str, info: SaeInfo) -> AbsorptionResult | None:
    """The absorption result `saelab absorption` wrote for the SAE `info` (once per version of the file), or None."""
    path = RunDir(run).absorption(info.hook, info.variant)
    return cached_result(AbsorptionResult.load, path) if path.is_file() else None


# Names this module had before the live model runs moved to `saelab.dashboards.live` and the id parsing to
# `saelab.dashboards.params`; resolved on first use (`live` imports this module).
_MOVED = {
    "run_model": ("live", "run_model"),
    "search_token": ("live", "search_token"),
    "prompt_latents": ("live", "prompt_latents"),
    "TokenLatents": ("live", "TokenLatents"),
    "parse_feature_id": ("params", "feature_id"),
}


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _MOVED[name]
    return getattr(importlib.import_module(f"saelab.dashboards.{module}"), attr)
