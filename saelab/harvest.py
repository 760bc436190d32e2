"""Harvest: run a model over text and write the activations of chosen hook points to a store."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from saelab.config import HarvestConfig
from saelab.errors import StoreError, TextSourceError
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
)
from saelab.run import is_local, store_relative
from saelab.store import ActivationStore, StoreWriter, saelab_meta, to_storage
from saelab.store.checksums import DamagedShard
from saelab.text import ContextBatch, SpecialTokens, batch_contexts, iter_documents, pack_contexts

IDENTITY_KEYS = (
    "model",
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


def given_identity(cfg: HarvestConfig) -> dict:
    """The part of a config that decides the store's content (not where it goes or runs), paths as given (what
    stores recorded before runs could move)."""
    return cfg.model_dump(include=set(IDENTITY_KEYS), mode="json")


def identity(cfg: HarvestConfig) -> dict:
    """`given_identity` as the store records it (its `config`): a local model folder or text file from the store's
    own folder when it lies beside the store (`store_relative`: `../model` for a run's model), so the run can move;
    model names (`minilm`, `gpt2`), dataset names and URLs as given."""
    recorded = given_identity(cfg)
    if cfg.model != MINILM and is_local(cfg.model):
        recorded["model"] = store_relative(cfg.model, store=cfg.out)
    if cfg.text.source == "files" and cfg.text.path is not None and is_local(cfg.text.path):
        recorded["text"]["path"] = store_relative(cfg.text.path, store=cfg.out)
    return recorded


FINISH = object()  # tells the writer thread to write what it holds and mark the store complete


@dataclass
class _Piece:
    """Kept rows of batch `batch`, whose first kept row is store row `batch_start`; this piece starts `offset` rows in."""

    batch: int
    batch_start: int
    offset: int
    acts: dict[str, np.ndarray]
    meta: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.meta["tokens"])

    @property
    def start(self) -> int:
        return self.batch_start + self.offset

    def cut(self, a: int, b: int) -> _Piece:
        return _Piece(
            self.batch,
            self.batch_start,
            self.offset + a,
            {k: v[a:b] for k, v in self.acts.items()},
            {k: v[a:b] for k, v in self.meta.items()},
        )

    @staticmethod
    def join(pieces: list[_Piece]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The activations (by hook) and metadata arrays of consecutive pieces, concatenated."""
        acts = {h: np.concatenate([p.acts[h] for p in pieces]) for h in pieces[0].acts}
        return acts, {k: np.concatenate([p.meta[k] for p in pieces]) for k in pieces[0].meta}


class _ShardWriter(threading.Thread):
    """Buffers pieces and writes whole shards beside the forward pass; commits after each shard."""

    def __init__(self, writer: StoreWriter, shard_rows: int):
        super().__init__(daemon=True)
        self.writer, self.shard_rows = writer, shard_rows
        self.inbox: queue.Queue = queue.Queue(maxsize=8)
        self.buffer: list[_Piece] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while (piece := self.inbox.get()) is not None:
                if piece is FINISH:
                    self._flush(final=True)
                    return
                self.buffer.append(piece)
                while sum(map(len, self.buffer)) >= self.shard_rows:
                    self._flush(final=False)
        except BaseException as err:
            self.error = err

    def _flush(self, final: bool) -> None:
        start = self.writer.rows_complete
        take, kept, n = [], [], 0
        for p in self.buffer:
            room = self.shard_rows - n if not final else len(p)
            if room >= len(p):
                take.append(p)
                n += len(p)
            elif room > 0:
                take.append(p.cut(0, room))
                kept.append(p.cut(room, len(p)))
                n += room
            else:
                kept.append(p)
        self.buffer = kept
        if take:
            self.writer.write(start, *_Piece.join(take))
        if final:
            self.writer.commit(start + n, complete=True, resume=None)
        elif kept:  # resume by rerunning the batch that holds the first uncommitted row
            self.writer.commit(start + n, resume={"batch": kept[0].batch, "rows": kept[0].batch_start})
        else:
            last = take[-1]
            self.writer.commit(start + n, resume={"batch": last.batch + 1, "rows": last.start + len(last)})


def _open_writer(cfg: HarvestConfig, model: Model, hooks: dict[str, int], *, overwrite: bool) -> StoreWriter:
    """Resume a store made by the same config, refuse one made by another, or create a new one (replacing an
    existing store only with `overwrite`; a folder that is not a saelab store is never replaced)."""
    group = None
    if not overwrite:
        try:
            group = zarr.open_group(store=cfg.out, mode="r+", zarr_format=3)
        except FileNotFoundError:  # nothing there, or a folder that is not a Zarr store: `create` checks it
            pass
    if group is None:
        meta = {
            "config": identity(cfg),
            "model_name": model_name(model),
            "encoder": is_encoder(model),
            "resume": {"batch": 0, "rows": 0},
        }
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
        changed = [k for k in IDENTITY_KEYS if old.get(k) not in (new[k], given[k])]
        diff = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
        raise StoreError(
            f"store {cfg.out!r} was made with a different config ({diff}); it is never appended to. "
            "Set `out` to a new path, or pass --overwrite (`overwrite=True`) to replace the store."
        )
    writer = StoreWriter(group)
    writer.remove_partial_writes()
    return writer


def harvest(
    cfg: HarvestConfig, model: Model | None = None, progress: bool = True, *, overwrite: bool = False
) -> ActivationStore:
    """Run the model over the text source and write the store at `cfg.out`; resumes an interrupted run.

    A store at `cfg.out` made with another config is refused, and replaced only with `overwrite` (which also
    starts a store of the same config over); a non-empty folder that is not a saelab store is always refused.

    The model runs one batch at a time and stops after the last requested hook; a writer thread
    turns batches into shards beside the forward pass. Rerunning after a crash continues from the
    last committed shard and ends with the same store as an uninterrupted run. Every rerun first reads the
    committed shards against their checksums and writes the missing or damaged ones again, and only them.
    """
    model = model if model is not None else load_model(cfg.model, device=cfg.device)
    points = resolve_hooks(model, cfg.hooks)
    if next(_batches(cfg, model), None) is None:
        raise TextSourceError(
            f"text source {cfg.text.model_dump(exclude_defaults=True) or 'embedded'} gave no complete context of "
            f"{cfg.context_length} tokens; give more text or a smaller context_length"
        )
    writer = _open_writer(cfg, model, {p.name: p.d for p in points}, overwrite=overwrite)
    damaged = ActivationStore(writer.group, cfg.out, verify=False).check().damaged
    if damaged:
        _repair(writer, cfg, model, points, damaged, progress=progress)
    if writer.meta["complete"]:
        return ActivationStore.open(cfg.out)
    resume = writer.meta["resume"]
    done = writer.rows_complete

    shard_writer = _ShardWriter(writer, cfg.shard_rows)
    shard_writer.start()
    bar = tqdm(
        total=cfg.max_tokens,
        initial=done,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc=f"harvest {model_name(model)}",
        smoothing=0.1,
    )
    try:
        pieces = _pieces(cfg, model, points, first=(resume["batch"], resume["rows"]), needed=lambda a, b: b > done)
        for piece in pieces:
            end = piece.start + len(piece)
            if piece.start < done:  # rows of this batch were committed before the interruption
                piece = piece.cut(done - piece.start, len(piece))
            if cfg.max_tokens is not None and end >= cfg.max_tokens:
                piece = piece.cut(0, len(piece) - (end - cfg.max_tokens))
                end = cfg.max_tokens
            _put(shard_writer, piece)
            bar.update(len(piece))
            if end == cfg.max_tokens:
                break
        _put(shard_writer, FINISH)
        shard_writer.join()
    finally:
        bar.close()
        if shard_writer.is_alive():
            shard_writer.inbox.put(None)
            shard_writer.join()
    if shard_writer.error is not None:
        raise shard_writer.error
    return ActivationStore.open(cfg.out)


def _batches(cfg: HarvestConfig, model: Model) -> Iterator[ContextBatch]:
    """The batches of packed contexts of the config's text, from the first."""
    special = SpecialTokens.for_tokenizer(model.tokenizer, is_encoder(model))
    contexts = pack_contexts(iter_documents(cfg.text), model.tokenizer, special, context_length=cfg.context_length)
    return batch_contexts(contexts, cfg.batch_size, special)


def _pieces(
    cfg: HarvestConfig,
    model: Model,
    points: list[HookPoint],
    *,
    first: tuple[int, int],
    needed: Callable[[int, int], bool],
) -> Iterator[_Piece]:
    """The kept rows of every batch from batch `first[0]`, whose first kept row is store row `first[1]`; the model
    runs only on the batches whose rows `[start, stop)` are `needed`, the others are skipped."""
    device = device_of(model)
    rows = first[1]
    for b, batch in enumerate(islice(_batches(cfg, model), first[0], None), start=first[0]):
        keep = ~batch.special.reshape(-1) if cfg.drop_special_tokens else np.ones(batch.tokens.size, bool)
        n = int(keep.sum())
        if needed(rows, rows + n):
            acts = capture(model, torch.from_numpy(batch.tokens).to(device), points)
            keep_t = torch.from_numpy(keep).to(device)
            yield _Piece(
                b,
                rows,
                0,
                {p.name: to_storage(acts[p.name].reshape(-1, p.d)[keep_t], cfg.dtype) for p in points},
                {
                    "tokens": batch.tokens.reshape(-1)[keep].astype(np.int32),
                    "doc_id": batch.doc_id.reshape(-1)[keep],
                    "position": batch.position.reshape(-1)[keep],
                    "context": np.repeat(b * cfg.batch_size + np.arange(len(batch)), batch.tokens.shape[1])[keep],
                },
            )
        rows += n


def _repair(
    writer: StoreWriter,
    cfg: HarvestConfig,
    model: Model,
    points: list[HookPoint],
    damaged: list[DamagedShard],
    *,
    progress: bool,
) -> None:
    """Write the damaged shards of the committed rows again, and only them: the text is packed again from the start
    and the model runs only on the batches that hold their rows."""
    spans = {d.shard: d.rows for d in damaged}
    names = {s: {d.array for d in damaged if d.shard == s} for s in spans}
    held: dict[int, list[_Piece]] = {s: [] for s in spans}
    bar = tqdm(total=sum(b - a for a, b in spans.values()), unit="tok", disable=not progress, desc="repair shards")
    wanted = lambda a, b: any(lo < b and a < hi for lo, hi in spans.values())
    for piece in _pieces(cfg, model, points, first=(0, 0), needed=wanted):
        end = piece.start + len(piece)
        for s, (lo, hi) in list(spans.items()):
            if lo < end and piece.start < hi:
                held[s].append(piece.cut(max(lo, piece.start) - piece.start, min(hi, end) - piece.start))
            if sum(map(len, held[s])) == hi - lo:
                acts, meta = _Piece.join(held.pop(s))
                arrays = {**{f"activations/{h}": a for h, a in acts.items()}, **meta}
                writer.rewrite(lo, {k: a for k, a in arrays.items() if k in names[s]})
                bar.update(hi - lo)
                del spans[s]
        if not spans:
            break
    bar.close()
    writer.commit(writer.rows_complete, complete=writer.meta["complete"])


def _put(shard_writer: _ShardWriter, item: object) -> None:
    """Hand an item to the writer thread, surfacing its error instead of blocking forever."""
    while True:
        if shard_writer.error is not None:
            raise shard_writer.error
        try:
            shard_writer.inbox.put(item, timeout=0.5)
            return
        except queue.Full:
            continue
