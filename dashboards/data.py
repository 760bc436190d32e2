"""What the feature browser reads from a run directory: SAEs, their metrics and analyses, the model.

Everything expensive to open (stores, SAEs, models, feature analyses) is cached per process, so a
page costs only the reads of what it shows. Problems a user can fix raise `RunError` with a message
that names the problem and the fix; the app shows it in the page.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from saelab.analysis import FeatureStore
from saelab.errors import RunError, SaelabError
from saelab.models import Model, capture, device_of, is_encoder, load_model, resolve_hooks
from saelab.sae import CFG_FILENAME, SAE
from saelab.store import ActivationStore
from saelab.text import SpecialTokens

STORE_DIR = "activations.zarr"
SAES_DIR = "saes"
ANALYSIS_DIR = "analysis"


T = TypeVar("T")


@dataclass(frozen=True)
class SaeInfo:
    """One trained SAE of the run: where it lives, what it was trained on, and its metrics."""

    hook: str
    variant: str
    path: Path
    model_name: str
    metrics: dict[str, Any]


def open_store(run_dir: str) -> ActivationStore:
    """The run's activation store; `RunError` when it is missing or unreadable."""
    path = Path(run_dir) / STORE_DIR
    if not path.is_dir():
        raise RunError(
            f"No activation store at {path}. Is {run_dir} a saelab run directory? "
            "Run `saelab harvest` with `out` set to RUN_DIR/activations.zarr."
        )
    return _open_store(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=8)
def _open_store(path: str, mtime: int) -> ActivationStore:
    try:
        return ActivationStore.open(path)
    except Exception as err:  # zarr raises many kinds of errors for damaged metadata
        raise RunError(
            f"The activation store {path} cannot be read ({type(err).__name__}: {err}). Harvest it again."
        ) from None


def _sae_model_name(folder: Path) -> str:
    meta = json.loads((folder / CFG_FILENAME).read_text()).get("metadata") or {}
    return str((meta.get("saelab_config") or {}).get("model_name") or meta.get("model_name") or "")


def _metrics(folder: Path) -> dict[str, Any]:
    path = folder / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _read_sae(folder: Path) -> SaeInfo:
    try:
        return SaeInfo(folder.parent.name, folder.name, folder, _sae_model_name(folder), _metrics(folder))
    except (OSError, ValueError) as err:
        raise RunError(f"SAE folder {folder} is unreadable ({err}); train it again.") from None


def list_saes(run_dir: str) -> list[SaeInfo]:
    """Every SAE under RUN/saes/<hook>/<variant>/, sorted; `RunError` when there are none."""
    root = Path(run_dir) / SAES_DIR
    folders = sorted(p.parent for p in root.glob(f"*/*/{CFG_FILENAME}"))
    if not folders:
        raise RunError(
            f"No SAEs under {root}. Train some with `saelab train` or `saelab sweep` (set `out` to {run_dir})."
        )
    return [_read_sae(folder) for folder in folders]


def sae_info(run_dir: str, hook: str | None, variant: str | None) -> SaeInfo:
    """The SAE `hook`/`variant` of the run; `RunError` naming the ones that exist if it is not there."""
    names = (hook or "", variant or "")
    folder = Path(run_dir, SAES_DIR, *names)
    if all(n and Path(n).name == n and n not in (".", "..") for n in names) and (folder / CFG_FILENAME).is_file():
        return _read_sae(folder)
    known = ", ".join(f"{s.hook}/{s.variant}" for s in list_saes(run_dir))
    raise RunError(f"The run has no SAE {hook}/{variant}. It has: {known}.")


def default_sae(run_dir: str) -> SaeInfo:
    """The first SAE trained on the run's own model (the first SAE if none is)."""
    saes, model = list_saes(run_dir), open_store(run_dir).model
    return next((s for s in saes if s.model_name in ("", model)), saes[0])


def check_model(run_dir: str, info: SaeInfo) -> None:
    """Refuse an SAE trained on another model than the one that made the run's activations."""
    store_model = open_store(run_dir).model
    if info.model_name and store_model and info.model_name != store_model:
        raise RunError(
            f"SAE {info.hook}/{info.variant} was trained on model {info.model_name!r}, but this run's "
            f"activations come from {store_model!r}. Its latents do not apply to this model; "
            "train an SAE on this run's store instead."
        )


def cached_result(load: Callable[[str], T], path: Path) -> T:
    """`load(path)` once per version of the file (a circuit, an absorption result); the `SaelabError` it raises
    for a missing or broken file becomes a `RunError` for the page."""
    return _cached_result(load, str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=32)
def _cached_result(load: Callable[[str], T], path: str, mtime: int) -> T:
    try:
        return load(path)
    except SaelabError as err:
        raise RunError(str(err)) from None


def analysis_path(run_dir: str, info: SaeInfo) -> Path:
    return Path(run_dir) / ANALYSIS_DIR / info.hook / f"{info.variant}.zarr"


