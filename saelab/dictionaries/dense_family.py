"""Dense-activation SAEs: JumpReLU (straight-through L0) and ReLU (L1), with the JumpReLU autograd functions."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from saelab.dictionaries.base import SAE, SAEConfig
from saelab.dictionaries.registry import register


class _JumpReLUFn(torch.autograd.Function):
    """`pre * (pre > threshold)` with the straight-through threshold gradient of
    Rajamanoharan et al. 2024 (rectangle kernel of width `bandwidth`)."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_threshold = -(threshold / ctx.bandwidth * window * grad).sum(0)
        return grad * (pre > threshold), grad_threshold, None


class _StepFn(torch.autograd.Function):
    """Heaviside `pre > threshold` with a straight-through gradient to the threshold only."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        return None, -(window * grad).sum(0) / ctx.bandwidth, None


@register
class JumpReLUSAE(SAE):
    """JumpReLU SAE trained with a straight-through L0 penalty (Rajamanoharan et al. 2024)."""

    arch = "jumprelu"

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__(cfg, device)
        self.threshold = nn.Parameter(
            torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold, dtype=self.W_enc.dtype, device=device)
        )

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu() * (pre > self.threshold)

    def _scaled_tensors(self) -> dict[str, Tensor]:
        return super()._scaled_tensors() | {"threshold": self.threshold}

    def training_loss(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            self.threshold.clamp_(min=0)
        batch = self.training_batch(x, y)
        pre = self.pre_acts(batch.x)
        bandwidth = self.cfg.jumprelu_bandwidth
        acts = _JumpReLUFn.apply(pre, self.threshold, bandwidth)
        _, total_var, fvu = self._loss_terms(batch, acts @ self.W_dec + self.output_base(batch.x))
        l0 = _StepFn.apply(pre, self.threshold, bandwidth).sum()
        loss = fvu + self.cfg.l0_coef * l0 / total_var
        self.update_dead(torch.arange(self.cfg.d_sae, device=pre.device), acts.detach().amax(0), batch.rows)
        return loss, {"loss": loss.detach(), "fvu": fvu.detach(), "l0": l0.detach() / batch.rows}


@register
class ReLUSAE(SAE):
    """ReLU SAE with an L1 penalty weighted by decoder norms (SAELens "standard")."""

    arch = "relu"

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def training_loss(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        batch = self.training_batch(x, y)
        acts = self.pre_acts(batch.x).relu()
        _, total_var, fvu = self._loss_terms(batch, acts @ self.W_dec + self.output_base(batch.x))
        l1 = acts.sum(0) @ self.W_dec.norm(dim=1)
        loss = fvu + self.cfg.l1_coef * l1 / total_var
        self.update_dead(torch.arange(self.cfg.d_sae, device=acts.device), acts.detach().amax(0), batch.rows)
        l0 = (acts.detach() > 0).sum() / batch.rows
        return loss, {"loss": loss.detach(), "fvu": fvu.detach(), "l0": l0}
