"""The optimisers a training run can use (`TrainConfig.optimizer`), their default peak rates, and their modes.

- `adam`: Adam (betas 0.9, 0.999), scheduled by `lr_factor` (warmup, constant, linear decay).
- `signum_sf`: sparsify's default: sign descent (`SignSGD`) inside the schedule-free wrapper of Defazio et al. 2024
  (`schedulefree.ScheduleFreeWrapper`, momentum 0.95), warmup and no decay (the average replaces it).
- `adamw_sf`: schedule-free AdamW (`schedulefree.AdamWScheduleFree`, no weight decay), warmup and no decay.

A schedule-free optimiser trains at extrapolated weights `y` and keeps the average `x` that is the model to use:
`eval_weights` swaps `x` in (for evaluation, saving and checkpoints) and `train_weights` swaps `y` back.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch
from schedulefree import AdamWScheduleFree, ScheduleFreeWrapper

OptimizerName = Literal["adam", "signum_sf", "adamw_sf"]

SCHEDULE_FREE: tuple[OptimizerName, ...] = ("signum_sf", "adamw_sf")
"""The optimisers with train and eval weights, which take no learning-rate decay."""

SIGNUM_MOMENTUM = 0.95
"""The schedule-free wrapper's momentum around `SignSGD` (sparsify's)."""


class SignSGD(torch.optim.Optimizer):
    """Steepest descent in the L-infinity norm: every parameter moves by `lr` times the sign of its gradient."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        """One sign step of every parameter that has a gradient."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


Optimizer = torch.optim.Optimizer | ScheduleFreeWrapper
"""What `make_optimizer` returns (the wrapper is not a `torch.optim.Optimizer` but has its interface)."""


def make_optimizer(name: OptimizerName, params: Iterable[torch.nn.Parameter], *, lr: float) -> Optimizer:
    """Optimiser `name` over `params` at learning rate `lr`, a schedule-free one in train mode."""
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), fused=True)
    opt: Optimizer
    if name == "signum_sf":
        opt = ScheduleFreeWrapper(SignSGD(params, lr=lr), momentum=SIGNUM_MOMENTUM)
    else:
        opt = AdamWScheduleFree(params, lr=lr, betas=(0.9, 0.999), warmup_steps=0)
    opt.train()
    return opt


def eval_weights(opt: Optimizer) -> None:
    """Put a schedule-free optimiser's average (the weights to evaluate and save) into its parameters; else nothing."""
    if isinstance(opt, ScheduleFreeWrapper | AdamWScheduleFree):
        opt.eval()


def train_weights(opt: Optimizer) -> None:
    """Put a schedule-free optimiser's training weights back into its parameters (after `eval_weights`)."""
    if isinstance(opt, ScheduleFreeWrapper | AdamWScheduleFree):
        opt.train()


def signum_lr(width: int) -> float:
    """sparsify's default rate for `signum_sf`: 5e-3 / sqrt(width / 2^14)."""
    return 5e-3 / math.sqrt(width / 2**14)