def feature_store(run_dir: str, info: SaeInfo) -> FeatureStore:
    """The SAE's feature analysis (`saelab.analysis.FeatureStore`), opened once per process."""
    path = analysis_path(run_dir, info)
    if not path.is_dir():
        raise RunError(
            f"SAE {info.hook}/{info.variant} has no feature analysis yet (no {path}). "
            "Run `saelab.analysis.analyze(RUN_DIR)` to compute it."
        )
    return _feature_store(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=16)
def _feature_store(path: str, mtime: int) -> FeatureStore:
    try:
        return FeatureStore.open(path)
    except Exception as err:
        raise RunError(
            f"The feature analysis {path} cannot be read ({type(err).__name__}: {err}); run the analysis again."
        ) from None


def parse_feature_id(raw: str | None, n_features: int) -> int:
    """A latent index from the URL, or `RunError` saying what a valid one looks like."""
    text = (raw or "").strip()
    if not text.lstrip("-").isdigit():
        raise RunError(f"Feature id {text!r} is not a number; give an integer from 0 to {n_features - 1}.")
    index = int(text)
    if not 0 <= index < n_features:
        raise RunError(f"Feature {index} does not exist: this SAE has {n_features} latents (0 to {n_features - 1}).")
    return index


@lru_cache(maxsize=4)
def _load_sae(path: str) -> SAE:
    return SAE.load(path, device="cpu").eval()


@lru_cache(maxsize=2)
def _load_model(spec: str) -> Model:
    return load_model(spec, device="cpu")


def run_model(run_dir: str) -> Model:
    """The model that made the run's activations, from the spec in the store's harvest config."""
    spec = open_store(run_dir).config.get("model")
    if not spec:
        raise RunError(
            "The activation store does not record which model made it (it was imported, not harvested), "
            "so text cannot be run through it."
        )
    try:
        return _load_model(str(spec))
    except Exception as err:
        raise RunError(f"Cannot load the run's model {spec!r} ({type(err).__name__}: {err}).") from None


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


def search_token(run_dir: str, info: SaeInfo, text: str) -> list[tuple[int, str, list[int]]]:
    """Tokenise `text` with the run's tokenizer; for each token: (id, display string, latents that involve it).

    Falls back to matching the analysis vocab's strings when the model cannot be loaded.
    """
    if not text.strip():
        raise RunError("Type a token or some text to search for.")
    fs = feature_store(run_dir, info)
    try:
        ids = run_model(run_dir).tokenizer(text, add_special_tokens=False)["input_ids"]
    except RunError:
        ids = [i for i, s in enumerate(fs.vocab) if s.strip() == text.strip()]
    if not ids:
        raise RunError(f"{text!r} matches no token of the vocabulary.")
    return [
        (int(t), token_text(fs.vocab, int(t)), [int(f) for f in fs.search_token(int(t))]) for t in dict.fromkeys(ids)
    ]


@dataclass(frozen=True)
class TokenLatents:
    """One prompt token and its most active latents (index, activation), strongest first."""

    token: str
    latents: list[tuple[int, float]]


def prompt_latents(run_dir: str, info: SaeInfo, text: str, top: int = 5) -> list[TokenLatents]:
    """Run the model and the SAE on `text` live; the top latents of every token of the text."""
    if not text.strip():
        raise RunError("The prompt is empty: type some text to see which latents fire on it.")
    check_model(run_dir, info)
    model = run_model(run_dir)
    special = SpecialTokens.for_tokenizer(model.tokenizer, is_encoder(model))
    body = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    room = model.cfg.n_ctx - len(special.prefix) - len(special.suffix)
    if len(body) > room:
        raise RunError(f"The prompt has {len(body)} tokens; this model reads at most {room}. Shorten it.")
    tokens = torch.tensor([special.frame(body)], dtype=torch.long)
    (point,) = resolve_hooks(model, [info.hook])
    acts = capture(model, tokens.to(device_of(model)), [point])[info.hook][0]
    body_acts = acts[len(special.prefix) : len(special.prefix) + len(body)].float().cpu()
    with torch.inference_mode():
        f = _load_sae(str(info.path)).encode(body_acts)
    values, indices = f.topk(min(top, f.shape[-1]), dim=-1)
    strings = model.tokenizer.convert_ids_to_tokens(body)
    return [
        TokenLatents(
            model.tokenizer.convert_tokens_to_string([s]), [(int(i), float(v)) for i, v in zip(idx, val) if v > 0]
        )
        for s, idx, val in zip(strings, indices.tolist(), values.tolist())
    ]


def finite(x: Any) -> float | None:
    """A metric as a float, or None when it is missing or not a finite number."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def valid_ids(ids: np.ndarray, values: np.ndarray) -> list[tuple[int, float]]:
    """(id, value) pairs without the -1 padding."""
    return [(int(i), float(v)) for i, v in zip(ids, values) if i >= 0]
