"""`torchrun ... tests/harvest_ranks.py CONFIG KILL_RANK AFTER_SHARDS`: `saelab.harvest` of a config file, where rank
`KILL_RANK` SIGKILLs itself as soon as it has written its `AFTER_SHARDS`-th shard (before rank 0 can commit it), as a
crash of one rank would.

Every rank also logs when it writes shards and when it resizes the arrays (`CONFIG.rank<r>.log`, a line
`put|reserve START END` each, in `time.monotonic()` seconds); resizes take 0.3 s longer than they would, so that a
write that overlapped one would show."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from saelab.config import HarvestConfig, load_config
from saelab.distributed import ranks
from saelab.harvest import harvest
from saelab.store import StoreWriter

RESERVE_DELAY = 0.3


def main() -> None:
    config, kill_rank, after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    put, reserve, written = StoreWriter.put, StoreWriter.reserve, []

    def log(what: str, start: float) -> None:
        with Path(f"{config}.rank{ranks().rank}.log").open("a") as f:
            f.write(f"{what} {start} {time.monotonic()}\n")

    def put_then_die(self: StoreWriter, *args, **kwargs):
        start = time.monotonic()
        result = put(self, *args, **kwargs)
        log("put", start)
        written.append(result)
        if len(written) == after and ranks().rank == kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    def slow_reserve(self: StoreWriter, rows: int) -> None:
        start = time.monotonic()
        time.sleep(RESERVE_DELAY)
        reserve(self, rows)
        log("reserve", start)

    StoreWriter.put, StoreWriter.reserve = put_then_die, slow_reserve
    harvest(load_config(config, HarvestConfig, []), progress=False)


if __name__ == "__main__":
    main()
