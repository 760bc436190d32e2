"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024) SAEs, trained with AuxK on the sparse kernels."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.dictionaries.base import SAE, Batch, SAEConfig
from saelab.dictionaries.registry import register
from saelab.distributed import all_gather
from saelab.ops import kernels
from saelab.ops.kernels import Entries, flat_topk
from saelab.ops.topk import topk_rows


class _Step(NamedTuple):
    """What one top-k forward of a training step gives the loss."""

    recon: Tensor
    """`[batch, d_in]` reconstruction of the scaled input."""
    aux_recon: Tensor | None
    """`[batch, d_in]` AuxK reconstruction of the residual from the dead latents; None without AuxK."""
    vals: Tensor
    """`[nnz]` pre-activations of the main entries."""
    lat: Tensor
    """`[nnz]` latents of the main entries."""


@register
class TopKSAE(SAE):
    """TopK SAE (Gao et al. 2024): the k largest pre-activations per token, ReLU'd."""

    arch = "topk"

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__(cfg, device)
        self._pre_buf: Tensor | None = None

    def activation(self, pre: Tensor) -> Tensor:
        vals, idx = topk_rows(pre, self.cfg.k)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def forward(self, x: Tensor) -> Tensor:
        vals, idx = topk_rows(self.pre_acts(self.prepare_input(x)), self.cfg.k)
        recon = kernels.sparse_decode(vals.relu(), idx, self.W_dec) + self.b_dec
        return (recon / self.input_scale).view(x.shape)

    def _select(self, pre: Tensor, rows: int) -> Entries:
        """Main entries chosen from pre-activations (this rank's, of a batch of `rows` rows)."""
        return kernels.topk_entries(pre, self.cfg.k)

    def training_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        batch = self.training_batch(x)
        x, cfg = batch.x, self.cfg
        dead = self.dead_mask()
        dead_cols = None
        if cfg.aux_coef > 0:
            dead_cols = self._aux_plan if self._aux_plan is not None else dead.nonzero().squeeze(1)
        k_aux = min(cfg.aux_k_resolved, 0 if dead_cols is None else len(dead_cols))
        sparse = cfg.k / cfg.d_sae <= cfg.sparse_density
        # Under autocast only the encoder matmul runs in low precision; the rest stays in
        # the parameters' dtype (the sparse kernels and top-k values need no more).
        mm_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            step = self._sparse_step if sparse else self._dense_step
            recon, aux_recon, vals, lat = step(batch, dead_cols if k_aux else None, k_aux, mm_dtype)

            residual, _, fvu = self._loss_terms(batch, recon)
            auxk = fvu.new_zeros(())
            if aux_recon is not None:
                residual = residual.detach()
                auxk = F.mse_loss(aux_recon, residual, reduction="sum") / self.batch_spread(residual)
            loss = fvu + cfg.aux_coef * auxk
        self.update_dead(lat, vals, batch.rows)
        metrics = {
            "loss": loss.detach(),
            "fvu": fvu.detach(),
            "auxk": auxk.detach(),
            "l0": (vals > 0).sum() / batch.rows,
            "dead_frac": dead.float().mean(),
        }
        return loss, metrics

    def _sparse_step(self, batch: Batch, dead_cols: Tensor | None, k_aux: int, mm_dtype: torch.dtype) -> _Step:
        """Top-k forward with the sparse kernels: the only dense op is the encoder matmul.

        AuxK takes the sparse kernels too while `k_aux / n_dead` is at most `aux_sparse_density`;
        with fewer dead latents the dense products over them are cheaper (`_dense_aux`)."""
        x = batch.x
        n_rows = x.shape[0]
        aux_sparse = dead_cols is not None and k_aux / len(dead_cols) <= self.cfg.aux_sparse_density
        with torch.no_grad():
            xc = (x - self.b_dec).to(mm_dtype)
            pre = torch.addmm(
                self.b_enc.to(mm_dtype), xc, self.W_enc.to(mm_dtype), out=self._workspace(n_rows, mm_dtype)
            )
            vals, lat, rows = self._select(pre, batch.rows)
            n_main = vals.numel()
            if aux_sparse:  # AuxK entries from the same pre-activations, in bags [B, 2B)
                aux_vals, aux_lat, aux_rows = kernels.topk_entries(pre, k_aux, dead_cols)
                vals = torch.cat([vals, aux_vals])
                lat = torch.cat([lat, aux_lat])
                rows = torch.cat([rows, aux_rows + n_rows])
            vals = vals.to(x.dtype)
        groups = [n_main, len(vals) - n_main] if aux_sparse else [n_main]
        out = kernels.sparse_autoencode(
            x, Entries(vals, lat, rows), groups, W_enc=self.W_enc, b_enc=self.b_enc, W_dec=self.W_dec, b_dec=self.b_dec
        )
        aux_recon = None
        if dead_cols is not None:
            aux_recon = out[1] if aux_sparse else self._dense_aux(x, dead_cols, k_aux, mm_dtype)
        return _Step(out[0] + self.b_dec, aux_recon, vals[:n_main], lat[:n_main])

    def _dense_step(self, batch: Batch, dead_cols: Tensor | None, k_aux: int, mm_dtype: torch.dtype) -> _Step:
        """Reference top-k forward with dense matmuls and plain autograd."""
        x = batch.x
        pre = torch.addmm(self.b_enc.to(mm_dtype), (x - self.b_dec).to(mm_dtype), self.W_enc.to(mm_dtype))
        pre = pre.to(x.dtype)
        with torch.no_grad():
            vals, cols, rows = self._select(pre.detach(), batch.rows)
        acts = torch.zeros_like(pre).index_put((rows, cols), pre[rows, cols].relu())
        aux_recon = self._dense_aux(x, dead_cols, k_aux, mm_dtype) if dead_cols is not None else None
        return _Step(acts @ self.W_dec + self.b_dec, aux_recon, vals, cols)

    def _dense_aux(self, x: Tensor, dead_cols: Tensor, k_aux: int, mm_dtype: torch.dtype) -> Tensor:
        """AuxK reconstruction from the top `k_aux` dead latents, with dense products over the
        `dead_cols` columns only (cost ~ batch x n_dead x d_in) and plain autograd."""
        W_enc, b_enc = self.W_enc[:, dead_cols], self.b_enc[dead_cols]
        pre = torch.addmm(b_enc.to(mm_dtype), (x - self.b_dec).to(mm_dtype), W_enc.to(mm_dtype)).to(x.dtype)
        with torch.no_grad():
            _, idx = topk_rows(pre.detach(), k_aux)
        acts = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
        return acts @ self.W_dec[dead_cols]

    def _workspace(self, n_rows: int, dtype: torch.dtype) -> Tensor:
        """Reused pre-activation buffer: allocating `[batch, d_sae]` anew every step
        costs page faults comparable to the matmul itself on CPU."""
        buf = self._pre_buf
        if buf is None or buf.shape[0] != n_rows or buf.dtype != dtype or buf.device != self.W_enc.device:
            buf = self._pre_buf = torch.empty(n_rows, self.cfg.d_sae, dtype=dtype, device=self.W_enc.device)
        return buf


