"""What a training run trains: the sweep `Grid`, `TrainConfig`, the default learning rate and its schedule.

Every field is range-checked where it is declared, so a bad value is a `ConfigError` naming its key before
anything runs; validation touches no file, and `identity` only looks paths up to record them.
"""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from saelab.config import StrictModel
from saelab.dictionaries import Arch
from saelab.dictionaries.transcoder import mlp_layer
from saelab.run import RunDir, is_local, is_url
from saelab.train.optim import OptimizerName, signum_lr

PositiveInt = Annotated[int, Field(gt=0)]
LearningRate = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Grid(StrictModel):
    """The sweep grid: every combination is one SAE per hook point."""

    arch: list[Arch] = Field(default=["topk"], min_length=1)
    """Architectures: `topk`, `batchtopk`, `jumprelu`, `relu`, `icfl` (batched-OMP codes, Donhauser et al. 2025)."""
    k: list[PositiveInt] = Field(default=[32], min_length=1)
    """Active latents per token (`batchtopk`: on average)."""
    expansion: list[PositiveInt] = Field(default=[16], min_length=1)
    """Dictionary widths as multiples of the hook point's dimension."""
    lr: list[LearningRate] | None = Field(default=None, min_length=1)
    """Learning rates (> 0); `None`: `default_lr(width, d_in=..., steps=...)`: Gao et al.'s 2e-4 / sqrt(width / 2^14),
    or 20 / (max(steps, 100) * sqrt(d_in)) where that is higher (short runs)."""
    seed: list[Annotated[int, Field(ge=0)]] | None = Field(default=None, min_length=1)
    """Initialisation seeds: one SAE per seed (times every other axis), all trained on the same batches (whose order
    `TrainConfig.seed` decides), their variant names ending in `-s<seed>`; `None`: one SAE per combination, initialised
    from `TrainConfig.seed`, named as before seeds were a grid axis."""


class TranscoderPair(StrictModel):
    """One MLP that transcoders replace: every grid point trains a transcoder from `input` to `output`."""

    input: str
    """The MLP's input hook point, `blocks.L.hook_mlp_in` (what the MLP reads: `saelab.models.HOOK_KINDS`)."""
    output: str
    """The same MLP's output, `blocks.L.hook_mlp_out`."""
    skip: bool = False
    """A skip transcoder (Paulo et al. 2025): a linear skip `W_skip` added to the sparse output."""

    @model_validator(mode="after")
    def _one_mlp(self) -> TranscoderPair:
        mlp_layer(self.input, self.output)  # a ConfigError naming the pair to give
        return self


class CrossCoderSpec(StrictModel):
    """One crosscoder: every grid point (`k`, `expansion`, `lr`, `seed`; not `arch`) trains one over `sources`."""

    sources: list[str] = Field(min_length=2)
    """The store's arrays it reads and writes, in order, all of one width: several hook points of one model
    (`blocks.1.hook_resid_post`, `blocks.2.hook_resid_post`) or one hook point in several models
    (`base/blocks.1.hook_resid_post`, `tuned/blocks.1.hook_resid_post`)."""
    arch: Literal["topk", "batchtopk"] = "batchtopk"
    """Its activation: `topk` (the k highest latents of each row) or `batchtopk` (Minder et al.'s choice)."""

    @field_validator("sources")
    @classmethod
    def _distinct(cls, sources: list[str]) -> list[str]:
        if len(set(sources)) != len(sources):
            raise ValueError(f"sources {sources} name one array twice; give each source once")
        return sources


