"""Exact resume state of a training run: every SAE's weights and optimiser state, in `RUN/saes/checkpoint/`.

```
checkpoint/latest.json                          {"step": N, "folder": "step-N", "stopped": {KEY: reason}}
checkpoint/step-<N>/<hook>/<variant>.safetensors   `sae.*` weights and `opt.<param>.*` Adam state
```

A new step folder is written in full before `latest.json` points at it, so a run killed at any moment
resumes from the last complete checkpoint.
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

from saelab.errors import TrainError

if TYPE_CHECKING:
    from saelab.train.trainer import Member

LATEST = "latest.json"
SUFFIX = ".safetensors"


def _shapes(path: Path) -> dict[str, list[int]]:
    """The shape of each SAE tensor in a member's checkpoint file, read from its header."""
    with safe_open(str(path), framework="pt") as f:
        return {key[4:]: list(f.get_slice(key).get_shape()) for key in f.keys() if key.startswith("sae.")}


def _latest(folder: Path) -> dict[str, Any] | None:
    latest = folder / LATEST
    return json.loads(latest.read_text()) if latest.exists() else None


def check_checkpoint(folder: Path, members: Sequence[Member], *, train_config: Path) -> None:
    """`TrainError` if the checkpoint in `folder` holds other SAEs than `members` (names or shapes differ).

    Reads only file headers: nothing is written, so the checkpoint is left as it is.
    """
    info = _latest(folder)
    if info is None:
        return
    step = folder / info["folder"]
    saved = {p.relative_to(step).as_posix().removesuffix(SUFFIX): p for p in sorted(step.glob(f"*/*{SUFFIX}"))}
    wanted = {m.key: m for m in members}
    problems = []
    if saved.keys() != wanted.keys():
        problems.append(f"it holds {', '.join(saved) or 'no SAE'}; this config trains {', '.join(wanted)}")
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
    """Write every SAE's exact state into a new step folder, then point `latest.json` at it."""
    step_folder = folder / f"step-{step}"
    for m in members:
        tensors = {f"sae.{k}": v for k, v in m.sae.state_dict().items()}
        for pid, state in m.opt.state_dict()["state"].items():
            tensors |= {f"opt.{pid}.{k}": v for k, v in state.items()}
        path = step_folder / f"{m.key}{SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    latest = {"step": step, "folder": step_folder.name, "stopped": {m.key: m.stopped for m in members if m.stopped}}
    tmp = folder / f"{LATEST}.tmp"
    tmp.write_text(json.dumps(latest))
    os.replace(tmp, folder / LATEST)
    for old in folder.glob("step-*"):
        if old != step_folder:
            shutil.rmtree(old)


def load_checkpoint(folder: Path, members: Sequence[Member], device: torch.device) -> int:
    """Restore the latest checkpoint in `folder` if there is one; return the step to continue from."""
    info = _latest(folder)
    if info is None:
        return 0
    step_folder = folder / info["folder"]
    for m in members:
        tensors = load_file(str(step_folder / f"{m.key}{SUFFIX}"), device=str(device))
        m.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
        opt_state = m.opt.state_dict()
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, pid, name = key.split(".", 2)
                opt_state["state"].setdefault(int(pid), {})[name] = value
        m.opt.load_state_dict(opt_state)
        m.stopped = info["stopped"].get(m.key)
    return int(info["step"])