@register
class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE (Bussmann et al. 2024): the `k * batch` largest pre-activations of
    the batch in training; at inference a JumpReLU with one learned threshold (as SAELens)."""

    arch = "batchtopk"

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__(cfg, device)
        self.threshold: Tensor
        self.register_buffer("threshold", torch.zeros((), dtype=self.W_enc.dtype, device=device))

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu() * (pre > self.threshold)

    def forward(self, x: Tensor) -> Tensor:
        return SAE.forward(self, x)

    def _select(self, pre: Tensor, rows: int) -> Entries:
        if self.split is None:
            entries = kernels.batch_topk_entries(pre, self.cfg.k)
            chosen = entries.vals
        else:
            entries, chosen = global_batch_topk(pre, self.cfg.k * rows)
        smallest = torch.where(chosen > 0, chosen, math.inf).min()
        ema = torch.lerp(self.threshold, smallest, self.cfg.threshold_lr)
        self.threshold.copy_(torch.where(smallest.isfinite(), ema, self.threshold))
        return entries

    def _scaled_tensors(self) -> dict[str, Tensor]:
        return super()._scaled_tensors() | {"threshold": self.threshold}

    def _export_tensor(self, name: str, tensor: Tensor) -> Tensor:
        return tensor.expand(self.cfg.d_sae) if name == "threshold" else tensor


def global_batch_topk(pre: Tensor, n: int) -> tuple[Entries, Tensor]:
    """This rank's entries among the `n` largest pre-activations of a batch split across ranks, exactly, and the values
    of all `n` (the same on every rank): each rank's own `n` largest (the most any rank can hold) are gathered, the
    `n`-th largest of them is the batch's threshold, and each rank keeps its entries at or above it. A value tied
    with the threshold on several rows can add entries (a single process breaks such ties arbitrarily)."""
    flat = pre.flatten()
    vals, idx = flat_topk(flat, min(n, flat.numel()))
    candidates = torch.full((n,), -math.inf, dtype=pre.dtype, device=pre.device)
    candidates[: len(vals)] = vals
    chosen = flat_topk(torch.cat(all_gather(candidates)), n)[0]
    keep = vals >= chosen.min()
    idx, order = idx[keep].sort()
    width = pre.shape[1]
    return Entries(vals[keep][order], idx % width, idx // width), chosen
