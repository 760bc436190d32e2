"""Harvest: run a model over text and write the activations of chosen hook points to a store."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab import distributed
from saelab.config import HarvestConfig
from saelab.errors import ConfigError, SaelabError, StoreError, TextSourceError
from saelab.harvest_shards import Finish, Piece, Shards, ShardWriter, put
from saelab.models import (
    MINILM,
    HookPoint,
    Model,
    capture,
    device_of,
    is_encoder,
    load_model,
    model_name,
    resolve_hooks,
    tokenizer_of,
)
from saelab.run import is_local, store_relative
from saelab.store import TORCH_DTYPE, ActivationStore, StoreWriter, open_group, saelab_meta, to_storage, zarr_group
from saelab.store.checksums import DamagedShard
from saelab.store.writer import Written
from saelab.text import ContextBatch, SpecialTokens, batch_contexts, iter_documents, pack_contexts

IDENTITY_KEYS = (
    "model",
    "models",
    "hooks",
    "text",
    "context_length",
    "batch_size",
    "max_tokens",
    "dtype",
    "drop_special_tokens",
    "shard_rows",
    "chunk_rows",
    "compression",
)
"""The config keys that decide a store's content; a store records `model` for one model, `models` for several."""
PROBE_TEXT = "Tokenizers differ on rare words: naïve façade, 3.14e-10, <b>HTML</b>, 東京, CamelCase_snake\tTAB"
"""A text that models harvested together must turn into the same ids (it catches another casing or normalisation)."""


def array_name(alias: str, hook: str) -> str:
    """The name of a hook's arrays in a store: `hook` for one model (alias `""`), `<alias>/<hook>` for several
    (`HarvestConfig.models`)."""
    return f"{alias}/{hook}" if alias else hook


def given_identity(cfg: HarvestConfig) -> dict:
    """The part of a config that decides the store's content (not where it goes or runs), paths as given (what
    stores recorded before runs could move): `model` for one model, `models` for several."""
    keys = {k for k in IDENTITY_KEYS if k != ("models" if cfg.models is None else "model")}
    return cfg.model_dump(include=keys, mode="json")


def _recorded_spec(spec: str, *, store: str) -> str:
    """A model spec as the store records it: a local folder from the store's folder where it can, names as given."""
    return store_relative(spec, store=store) if spec != MINILM and is_local(spec) else spec


def identity(cfg: HarvestConfig) -> dict:
    """`given_identity` as the store records it (its `config`): a local model folder or text file from the store's
    own folder when it lies beside the store (`store_relative`: `../model` for a run's model), so the run can move;
    model names (`minilm`, `gpt2`), dataset names and URLs as given."""
    recorded = given_identity(cfg)
    if cfg.models is None:
        recorded["model"] = _recorded_spec(cfg.model, store=cfg.out)
    else:
        recorded["models"] = {a: _recorded_spec(spec, store=cfg.out) for a, spec in cfg.models.items()}
    if cfg.text.source == "files" and cfg.text.path is not None and is_local(cfg.text.path):
        recorded["text"]["path"] = store_relative(cfg.text.path, store=cfg.out)
    return recorded


@dataclass
class _Kept:
    """Batch `batch` of the packed text, whose kept rows (`keep`) are store rows `[start, start + n)`."""

    batch: int
    start: int
    contexts: ContextBatch
    keep: np.ndarray

    @property
    def n(self) -> int:
        return int(self.keep.sum())


def _models_name(models: Mapping[str, Model]) -> str:
    """The models' short name: the model's for one, `alias=name, ...` for several."""
    return ", ".join(f"{a}={model_name(m)}" if a else model_name(m) for a, m in models.items())


