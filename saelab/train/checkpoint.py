"""Exact resume state of a training run: every SAE's weights and optimiser state, in `RUN/saes/checkpoint/`.

```
checkpoint/latest.json                          {"step": N, "folder": "step-N", "stopped": {KEY: reason}}
checkpoint/step-<N>/<hook>/<variant>.safetensors   `sae.*` weights, `opt.<param>.*` optimiser state and
                                                `group.<i>.<name>` its param groups' scalars (step counts, sums)
```

A schedule-free optimiser's (`TrainConfig.optimizer`) `sae.*` weights are its averaged (eval-mode) ones, as the saved
SAEs; a resume puts its training weights back from them and its `z` state, as the uninterrupted run does after
writing the checkpoint, so the two continue from the same weights.

A new step folder is written in full before `latest.json` points at it, so a run killed at any moment
resumes from the last complete checkpoint. Under torchrun each SAE's file is written by the rank that writes its
files (`Trainer.writes`) and rank 0 points `latest.json` at the folder once every rank has written its part. The
state is per SAE and the same whatever the rank count or `parallel` mode, so a run resumes with any of them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from saelab import distributed
from saelab.errors import TrainError
from saelab.train.optim import eval_weights, train_weights

if TYPE_CHECKING:
    from saelab.train.trainer import Member

LATEST = "latest.json"
DTYPES = {bool: torch.bool, int: torch.int64, float: torch.float64}
"""How a param group's scalars are stored (exactly: a float64 holds a Python float)."""
SUFFIX = ".safetensors"


def _shapes(path: Path) -> dict[str, list[int]]:
    """The shape of each SAE tensor in a member's checkpoint file, read from its header."""
    with safe_open(str(path), framework="pt") as f:
        return {key[4:]: list(f.get_slice(key).get_shape()) for key in f.keys() if key.startswith("sae.")}


def _latest(folder: Path) -> dict[str, Any] | None:
    latest = folder / LATEST
    return json.loads(latest.read_text()) if latest.exists() else None


def check_checkpoint(
    folder: Path, members: Sequence[Member], *, keys: Sequence[str] | None = None, train_config: Path
) -> None:
    """`TrainError` if the checkpoint in `folder` holds other SAEs than `keys` (every SAE of the config; default:
    those of `members`), or if one of `members` (those this rank trains) has other shapes there.

    Reads only file headers: nothing is written, so the checkpoint is left as it is.
    """
    info = _latest(folder)
    if info is None:
        return
    step = folder / info["folder"]
    saved = {p.relative_to(step).as_posix().removesuffix(SUFFIX): p for p in sorted(step.glob(f"*/*{SUFFIX}"))}
    wanted = {m.key: m for m in members}
    every = list(wanted) if keys is None else list(keys)
    problems = []
    if sorted(saved) != sorted(every):
        problems.append(f"it holds {', '.join(saved) or 'no SAE'}; this config trains {', '.join(every)}")
    else:
        for key, member in wanted.items():
            here = {name: list(t.shape) for name, t in member.sae.state_dict().items()}
            there = _shapes(saved[key])
            differ = [
                f"{name} {there.get(name)} there, {shape} here"
                for name, shape in here.items()
                if there.get(name) != shape
            ]
            if differ:
                problems.append(f"{key} has other shapes ({'; '.join(differ)})")
    if problems:
        raise TrainError(
            f"the checkpoint in {folder} was made for other SAEs: {'; '.join(problems)}. Use a new `run` folder "
            f"for these SAEs, or resume with the config that made the checkpoint ({train_config})"
        )


def save_checkpoint(folder: Path, members: Sequence[Member], step: int) -> None:
    """Write the exact state of `members` (the SAEs whose files this rank writes) into a new step folder, then, once
    every rank has, point `latest.json` at it (rank 0)."""
    step_folder = folder / f"step-{step}"
    for m in members:
        eval_weights(m.opt)  # a schedule-free optimiser's average: the weights a resume and the saved SAE start from
        tensors = {f"sae.{k}": v for k, v in m.sae.state_dict().items()}
        opt_state = m.opt.state_dict()
        for pid, state in opt_state["state"].items():
            tensors |= {f"opt.{pid}.{k}": v for k, v in state.items()}
        for i, group in enumerate(opt_state["param_groups"]):
            tensors |= {
                f"group.{i}.{k}": torch.tensor(v, dtype=DTYPES[type(v)]) for k, v in group.items() if type(v) in DTYPES
            }
        path = step_folder / f"{m.key}{SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
        train_weights(m.opt)
    stopped = {m.key: m.stopped for m in members if m.stopped}
    if distributed.ranks().many:  # also waits for every rank's files
        stopped = {key: why for part in distributed.gather_objects(stopped) for key, why in part.items()}
    if distributed.ranks().main:
        latest = {"step": step, "folder": step_folder.name, "stopped": stopped}
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{LATEST}.tmp"
        tmp.write_text(json.dumps(latest))
        os.replace(tmp, folder / LATEST)
        for old in folder.glob("step-*"):
            if old != step_folder:
                shutil.rmtree(old)
    distributed.barrier()  # no rank writes the next step folder while rank 0 removes the old ones


def load_checkpoint(folder: Path, members: Sequence[Member], device: torch.device) -> int:
    """Restore the latest checkpoint in `folder` if there is one; return the step to continue from."""
    info = _latest(folder)
    if info is None:
        return 0
    step_folder = folder / info["folder"]
    for m in members:
        tensors = load_file(str(step_folder / f"{m.key}{SUFFIX}"), device=str(device))
        eval_weights(m.opt)  # a fresh optimiser's weights are the saved average: a schedule-free one is told so
        m.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        opt_state = m.opt.state_dict()
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                opt_state["state"].setdefault(int(pid), {})[name] = value
            elif key.startswith("group."):
                _, i, name = key.split(".", 2)
                opt_state["param_groups"][int(i)][name] = value.item()
        m.opt.load_state_dict(opt_state)
        train_weights(m.opt)
        m.stopped = info["stopped"].get(m.key)
    return int(info["step"])
