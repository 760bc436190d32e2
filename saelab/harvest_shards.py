"""The harvest's writing side: pieces of batches, the shards each rank owns, and the writer thread that writes
whole shards beside the forward pass and has rank 0 commit them in rounds (`saelab.harvest` drives it)."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import numpy as np

from saelab.distributed import Ranks, barrier, gather_objects
from saelab.store import StoreWriter
from saelab.store.writer import Written


@dataclass
class Piece:
    """Kept rows of batch `batch` (`size` rows from store row `batch_start`); this piece starts `offset` rows in."""

    batch: int
    batch_start: int
    size: int
    offset: int
    acts: dict[str, np.ndarray]
    meta: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.meta["tokens"])

    @property
    def start(self) -> int:
        return self.batch_start + self.offset

    def cut(self, a: int, b: int) -> Piece:
        return Piece(
            self.batch,
            self.batch_start,
            self.size,
            self.offset + a,
            {k: v[a:b] for k, v in self.acts.items()},
            {k: v[a:b] for k, v in self.meta.items()},
        )

    @staticmethod
    def join(pieces: list[Piece]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The activations (by hook) and metadata arrays of consecutive pieces, concatenated."""
        acts = {h: np.concatenate([p.acts[h] for p in pieces]) for h in pieces[0].acts}
        return acts, {k: np.concatenate([p.meta[k] for p in pieces]) for k in pieces[0].meta}


@dataclass
class Finish:
    """Tells the writer thread that the store ends at row `rows`: write what it holds and end the harvest."""

    rows: int


@dataclass
class Shard:
    """A shard one rank wrote, for rank 0 to commit."""

    stop: int
    """The row after its last."""
    written: Written
    """Its checksums and statistics."""
    resume: dict[str, int]
    """Where a harvest that stops after it starts again: the batch that holds row `stop`, and that batch's first row."""


class Shards:
    """Which shards a rank writes: from shard `first` on, every `world`-th, starting `rank` shards in (all of them on
    one rank), `shard_rows` rows each."""

    def __init__(self, first: int, here: Ranks, shard_rows: int):
        self.first, self.here, self.shard_rows = first, here, shard_rows

    def owns(self, shard: int) -> bool:
        return shard >= self.first and (shard - self.first) % self.here.world == self.here.rank

    def touched(self, start: int, stop: int) -> list[int]:
        """This rank's shards among those that rows `[start, stop)` fall in."""
        return [s for s in range(start // self.shard_rows, -(-stop // self.shard_rows)) if self.owns(s)]

    def rounds(self, rows: int) -> int:
        """How many rounds (one shard per rank each) a store of `rows` rows takes from shard `first`."""
        return -(-max(0, -(-rows // self.shard_rows) - self.first) // self.here.world)


class ShardWriter(threading.Thread):
    """Buffers the pieces of this rank's shards and writes each shard, once whole, beside the forward pass.

    The ranks write in rounds, one shard each (shards `first + k * world + rank` in round `k`); after each round rank 0
    gathers what they wrote and commits it, so `rows_complete` always ends a round and every shard below it has its
    checksum. On one rank a round is one shard: a commit after each, as ever."""

    def __init__(self, writer: StoreWriter, shards: Shards):
        super().__init__(daemon=True)
        self.writer, self.shards = writer, shards
        self.here = shards.here
        self.shard = shards.first + self.here.rank  # the next shard this rank writes
        self.done = 0  # rounds this rank has taken part in
        self.inbox: queue.Queue = queue.Queue(maxsize=8)
        self.held: dict[int, list[Piece]] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while (item := self.inbox.get()) is not None:
                if isinstance(item, Finish):
                    self._finish(item.rows)
                    return
                self._hold(item)
                while sum(map(len, self.held.get(self.shard, []))) == self.shards.shard_rows:
                    self._round(self._write(), rows=None)
        except BaseException as err:
            self.error = err

    def _hold(self, piece: Piece) -> None:
        """Keep the rows of `piece` that fall in this rank's shards still to write."""
        r, end = self.shards.shard_rows, piece.start + len(piece)
        for s in self.shards.touched(piece.start, end):
            if s >= self.shard:
                lo, hi = max(piece.start, s * r), min(end, (s + 1) * r)
                self.held.setdefault(s, []).append(piece.cut(lo - piece.start, hi - piece.start))

    def _write(self) -> Shard:
        """Write the held rows of this rank's next shard."""
        pieces = self.held.pop(self.shard)
        written = self.writer.put(self.shard * self.shards.shard_rows, *Piece.join(pieces), resize=not self.here.many)
        last = pieces[-1]
        stop = last.start + len(last)
        more = last.batch_start + last.size > stop  # the batch goes on into the next shard
        resume = {"batch": last.batch, "rows": last.batch_start} if more else {"batch": last.batch + 1, "rows": stop}
        return Shard(stop, written, resume)

    def _round(self, shard: Shard | None, *, rows: int | None) -> None:
        """End a round: rank 0 commits every rank's shard of it (`rows`: the store's last round ends it there)."""
        self.shard += self.here.world
        self.done += 1
        shards = [s for s in gather_objects(shard) if s is not None]
        if self.here.many:
            # Room for the next round while no rank writes: a rank opening an array reads its `zarr.json`, which a
            # resize rewrites (in place on fsspec stores), so every rank waits for it. Every round has this barrier
            # (ranks can disagree on which round is the last: one whose last shard is whole learns it later).
            if self.here.main and rows is None:
                self.writer.reserve((self.shard + self.here.world) * self.shards.shard_rows)
            barrier()
        if not self.here.main:
            return
        for s in shards:
            self.writer.add(s.written)
        if rows is not None:
            self.writer.commit(rows, complete=True, resume=None)
        elif shards:
            self.writer.commit(shards[-1].stop, resume=shards[-1].resume)

    def _finish(self, rows: int) -> None:
        """The text ended at row `rows`: write this rank's last (partial) shard, if it holds one, and take part in
        the rounds left; the last round completes the store (or rank 0 does, when every round is behind it)."""
        rounds = self.shards.rounds(rows)
        if self.done == rounds and self.here.main:
            self.writer.commit(rows, complete=True, resume=None)
        while self.done < rounds:
            shard = self._write() if self.shard in self.held else None
            self._round(shard, rows=rows if self.done == rounds - 1 else None)


def put(shard_writer: ShardWriter, item: object) -> None:
    """Hand an item to the writer thread, surfacing its error instead of blocking forever."""
    while True:
        if shard_writer.error is not None:
            raise shard_writer.error
        try:
            shard_writer.inbox.put(item, timeout=0.5)
            return
        except queue.Full:
            continue
