"""The SAE interface every architecture implements, its config, and the initialisation helpers.

Every SAE has `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]` and `b_dec [d_in]` and computes
`f = act((x * s - b_dec) @ W_enc + b_enc) / s` and `x_hat = f @ W_dec + b_dec / s`, where `s = input_scale`
makes the mean input norm `sqrt(d_in)` during training. `save` folds `s` into the weights, so saved SAEs
(and SAELens, which loads them) work on raw activations.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from saelab.dictionaries.registry import Arch, sae_class

DType = Literal["float32", "float64", "bfloat16", "float16"]


class SAEConfig(BaseModel):
    """Architecture, training hyper-parameters and provenance of an SAE."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    arch: Arch = "topk"
    d_in: int = Field(gt=0, description="Width of the activations the SAE reads.")
    d_sae: int = Field(gt=0, description="Number of latents.")
    k: int = Field(default=32, gt=0, description="Active latents per token (batchtopk: on average); at most d_sae.")
    aux_k: int | None = Field(default=None, ge=0, description="AuxK latents per token; None means d_in // 2.")
    aux_coef: float = Field(default=1 / 32, ge=0, description="AuxK loss weight (topk/batchtopk); 0 disables.")
    dead_tokens: int = Field(default=10_000_000, gt=0, description="A latent is dead after this many tokens unfired.")
    l1_coef: float = Field(
        default=5.0, ge=0, description="ReLU SAE: L1 weight (loss = (SSE + l1_coef * L1) / variance)."
    )
    l0_coef: float = Field(
        default=1.0, ge=0, description="JumpReLU SAE: L0 weight (loss = (SSE + l0_coef * L0) / variance)."
    )
    jumprelu_bandwidth: float = Field(
        default=0.05, gt=0, description="JumpReLU SAE: width of the straight-through window."
    )
    jumprelu_init_threshold: float = Field(
        default=0.1, ge=0, description="JumpReLU SAE: initial threshold of every latent."
    )
    threshold_lr: float = Field(default=0.01, gt=0, le=1, description="BatchTopK: EMA rate of the inference threshold.")
    sparse_density: float = Field(
        default=1 / 16,
        ge=0,
        le=1,
        description="Use the sparse kernels when k / d_sae <= this fraction, else dense matmuls.",
    )
    aux_sparse_density: float = Field(
        default=1 / 6,
        ge=0,
        le=1,
        description="With sparse main latents, AuxK uses the sparse kernels when k_aux / n_dead "
        "<= this fraction, else dense products over the dead latents only (CPU break-even measured at about 0.15).",
    )
    dtype: DType = "float32"
    model_name: str = ""
    hook_name: str = ""
    context_size: int | None = Field(default=None, gt=0, description="Context length of the activations trained on.")
    dataset: str = ""

    @model_validator(mode="after")
    def _check_k(self) -> SAEConfig:
        if self.arch in ("topk", "batchtopk") and self.k > self.d_sae:
            raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}; lower k or widen the SAE")
        return self

    @property
    def aux_k_resolved(self) -> int:
        return self.d_in // 2 if self.aux_k is None else self.aux_k


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 8, eps: float = 1e-6) -> Tensor:
    """Geometric median of the rows of `x` by Weiszfeld iterations from the mean."""
    median = x.mean(0)
    for _ in range(iters):
        weights = 1 / (x - median).norm(dim=1).clamp_min(eps)
        median = (weights @ x) / weights.sum()
    return median


def spread(x: Tensor) -> Tensor:
    """Summed squared deviation of the rows of `x` from their mean (`x.var(0).sum() * n`,
    several times faster than `var` on CPU)."""
    return (x - x.mean(0)).square().sum()


class LossTerms(NamedTuple):
    """The reconstruction terms every SAE loss starts from."""

    residual: Tensor
    """`x - recon`, `[batch, d_in]`."""
    total_var: Tensor
    """Summed squared deviation of `x` from its mean (the FVU's denominator)."""
    fvu: Tensor
    """Fraction of variance unexplained: squared error over `total_var`."""


