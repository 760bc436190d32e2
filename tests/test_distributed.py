"""saelab.distributed: torchrun's environment read right, identities on one process, a failing rank stops the run."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import torch

from saelab import distributed
from saelab.errors import ConfigError
from tests.launch import torchrun, tracebacks


def test_one_process_is_rank_0_of_1_and_every_collective_is_the_identity(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ranks = distributed.init()
    assert ranks == distributed.Ranks(rank=0, world=1, local_rank=0) and ranks.main and not ranks.many
    assert not torch.distributed.is_initialized()  # nothing was set up
    t = torch.tensor([1.5, -2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.5, -2.0]
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    assert distributed.all_gather(t) == [t]
    assert distributed.broadcast_object("x") == "x"
    distributed.barrier()
    distributed.wait_for_main()


def test_torchruns_environment_is_read_and_nonsense_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched() == distributed.Ranks(rank=3, world=4, local_rank=1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="torchrun"):
        distributed.launched()
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ConfigError, match="RANK='two' is not an integer"):
        distributed.launched()


def test_the_collectives_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout().total_seconds() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "7")
    assert distributed.timeout().total_seconds() == 7
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "0")
    with pytest.raises(ConfigError, match="positive"):
        distributed.timeout()


@pytest.mark.distributed
def test_a_rank_that_raises_stops_the_run_with_its_error_within_a_minute():
    """Rank 1 raises while rank 0 waits at a barrier for it: torchrun must end the run, non-zero, with the error."""
    done = torchrun(str(Path(__file__).parent / "rank_fails.py"), timeout=180)
    raised = re.search(r"raising at ([0-9.]+)", done.stdout)
    assert raised, done.stdout + done.stderr
    seconds = time.time() - float(raised[1])  # from the error to the end of the run
    assert done.returncode != 0
    assert "rank 1 cannot go on: this is the error the test expects" in done.stdout + done.stderr
    # What a failed launch's assertion shows starts with the failing rank's own traceback, whatever follows it.
    assert (
        tracebacks(done)
        .split("\n\n")[0]
        .endswith("DistributedError: rank 1 cannot go on: this is the error the test expects")
    )
    assert seconds < 60, f"the run took {seconds:.0f} s to stop after the error"
