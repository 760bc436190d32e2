"""Train many SAEs in one pass over an activation store: hook points x a sweep grid, sharing each batch, with the
config's transcoders and crosscoders at every grid point in the same pass.

What a run writes (paths from `saelab.run.RunDir`): each SAE in SAELens layout with its `metrics.json` under
`RUN/saes/<hook>/<variant>/` (the folder of an array `<alias>/<hook>` of a multi-model store, and of a crosscoder's
first source, is `array_folder`'s: `<alias>__<hook>`), the exact resume state in `RUN/saes/checkpoint/`
(`saelab.train.checkpoint`) and the resolved config in `RUN/saes/train_config.json`.

Under torchrun the ranks share the work as `TrainConfig.parallel` says (`members` or `ddp`); rank 0 shows the
progress, logs and writes `train_config.json`, and each SAE's files are written by one rank: the one that trains it
(`members`), or rank 0 (`ddp`, where every rank holds the same weights).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, NamedTuple, cast

import torch
from pydantic import ValidationError
from tqdm.auto import tqdm

from saelab import distributed
from saelab.config import build, format_validation_error
from saelab.dictionaries import SAE, CrossCoder, CrossCoderConfig, SAEConfig, train_step
from saelab.dictionaries import crosscoder as crosscoders
from saelab.dictionaries.preprocessing import WHITENING_ROWS, Whitening, pca_whitening, whitening_sample
from saelab.dictionaries.transcoder import aligned_rows, transcoder_metrics
from saelab.errors import ConfigError, DistributedError, StoreError, TrainError
from saelab.models import is_encoder, load_model, locate
from saelab.run import RunDir, array_folder
from saelab.store import ActivationStore, split_array
from saelab.train.checkpoint import check_checkpoint, load_checkpoint, save_checkpoint
from saelab.train.config import (
    CrossCoderSpec,
    TrainConfig,
    TranscoderPair,
    lr_factor,
    saved_identity,
    variant_name,
)
from saelab.train.loggers import TrainLogger, make_logger
from saelab.train.metrics import (
    crosscoder_metrics,
    embedding_metrics,
    eval_tokens,
    reconstruction_metrics,
    spliced_metrics,
)
from saelab.train.optim import SCHEDULE_FREE, Optimizer, OptimizerName, eval_weights, make_optimizer
from saelab.train.result import TrainedSAE


@dataclass
class Member:
    """One dictionary being trained (an SAE, a transcoder or a crosscoder), with its optimiser and running metrics."""

    index: int
    """Its place among the config's SAEs (hook points x grid), the order `train` returns them in."""
    hook: str
    """Its folder under `RUN/saes/`: `array_folder` of the array it reads (a crosscoder's: of its first source)."""
    variant: str
    """Its folder name under the hook point's (`variant_name`)."""
    lr: float
    """Peak learning rate (the schedule scales it per step)."""
    seed: int
    """The seed of its initialisation (its `grid.seed`, or `TrainConfig.seed`)."""
    sae: SAE | CrossCoder
    """The SAE (or transcoder, or crosscoder)."""
    opt: Optimizer
    """Its optimiser (`TrainConfig.optimizer`)."""
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    """Running sums of the step metrics since the last log (on the device: no sync per step)."""
    window: int = 0
    """Steps summed in `sums`."""
    bad_step: torch.Tensor = field(default_factory=lambda: torch.full((), -1, dtype=torch.long))
    """First step whose loss was not finite (-1: none; on the training device), checked once per log interval."""
    stopped: str | None = None
    """Why it was stopped, if it was."""

    @property
    def key(self) -> str:
        """`hook/variant`, its name in checkpoints and loggers."""
        return f"{self.hook}/{self.variant}"

    @property
    def reads(self) -> list[str]:
        """The store's arrays whose row-aligned rows each step gives it (`aligned_rows`): an SAE's `[hook_name]`, a
        transcoder's `[hook_name, hook_name_out]`, a crosscoder's sources."""
        if isinstance(self.sae, CrossCoder):
            return self.sae.inputs
        cfg = self.sae.cfg
        return [cfg.hook_name] if cfg.d_out is None else [cfg.hook_name, cfg.hook_name_out]

    def inputs(self, batch: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """What its `step` (and `init_from_sample`) takes from one store batch (hook -> rows): an SAE's `[x]`, a
        transcoder's `[x, y]`, a crosscoder's `[x]` with its sources stacked `[rows, S, d_in]`."""
        rows = aligned_rows(batch, self.reads)
        return [torch.stack(rows, dim=1)] if isinstance(self.sae, CrossCoder) else rows

    @classmethod
    def create(
        cls,
        sae_cfg: SAEConfig | CrossCoderConfig,
        *,
        lr: float,
        seed: int,
        device: torch.device | str,
        index: int = 0,
        hook: str = "",
        variant: str = "",
        optimizer: OptimizerName = "adam",
    ) -> Member:
        """A fresh SAE (a `CrossCoderConfig`: crosscoder) seeded by `seed` alone (so its start does not depend on
        which SAEs share its rank or its pass) with its `optimizer` (`make_optimizer`) at peak learning rate `lr`."""
        torch.manual_seed(seed)
        if isinstance(sae_cfg, CrossCoderConfig):
            sae: SAE | CrossCoder = CrossCoder(sae_cfg, device=device)
        else:
            sae = SAE.from_config(sae_cfg, device=device)
        opt = make_optimizer(optimizer, sae.parameters(), lr=lr)
        return cls(index=index, hook=hook, variant=variant, lr=lr, seed=seed, sae=sae, opt=opt)

    def step(
        self, x: torch.Tensor, y: torch.Tensor | None = None, *, factor: float, refresh: bool
    ) -> dict[str, torch.Tensor]:
        """One training step on its batch `x` (a transcoder's: to its outputs `y`; a crosscoder's: its sources stacked,
        `inputs`; on the training device) at `factor` times its peak learning rate, refreshing an SAE's AuxK dead set
        first when `refresh` (the factor and refresh of `schedule`); bf16 autocast on CUDA. Returns `train_step`'s
        detached metrics."""
        for group in self.opt.param_groups:
            group["lr"] = self.lr * factor
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            if isinstance(self.sae, CrossCoder):
                return crosscoders.train_step(self.sae, self.opt, x)
            if refresh:
                self.sae.plan_aux()
            return train_step(self.sae, self.opt, x, y)


def schedule(cfg: TrainConfig, step: int, *, start: int = 0) -> tuple[float, bool]:
    """At training step `step` of a run that (re)started at `start`: the learning-rate factor (`lr_factor`) and
    whether AuxK's dead set is refreshed before the step. The refresh (one device sync) happens only at fixed steps,
    the start and every checkpoint included, so a resumed run refreshes exactly where an uninterrupted one did."""
    decay_start = 1.0 if cfg.optimizer in SCHEDULE_FREE else cfg.decay_start  # the average replaces the decay
    factor = lr_factor(step, cfg.total_steps, warmup=cfg.warmup_steps, decay_start=decay_start)
    return factor, step == start or step % cfg.log_every == 0 or step % cfg.checkpoint_steps == 0


class _Spec(NamedTuple):
    """One SAE of the config, before it is built."""

    hook: str
    """Its folder under `RUN/saes/`: `array_folder` of the array it reads (a crosscoder's: of its first source)."""
    cfg: SAEConfig | CrossCoderConfig
    """Its `SAEConfig` (a crosscoder's `CrossCoderConfig`)."""
    lr: float
    """Its peak learning rate."""
    seed: int | None
    """Its `grid.seed`; `None` when the grid has none (then `TrainConfig.seed` initialises it)."""

    @property
    def key(self) -> str:
        """`hook/variant`, as `Member.key` (a transcoder's variant starts `transcoder-` or `skiptranscoder-`, a
        crosscoder's `crosscoder-`)."""
        cfg = self.cfg
        return f"{self.hook}/{variant_name(kind_arch(cfg), cfg.k, cfg.d_sae, lr=self.lr, seed=self.seed)}"


def kind_arch(cfg: SAEConfig | CrossCoderConfig) -> str:
    """The architecture a dictionary's variant name, `TrainedSAE.arch` and its rows record: an SAE's `arch`, a
    transcoder's `transcoder-<arch>` (`skiptranscoder-<arch>` with a skip), a crosscoder's `crosscoder-<activation>`."""
    if isinstance(cfg, CrossCoderConfig):
        return f"crosscoder-{cfg.activation}"
    return cfg.arch if cfg.d_out is None else f"{'skip' if cfg.skip else ''}transcoder-{cfg.arch}"


class Trainer:
    """Trains every SAE of a config over one shared stream of batches; resumable; on every rank of a torchrun launch
    (`TrainConfig.parallel`)."""

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.ranks = distributed.init()
        self.cfg, self.progress = cfg, progress and self.ranks.main
        self.store = ActivationStore.open(cfg.store_path)
        self.hooks = cfg.hooks or ([] if cfg.transcoders or cfg.crosscoders else self.store.hooks)
        pairs = [(t.input, t.output) for t in cfg.transcoders] + [tuple(c.sources) for c in cfg.crosscoders]
        self.read_hooks = list(dict.fromkeys(self.hooks + [h for pair in pairs for h in pair]))
        """Every hook point a batch holds: the SAEs', the transcoders' inputs and outputs, the crosscoders' sources."""
        missing = [h for h in self.read_hooks if h not in self.store.hooks]
        if missing:
            raise StoreError(f"hooks {missing} are not in store {cfg.store_path!r}; it has {self.store.hooks}")
        if self.store.n_tokens <= cfg.eval_rows + cfg.batch_size:
            raise StoreError(
                f"store {cfg.store_path!r} has {self.store.n_tokens} rows: too few for eval_rows={cfg.eval_rows} "
                f"plus one batch of {cfg.batch_size}; harvest more or lower them"
            )
        self.device = distributed.local_device(cfg.device)
        self.train_rows = (0, self.store.n_tokens - cfg.eval_rows)
        self.total_steps = cfg.total_steps
        self.run_dir = RunDir(cfg.run)
        self.specs = [self._spec(h, *combo) for h in self.hooks for combo in self._combos()]
        self.specs += [self._spec(t.input, *combo, transcoder=t) for t in cfg.transcoders for combo in self._combos()]
        self.specs += [self._crosscoder_spec(c, *combo) for c in cfg.crosscoders for combo in self._crosscoder_combos()]
        twice = [key for key, n in Counter(s.key for s in self.specs).items() if n > 1]
        if twice:
            raise ConfigError(
                f"two crosscoders would be saved as {twice}: they start with the same source; put another of their "
                "sources first in one of them"
            )
        aliased = [s.cfg.hook_name for s in self.specs if isinstance(s.cfg, SAEConfig) and "/" in s.cfg.hook_name]
        if aliased and cfg.model not in (None, "none"):
            raise ConfigError(
                f"`model: {cfg.model}` names one model, but {aliased} are arrays of a store of several models, each "
                f"evaluated on its own model as the store records it ({self.store.model_specs}); leave `model` unset "
                "(or set it to none to skip those metrics)"
            )
        self.parallel = self._parallel(len(self.specs))
        if self.parallel == "ddp" and self.ranks.many and cfg.crosscoders:
            raise DistributedError(
                "parallel: ddp does not split a crosscoder's batches across ranks; set parallel: members (with at "
                f"least as many dictionaries as ranks, here {len(self.specs)}) or launch one process"
            )
        rank, world = self.ranks.rank, self.ranks.world
        mine = range(rank, len(self.specs), world) if self.parallel == "members" else range(len(self.specs))
        self.members = [self._member(i) for i in mine]
        if self.parallel == "ddp" and self.ranks.many:  # every rank reads each whole batch and trains on its slice
            for m in self.members:
                if isinstance(m.sae, SAE):  # always: ddp was refused above with crosscoders
                    m.sae.split = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)

    def _parallel(self, n_saes: int) -> str:
        """`members` or `ddp`: `TrainConfig.parallel` resolved for `n_saes` SAEs on this launch's ranks."""
        world, mode = self.ranks.world, self.cfg.parallel
        if mode == "auto":
            mode = "members" if n_saes >= world else "ddp"
        if self.ranks.many and mode == "members" and n_saes < world:
            raise DistributedError(
                f"parallel: members deals {n_saes} SAE(s) to {world} ranks, so some ranks would have none; "
                f"launch at most {n_saes} ranks, or set parallel: ddp (or auto)"
            )
        if self.ranks.many and mode == "ddp" and self.cfg.batch_size < world:
            raise DistributedError(
                f"parallel: ddp splits each batch of {self.cfg.batch_size} rows across {world} ranks, fewer rows than "
                f"ranks; raise batch_size to at least {world} or launch fewer ranks"
            )
        return mode

    def _combos(self) -> list[tuple[str, int, int, float | None, int | None]]:
        g = self.cfg.grid
        return list(itertools.product(g.arch, g.k, g.expansion, g.lr or [None], g.seed or [None]))

    def _crosscoder_combos(self) -> list[tuple[int, int, float | None, int | None]]:
        g = self.cfg.grid
        return list(itertools.product(g.k, g.expansion, g.lr or [None], g.seed or [None]))

    def _crosscoder_spec(
        self, spec: CrossCoderSpec, k: int, expansion: int, lr: float | None, seed: int | None
    ) -> _Spec:
        """The crosscoder of `spec` at one grid point; `ConfigError` if its sources differ in width."""
        widths = {s: self.store.d(s) for s in spec.sources}
        d_in = next(iter(widths.values()))
        shared = {k: v for k, v in self.cfg.sae.items() if k in CrossCoderConfig.model_fields}
        fields: dict[str, Any] = dict(
            activation=spec.arch,
            d_sae=expansion * d_in,
            k=k,
            model_name=self.store.model,
            context_size=self.store.config.get("context_length"),
            dataset=str(self.store.config.get("text", "")),
        )
        what = f"crosscoder config for {spec.sources} ({spec.arch}, k={k}, x{expansion})"
        try:
            cc_cfg = CrossCoderConfig.for_sources(widths, **(fields | shared))
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, what, CrossCoderConfig)) from None
        # the floor of `default_lr` by the width it reads: the sources laid end to end
        peak = self.cfg.peak_lr(cc_cfg.d_sae, d_in=d_in * len(widths), lr=lr)
        return _Spec(array_folder(spec.sources[0]), cc_cfg, peak, seed)

    def _spec(
        self,
        hook: str,
        arch: str,
        k: int,
        expansion: int,
        lr: float | None,
        seed: int | None,
        *,
        transcoder: TranscoderPair | None = None,
    ) -> _Spec:
        """The SAE over the array `hook` (`<alias>/<hook>` in a store of several models) at one grid point, or the
        `transcoder` from it (`TranscoderPair` has checked that its input and output are of one model)."""
        d_in = self.store.d(hook)
        fields: dict[str, Any] = {}
        if transcoder is not None:
            out = transcoder.output
            fields = {"d_out": self.store.d(out), "skip": transcoder.skip, "hook_name_out": out}
        fields |= dict(
            arch=arch,
            d_in=d_in,
            d_sae=expansion * d_in,
            k=k,
            hook_name=hook,
            model_name=self.store.model_of(hook),
            context_size=self.store.config.get("context_length"),
            dataset=str(self.store.config.get("text", "")),
        )
        sae_cfg = build(SAEConfig, {**fields, **self.cfg.sae}, f"SAE config for {hook} ({arch}, k={k}, x{expansion})")
        return _Spec(array_folder(hook), sae_cfg, self.cfg.peak_lr(sae_cfg.d_sae, d_in=d_in, lr=lr), seed)

    def _member(self, index: int) -> Member:
        """SAE `index` of `specs`, seeded by its own seed alone, so its start does not depend on which SAEs share its
        rank (or its pass)."""
        hook, sae_cfg, lr, grid_seed = self.specs[index]
        seed = self.cfg.seed if grid_seed is None else grid_seed
        variant = self.specs[index].key.removeprefix(f"{hook}/")
        return Member.create(
            sae_cfg,
            lr=lr,
            seed=seed,
            device=self.device,
            index=index,
            hook=hook,
            variant=variant,
            optimizer=self.cfg.optimizer,
        )

    @property
    def writes(self) -> list[Member]:
        """The members whose files this rank writes: its own (`members`), or all of them on rank 0 (`ddp`)."""
        return self.members if self.parallel == "members" or self.ranks.main else []

    # ------------------------------------------------------------------ state

    def _init_from_sample(self) -> None:
        n = min(8192, self.train_rows[1])
        sample = next(self._batches(n, seed=self.cfg.seed + 1))
        whitening = self._whitening()
        for m in self.members:
            if isinstance(m.sae, SAE) and m.sae.cfg.whiten:
                m.sae.set_whitening(whitening[m.reads[0]])
            m.sae.init_from_sample(*(rows.to(self.device) for rows in m.inputs(sample)))

    def _whitening(self) -> dict[str, Whitening]:
        """The PCA whitening of each hook point that an SAE here whitens (`sae.whiten`), from a sample of
        `whiten_store` or else of the training rows; `ConfigError`/`StoreError` naming the fix if it cannot be."""
        rconds = {
            m.reads[0]: m.sae.cfg.whiten_rcond for m in self.members if isinstance(m.sae, SAE) and m.sae.cfg.whiten
        }
        if not rconds:
            return {}
        control = self.cfg.whiten_store
        if control is None:
            sample = next(self._batches(min(WHITENING_ROWS, self.train_rows[1]), seed=self.cfg.seed + 2))
        else:
            sample = whitening_sample(control, {h: self.store.d(h) for h in rconds}, seed=self.cfg.seed + 2)
        where = f"the control store {control!r}" if control else f"the training store {self.cfg.store_path!r}"
        return {h: pca_whitening(sample[h], rcond=r, source=f"{h!r} in {where}") for h, r in rconds.items()}

    def _batches(self, batch_size: int, **kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of the training rows, one tensor per hook point."""
        # `hooks` is a list, so each batch is a dict (`ActivationStore.batches` has no overloads saying so).
        return cast(
            Iterator[dict[str, torch.Tensor]],
            self.store.batches(self.read_hooks, batch_size, rows=self.train_rows, **kwargs),
        )

    def _check_resume(self) -> None:
        """Refuse, before anything is written, a run folder whose SAEs were made by another config."""
        run = self.run_dir
        diff = []
        if run.train_config.exists():
            old, new = saved_identity(json.loads(run.train_config.read_text()), run), self.cfg.identity()
            diff = [k for k in old if old.get(k) != new.get(k)]
        try:
            check_checkpoint(
                run.checkpoint, self.members, keys=[s.key for s in self.specs], train_config=run.train_config
            )
        except TrainError as err:  # a config that differs names other SAEs too (a default lr depends on `tokens`)
            raise (TrainError(f"{err}; the saved config differs in {diff}") if diff else err) from None
        if diff:
            raise ConfigError(
                f"{run.saes_dir} holds SAEs trained with a different config (differs in {diff}); "
                f"set `run` to a new run directory or delete {run.saes_dir} to start over"
            )

    # ------------------------------------------------------------------- loop

    def run(self) -> list[TrainedSAE]:
        """Train to `cfg.tokens`, evaluate on the held-out rows, save; returns one result per SAE (on every rank: all
        of them, in the config's order)."""
        run = self.run_dir.prepare()
        self._check_resume()
        start = load_checkpoint(run.checkpoint, self.members, self.device)
        if start == 0:  # before anything is written: a whitening that is refused leaves the run as it was
            self._init_from_sample()
        distributed.barrier()  # every rank has read what it resumes from before rank 0 writes
        if self.ranks.main:
            run.saes_dir.mkdir(parents=True, exist_ok=True)
            run.train_config.write_text(json.dumps(self.cfg.identity(), indent=1))
        logger = make_logger(self.cfg.logger, run.saes_dir) if self.ranks.main else None
        cfg = self.cfg
        batches = self._batches(cfg.batch_size, seed=cfg.seed, epochs=None, start_batch=start)
        bar = tqdm(total=self.total_steps, initial=start, unit="step", disable=not self.progress, desc="train")
        for m in self.members:
            m.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        try:
            for step in range(start, self.total_steps):
                batch = {h: x.to(self.device, non_blocking=True) for h, x in next(batches).items()}
                factor, refresh = schedule(cfg, step, start=start)
                for m in self.members:
                    if m.stopped:
                        continue
                    metrics = m.step(*m.inputs(batch), factor=factor, refresh=refresh)
                    finite = torch.isfinite(metrics["loss"])
                    m.bad_step = torch.where((m.bad_step < 0) & ~finite, step, m.bad_step)
                    for k, v in metrics.items():
                        m.sums[k] = m.sums.get(k, 0) + v.float()
                    m.window += 1
                if (step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps:
                    self._log(step + 1, bar, logger)
                if (step + 1) % cfg.checkpoint_steps == 0 and step + 1 < self.total_steps:
                    save_checkpoint(run.checkpoint, self.writes, step + 1)
                bar.update(1)
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        save_checkpoint(run.checkpoint, self.writes, self.total_steps)
        return self._finish()

    def _log(self, step: int, bar: tqdm, logger: TrainLogger | None) -> None:
        """Sync once per log interval: stop SAEs whose loss went non-finite, show the running means (every rank's
        SAEs, on rank 0)."""
        stops: list[tuple[int, str]] = []
        points: list[tuple[int, str, str, float]] = []  # (member index, member key, metric, running mean)
        for m in self.members:
            if m.stopped:
                continue
            bad = int(m.bad_step)
            if bad >= 0:
                m.stopped = f"loss became NaN/inf at step {bad}; this SAE was stopped, the others went on"
                stops.append((m.index, f"{m.key}: {m.stopped}"))
                continue
            points += [(m.index, m.key, k, float(v) / m.window) for k, v in m.sums.items()]
            m.sums, m.window = {}, 0
        if self.parallel == "members" and self.ranks.many:
            parts = distributed.gather_objects((stops, points))
            stops = sorted((s for part, _ in parts for s in part), key=itemgetter(0))
            points = sorted((p for _, part in parts for p in part), key=itemgetter(0))
        if not self.ranks.main:
            return
        for _, note in stops:
            tqdm.write(note)
        shown: dict[str, list[float]] = {}
        for _, key, metric, v in points:
            shown.setdefault(metric, []).append(v)
            if logger is not None:
                logger.log(f"{key}/{metric}", v, step * self.cfg.batch_size)
        if shown:
            bar.set_postfix(
                {k: f"{sum(v) / len(v):.3g}" for k, v in shown.items() if k in ("loss", "fvu", "l0", "dead_frac")}
            )

    def _finish(self) -> list[TrainedSAE]:
        """Evaluate on held-out rows, save each SAE in SAELens layout with its metrics (each by the rank that writes
        it); every rank returns every SAE's result."""
        eval_rows = slice(self.train_rows[1], self.store.n_tokens)
        models, tokens = self._eval_models() if self.writes else ({}, None)
        results: list[tuple[int, TrainedSAE]] = []
        for m in self.writes:
            folder = self.run_dir.sae(m.hook, m.variant)
            reconstruction, spliced, embedding = None, None, None
            sae = m.sae
            if not m.stopped:
                sae.eval()
                eval_weights(m.opt)  # a schedule-free optimiser's average is the SAE to evaluate and save
                held_out = m.inputs({h: self.store.activations(h, eval_rows) for h in m.reads})
                alias, hook = split_array(m.reads[0])  # the model that made the array, and its own hook point
                model = models.get(alias)
                if isinstance(sae, CrossCoder):  # FVU per source, decoder norms
                    reconstruction = crosscoder_metrics(sae, held_out[0])
                elif sae.cfg.d_out is None:
                    reconstruction = reconstruction_metrics(sae, held_out[0])
                    if model is not None and tokens is not None and not is_encoder(model):
                        spliced = spliced_metrics(model, sae, hook, tokens=tokens)
                    elif model is not None and tokens is not None and (point := locate(model, hook)).read is None:
                        hooks = {"input_hook": point.hook, "output_hook": point.hook}  # where the model holds it
                        embedding = embedding_metrics(model, sae, **hooks, tokens=tokens)
                else:  # the FVU of its output; with the MLP replaced, a decoder's loss or an encoder's embedding
                    reconstruction = transcoder_metrics(sae, held_out[0], held_out[1])
                    output_hook = split_array(sae.cfg.hook_name_out)[1]
                    if model is not None and tokens is not None and not is_encoder(model):
                        spliced = spliced_metrics(model, sae, hook, output_hook=output_hook, tokens=tokens)
                    elif model is not None and tokens is not None:
                        hooks = {"input_hook": hook, "output_hook": output_hook}
                        embedding = embedding_metrics(model, sae, **hooks, tokens=tokens)
                sae.save(folder)
            result = TrainedSAE(
                hook=m.hook,
                arch=kind_arch(sae.cfg),
                k=m.sae.cfg.k,
                width=m.sae.cfg.d_sae,
                lr=m.lr,
                seed=m.seed,
                tokens=self.total_steps * self.cfg.batch_size,
                path=folder,
                run=self.run_dir.root,
                stopped=m.stopped,
                reconstruction=reconstruction,
                spliced=spliced,
                embedding=embedding,
            )
            folder.mkdir(parents=True, exist_ok=True)
            self.run_dir.sae_metrics(m.hook, m.variant).write_text(json.dumps(result.row(), indent=1))
            results.append((m.index, result))
        return [r for _, r in sorted(sum(distributed.gather_objects(results), []), key=itemgetter(0))]

    def _eval_models(self) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Alias -> model (`""`: a store of one model) of the SAEs and transcoders this rank writes, and the eval
        contexts, for the spliced metrics when the store came from a decoder harvest, or for the embedding metrics of
        the transcoders when it came from an encoder's. An `<alias>/<hook>` array's model is its alias's in the
        store's metadata (`ActivationStore.spec_of`); a store of one model's is `TrainConfig.model`, or the store's."""
        encoder = self.store.meta.get("encoder")
        saes = [m for m in self.writes if isinstance(m.sae, SAE)]
        transcoders = any(isinstance(m.sae, SAE) and m.sae.cfg.d_out is not None for m in saes)
        wanted = encoder is False or (encoder is True and transcoders)
        if self.cfg.model == "none" or "text" not in self.store.config or self.cfg.ce_contexts <= 0:
            return {}, None
        specs: dict[str, str | None] = {}
        for m in saes:
            alias, _ = split_array(m.reads[0])
            given = self.cfg.model if not alias else None  # `Trainer` refuses `model` with an aliased array
            specs[alias] = given or (self.store.spec_of(m.reads[0]) if wanted else None)
        models = {alias: load_model(spec, device=str(self.device)) for alias, spec in specs.items() if spec}
        if not models:
            return {}, None
        first = next(iter(models.values()))  # the models of one store share their tokenizer
        return models, eval_tokens(self.store.config | {"text": self.store.text}, first, self.cfg.ce_contexts)


def train(cfg: TrainConfig, progress: bool = True) -> list[TrainedSAE]:
    """Train every SAE the config asks for (resuming if interrupted); return a `TrainedSAE` per SAE.

    Each has `hook`, `arch`, `k`, `width`, `lr`, `tokens` and `path` (its folder `RUN/saes/<hook>/<variant>/`).
    An SAE whose loss became NaN/inf has `stopped` (why) and no metrics; the others have `reconstruction`
    (`ReconstructionMetrics`: `fvu`, `mse`, `l0`, dead and dense fractions), and `spliced` (`SplicedMetrics`:
    `ce_loss_score`, `kl_div_score`, ...) when a decoder model was run with the SAE spliced in, or `embedding`
    (`EmbeddingMetrics`: the pooled sentence embeddings' cosine with its reconstruction in place of the activation) on
    an encoder's store (MiniLM). A transcoder's `reconstruction` is that of its output, and with the MLP replaced by
    it, it has `spliced` on a decoder's store and `embedding` on an encoder's; a crosscoder's is `CrossCoderMetrics`
    (FVU per source, the sources' shares of the decoder norms).
    `TrainedSAE.row()` is the flat row that its `metrics.json` holds.

    Under torchrun (`torchrun --nproc-per-node N -m saelab train CONFIG`, or a script calling this) every rank calls
    it; the ranks share the work as `cfg.parallel` says, only rank 0 shows progress, and every rank returns all the
    results.
    """
    return Trainer(cfg, progress).run()