def _open_writer(
    cfg: HarvestConfig, models: Mapping[str, Model], hooks: dict[str, int], *, overwrite: bool
) -> StoreWriter:
    """Resume a store made by the same config, refuse one made by another, or create a new one (replacing an
    existing store only with `overwrite`; a folder that is not a saelab store is never replaced)."""
    group = None
    if not overwrite:
        try:
            group = zarr_group(cfg.out, "r+")
        except FileNotFoundError:  # nothing there, or a folder that is not a Zarr store: `create` checks it
            pass
    if group is None:
        meta: dict[str, Any] = {
            "config": identity(cfg),
            "model_name": _models_name(models),
            "encoder": is_encoder(next(iter(models.values()))),
            "resume": {"batch": 0, "rows": 0},
        }
        if cfg.models is not None:
            meta["models"] = {a: model_name(m) for a, m in models.items()}
        return StoreWriter.create(
            cfg.out,
            meta,
            hooks,
            dtype=cfg.dtype,
            shard_rows=cfg.shard_rows,
            chunk_rows=cfg.chunk_rows,
            compression=cfg.compression,
            overwrite=overwrite,
        )
    if "saelab" not in group.attrs:
        raise StoreError(f"{cfg.out!r} exists and is not a saelab store; choose another `out` or remove it")
    old = saelab_meta(group, cfg.out).get("config", {})
    new, given = identity(cfg), given_identity(cfg)
    if old not in (new, given):  # a store written before runs could move records paths as given
        changed = [k for k in IDENTITY_KEYS if old.get(k) not in (new.get(k), given.get(k))]
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise StoreError(
            f"store {cfg.out!r} was made with a different config ({diff}); it is never appended to. "
            "Set `out` to a new path, or pass --overwrite (`overwrite=True`) to replace the store."
        )
    writer = StoreWriter(group)
    writer.remove_partial_writes()
    return writer


def _open_and_check(
    cfg: HarvestConfig, models: Mapping[str, Model], points: Mapping[str, list[HookPoint]], *, overwrite: bool
) -> tuple[StoreWriter, list[DamagedShard]]:
    """`_open_writer`, and the shards of the committed rows that are missing or damaged."""
    hooks = {array_name(a, p.name): p.d for a, ps in points.items() for p in ps}
    writer = _open_writer(cfg, models, hooks, overwrite=overwrite)
    return writer, ActivationStore(writer.group, cfg.out, verify=False).check().damaged


