"""Train many SAEs in one pass over an activation store: hook points x a sweep grid, sharing each batch.

Run directory layout written here:

    <out>/saes/<hook>/<variant>/cfg.json, sae_weights.safetensors, metrics.json   (SAELens layout)
    <out>/saes/checkpoint/latest.json, step-<N>/<hook>/<variant>.safetensors       (exact resume state)
    <out>/saes/train_config.json                                                    (the resolved config)
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from saelab.config import StrictModel, build
from saelab.errors import ConfigError, StoreError
from saelab.metrics import eval_tokens, reconstruction_metrics, spliced_metrics
from saelab.models import load_model, resolve_device
from saelab.sae import SAE, Arch, SAEConfig, train_step
from saelab.store import ActivationStore

CHECKPOINT_DIR = "checkpoint"


class Grid(StrictModel):
    """The sweep grid: every combination is one SAE per hook point."""

    arch: list[Arch] = ["topk"]
    k: list[int] = [32]
    expansion: list[int] = [16]
    lr: list[float] | None = None  # None: 2e-4 / sqrt(width / 2^14), as in Gao et al.


class TrainConfig(StrictModel):
    """What to train, on what, for how long."""

    store: str
    run: str
    hooks: list[str] | None = None
    grid: Grid = Grid()
    sae: dict[str, Any] = {}
    tokens: int = 5_000_000
    batch_size: int = 4096
    eval_rows: int = 16_384
    warmup_steps: int = 100
    decay_start: float = 0.8
    seed: int = 0
    checkpoint_every: int = 1_000_000
    log_every: int = 20
    device: str = "auto"
    logger: Literal["none", "tensorboard", "wandb"] = "none"
    model: str | None = None  # for CE loss recovered and KL; default: the store's model if it is a decoder
    ce_contexts: int = 16


def default_lr(width: int) -> float:
    """Gao et al.'s learning-rate scaling with the dictionary width."""
    return 2e-4 / math.sqrt(width / 2**14)


def lr_factor(step: int, total: int, warmup: int, decay_start: float) -> float:
    """Linear warmup, constant, then linear decay to zero over the last (1 - decay_start) of training."""
    warm = min(1.0, (step + 1) / max(warmup, 1))
    start = int(decay_start * total)
    decay = 1.0 if step < start else max(0.0, (total - step) / max(total - start, 1))
    return warm * decay


@dataclass
class Member:
    """One SAE being trained, with its optimiser and running metrics."""

    hook: str
    variant: str
    lr: float
    sae: SAE
    opt: torch.optim.Adam
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    window: int = 0
    bad_step: torch.Tensor | None = None
    stopped: str | None = None

    @property
    def key(self) -> str:
        return f"{self.hook}/{self.variant}"


def variant_name(arch: str, k: int, width: int, lr: float) -> str:
    return f"{arch}-k{k}-w{width}-lr{lr:.3g}"


