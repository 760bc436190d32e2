"""Ranks under `torchrun`: one process group per run, set up from torchrun's environment, and the few collectives
saelab's stages use (all of them torch.distributed's own).

`torchrun --nproc-per-node N -m saelab harvest|train|sweep|analyze CONFIG` starts N copies of a command; each calls
`init()` first, which joins the process group that torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
`MASTER_ADDR`, `MASTER_PORT`) describe: NCCL when the rank has a CUDA device, gloo otherwise. Without torchrun (no
`WORLD_SIZE`, or 1) nothing is set up and every helper here acts as the identity of a single rank, so one process
behaves exactly as it always has.

A rank that fails exits non-zero; torchrun's agent then stops the other ranks and exits with the failure. Every
collective also has a timeout (`SAELAB_DIST_TIMEOUT` seconds, default 300), so a rank left waiting on a peer that
died outside torchrun ends with an error instead of hanging; only `wait_for_main`, where ranks wait while rank 0
works alone, waits longer (`SAELAB_DIST_WAIT`, default 6 hours).
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from saelab.errors import ConfigError

T = TypeVar("T")

TIMEOUT_ENV = "SAELAB_DIST_TIMEOUT"
"""The environment variable that sets the collectives' timeout in seconds."""
DEFAULT_TIMEOUT_S = 300
WAIT_ENV = "SAELAB_DIST_WAIT"
"""The environment variable that sets how long `wait_for_main` waits for rank 0, in seconds."""
DEFAULT_WAIT_S = 6 * 3600

_patient: Any = None  # a gloo group with the long `wait_for_main` timeout, made by `init`


@dataclass(frozen=True)
class Ranks:
    """Where this process stands among the ranks of a run."""

    rank: int
    """This process's global rank, 0..world-1."""
    world: int
    """How many ranks the run has (1 without torchrun)."""
    local_rank: int
    """This process's rank on its own machine (which local GPU it uses)."""

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one that prints progress and writes attributes and results."""
        return self.rank == 0

    @property
    def many(self) -> bool:
        """Whether there is more than one rank."""
        return self.world > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={value!r} is not an integer; torchrun sets it, unset it"
        ) from None


def launched() -> Ranks:
    """The ranks torchrun's environment describes (rank 0 of 1 without torchrun)."""
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} do not describe a rank; launch with torchrun")
    return Ranks(rank=rank, world=world, local_rank=local)


def ranks() -> Ranks:
    """This process's `Ranks`: those of the joined process group, else torchrun's environment's."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=_env_int("LOCAL_RANK", 0))
    return launched()


def timeout(name: str = TIMEOUT_ENV, default: int = DEFAULT_TIMEOUT_S) -> timedelta:
    """The collectives' timeout (`SAELAB_DIST_TIMEOUT` seconds, default 300), or another such setting."""
    seconds = _env_int(name, default)
    if seconds <= 0:
        raise ConfigError(f"{name}={seconds} must be a positive number of seconds")
    return timedelta(seconds=seconds)


def init() -> Ranks:
    """Join torchrun's process group once (NCCL with CUDA, gloo on the CPU); a no-op for a single process.

    On CUDA each rank is pinned to its local GPU (`LOCAL_RANK`), so `device: auto` means that GPU."""
    here = launched()
    if not here.many or dist.is_initialized():
        return ranks()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(here.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timeout())
    global _patient
    _patient = dist.new_group(backend="gloo", timeout=timeout(WAIT_ENV, DEFAULT_WAIT_S))
    atexit.register(shutdown)
    return ranks()


def local_device(device: str = "auto") -> torch.device:
    """`device` for this rank: `auto` is this rank's local GPU when CUDA is present (the GPU `LOCAL_RANK` names),
    the CPU otherwise; anything else as given."""
    if device != "auto":
        return torch.device(device)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", ranks().local_rank % torch.cuda.device_count())


def barrier() -> None:
    """Wait for every rank (nothing to wait for on one)."""
    if ranks().many:
        dist.barrier()


def wait_for_main() -> None:
    """Wait for every rank while rank 0 does work alone (writing an analysis, evaluating): a barrier whose timeout
    is `SAELAB_DIST_WAIT` seconds (default 6 hours), not the collectives' short one."""
    if ranks().many:
        dist.barrier(group=_patient)


def gather_objects(obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order, on every rank; `[obj]` on one rank."""
    if not ranks().many:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (the others' argument is ignored)."""
    if not ranks().many:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (the same shape on each), in rank order; `[tensor]` on one rank."""
    if not ranks().many:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks in place and return it (unchanged on one rank)."""
    if ranks().many:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shutdown() -> None:
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
