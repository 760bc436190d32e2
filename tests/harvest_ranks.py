"""`torchrun ... tests/harvest_ranks.py CONFIG KILL_RANK AFTER_SHARDS`: `saelab.harvest` of a config file, where rank
`KILL_RANK` SIGKILLs itself as soon as it has written its `AFTER_SHARDS`-th shard (before rank 0 can commit it), as a
crash of one rank would."""

from __future__ import annotations

import os
import signal
import sys

from saelab.config import HarvestConfig, load_config
from saelab.distributed import ranks
from saelab.harvest import harvest
from saelab.store import StoreWriter


def main() -> None:
    config, kill_rank, after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    put, written = StoreWriter.put, []

    def put_then_die(self: StoreWriter, *args, **kwargs):
        result = put(self, *args, **kwargs)
        written.append(result)
        if len(written) == after and ranks().rank == kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    StoreWriter.put = put_then_die
    harvest(load_config(config, HarvestConfig, []), progress=False)


if __name__ == "__main__":
    main()