def _identity(cfg: TrainConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", exclude={"device", "log_every", "logger"})


class Trainer:
    """Trains every SAE of a config over one shared stream of batches; resumable."""

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.store = ActivationStore.open(cfg.store)
        self.hooks = cfg.hooks or self.store.hooks
        missing = [h for h in self.hooks if h not in self.store.hooks]
        if missing:
            raise StoreError(f"hooks {missing} are not in store {cfg.store!r}; it has {self.store.hooks}")
        if self.store.n_tokens <= cfg.eval_rows + cfg.batch_size:
            raise StoreError(
                f"store {cfg.store!r} has {self.store.n_tokens} rows: too few for eval_rows={cfg.eval_rows} "
                f"plus one batch of {cfg.batch_size}; harvest more or lower them"
            )
        self.device = resolve_device(cfg.device)
        self.train_rows = (0, self.store.n_tokens - cfg.eval_rows)
        self.total_steps = cfg.tokens // cfg.batch_size
        self.root = Path(cfg.run) / "saes"
        self.members = [self._member(h, *combo) for h in self.hooks for combo in self._combos()]

    def _combos(self) -> list[tuple[str, int, int, float | None]]:
        g = self.cfg.grid
        return list(itertools.product(g.arch, g.k, g.expansion, g.lr or [None]))

    def _member(self, hook: str, arch: str, k: int, expansion: int, lr: float | None) -> Member:
        d_in = self.store.d(hook)
        fields = dict(
            arch=arch,
            d_in=d_in,
            d_sae=expansion * d_in,
            k=k,
            hook_name=hook,
            model_name=self.store.model,
            context_size=self.store.config.get("context_length"),
            dataset=str(self.store.config.get("text", "")),
        )
        sae_cfg = build(SAEConfig, {**fields, **self.cfg.sae}, f"SAE config for {hook} ({arch}, k={k}, x{expansion})")
        torch.manual_seed(self.cfg.seed)
        sae = SAE.from_config(sae_cfg, device=self.device)
        lr = lr if lr is not None else default_lr(sae_cfg.d_sae)
        opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), fused=True)
        return Member(hook, variant_name(arch, k, sae_cfg.d_sae, lr), lr, sae, opt)

    # ------------------------------------------------------------------ state

    def _init_from_sample(self) -> None:
        n = min(8192, self.train_rows[1])
        sample = next(self.store.batches(self.hooks, n, seed=self.cfg.seed + 1, rows=self.train_rows))
        for m in self.members:
            m.sae.init_from_sample(sample[m.hook].to(self.device))

    def _save_checkpoint(self, step: int) -> None:
        """Write every SAE's exact state into a new folder, then point `latest.json` at it."""
        ckpt = self.root / CHECKPOINT_DIR
        folder = ckpt / f"step-{step}"
        for m in self.members:
            tensors = {f"sae.{k}": v for k, v in m.sae.state_dict().items()}
            for pid, state in m.opt.state_dict()["state"].items():
                tensors |= {f"opt.{pid}.{k}": v for k, v in state.items()}
            path = folder / f"{m.key}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
        latest = {"step": step, "folder": folder.name, "stopped": {m.key: m.stopped for m in self.members if m.stopped}}
        tmp = ckpt / "latest.json.tmp"
        tmp.write_text(json.dumps(latest))
        os.replace(tmp, ckpt / "latest.json")
        for old in ckpt.glob("step-*"):
            if old != folder:
                shutil.rmtree(old)

    def _load_checkpoint(self) -> int:
        """Restore the latest checkpoint if there is one; return the step to continue from."""
        config_path = self.root / "train_config.json"
        if config_path.exists():
            old = json.loads(config_path.read_text())
            if old != _identity(self.cfg):
                diff = [k for k in old if old.get(k) != _identity(self.cfg).get(k)]
                raise ConfigError(
                    f"{self.root} holds SAEs trained with a different config (differs in {diff}); "
                    f"set `out` to a new run directory or delete {self.root} to start over"
                )
        latest = self.root / CHECKPOINT_DIR / "latest.json"
        if not latest.exists():
            return 0
        info = json.loads(latest.read_text())
        folder = self.root / CHECKPOINT_DIR / info["folder"]
        for m in self.members:
            tensors = load_file(str(folder / f"{m.key}.safetensors"), device=str(self.device))
            m.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
            opt_state = m.opt.state_dict()
            for key, value in tensors.items():
                if key.startswith("opt."):
                    _, pid, name = key.split(".", 2)
                    opt_state["state"].setdefault(int(pid), {})[name] = value
            m.opt.load_state_dict(opt_state)
            m.stopped = info["stopped"].get(m.key)
        return int(info["step"])

    # ------------------------------------------------------------------- loop

    def run(self) -> list[dict[str, Any]]:
        """Train to `cfg.tokens`, evaluate on the held-out rows, save; returns one result row per SAE."""
        self.root.mkdir(parents=True, exist_ok=True)
        start = self._load_checkpoint()
        (self.root / "train_config.json").write_text(json.dumps(_identity(self.cfg), indent=1))
        if start == 0:
            self._init_from_sample()
        logger = _make_logger(self.cfg.logger, self.root)
        cfg = self.cfg
        ckpt_every = max(1, cfg.checkpoint_every // cfg.batch_size)
        use_autocast = self.device.type == "cuda"
        batches = self.store.batches(
            self.hooks, cfg.batch_size, seed=cfg.seed, rows=self.train_rows, epochs=None, start_batch=start
        )
        bar = tqdm(total=self.total_steps, initial=start, unit="step", disable=not self.progress, desc="train")
        step = start
        for m in self.members:
            m.bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        try:
            for step in range(start, self.total_steps):
                batch = {h: x.to(self.device, non_blocking=True) for h, x in next(batches).items()}
                factor = lr_factor(step, self.total_steps, cfg.warmup_steps, cfg.decay_start)
                # The dead set for AuxK is refreshed (one device sync) only at fixed steps, the start and
                # every checkpoint included, so a resumed run refreshes exactly where an uninterrupted one did.
                refresh = step == start or step % cfg.log_every == 0 or step % ckpt_every == 0
                for m in self.members:
                    if m.stopped:
                        continue
                    if refresh:
                        m.sae.plan_aux()
                    for group in m.opt.param_groups:
                        group["lr"] = m.lr * factor
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_autocast):
                        metrics = train_step(m.sae, m.opt, batch[m.hook])
                    finite = torch.isfinite(metrics["loss"])
                    m.bad_step = torch.where((m.bad_step < 0) & ~finite, step, m.bad_step)
                    for k, v in metrics.items():
                        m.sums[k] = m.sums.get(k, 0) + v.float()
                    m.window += 1
                if (step + 1) % cfg.log_every == 0 or step + 1 == self.total_steps:
                    self._log(step + 1, bar, logger)
                if (step + 1) % ckpt_every == 0 and step + 1 < self.total_steps:
                    self._save_checkpoint(step + 1)
                bar.update(1)
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        self._save_checkpoint(self.total_steps)
        return self._finish()

    def _log(self, step: int, bar: tqdm, logger: Any) -> None:
        """Sync once per log interval: stop SAEs whose loss went non-finite, show the running means."""
        shown: dict[str, list[float]] = {}
        for m in self.members:
            if m.stopped:
                continue
            bad = int(m.bad_step)
            if bad >= 0:
                m.stopped = f"loss became NaN/inf at step {bad}; this SAE was stopped, the others went on"
                tqdm.write(f"{m.key}: {m.stopped}")
                continue
            means = {k: float(v) / m.window for k, v in m.sums.items()}
            m.sums, m.window = {}, 0
            for k, v in means.items():
                shown.setdefault(k, []).append(v)
                if logger is not None:
                    logger.log(f"{m.key}/{k}", v, step * self.cfg.batch_size)
        if shown:
            bar.set_postfix(
                {k: f"{sum(v) / len(v):.3g}" for k, v in shown.items() if k in ("loss", "fvu", "l0", "dead_frac")}
            )

    def _finish(self) -> list[dict[str, Any]]:
        """Evaluate on held-out rows, save each SAE in SAELens layout with its metrics."""
        eval_rows = (self.train_rows[1], self.store.n_tokens)
        model, tokens = self._ce_model()
        results = []
        for m in self.members:
            folder = self.root / m.hook / m.variant
            row = {
                "hook": m.hook,
                "arch": m.sae.cfg.arch,
                "k": m.sae.cfg.k,
                "width": m.sae.cfg.d_sae,
                "lr": m.lr,
                "tokens": self.total_steps * self.cfg.batch_size,
                "path": str(folder),
            }
            if m.stopped:
                row["stopped"] = m.stopped
            else:
                m.sae.eval()
                x = self.store.activations(m.hook, slice(*eval_rows))
                row |= reconstruction_metrics(m.sae, x)
                if model is not None:
                    row |= spliced_metrics(model, m.sae, m.hook, tokens)
                m.sae.save(folder)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "metrics.json").write_text(json.dumps(row, indent=1))
            results.append(row)
        return results

    def _ce_model(self) -> tuple[Any, torch.Tensor | None]:
        """The model and eval contexts for spliced metrics, when the store came from a decoder harvest."""
        spec = self.cfg.model or (self.store.config.get("model") if self.store.meta.get("encoder") is False else None)
        if not spec or spec == "none" or "text" not in self.store.config or self.cfg.ce_contexts <= 0:
            return None, None
        model = load_model(spec, device=str(self.device))
        return model, eval_tokens(self.store.config, model, self.cfg.ce_contexts)


def train(cfg: TrainConfig, progress: bool = True) -> list[dict[str, Any]]:
    """Train every SAE the config asks for (resuming if interrupted); return one result row per SAE."""
    return Trainer(cfg, progress).run()


class _Logger:
    def __init__(self, kind: str, root: Path):
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError(
                    "logger: tensorboard needs the tensorboard package; pip install tensorboard"
                ) from None
            self.writer = SummaryWriter(str(root / "tensorboard"))
            self.log = lambda k, v, t: self.writer.add_scalar(k, v, t)
            self.close = self.writer.close
        else:
            try:
                import wandb
            except ImportError:
                raise ConfigError("logger: wandb needs the wandb package; pip install wandb") from None
            run = wandb.init(project="saelab", dir=str(root))
            self.log = lambda k, v, t: run.log({k: v}, step=t)
            self.close = run.finish


def _make_logger(kind: str, root: Path) -> _Logger | None:
    return None if kind == "none" else _Logger(kind, root)