class SAE(nn.Module):
    """Base class; build with `SAE.from_config(cfg)` or `SAE.load(path)`."""

    arch: ClassVar[str]

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__()
        if cfg.arch != self.arch:
            raise ValueError(f"{type(self).__name__} got arch={cfg.arch!r}; use SAE.from_config(cfg)")
        self.cfg = cfg
        dtype = getattr(torch, cfg.dtype)
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, dtype=dtype, device=device)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_enc = nn.Parameter(W_dec.T.contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype, device=device))
        self.input_scale: Tensor
        self.tokens_since_fired: Tensor
        self.register_buffer("input_scale", torch.ones((), dtype=dtype, device=device))
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long, device=device))
        self._aux_plan: Tensor | None = None  # dead latents AuxK trains on

    @staticmethod
    def from_config(cfg: SAEConfig, device: torch.device | str | None = None) -> SAE:
        """A freshly initialised SAE of the class registered for `cfg.arch`."""
        return sae_class(cfg.arch)(cfg, device)

    # ----------------------------------------------------------------- inference

    def prepare_input(self, x: Tensor) -> Tensor:
        """Raw activations `[..., d_in]` as the encoder reads them: `[batch, d_in]` in the SAE's dtype, times
        `input_scale` (which makes the mean input norm sqrt(d_in) in training; 1 once folded, as in a saved SAE)."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"expected activations [..., d_in={self.cfg.d_in}], got shape {tuple(x.shape)}")
        return x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype) * self.input_scale

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations `[batch, d_sae]` of already scaled inputs `[batch, d_in]`."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def activation(self, pre: Tensor) -> Tensor:
        """Dense latent activations from pre-activations."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations `[..., d_sae]` of raw activations `[..., d_in]`."""
        f = self.activation(self.pre_acts(self.prepare_input(x))) / self.input_scale
        return f.view(*x.shape[:-1], self.cfg.d_sae)

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction `[..., d_in]` from latent activations `[..., d_sae]`."""
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec / self.input_scale

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of raw activations `x`."""
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ training

    def training_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of a batch of raw activations `[..., d_in]` and detached metric tensors.

        Also updates the dead-latent counters. Metrics never synchronise with the device.
        """
        raise NotImplementedError

    def _loss_terms(self, x: Tensor, recon: Tensor) -> LossTerms:
        """Residual, total variance of `x` and fraction of variance unexplained."""
        total_var = spread(x)
        return LossTerms(x - recon, total_var, F.mse_loss(recon, x, reduction="sum") / total_var)

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
        top-k indices and values; nothing of size `[batch, d_sae]` is needed.
        """
        self.tokens_since_fired += n_tokens
        never = torch.iinfo(torch.long).max
        reset = torch.where(acts.flatten() > 0, 0, never)
        self.tokens_since_fired.scatter_reduce_(0, latents.flatten(), reset, reduce="amin")

    @torch.no_grad()
    def init_from_sample(self, x: Tensor) -> None:
        """Set `input_scale` so the mean norm is sqrt(d_in), and `b_dec` to the
        geometric median of the scaled sample `[n, d_in]`."""
        x = x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype)
        self.input_scale.fill_(math.sqrt(self.cfg.d_in) / x.norm(dim=1).mean())
        self.b_dec.copy_(geometric_median(x * self.input_scale))

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
        activations with `input_scale == 1`; encodings and reconstructions are unchanged."""
        for tensor in self._scaled_tensors().values():
            tensor /= self.input_scale
        self.input_scale.fill_(1.0)

    def _scaled_tensors(self) -> dict[str, Tensor]:
        """Tensors in units of the scaled input, keyed by their SAELens name."""
        return {"b_enc": self.b_enc, "b_dec": self.b_dec}

    # --------------------------------------------------------------- checkpoints

    def save(self, path: str | Path) -> None:
        """Write `cfg.json` and `sae_weights.safetensors` in SAELens 6 layout (scale folded)."""
        from saelab.dictionaries.saelens import save_sae  # saelens builds on this module

        save_sae(self, path)

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


def train_step(sae: SAE, optimizer: torch.optim.Optimizer, x: Tensor) -> dict[str, Tensor]:
    """One optimisation step on raw activations `x`: loss, backward, decoder-gradient
    projection, optimiser step, decoder renormalisation. Returns detached metrics."""
    loss, metrics = sae.training_loss(x)
    loss.backward()
    sae.project_decoder_grad()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sae.normalize_decoder()
    return metrics
