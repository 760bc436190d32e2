"""Run by tests/test_distributed.py under torchrun: rank 1 raises a saelab error while rank 0 waits for it."""

import time

from saelab import distributed
from saelab.errors import DistributedError

ranks = distributed.init()
if ranks.rank == 1:
    print(f"raising at {time.time()}", flush=True)
    raise DistributedError("rank 1 cannot go on: this is the error the test expects")
distributed.barrier()  # rank 0 waits here for a peer that is gone; torchrun must stop it
