"""TopK (Gao et al. 2024) and BatchTopK (Bussmann et al. 2024) SAEs, trained with AuxK on the sparse kernels, and
as Matryoshka SAEs (`SAEConfig.matryoshka_prefixes` / `matryoshka_sample`, `saelab.dictionaries.matryoshka`)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.dictionaries import matryoshka
from saelab.dictionaries.base import SAE, Batch, SAEConfig
from saelab.dictionaries.registry import register
from saelab.distributed import all_gather
from saelab.errors import ConfigError
from saelab.ops import kernels
from saelab.ops.kernels import Entries, flat_topk
from saelab.ops.topk import topk_rows


class _Step(NamedTuple):
    """What one top-k forward of a training step gives the loss."""

    bands: list[Tensor]
    """`[batch, d_out]` decodes of the main entries, one per Matryoshka band, shortest prefix first (one: a plain SAE's);
    prefix `j` reconstructs `base` plus the first `j + 1`."""
    base: Tensor
    """What the decoder adds to the latents' sum (`SAE.output_base`)."""
    aux_recons: list[Tensor]
    """`[batch, d_in]` AuxK reconstructions of a residual, one per `AuxGroup` of the step."""
    vals: Tensor
    """`[nnz]` pre-activations of the main entries."""
    lat: Tensor
    """`[nnz]` latents of the main entries."""


class AuxGroup(NamedTuple):
    """Dead latents that AuxK trains together, on the residual of one reconstruction."""

    band: int
    """Whose residual they reconstruct: Matryoshka prefix `band` (the last, or a plain SAE's only one: the whole
    dictionary's)."""
    cols: Tensor
    """The dead latents, ascending."""
    k: int
    """How many of them each row uses."""
    scale: float
    """The weight of their loss."""


@register
class TopKSAE(SAE):
    """TopK SAE (Gao et al. 2024): the k largest pre-activations per token, ReLU'd."""

    arch = "topk"

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__(cfg, device)
        self._pre_buf: Tensor | None = None
        if cfg.matryoshka_sample:  # steps that drew prefixes: in checkpoints, so a resumed run draws the same ones
            self.prefix_draws: Tensor
            self.register_buffer("prefix_draws", torch.zeros((), dtype=torch.long, device=device))

    def activation(self, pre: Tensor) -> Tensor:
        vals, idx = topk_rows(pre, self.cfg.k)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def forward(self, x: Tensor) -> Tensor:
        scaled = self.prepare_input(x)
        vals, idx = topk_rows(self.pre_acts(scaled), self.cfg.k)
        recon = kernels.sparse_decode(vals.relu(), idx, self.W_dec) + self.output_base(scaled)
        return self._unwhiten(recon / self.output_scale).view(*x.shape[:-1], self.cfg.d_out_resolved)

    def _select(self, pre: Tensor, rows: int) -> Entries:
        """Main entries chosen from pre-activations (this rank's, of a batch of `rows` rows)."""
        return kernels.topk_entries(pre, self.cfg.k)

    def training_loss(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        batch = self.training_batch(x, y)
        x, cfg = batch.x, self.cfg
        dead = self.dead_mask()
        dead_cols = None
        if cfg.aux_coef > 0:
            dead_cols = self._aux_plan if self._aux_plan is not None else dead.nonzero().squeeze(1)
        widths = self.inner_prefixes()
        aux = self._aux_groups(dead_cols, widths)
        sparse = cfg.k / cfg.d_sae <= cfg.sparse_density
        # Under autocast only the encoder matmul runs in low precision; the rest stays in
        # the parameters' dtype (the sparse kernels and top-k values need no more).
        mm_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        with torch.autocast(x.device.type, enabled=False):
            step = self._sparse_step if sparse else self._dense_step
            bands, base, aux_recons, vals, lat = step(batch, aux, mm_dtype, widths)
            # every prefix's squared error from one running residual (`kernels.nested_sse`); the last: the whole SAE's
            masked = batch.masked
            target = (batch.x if batch.y is None else batch.y) if masked is None else masked.target
            sse, residuals = kernels.nested_sse(target, base, bands, None if masked is None else masked.held_out)
            fvus = sse / (batch.total_var if masked is None else masked.held_var)
            fvu, inner_fvu = fvus[-1], fvus[:-1]
            auxk = fvu.new_zeros(())
            for group, aux_recon in zip(aux, aux_recons, strict=True):
                residual = residuals[group.band]
                aux_recon = self.held_out(batch, aux_recon)  # masking: the residual is on the held-out dims alone
                auxk = auxk + group.scale * F.mse_loss(aux_recon, residual, reduction="sum") / self.residual_spread(
                    residual, sse[group.band].detach()
                )
            recon_loss = fvus.mean()
            loss = recon_loss + cfg.aux_coef * auxk
        self.update_dead(lat, vals, batch.rows)
        metrics = {
            "loss": loss.detach(),
            "fvu": fvu.detach(),
            "auxk": auxk.detach(),
            "l0": (vals > 0).sum() / batch.rows,
            "dead_frac": dead.float().mean(),
        }
        if cfg.matryoshka_prefixes:  # fixed widths: each prefix's FVU (drawn ones differ per step)
            metrics |= {f"fvu_{w}": v.detach() for w, v in zip(widths, inner_fvu, strict=True)}
        if widths:
            metrics["prefix_fvu"] = recon_loss.detach()
        return loss, metrics

    def _aux_groups(self, dead_cols: Tensor | None, inner: list[int]) -> list[AuxGroup]:
        """The AuxK groups of a step: all dead latents on the whole dictionary's residual; with Matryoshka prefixes
        and `matryoshka_aux`, the dead latents of each band on their own prefix's residual, weighted by
        `min(n_dead / aux_k, 1)` (SAELens's `calculate_matryoshka_aux_loss`), so dead latents of a short prefix learn
        what it misses. Splitting them by band reads the counts on the host (one device sync on a GPU)."""
        cfg = self.cfg
        k_aux = min(cfg.aux_k_resolved, 0 if dead_cols is None else len(dead_cols))
        if dead_cols is None or not k_aux:
            return []
        if not (inner and cfg.matryoshka_aux):
            return [AuxGroup(len(inner), dead_cols, k_aux, 1.0)]
        band = torch.bucketize(
            dead_cols, torch.tensor(inner, dtype=dead_cols.dtype, device=dead_cols.device), right=True
        )
        counts = torch.bincount(band, minlength=len(inner) + 1).tolist()
        return [
            AuxGroup(j, cols, min(cfg.aux_k_resolved, len(cols)), min(len(cols) / cfg.aux_k_resolved, 1.0))
            for j, cols in enumerate(dead_cols.split(counts))
            if len(cols)
        ]

    def inner_prefixes(self) -> list[int]:
        """The Matryoshka prefix widths below `d_sae` that this training step reconstructs from: the fixed
        `matryoshka_prefixes`, or `matryoshka_sample` widths drawn for this step (the draw counter advances);
        empty for a plain SAE."""
        cfg = self.cfg
        if cfg.matryoshka_sample:
            draw = int(self.prefix_draws)
            self.prefix_draws.add_(1)
            return matryoshka.sample_prefixes(cfg.d_sae, cfg.matryoshka_sample, draw)[:-1]
        return (cfg.matryoshka_prefixes or [cfg.d_sae])[:-1]

    def prefix(self, n: int) -> TopKSAE:
        """A new SAE of the first `n` latents (a Matryoshka prefix, or any), usable on its own: the same weights,
        input scale and threshold, its config's `d_sae = n` with the prefix widths up to `n` (`k` at most `n`), in
        eval mode. A BatchTopK prefix encodes exactly as the whole SAE's first `n` latents do, and reconstructs as
        the whole SAE's prefix `n` does in training; a TopK prefix picks its own top `k` among its `n` latents."""
        cfg = self.cfg
        if not 0 < n <= cfg.d_sae:
            raise ConfigError(f"a prefix of {n} latents does not fit d_sae={cfg.d_sae}; give 1 <= n <= {cfg.d_sae}")
        widths = [w for w in cfg.matryoshka_prefixes if w < n] + [n] if cfg.matryoshka_prefixes else None
        sample = cfg.matryoshka_sample if cfg.matryoshka_sample and cfg.matryoshka_sample <= n else None
        update = {"d_sae": n, "k": min(cfg.k, n), "matryoshka_prefixes": widths, "matryoshka_sample": sample}
        sub = type(self)(SAEConfig.model_validate(cfg.model_dump() | update), self.W_enc.device)
        latent_major = {"b_enc", "W_dec", "tokens_since_fired"}
        state = {
            name: t[:, :n] if name == "W_enc" else t[:n] if name in latent_major else t
            for name, t in self.state_dict().items()
        }
        sub.load_state_dict({name: t for name, t in state.items() if name in sub.state_dict()})
        return sub.eval()

    def _sparse_step(self, batch: Batch, aux: list[AuxGroup], mm_dtype: torch.dtype, inner: list[int]) -> _Step:
        """Top-k forward with the sparse kernels: the only dense op is the encoder matmul.

        Each AuxK group takes the sparse kernels too while `k / n_dead` is at most `aux_sparse_density`;
        with fewer dead latents the dense products over them are cheaper (`_dense_aux`, all such groups in one pass).
        With `inner` prefix widths
        the main entries are decoded in one group per latent band (`matryoshka.band_entries`)."""
        x = batch.x
        n_rows = x.shape[0]
        aux_sparse = [g.k / len(g.cols) <= self.cfg.aux_sparse_density for g in aux]
        with torch.no_grad():
            xc = (x - self.b_in).to(mm_dtype)
            pre = torch.addmm(
                self.b_enc.to(mm_dtype), xc, self.W_enc.to(mm_dtype), out=self._workspace(n_rows, mm_dtype)
            )
            vals, lat, rows = self._select(pre, batch.rows)
            n_main = vals.numel()
            groups = [n_main]
            parts = [Entries(vals, lat, rows)]
            if inner:
                parts[0], groups = matryoshka.band_entries(parts[0], inner, n_rows)
            for group, sparse in zip(aux, aux_sparse, strict=True):
                if sparse:  # AuxK entries from the same pre-activations, in the bags after the main ones
                    aux_vals, aux_lat, aux_rows = kernels.topk_entries(pre, group.k, group.cols)
                    parts.append(Entries(aux_vals, aux_lat, aux_rows + len(groups) * n_rows))
                    groups.append(len(aux_vals))
            vals, lat, rows = (torch.cat(t) for t in zip(*parts, strict=True)) if len(parts) > 1 else parts[0]
            vals = vals.to(x.dtype)
        out = kernels.sparse_autoencode(
            x, Entries(vals, lat, rows), groups, W_enc=self.W_enc, b_enc=self.b_enc, W_dec=self.W_dec, b_dec=self.b_in
        )
        sparse_out = iter(out[len(inner) + 1 :])
        dense_out = iter(
            self._dense_aux(x, [g for g, sparse in zip(aux, aux_sparse, strict=True) if not sparse], mm_dtype)
        )
        aux_recons = [next(sparse_out) if sparse else next(dense_out) for sparse in aux_sparse]
        return _Step(list(out[: len(inner) + 1]), self.output_base(x), aux_recons, vals[:n_main], lat[:n_main])

    def _dense_step(self, batch: Batch, aux: list[AuxGroup], mm_dtype: torch.dtype, inner: list[int]) -> _Step:
        """Reference top-k forward with dense matmuls and plain autograd."""
        x = batch.x
        pre = torch.addmm(self.b_enc.to(mm_dtype), (x - self.b_in).to(mm_dtype), self.W_enc.to(mm_dtype))
        pre = pre.to(x.dtype)
        with torch.no_grad():
            vals, cols, rows = self._select(pre.detach(), batch.rows)
        acts = torch.zeros_like(pre).index_put((rows, cols), pre[rows, cols].relu())
        bands = matryoshka.dense_band_decodes(acts, self.W_dec, inner)
        return _Step(bands, self.output_base(x), self._dense_aux(x, aux, mm_dtype), vals, cols)

    def _dense_aux(self, x: Tensor, groups: list[AuxGroup], mm_dtype: torch.dtype) -> list[Tensor]:
        """AuxK reconstructions of `groups`, each from its top `k` dead latents, with dense products over their
        columns only and plain autograd, all groups in one pass (`kernels.dense_topk_decodes`)."""
        if not groups:
            return []
        cols = [(g.cols, g.k) for g in groups]
        return kernels.dense_topk_decodes(
            x - self.b_in, cols, W_enc=self.W_enc, b_enc=self.b_enc, W_dec=self.W_dec, mm_dtype=mm_dtype
        )

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