def harvest(
    cfg: HarvestConfig,
    model: Model | Mapping[str, Model] | None = None,
    progress: bool = True,
    *,
    overwrite: bool = False,
) -> ActivationStore:
    """Run the model over the text source and write the store at `cfg.out`; resumes an interrupted run.

    `model`: the loaded model (`cfg.model` is loaded when None); for a config of several `models`, a dict alias ->
    loaded model with every alias, or None. Several models run on the same batches, one after the other, and their
    hooks' arrays (`<alias>/<hook>`) share the store's rows and metadata; their tokenizers must be the same
    (`check_same_tokenizer`).

    A store at `cfg.out` made with another config is refused, and replaced only with `overwrite` (which also
    starts a store of the same config over); a non-empty folder that is not a saelab store is always refused.

    The model runs one batch at a time and stops after the last requested hook; a writer thread
    turns batches into shards beside the forward pass. Rerunning after a crash continues from the
    last committed shard and ends with the same store as an uninterrupted run. Every rerun first reads the
    committed shards against their checksums and writes the missing or damaged ones again, and only them.

    Under torchrun (`torchrun --nproc-per-node N -m saelab harvest CONFIG`, or a script that calls this) every rank
    packs the same text into the same batches; the ranks take the shards in turn (rank `r` the `r`-th of every `N`
    from the first one missing), run the model only on the batches their shards need and write those shards, and
    rank 0 alone creates the store, shows progress and commits what all of them wrote, so the store is the one a
    single process writes, byte for byte. A rerun with any number of ranks resumes it.
    """
    here = distributed.init()
    models = _models(cfg, model)
    check_same_tokenizer(models)
    points = {alias: resolve_hooks(m, cfg.hooks) for alias, m in models.items()}
    reader = next(iter(models.values()))  # whose tokenizer packs the text (the same for all of them)
    if next(_batches(cfg, reader), None) is None:
        raise TextSourceError(
            f"text source {cfg.text.model_dump(exclude_defaults=True) or 'embedded'} gave no complete context of "
            f"{cfg.context_length} tokens; give more text or a smaller context_length"
        )
    progress = progress and here.main
    opened = _on_rank0(lambda: _open_and_check(cfg, models, points, overwrite=overwrite))
    writer = opened[0] if opened is not None else StoreWriter(open_group(cfg.out, mode="r+"))
    damaged = distributed.broadcast_object(opened[1] if opened is not None else [])
    if damaged:
        _repair(writer, cfg, models, points, damaged, progress=progress)
    if writer.meta["complete"]:
        return ActivationStore.open(cfg.out)
    resume = writer.meta["resume"]
    done = writer.rows_complete
    shards = Shards(done // cfg.shard_rows, here, cfg.shard_rows)
    if here.many:
        if here.main:  # room for the first round's shards before any rank writes them
            writer.reserve((shards.first + here.world) * cfg.shard_rows)
        distributed.barrier()

    shard_writer = ShardWriter(writer, shards)
    shard_writer.start()
    bar = tqdm(
        total=cfg.max_tokens,
        initial=done,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc=f"harvest {_models_name(models)}",
        smoothing=0.1,
    )
    try:
        stop = done
        for kept in _kept_batches(cfg, reader, first=(resume["batch"], resume["rows"])):
            stop = kept.start + kept.n if cfg.max_tokens is None else min(kept.start + kept.n, cfg.max_tokens)
            if shards.touched(kept.start, stop):
                put(shard_writer, _piece(cfg, models, points, kept).cut(0, stop - kept.start))
            bar.update(max(stop, done) - max(kept.start, done))
            if stop == cfg.max_tokens:
                break
        put(shard_writer, Finish(stop))
        shard_writer.join()
    finally:
        bar.close()
        if shard_writer.is_alive():
            shard_writer.inbox.put(None)
            shard_writer.join()
    if shard_writer.error is not None:
        raise shard_writer.error
    distributed.barrier()  # every rank opens the store once rank 0 has completed it
    return ActivationStore.open(cfg.out)


def _models(cfg: HarvestConfig, given: Model | Mapping[str, Model] | None) -> dict[str, Model]:
    """Alias -> model of every model the config harvests (alias `""` for one model): those given, or loaded."""
    specs = cfg.model_specs
    if given is None:
        device = str(distributed.local_device(cfg.device))
        return {alias: load_model(spec, device=device) for alias, spec in specs.items()}
    if not isinstance(given, Mapping):
        if cfg.models is not None:
            raise ConfigError(
                f"the config harvests several models ({', '.join(cfg.models)}) but one model was given; pass a dict "
                "alias -> loaded model with every alias, or none to load them from `models`"
            )
        return {"": given}
    if cfg.models is None or set(given) != set(specs):
        raise ConfigError(
            f"the models given ({', '.join(sorted(given)) or 'none'}) are not the config's `models` "
            f"({', '.join(sorted(cfg.models or {})) or 'one `model`'}); give one loaded model per alias of `models`"
        )
    return {alias: given[alias] for alias in specs}


def check_same_tokenizer(models: Mapping[str, Model]) -> None:
    """Refuse (`ConfigError`, naming both) models that would not read the same tokens from the same text.

    Compared with the first model: the vocabulary (every token and its id), how contexts are framed (the
    `SpecialTokens`: [CLS]/[SEP] or BOS/EOS ids, and every special id, which depend on encoder or decoder too), the
    special tokens by role (`special_tokens_map`) and the ids of `PROBE_TEXT` (which a tokenizer with another casing or
    normalisation but the same vocabulary changes)."""
    if len(models) < 2:
        return
    (first, base), *rest = models.items()

    def facts(model: Model) -> dict[str, Any]:
        tok = tokenizer_of(model, ConfigError)
        return {
            "vocabulary": tok.get_vocab(),
            "framing (special token ids, encoder or decoder)": SpecialTokens.for_tokenizer(tok, is_encoder(model)),
            "special tokens": tok.special_tokens_map,
            "ids of a sample text": tok(PROBE_TEXT, add_special_tokens=False)["input_ids"],
        }

    want = facts(base)
    for alias, model in rest:
        got = facts(model)
        differ = [k for k in want if got[k] != want[k]]
        if differ:
            raise ConfigError(
                f"models {first!r} ({model_name(base)}) and {alias!r} ({model_name(model)}) have different tokenizers "
                f"(their {', '.join(differ)} differ), so they cannot be harvested over the same tokens; harvest "
                "them into separate stores, or give models that share one tokenizer"
            )


T = TypeVar("T")


def _on_rank0(make: Callable[[], T]) -> T | None:
    """`make()` on rank 0 (its result there, None on the other ranks, which wait for it); a `SaelabError` it raises
    is raised on every rank, so that all of them stop with it."""
    if not distributed.ranks().many:
        return make()
    result, error = None, None
    if distributed.ranks().main:
        try:
            result = make()
        except SaelabError as err:
            error = err
    error = distributed.broadcast_object(error)
    if error is not None:
        raise error
    return result


def _batches(cfg: HarvestConfig, model: Model) -> Iterator[ContextBatch]:
    """The batches of packed contexts of the config's text, from the first."""
    special = SpecialTokens.for_tokenizer(model.tokenizer, is_encoder(model))
    contexts = pack_contexts(iter_documents(cfg.text), model.tokenizer, special, context_length=cfg.context_length)
    return batch_contexts(contexts, cfg.batch_size, special)


def _kept_batches(cfg: HarvestConfig, model: Model, *, first: tuple[int, int]) -> Iterator[_Kept]:
    """Every batch from batch `first[0]`, whose first kept row is store row `first[1]`, with the rows it keeps: the
    tokenizer alone decides them, so every rank knows where each batch's rows go without running the model."""
    rows = first[1]
    for b, batch in enumerate(islice(_batches(cfg, model), first[0], None), start=first[0]):
        keep = ~batch.special.reshape(-1) if cfg.drop_special_tokens else np.ones(batch.tokens.size, bool)
        kept = _Kept(b, rows, batch, keep)
        yield kept
        rows += kept.n


def _piece(
    cfg: HarvestConfig, models: Mapping[str, Model], points: Mapping[str, list[HookPoint]], kept: _Kept
) -> Piece:
    """Run each model on a batch: the activations (by array name) and metadata of its kept rows."""
    batch, keep = kept.contexts, kept.keep
    stored: dict[str, np.ndarray] = {}
    for alias, model in models.items():
        device = device_of(model)
        acts = capture(model, torch.from_numpy(batch.tokens).to(device), points[alias])
        keep_t = None if keep.all() else torch.from_numpy(keep).to(device)  # indexing copies rows: only to drop some
        for p in points[alias]:
            # The kept rows in the store's dtype: a copy (never a view of the model's tensors), cast first so that
            # dropping rows moves half the bytes.
            x = acts[p.name].reshape(-1, p.d).to(TORCH_DTYPE[cfg.dtype], copy=True)
            stored[array_name(alias, p.name)] = to_storage(x if keep_t is None else x[keep_t], cfg.dtype)
    return Piece(
        kept.batch,
        kept.start,
        kept.n,
        0,
        stored,
        {
            "tokens": batch.tokens.reshape(-1)[keep].astype(np.int32),
            "doc_id": batch.doc_id.reshape(-1)[keep],
            "position": batch.position.reshape(-1)[keep],
            "context": np.repeat(kept.batch * cfg.batch_size + np.arange(len(batch)), batch.tokens.shape[1])[keep],
        },
    )


def _repair(
    writer: StoreWriter,
    cfg: HarvestConfig,
    models: Mapping[str, Model],
    points: Mapping[str, list[HookPoint]],
    damaged: list[DamagedShard],
    *,
    progress: bool,
) -> None:
    """Write the damaged shards of the committed rows again, and only them: the text is packed again from the start
    and the model runs only on the batches that hold their rows. On several ranks each rewrites its share of the
    shards (the `r`-th of every `N`) and rank 0 commits their checksums."""
    here = distributed.ranks()
    ordered = sorted({d.shard for d in damaged})
    spans = {d.shard: d.rows for d in damaged if ordered.index(d.shard) % here.world == here.rank}
    names = {s: {d.array for d in damaged if d.shard == s} for s in spans}
    held: dict[int, list[Piece]] = {s: [] for s in spans}
    written: list[Written] = []
    bar = tqdm(total=sum(b - a for a, b in spans.values()), unit="tok", disable=not progress, desc="repair shards")
    for kept in _kept_batches(cfg, next(iter(models.values())), first=(0, 0)):
        if not spans:
            break
        end = kept.start + kept.n
        if not any(lo < end and kept.start < hi for lo, hi in spans.values()):
            continue
        piece = _piece(cfg, models, points, kept)
        for s, (lo, hi) in list(spans.items()):
            if lo < end and piece.start < hi:
                held[s].append(piece.cut(max(lo, piece.start) - piece.start, min(hi, end) - piece.start))
            if sum(map(len, held[s])) == hi - lo:
                acts, meta = Piece.join(held.pop(s))
                arrays = {**{f"activations/{h}": a for h, a in acts.items()}, **meta}
                written.append(writer.reput(lo, {k: a for k, a in arrays.items() if k in names[s]}))
                bar.update(hi - lo)
                del spans[s]
    bar.close()
    everyone = distributed.gather_objects(written)
    if here.main:
        for w in (w for rank in everyone for w in rank):
            writer.add(w)
        writer.commit(writer.rows_complete, complete=writer.meta["complete"])
