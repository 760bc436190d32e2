"""What `saelab circuit` computes (`CircuitConfig`: the builtin `induction` task or prompts) and `run_circuit`,
which loads the model and SAEs, finds the circuit and writes it to `RUN/circuits/<name>.json`.

The config is checked without touching the filesystem, so it can be built anywhere; `run_circuit` checks that
the SAE folders and the prompts file exist."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

from pydantic import Field, model_validator

from saelab.circuits.graph import Circuit, find_circuit
from saelab.circuits.groups import PositionGroups, grouping
from saelab.circuits.nodes import Aggregation, Method
from saelab.circuits.splice import Baseline
from saelab.circuits.tasks import MetricName, Prompt, induction_task, prompt_task
from saelab.config import StrictModel
from saelab.dictionaries import SAE
from saelab.errors import CircuitError, MissingError, RunError
from saelab.models import device_of, load_model
from saelab.run import RunDir


class InductionData(StrictModel):
    """The builtin induction task (`induction_task`): `examples` sequences BOS + R + R, read at `position`."""

    task: Literal["induction"] = "induction"
    examples: int = Field(default=8, ge=2)
    length: int = Field(default=10, ge=2)
    position: int | None = Field(default=None, ge=0)
    seed: int = 0
    held_out: int = Field(default=64, ge=0)
    """Fresh sequences (seed `seed + 1`) on which the circuit's faithfulness is measured too; 0 for none."""


class PromptData(StrictModel):
    """Prompts given inline (`prompts`) or as a JSON-lines file of the same fields (`file`)."""

    task: Literal["prompts"] = "prompts"
    prompts: list[Prompt] = []
    file: str | None = None
    held_out: list[Prompt] = []
    """Prompts kept apart (same token length) on which the circuit's faithfulness is measured too."""

    @model_validator(mode="after")
    def _one_source(self) -> PromptData:
        if bool(self.prompts) == bool(self.file):
            raise ValueError("give either `prompts` (a list) or `file` (a .jsonl of prompts), not both or neither")
        return self

    def load(self) -> list[Prompt]:
        """The prompts; `MissingError` when the file does not exist, `CircuitError` for a line that is no prompt."""
        if not self.file:
            return self.prompts
        path = Path(self.file)
        if not path.is_file():
            raise MissingError(f"no prompts file {self.file!r}; give an existing .jsonl file as `data.file`")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise CircuitError(f"{self.file} is not UTF-8 text ({err.reason}); save the prompts as UTF-8") from None
        prompts = []
        for number, line in enumerate(lines, 1):
            try:
                prompts += [Prompt(**json.loads(line))] if line.strip() else []
            except (ValueError, TypeError) as err:
                raise CircuitError(
                    f"{self.file} line {number} is not a prompt ({err}); each line must be a JSON "
                    "object with clean, and optionally patch, target, distractor, position"
                ) from None
        return prompts


class CircuitConfig(StrictModel):
    """What `saelab circuit` computes: a circuit of `saes` in `model` for a task, written to
    `<run>/circuits/<name>.json`. Each SAE is given by its folder, or by its variant name in the run
    (`<run>/saes/<hook>/<variant>`). A transcoder replaces its MLP: key it by the MLP output it writes
    (`blocks.L.hook_mlp_out: transcoder-...`); its nodes are its latents and the MLP output minus its own."""

    renamed: ClassVar[dict[str, str]] = {"out": "run"}
    name: str = Field(default="circuit", pattern=r"^[\w.-]+$")
    run: str
    model: str
    saes: dict[str, str]
    data: Union[InductionData, PromptData] = Field(discriminator="task")
    metric: MetricName = "logit"
    method: Method = "ig"
    ig_steps: int = Field(default=10, ge=1)
    baseline: Baseline = "patch"
    aggregation: Aggregation = "none"
    node_threshold: float = Field(default=0.05, ge=0)
    edge_threshold: float = Field(default=0.02, ge=0)
    max_nodes: int = Field(default=100, ge=1)
    curve_sizes: list[Annotated[int, Field(ge=0)]] | None = None
    group_latents: Literal["node", "head"] | None = None
    """Also find a circuit of group nodes, latents grouped by head (or kept one by one); None for none. Families
    need `saelab.circuits.groups.grouping(..., families=...)` in Python."""
    group_positions: PositionGroups = "position"
    """How the grouped circuit merges positions: one by one, by the task's roles, or all together."""
    max_groups: int = Field(default=32, ge=1)
    """The grouped circuit's most group nodes."""
    check_estimates: bool = False
    """Report attribution patching's and integrated gradients' agreement with exact patching."""
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> CircuitConfig:
        if not self.saes:
            raise ValueError(
                "give at least one SAE: saes: {blocks.0.attn.hook_z: RUN/saes/blocks.0.attn.hook_z/VARIANT}"
            )
        if isinstance(self.data, InductionData) and self.metric not in ("logit", "loss"):
            raise ValueError(f"the induction task scores a target token: use metric logit or loss, not {self.metric!r}")
        return self


