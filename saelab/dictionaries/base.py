"""The SAE interface every architecture implements (its config is `saelab.dictionaries.config`, its batch and loss
terms `saelab.dictionaries.batch`; both are re-exported here, where they lived first).

Every SAE has `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]` and `b_dec [d_in]` and computes
`f = act((x * s - b_dec) @ W_enc + b_enc) / s` and `x_hat = f @ W_dec + b_dec / s`, where `s = input_scale`
makes the mean input norm `sqrt(d_in)` during training. `save` folds `s` into the weights, so saved SAEs
(and SAELens, which loads them) work on raw activations.

A transcoder (`SAEConfig.d_out`) is the same class reading one hook and writing another: `W_dec [d_sae, d_out]`,
`b_dec [d_out]`, no bias subtracted from its input, its target scaled by its own `target_scale`, and a skip
transcoder's `W_skip [d_out, d_in]` (`saelab.dictionaries.transcoder` says which reference it follows).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from saelab.dictionaries.batch import (
    Batch,
    LossTerms,
    Masked,
    geometric_median,
    global_spread,
    held_out_dims,
    spread,
)
from saelab.dictionaries.config import DType, SAEConfig
from saelab.dictionaries.preprocessing import Whitening, fold_whitening
from saelab.dictionaries.registry import sae_class
from saelab.distributed import all_reduce_sum

__all__ = [
    "SAE",
    "Batch",
    "DType",
    "LossTerms",
    "Masked",
    "SAEConfig",
    "geometric_median",
    "held_out_dims",
    "train_step",
]


class SAE(nn.Module):
    """Base class; build with `SAE.from_config(cfg)` or `SAE.load(path)`."""

    arch: ClassVar[str]
    signed_codes: ClassVar[bool] = False
    """Whether its codes can be negative (ICFL's pursuit coefficients): analyses that rank activations refuse it."""

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__()
        if cfg.arch != self.arch:
            raise ValueError(f"{type(self).__name__} got arch={cfg.arch!r}; use SAE.from_config(cfg)")
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        d_out = cfg.d_out_resolved
        W_dec = torch.randn(cfg.d_sae, d_out, dtype=dtype, device=device)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_enc = W_dec.T.contiguous()  # a transcoder's: random unit columns (its input is another space)
        if cfg.d_out is not None:
            W_enc = torch.randn(cfg.d_in, cfg.d_sae, dtype=dtype, device=device)
            W_enc /= W_enc.norm(dim=0, keepdim=True)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_out, dtype=dtype, device=device))
        self.W_skip: nn.Parameter | None
        skip = nn.Parameter(torch.zeros(d_out, cfg.d_in, dtype=dtype, device=device)) if cfg.skip else None
        self.register_parameter("W_skip", skip)  # a skip transcoder's `x @ W_skip.T`, zero at the start
        self.input_scale: Tensor
        self.target_scale: Tensor | None
        self._zero_in: Tensor | None
        self.tokens_since_fired: Tensor
        self.register_buffer("input_scale", torch.ones((), dtype=dtype, device=device))
        transcodes = cfg.d_out is not None
        self.register_buffer("target_scale", torch.ones((), dtype=dtype, device=device) if transcodes else None)
        zero_in = torch.zeros(cfg.d_in, dtype=dtype, device=device) if transcodes else None
        self.register_buffer("_zero_in", zero_in, persistent=False)  # `b_in` of a transcoder
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long, device=device))
        self.whiten_mean: Tensor | None
        self.whiten_matrix: Tensor | None
        self.whiten_inverse: Tensor | None
        eye = torch.eye(cfg.d_in, dtype=dtype, device=device) if cfg.whiten else None
        self.register_buffer("whiten_mean", torch.zeros(cfg.d_in, dtype=dtype, device=device) if cfg.whiten else None)
        self.register_buffer("whiten_matrix", eye)  # `z = (x - whiten_mean) @ whiten_matrix` (`set_whitening`)
        self.register_buffer("whiten_inverse", None if eye is None else eye.clone())
        self._aux_plan: Tensor | None = None  # dead latents AuxK trains on
        self.split: slice | None = None
        """The rows of each training batch that this rank trains on, when every rank is given the whole batch and
        trains on its slice of it (`parallel: ddp`); `None`: all of them. When set, the loss's denominators, the
        dead-latent counters and BatchTopK's selection are those of the whole batch, and each metric a step returns
        is this rank's share (`train_step` sums gradients, counters and shares over the ranks)."""
        self._fired: tuple[Tensor, int] | None = None  # under `split`: (latents fired here, tokens) not yet summed

    @staticmethod
    def from_config(cfg: SAEConfig, device: torch.device | str | None = None) -> SAE:
        """A freshly initialised SAE of the class registered for `cfg.arch`."""
        return sae_class(cfg.arch)(cfg, device)

    # ----------------------------------------------------------------- inference

    def prepare_input(self, x: Tensor) -> Tensor:
        """Raw activations `[..., d_in]` as the encoder reads them: `[batch, d_in]` in the SAE's dtype, whitened
        (`cfg.whiten`), times `input_scale` (which makes the mean input norm sqrt(d_in) in training; 1 once folded,
        as in a saved SAE)."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"expected activations [..., d_in={self.cfg.d_in}], got shape {tuple(x.shape)}")
        return self._whiten(x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype)) * self.input_scale

    def _whiten(self, x: Tensor) -> Tensor:
        """`(x - whiten_mean) @ whiten_matrix` for an SAE that whitens (`cfg.whiten`), else `x`."""
        if self.whiten_mean is None or self.whiten_matrix is None:
            return x
        return (x - self.whiten_mean) @ self.whiten_matrix

    def _unwhiten(self, z: Tensor) -> Tensor:
        """Whitened rows back in raw units: `z @ whiten_inverse + whiten_mean` (`cfg.whiten`), else `z`."""
        if self.whiten_mean is None or self.whiten_inverse is None:
            return z
        return torch.addmm(self.whiten_mean, z, self.whiten_inverse)

    def prepare_target(self, y: Tensor) -> Tensor:
        """A transcoder's raw output rows `[..., d_out]` as its loss reads them: `[batch, d_out]` in its dtype, times
        `target_scale`."""
        d_out = self.cfg.d_out_resolved
        if y.shape[-1] != d_out:
            raise ValueError(f"expected outputs [..., d_out={d_out}], got shape {tuple(y.shape)}")
        return y.reshape(-1, d_out).to(self.W_enc.dtype) * self.output_scale

    @property
    def output_scale(self) -> Tensor:
        """What the output is scaled by in training: `input_scale` for an SAE, whose output is its input; a
        transcoder's `target_scale` (mean output norm `sqrt(d_out)`; 1 once folded)."""
        return self.input_scale if self.target_scale is None else self.target_scale

    @property
    def b_in(self) -> Tensor:
        """What the encoder subtracts from the scaled input: `b_dec` for an SAE (SAELens's `apply_b_dec_to_input`); a
        zero vector for a transcoder, whose `b_dec` lives in the output space (SAELens's and sparsify's transcoders
        subtract nothing)."""
        return self.b_dec if self._zero_in is None else self._zero_in

    def output_base(self, x: Tensor) -> Tensor:
        """What the decoder adds to the latents' sum for scaled inputs `x` `[batch, d_in]`: `b_dec`, plus a skip
        transcoder's linear skip `x @ W_skip.T` (`[batch, d_out]`)."""
        return self.b_dec if self.W_skip is None else torch.addmm(self.b_dec, x, self.W_skip.T)

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations `[batch, d_sae]` of already scaled inputs `[batch, d_in]`."""
        return torch.addmm(self.b_enc, x - self.b_in, self.W_enc)

    def activation(self, pre: Tensor) -> Tensor:
        """Dense latent activations from pre-activations."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations `[..., d_sae]` of raw activations `[..., d_in]`."""
        f = self.activation(self.pre_acts(self.prepare_input(x))) / self.output_scale
        return f.view(*x.shape[:-1], self.cfg.d_sae)

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction `[..., d_in]` (a transcoder's output `[..., d_out]`, without a skip transcoder's skip, as
        SAELens's `SkipTranscoder.decode`) from latent activations `[..., d_sae]` (in raw units, also when
        whitening)."""
        recon = f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec / self.output_scale
        return recon if self.whiten_mean is None else self._unwhiten(recon.reshape(-1, self.cfg.d_in)).view_as(recon)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of raw activations `x` (a transcoder's output, with its skip)."""
        out = self.decode(self.encode(x))
        if self.W_skip is None:
            return out
        return out + (self.prepare_input(x) @ self.W_skip.T / self.output_scale).view_as(out)

    # ------------------------------------------------------------------ training

    def training_loss(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of a batch of raw activations `[..., d_in]` (a transcoder's: and of its outputs `y` `[..., d_out]`)
        and detached metric tensors.

        Also updates the dead-latent counters. Metrics never synchronise with the device.
        """
        raise NotImplementedError

    def training_batch(self, x: Tensor, y: Tensor | None = None) -> Batch:
        """Raw activations `[..., d_in]` of a whole batch as the loss reads them: whitened and scaled, sliced to
        `split`, and masked (`cfg.mask_fraction`); a transcoder's outputs `y` `[..., d_out]` scaled and sliced too.

        Masking follows Chidambaram et al. 2023 and their code (github.com/2014mchidamb/masked-sparse-coding-icml,
        `masking_loss`): each step hides one random subset of `cfg.masked_dims` input dimensions from the encoder,
        the same for every row of the batch, and the loss is the reconstruction error on that subset alone, so
        latents that fit the noise of the dimensions they read gain nothing. The paper fits codes by OMP on the kept
        dimensions, which needs no rescaling; an SAE's encoder is a linear read-out, so the kept part of `x - b_dec`
        is scaled by `d_in / kept` (as inverted dropout) to keep the pre-activations at the scale inference sees,
        where the encoder reads every dimension unmasked. The subset is drawn from a hash of the batch's first and
        last rows (`held_out_dims`): every rank of a split batch draws the same one, and a resumed run the same as an
        uninterrupted one, with no generator state to checkpoint."""
        if (y is None) != (self.cfg.d_out is None):
            raise ValueError(
                "a transcoder trains on input and output rows, an SAE on its input alone; pass y for a transcoder only"
            )
        x = self.prepare_input(x)
        rows = x if self.split is None else x[self.split]
        if y is not None:
            y = self.prepare_target(y)
            return Batch(rows, x.shape[0], spread(y), y=y if self.split is None else y[self.split])
        if self.cfg.mask_fraction is None:
            return Batch(rows, x.shape[0], spread(x))
        d_in = self.cfg.d_in
        held = held_out_dims(x, self.cfg.masked_dims).to(x.dtype)
        keep = (1 - held) * (d_in / (d_in - self.cfg.masked_dims))
        enc = torch.addcmul(self.b_dec, rows - self.b_dec, keep)
        return Batch(enc, x.shape[0], spread(x), Masked(rows, held, spread(x * held)))

    def _loss_terms(self, batch: Batch, recon: Tensor) -> LossTerms:
        """Residual, total variance of the whole batch and fraction of variance unexplained (with masking, on the
        held-out dimensions)."""
        if batch.masked is None:
            x = batch.x if batch.y is None else batch.y
            return LossTerms(x - recon, batch.total_var, F.mse_loss(recon, x, reduction="sum") / batch.total_var)
        target, held, held_var = batch.masked
        residual = (target - recon) * held
        return LossTerms(residual, batch.total_var, residual.square().sum() / held_var)

    @staticmethod
    def held_out(batch: Batch, t: Tensor) -> Tensor:
        """`t` `[rows, d_in]` on the dimensions a masked batch takes its loss on (zero elsewhere); `t` unmasked."""
        return t if batch.masked is None else t * batch.masked.held_out

    def residual_spread(self, residual: Tensor, sse: Tensor) -> Tensor:
        """`spread` of a residual of this rank's slice of a batch, over the whole batch (`global_spread` under `split`),
        given its squared norm `sse` (`|residual|^2`): on one rank `sse - n |mean|^2` in float64, one pass over the
        rows where `spread` takes three. A residual's mean is small against its spread, so the difference loses no
        precision that matters (`spread` itself sums in float32)."""
        if self.split is not None:
            return global_spread(residual)
        mean = residual.mean(0, dtype=torch.float64)
        return (sse.double() - residual.shape[0] * mean.dot(mean)).to(sse.dtype)

    @torch.no_grad()
    def plan_aux(self) -> None:
        """Fix the dead latents AuxK trains on until the next call.

        Sizing AuxK needs the number of dead latents on the host, one device sync. A trainer calls
        this every few steps so the hot loop never waits; without it, each step syncs once."""
        self._aux_plan = self.dead_mask().nonzero().squeeze(1)

    def dead_mask(self) -> Tensor:
        """Latents that have not fired in the last `cfg.dead_tokens` tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    @torch.no_grad()
    def update_dead(self, latents: Tensor, acts: Tensor, n_tokens: int) -> None:
        """Count `n_tokens` more tokens and reset latents with a positive activation.

        `latents` and `acts` are matching flat (latent, activation) entries, e.g. the
        top-k indices and values; nothing of size `[batch, d_sae]` is needed. Under `split` (`n_tokens`: the
        whole batch's) the latents this rank saw fire wait to be summed over the ranks with the gradients
        (`sum_over_ranks` calls `reset_fired`), so every rank keeps the counters a single process would.
        """
        if self.split is not None:
            fired = torch.zeros(self.cfg.d_sae, dtype=self.W_enc.dtype, device=latents.device)
            self._fired = fired.index_fill_(0, latents.flatten()[acts.flatten() > 0], 1), n_tokens
            return
        self.tokens_since_fired += n_tokens
        never = torch.iinfo(torch.long).max
        reset = torch.where(acts.flatten() > 0, 0, never)
        self.tokens_since_fired.scatter_reduce_(0, latents.flatten(), reset, reduce="amin")

    @torch.no_grad()
    def reset_fired(self, fired: Tensor, n_tokens: int) -> None:
        """Count `n_tokens` more tokens and reset the latents where `fired [d_sae]` is positive."""
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired.masked_fill_(fired > 0, 0)

    @torch.no_grad()
    def init_from_sample(self, x: Tensor, y: Tensor | None = None) -> None:
        """Set `input_scale` so the mean norm is sqrt(d_in), and `b_dec` to the
        geometric median of the scaled sample `[n, d_in]` (whitened first if the SAE whitens: `set_whitening`
        comes before). A transcoder takes its outputs `y` `[n, d_out]` too: `target_scale` makes their mean norm
        sqrt(d_out), `b_dec` is their scaled geometric median, and `b_enc` centres the pre-activations on the scaled
        inputs' geometric median (sparsify's transcoder initialisation, with the median for the mean)."""
        x = self._whiten(x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype))
        self.input_scale.fill_(math.sqrt(self.cfg.d_in) / x.norm(dim=1).mean())
        if self.target_scale is None:
            self.b_dec.copy_(geometric_median(x * self.input_scale))
            return
        if y is None:
            raise ValueError("a transcoder's initialisation needs a sample of its outputs too; pass y")
        y = y.reshape(-1, self.cfg.d_out_resolved).to(self.W_enc.dtype)
        self.target_scale.fill_(math.sqrt(self.cfg.d_out_resolved) / y.norm(dim=1).mean())
        self.b_dec.copy_(geometric_median(y * self.target_scale))
        self.b_enc.copy_(-geometric_median(x * self.input_scale) @ self.W_enc)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each decoder row (call before the step)."""
        if self.W_dec.grad is not None:
            parallel = torch.linalg.vecdot(self.W_dec.grad, self.W_dec)
            self.W_dec.grad.addcmul_(parallel[:, None], self.W_dec, value=-1)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (call after the step)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.W_dec.dtype).eps)

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Fold `input_scale` into the biases (and thresholds) so the SAE takes raw
        activations with `input_scale == 1`; encodings and reconstructions are unchanged. A transcoder folds its
        `target_scale` too: the biases and thresholds are divided by it, `W_enc` and `W_skip` multiplied by
        `input_scale / target_scale`, so its codes stay the weights of unit-norm decoder rows in raw output units."""
        ratio = self.input_scale / self.output_scale
        for tensor in self._input_tensors().values():
            tensor *= ratio
        for tensor in self._scaled_tensors().values():
            tensor /= self.output_scale
        self.input_scale.fill_(1.0)
        if self.target_scale is not None:
            self.target_scale.fill_(1.0)

    def _scaled_tensors(self) -> dict[str, Tensor]:
        """Tensors in units of the scaled output (an SAE's: its input), keyed by their SAELens name."""
        return {"b_enc": self.b_enc, "b_dec": self.b_dec}

    def _input_tensors(self) -> dict[str, Tensor]:
        """Tensors that multiply the scaled input, keyed by their SAELens name: folding scales them by
        `input_scale / output_scale` (1 for an SAE)."""
        tensors: dict[str, Tensor] = {"W_enc": self.W_enc}
        return tensors if self.W_skip is None else tensors | {"W_skip": self.W_skip}

    @torch.no_grad()
    def set_whitening(self, whitening: Whitening) -> None:
        """Whiten the inputs with `whitening` (`saelab.dictionaries.preprocessing.pca_whitening`); for an SAE whose
        config says `whiten`, before `init_from_sample`."""
        if self.whiten_mean is None or self.whiten_matrix is None or self.whiten_inverse is None:
            raise ValueError("this SAE does not whiten; build it from a config with whiten=True")
        self.whiten_mean.copy_(whitening.mean)
        self.whiten_matrix.copy_(whitening.matrix)
        self.whiten_inverse.copy_(whitening.inverse)

    @torch.no_grad()
    def folded(self) -> SAE:
        """A copy of this whitening SAE that reads and writes raw activations with the whitening and the input scale
        folded into its weights (`preprocessing.fold_whitening`): the same codes and reconstructions, a config that
        says `whiten: false, whitened: true`, and decoder rows that are raw-space directions (not unit norm)."""
        if self.whiten_mean is None or self.whiten_matrix is None or self.whiten_inverse is None:
            raise ValueError("this SAE does not whiten, so there is nothing to fold; save it as it is")
        cfg = self.cfg.model_copy(update={"whiten": False, "whitened": True})
        copy = SAE.from_config(cfg, device=self.W_enc.device)
        whitening = {"whiten_mean", "whiten_matrix", "whiten_inverse"}
        copy.load_state_dict({k: v for k, v in self.state_dict().items() if k not in whitening})
        copy.fold_input_scale()
        weights = fold_whitening(
            copy.W_enc,
            copy.W_dec,
            copy.b_dec,
            mean=self.whiten_mean,
            matrix=self.whiten_matrix,
            inverse=self.whiten_inverse,
        )
        for name, tensor in zip(("W_enc", "W_dec", "b_dec"), weights, strict=True):
            getattr(copy, name).copy_(tensor)
        return copy

    # --------------------------------------------------------------- checkpoints

    def save(self, path: str | Path) -> None:
        """Write `cfg.json` and `sae_weights.safetensors` in SAELens 6 layout (scale and whitening folded)."""
        from saelab.dictionaries.saelens import save_sae  # saelens builds on this module

        save_sae(self if self.whiten_mean is None else self.folded(), path)

    def _export_tensor(self, name: str, tensor: Tensor) -> Tensor:
        """The tensor `name` as the saved checkpoint holds it (e.g. a scalar threshold repeated per latent)."""
        return tensor

    @staticmethod
    def load(path: str | Path, device: torch.device | str | None = None) -> SAE:
        """Load an SAE saved by saelab or SAELens (`SAE.save_model` / `save_inference_model`).

        A folder without the two files raises `MissingError`; one whose files cannot be read as an SAE
        raises `SAELoadError` naming what is wrong (both are `SaelabError`s)."""
        from saelab.dictionaries.saelens import load_sae  # saelens builds on this module

        return load_sae(path, device)


REPLICATED_METRICS = frozenset({"dead_frac"})
"""Step metrics that every rank of a split batch computes alike; every other one is a rank's share of the batch's."""


@torch.no_grad()
def sum_over_ranks(sae: SAE, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum a `split` step's gradients, latents fired and metric shares over the ranks, in one flat all-reduce; set
    the summed gradients and dead-latent counters; return the whole batch's metrics. A parameter without a gradient
    counts as a zero one, so every rank sends the same layout."""
    if sae._fired is None:
        raise RuntimeError("sum_over_ranks follows a `split` training loss, which records the latents fired")
    (fired, n_tokens), sae._fired = sae._fired, None
    params = [p for p in sae.parameters() if p.requires_grad]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    shared = [k for k in metrics if k not in REPLICATED_METRICS]
    parts = [g.flatten() for g in grads] + [fired] + [metrics[k].reshape(1).to(fired.dtype) for k in shared]
    pieces = all_reduce_sum(torch.cat(parts)).split([len(part) for part in parts])
    for p, g, piece in zip(params, grads, pieces, strict=False):
        p.grad = g.copy_(piece.view_as(g))
    sae.reset_fired(pieces[len(grads)], n_tokens)
    summed = {k: v.reshape(()).to(metrics[k].dtype) for k, v in zip(shared, pieces[len(grads) + 1 :], strict=True)}
    return metrics | summed


class StepOptimizer(Protocol):
    """What `train_step` needs of an optimiser: a `torch.optim.Optimizer`, or a schedule-free wrapper around one."""

    def step(self) -> object: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...


def train_step(sae: SAE, optimizer: StepOptimizer, x: Tensor, y: Tensor | None = None) -> dict[str, Tensor]:
    """One optimisation step on raw activations `x` (a transcoder's: to its outputs `y`): loss, backward,
    decoder-gradient projection, optimiser step, decoder renormalisation. Returns detached metrics.

    Under `sae.split` every rank is given the whole batch `x` and computes its slice's part; the parts are summed over
    the ranks (`sum_over_ranks`) before the optimiser step, so every rank takes the whole batch's step."""
    loss, metrics = sae.training_loss(x) if y is None else sae.training_loss(x, y)  # ICFL takes `x` alone
    loss.backward()
    if sae.split is not None:
        metrics = sum_over_ranks(sae, metrics)
    sae.project_decoder_grad()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sae.normalize_decoder()
    return metrics
