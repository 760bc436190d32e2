"""`saelab heads CONFIG`: a YAML file naming the model, the run to write into and the task's positive prompts with
their negatives (`HeadCircuitConfig`), and `run_head_circuit`, which finds the task's head circuit by discrete codes
next to activation patching (`saelab.heads.discrete.head_circuit`) and writes it to `RUN/heads/<name>.json`."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Literal

from pydantic import Field

from saelab.circuits.tasks import MetricName, Prompt
from saelab.config import StrictModel
from saelab.errors import HeadsError
from saelab.heads.discrete import DiscreteConfig, HeadCircuit, contrast_task, head_circuit
from saelab.models import load_model
from saelab.run import RunDir


class HeadCircuitConfig(StrictModel):
    """What `saelab heads CONFIG` computes: the model, the run, the prompts (`clean` the positive prompt, `patch` its
    negative of the same token length, `target`/`distractor` what the patching metric reads) and the method's
    settings (`DiscreteConfig`'s fields)."""

    model: str
    run: str
    name: str = Field(default="head_circuit", pattern=r"^[A-Za-z0-9_.-]+$")
    device: str = "auto"
    metric: MetricName = "logit_diff"
    prompts: list[Prompt] = Field(min_length=1)
    n_codes: int = Field(default=200, ge=2)
    steps: int = Field(default=500, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    l1: float = Field(default=0.02, ge=0)
    train_prompts: int = Field(default=10, ge=1)
    position: Literal["mean", "last"] = "mean"
    normalise: bool = False
    threshold: float = Field(default=0.5, gt=0, le=1)
    seed: int = 0
    permutations: int = Field(default=1000, ge=0)

    def discrete(self) -> DiscreteConfig:
        """The method's settings."""
        fields = asdict(DiscreteConfig())
        return DiscreteConfig(**{key: getattr(self, key) for key in fields})


def run_head_circuit(cfg: HeadCircuitConfig) -> tuple[HeadCircuit, Path]:
    """Load the model, build the task from the prompts, find its head circuit and write it to
    `<run>/heads/<name>.json`; return both."""
    from transformer_lens import HookedTransformer

    model = load_model(cfg.model, device=cfg.device)
    if not isinstance(model, HookedTransformer):
        raise HeadsError(f"{cfg.model!r} loads as a {type(model).__name__}; head circuits need a decoder's heads")
    found = head_circuit(model, contrast_task(model, cfg.prompts, cfg.metric), cfg.discrete())
    found.config = cfg.model_dump(mode="json")
    run = RunDir(cfg.run)
    run.prepare()
    return found, found.save(run.heads(cfg.name))


def head_circuits(run_dir: str | Path) -> list[Path]:
    """The head circuits written into the run (`RUN/heads/*.json` files of `HeadCircuit`s), by name."""
    import json

    folder = RunDir(run_dir).heads("x").parent
    found = []
    for path in sorted(folder.glob("*.json")):
        try:
            if "discrete_seconds" in json.loads(path.read_text()):
                found.append(path)
        except ValueError:  # not JSON: not a head circuit (the heads page reports the others' errors)
            continue
    return found