FIND_OPTIONS = (
    "method",
    "ig_steps",
    "baseline",
    "aggregation",
    "node_threshold",
    "edge_threshold",
    "max_nodes",
    "curve_sizes",
    "name",
    "max_groups",
    "check_estimates",
)
"""The `CircuitConfig` keys that `find_circuit` takes as options of the same name."""


def _in_run(run: RunDir, hook: str, given: str) -> Path | None:
    """The folder of SAE variant `given` at `hook` in `run`, if `given` is a name that the run holds."""
    try:
        folder = run.sae(hook, given)
    except RunError:
        return None
    return folder if folder.is_dir() else None


def sae_folders(cfg: CircuitConfig) -> dict[str, Path]:
    """Each SAE's folder: the path given, or the run's SAE of that variant name (a transcoder's, keyed by its
    `blocks.L.hook_mlp_out`, under `blocks.L.hook_mlp_in`); `MissingError` naming the ones that are neither."""
    run = RunDir(cfg.run)
    folders = {
        # a transcoder, keyed by the MLP output it writes, is saved under the MLP input it reads
        h: Path(p)
        if Path(p).is_dir()
        else _in_run(run, h, p) or _in_run(run, h.replace("hook_mlp_out", "hook_mlp_in"), p)
        for h, p in cfg.saes.items()
    }
    missing = [cfg.saes[h] for h, f in folders.items() if f is None]
    if missing:
        known = ", ".join(f"{s.hook}/{s.variant}" for s in run.saes()) or "none"
        raise MissingError(
            f"no SAE folder {missing}; give folders with cfg.json and sae_weights.safetensors, or the variant "
            f"name of one of the run's SAEs (the run {run.root} has: {known})"
        )
    return {h: f for h, f in folders.items() if f is not None}


def run_circuit(cfg: CircuitConfig, progress: bool = True) -> tuple[Circuit, Path]:
    """Load the model and SAEs, find the circuit, write it to `<run>/circuits/<name>.json`; return both."""
    run = RunDir(cfg.run)
    folders = sae_folders(cfg)
    prompts = cfg.data.load() if isinstance(cfg.data, PromptData) else []
    model = load_model(cfg.model, device=cfg.device)
    device = device_of(model)
    saes = {h: SAE.load(f, device=device).eval() for h, f in folders.items()}
    if isinstance(cfg.data, InductionData):
        data, metric = cfg.data, cfg.metric
        assert metric in ("logit", "loss")  # the config's validator refuses the others for this task
        task = induction_task(model, data.examples, data.length, position=data.position, seed=data.seed, metric=metric)
        held_out = None
        if data.held_out:
            held_out = induction_task(
                model, data.held_out, data.length, position=data.position, seed=data.seed + 1, metric=metric
            )
    else:
        task = prompt_task(model, prompts, cfg.metric)
        held_out = prompt_task(model, cfg.data.held_out, cfg.metric) if cfg.data.held_out else None
    groups = None
    if cfg.group_latents is not None:
        groups = grouping(model, saes, task, latents=cfg.group_latents, positions=cfg.group_positions)
    run.prepare()
    options = {key: getattr(cfg, key) for key in FIND_OPTIONS}
    paths = {h: run.relative(f) for h, f in folders.items()}
    circuit = find_circuit(
        model, saes, task, **options, sae_paths=paths, held_out=held_out, groups=groups, progress=progress
    )
    circuit.config = cfg.model_dump(mode="json")
    return circuit, circuit.save(run.circuit(cfg.name))