class TrainConfig(StrictModel):
    """What to train, on what, for how long."""

    store: str | None = None
    """The activation store (path or fsspec URL); `None`: the run's own store (`RunDir(run).store`)."""
    whiten_store: str | None = None
    """With `sae: {whiten: true}`: the control store whose activations give the PCA whitening statistics (it must hold
    the trained hook points at the same widths), as Donhauser et al. whiten with control data; `None`: the training
    store."""
    run: str
    """The run folder: the SAEs go to `RUN/saes/`."""
    hooks: list[str] | None = None
    """Hook points to train SAEs on; `None` (or empty): every hook point of the store, or none when `transcoders` or
    `crosscoders` are given."""
    transcoders: list[TranscoderPair] = []
    """MLPs to train transcoders of (`{input: blocks.L.hook_mlp_in, output: blocks.L.hook_mlp_out, skip: false}`), each
    at every grid point; saved under their input hook, as variants `transcoder-...` (`skiptranscoder-...`)."""
    crosscoders: list[CrossCoderSpec] = []
    """Crosscoders to train (`{sources: [a, b], arch: batchtopk}`), each at every grid point; saved under their first
    source, as variants `crosscoder-<arch>-...`. The `sae` fields that a crosscoder has (`dead_tokens`, `aux_k`,
    `aux_coef`, `threshold_lr`, `dtype`) apply to it too."""
    grid: Grid = Grid()
    """The sweep grid."""
    sae: dict[str, Any] = {}
    """Further `SAEConfig` fields, the same for every SAE (e.g. `dead_tokens`, `l1_coef`)."""
    tokens: int = Field(default=5_000_000, gt=0)
    """Training tokens per SAE; at least one batch."""
    batch_size: int = Field(default=4096, gt=0)
    """Rows per step, shared by every SAE."""
    eval_rows: int = Field(default=16_384, gt=0)
    """Rows at the end of the store held out for the metrics."""
    optimizer: OptimizerName = "adam"
    """`adam`: Adam with warmup and a linear decay (`decay_start`); `signum_sf`: sparsify's default, sign descent in
    a schedule-free wrapper (momentum 0.95; default rate 5e-3 / sqrt(width / 2^14)); `adamw_sf`: schedule-free AdamW
    (default rate `default_lr`'s). Schedule-free ones warm up and do not decay, and what they save, checkpoint and
    evaluate is their averaged (eval-mode) weights (`saelab.train.optim`)."""
    warmup_steps: int = Field(default=100, ge=0)
    """Steps of linear learning-rate warmup."""
    decay_start: float = Field(default=0.8, ge=0, le=1)
    """Fraction of training after which the learning rate decays linearly to zero (`adam`; schedule-free optimisers
    do not decay)."""
    seed: int = Field(default=0, ge=0)
    """Seeds the batch order (and the sample that sets each SAE's input scale), and the SAEs' initialisation unless
    `grid.seed` gives each its own."""
    checkpoint_every: int = Field(default=1_000_000, gt=0)
    """Tokens between checkpoints."""
    log_every: int = Field(default=20, gt=0)
    """Steps between progress updates (and logger points)."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda`, `cuda:N`; under torchrun `auto` is each rank's own GPU (`LOCAL_RANK`)."""
    parallel: Literal["auto", "members", "ddp"] = "auto"
    """How the ranks of a torchrun launch share the work (one process: ignored). `members`: the SAEs are dealt out to
    the ranks in turn, every rank reads the same batches and trains, checkpoints and saves only its own, with weights
    identical to one process's. `ddp`: every rank trains every SAE on its contiguous slice of each batch, and the
    gradients, the loss's denominators, the dead-latent counters and BatchTopK's selection are those of the whole
    batch, so the weights equal one process's up to float summation order. `auto`: `members` when there are at
    least as many SAEs as ranks (no rank idles and nothing is communicated per step), `ddp` otherwise. Either resumes
    from a checkpoint written with any rank count or mode (both write the same per-SAE state)."""
    logger: Literal["none", "tensorboard", "wandb"] = "none"
    """Where the running metrics go besides the progress bar."""
    model: str | None = None
    """The model for CE loss recovered and KL; default: the store's model if it is a decoder; `none`: skip."""
    ce_contexts: int = Field(default=16, ge=0)
    """Contexts for the spliced metrics; 0 skips them."""

    @model_validator(mode="after")
    def _whiten_store_whitens(self) -> TrainConfig:
        if self.whiten_store is not None and not self.sae.get("whiten"):
            raise ValueError(
                "`whiten_store` gives whitening statistics, but no SAE whitens; set `sae: {whiten: true}` or drop "
                "`whiten_store`"
            )
        return self

    @field_validator("batch_size")
    @classmethod
    def _one_batch_at_least(cls, batch_size: int, info: ValidationInfo) -> int:
        tokens = info.data.get("tokens")  # declared before `batch_size`; absent when it was refused itself
        if tokens is not None and tokens < batch_size:
            raise ValueError(
                f"one batch is more than `tokens` ({tokens}), so nothing would be trained; "
                "raise `tokens` or lower `batch_size`"
            )
        return batch_size

    @property
    def total_steps(self) -> int:
        """Training steps per SAE: `tokens // batch_size`."""
        return self.tokens // self.batch_size

    @property
    def checkpoint_steps(self) -> int:
        """Steps between checkpoints: `checkpoint_every // batch_size`, at least 1."""
        return max(1, self.checkpoint_every // self.batch_size)

    def peak_lr(self, width: int, *, d_in: int, lr: float | None = None) -> float:
        """The peak learning rate of an SAE of `width` latents over `d_in` dimensions: `lr` as given (a `grid.lr`
        entry), or `None`: `default_lr` for that width and `d_in` and this run's `total_steps` (`signum_sf`:
        `signum_lr(width)`)."""
        if lr is not None:
            return lr
        if self.optimizer == "signum_sf":
            return signum_lr(width)
        return default_lr(width, d_in=d_in, steps=self.total_steps)

    @property
    def store_path(self) -> str:
        """The store to train on: `store`, or the run's own `activations.zarr`."""
        return self.store if self.store is not None else str(RunDir(self.run).store)

    def identity(self) -> dict[str, Any]:
        """What decides the trained SAEs (saved as `train_config.json`; a resume must match it).

        Where the run is does not decide them, so `run` is left out, and the store (and `model` when it is a local
        folder) is recorded as a run records every path (`RunDir.relative`): the run's own store as
        `activations.zarr`, so the same config resumes a moved run, or from another working directory."""
        run = RunDir(self.run)
        identity = self.model_dump(mode="json", exclude={"device", "log_every", "logger", "parallel", "run"})
        identity["store"] = run.relative(self.store_path)  # in place: the saved file keeps its key order
        if self.grid.seed is None:  # as runs saved before `grid.seed` existed record it, so that they resume
            del identity["grid"]["seed"]
        if self.model is not None and is_local(self.model):
            identity["model"] = run.relative(self.model)
        if not self.transcoders:  # as runs saved before transcoders existed record it, so that they resume
            del identity["transcoders"]
        if not self.crosscoders:  # as runs saved before crosscoders existed record it, so that they resume
            del identity["crosscoders"]
        if self.optimizer == "adam":  # as runs saved before `optimizer` existed record it, so that they resume
            del identity["optimizer"]
        if self.whiten_store is None:  # as runs saved before `whiten_store` existed record it, so that they resume
            del identity["whiten_store"]
        else:
            identity["whiten_store"] = run.relative(self.whiten_store)
        return identity


def saved_identity(saved: dict[str, Any], run: RunDir) -> dict[str, Any]:
    """A `train_config.json` that `run` holds, in the form `TrainConfig.identity` gives today (the resume check).

    Files written before runs could move record `run`, and the store and `model` as they were given then (absolute
    or relative to where training ran). A path that lay inside the `run` recorded beside it (the run's own store
    above all) is that path inside the run, wherever the run is now; another store or model folder is recorded
    absolute, as today. So an old run resumes after a move even though its recorded store path now points nowhere."""
    if "run" not in saved:
        return saved
    then = PurePath(saved["run"])
    upgraded = {key: value for key, value in saved.items() if key != "run"}
    for key in ("store", "model"):
        value = upgraded.get(key)
        if not isinstance(value, str) or is_url(value):
            continue
        if PurePath(value).is_relative_to(then):
            upgraded[key] = PurePath(value).relative_to(then).as_posix()
        elif key == "store" or is_local(value):
            upgraded[key] = run.relative(value)
    return upgraded


SHORT_RUN_LR = 20.0
"""`default_lr`'s floor is this over `steps * sqrt(d_in)`. On MiniLM's residual (d_in 384, width 1536, k 16) the best
rate is ~0.003-0.01 at 30 and 200 steps and 0.04 kills 85% of the latents; on the synthetic benchmark (d_in 96) the
best is ~8 / steps. 20 is the real model's side of both: `lr * steps` 1 at d_in 384, 2 at d_in 96."""

SHORT_RUN_MIN_STEPS = 100
"""Runs shorter than this get the floor of a run of this many steps (a 30-step run of the trainer tests' toy diverged
at 8 / 30)."""


def default_lr(width: int, *, d_in: int | None = None, steps: int | None = None) -> float:
    """The default peak learning rate of an SAE of `width` latents over `d_in` dimensions trained for `steps` steps:
    Gao et al.'s rule 2e-4 / sqrt(width / 2^14) (sparsify's Adam default), raised to
    `SHORT_RUN_LR / (max(steps, SHORT_RUN_MIN_STEPS) * sqrt(d_in))` where that is higher.

    Gao et al. tuned their rule on long runs; at the budgets of a first experiment it learns almost nothing (the
    sweep of `scripts/bench_sample_efficiency.py --gao-multiples`: 0% of the true directions recovered in 0.5M tokens
    at 3x their rate, 45% at 100x). The floor keeps `lr * steps`, how far Adam can move the unit-norm decoder rows
    in the run, fixed, and gives way to Gao et al.'s rule once the run is long (width 1536, d_in 384: from about
    1,600 steps). It falls with `sqrt(d_in)`: Adam moves every weight by about `lr` a step and a unit-norm row's
    entries are about `1 / sqrt(d_in)`. The constant is set by a real model, not the synthetic sweep: on MiniLM's
    `blocks.1.hook_resid_post` (width 1536, k 16, batches of 512) 30 steps at 0.04 leave 85% of the latents dead on
    held-out rows (FVU 0.54), at 0.01 0.8% (FVU 0.44), at Gao's 6.5e-4 FVU 0.65; 200 steps at 0.02 leave 68% dead,
    at 0.003 7% (FVU 0.245). On the synthetic benchmark, whose Zipf-rare features want more, the best is ~4x higher.
    `steps=None` (or `d_in=None`): Gao et al.'s rule alone."""
    gao = 2e-4 / math.sqrt(width / 2**14)
    if steps is None or d_in is None:
        return gao
    return max(gao, SHORT_RUN_LR / (max(steps, SHORT_RUN_MIN_STEPS) * math.sqrt(d_in)))


def lr_factor(step: int, total: int, *, warmup: int, decay_start: float) -> float:
    """Linear warmup, constant, then linear decay to zero over the last (1 - decay_start) of training."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    start = int(decay_start * total)
    decay = 1.0 if step < start else max(0.0, (total - step) / max(total - start, 1))
    return warm * decay


def variant_name(arch: str, k: int, width: int, *, lr: float, seed: int | None = None) -> str:
    """The folder name of one SAE of the grid under its hook point's folder; `seed`: its `grid.seed` (`None` when the
    grid has no seeds, whose names end at the learning rate)."""
    return f"{arch}-k{k}-w{width}-lr{lr:.3g}" + ("" if seed is None else f"-s{seed}")
