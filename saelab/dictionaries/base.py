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
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from torch import Tensor, nn

from saelab.dictionaries.matryoshka import resolve_prefixes
from saelab.dictionaries.registry import Arch, sae_class
from saelab.distributed import all_gather, all_reduce_sum

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
    matryoshka_prefixes: list[int] | None = Field(
        default=None,
        description="Matryoshka (topk/batchtopk): nested prefix widths, strictly increasing, the last = d_sae; each "
        "prefix of the dictionary also reconstructs the input from the step's top-k entries among its latents, and the "
        "loss is the mean of their FVUs. Floats in (0, 1] are fractions of d_sae (one list fits every expansion of a "
        "sweep). None: off.",
    )
    matryoshka_sample: int | None = Field(
        default=None,
        ge=2,
        description="Matryoshka with sampled prefixes (Nabeshima): each step draws this many prefix widths, short ones "
        "favoured, the last = d_sae, instead of fixed matryoshka_prefixes. None: off.",
    )
    matryoshka_aux: bool = Field(
        default=True,
        description="Matryoshka: AuxK per prefix band, the dead latents of each band reconstructing their own prefix's "
        "residual (SAELens's use_matryoshka_aux_loss), so a short prefix revives its dead latents; false: one AuxK on "
        "the whole dictionary's residual (Bussmann et al.'s reference).",
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

    @field_validator("matryoshka_prefixes", mode="before")
    @classmethod
    def _resolve_prefixes(cls, prefixes: list[int | float] | None, info: ValidationInfo) -> list[int] | None:
        d_sae = info.data.get("d_sae")  # declared before; absent when it was refused itself
        if d_sae is None or not isinstance(prefixes, list | tuple):  # pydantic refuses what is not a list
            return prefixes
        return resolve_prefixes(prefixes, d_sae)

    @model_validator(mode="after")
    def _check_matryoshka(self) -> SAEConfig:
        if (self.matryoshka_prefixes or self.matryoshka_sample) and self.arch not in ("topk", "batchtopk"):
            raise ValueError(f"Matryoshka prefixes need arch topk or batchtopk, not {self.arch!r}; change arch")
        if self.matryoshka_prefixes and self.matryoshka_sample:
            raise ValueError("give matryoshka_prefixes (fixed widths) or matryoshka_sample (drawn widths), not both")
        if self.matryoshka_sample is not None and self.matryoshka_sample > self.d_sae:
            raise ValueError(f"matryoshka_sample={self.matryoshka_sample} exceeds d_sae={self.d_sae}; lower it")
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


@torch.no_grad()
def global_spread(x: Tensor) -> Tensor:
    """`spread` of the rows of every rank's `x` taken together, the same number on every rank: each rank's row count,
    mean and `spread` are gathered and combined by Chan et al.'s pairwise formula (the sum of the spreads plus each
    count times its mean's squared distance from the overall mean), which loses no precision to cancellation."""
    local = torch.cat([x.new_tensor([x.shape[0]]), spread(x).reshape(1), x.mean(0)])
    parts = torch.stack(all_gather(local))
    counts, spreads, means = parts[:, 0], parts[:, 1], parts[:, 2:]
    mean = counts @ means / counts.sum()
    return spreads.sum() + counts @ (means - mean).square().sum(1)


class Batch(NamedTuple):
    """A training batch as an SAE's loss reads it (`SAE.training_batch`)."""

    x: Tensor
    """The scaled rows this process trains on, `[rows, d_in]` (under `SAE.split`, its slice of the batch)."""
    rows: int
    """Rows of the whole batch."""
    total_var: Tensor
    """`spread` of the whole scaled batch: the FVU's denominator."""


class LossTerms(NamedTuple):
    """The reconstruction terms every SAE loss starts from."""

    residual: Tensor
    """`x - recon`, `[batch, d_in]`."""
    total_var: Tensor
    """Summed squared deviation of the whole batch from its mean (the FVU's denominator)."""
    fvu: Tensor
    """Fraction of variance unexplained: squared error over `total_var` (under `SAE.split`, this rank's share)."""


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

    def training_batch(self, x: Tensor) -> Batch:
        """Raw activations `[..., d_in]` of a whole batch as the loss reads them: scaled, sliced to `split`."""
        x = self.prepare_input(x)
        return Batch(x if self.split is None else x[self.split], x.shape[0], spread(x))

    def _loss_terms(self, batch: Batch, recon: Tensor) -> LossTerms:
        """Residual, total variance of the whole batch and fraction of variance unexplained."""
        x = batch.x
        return LossTerms(x - recon, batch.total_var, F.mse_loss(recon, x, reduction="sum") / batch.total_var)

    def batch_spread(self, rows: Tensor) -> Tensor:
        """`spread` of `rows` computed on this rank's slice of a batch, over the whole batch (`global_spread` under
        `split`)."""
        return spread(rows) if self.split is None else global_spread(rows)

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


def train_step(sae: SAE, optimizer: torch.optim.Optimizer, x: Tensor) -> dict[str, Tensor]:
    """One optimisation step on raw activations `x`: loss, backward, decoder-gradient
    projection, optimiser step, decoder renormalisation. Returns detached metrics.

    Under `sae.split` every rank is given the whole batch `x` and computes its slice's part; the parts are summed over
    the ranks (`sum_over_ranks`) before the optimiser step, so every rank takes the whole batch's step."""
    loss, metrics = sae.training_loss(x)
    loss.backward()
    if sae.split is not None:
        metrics = sum_over_ranks(sae, metrics)
    sae.project_decoder_grad()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sae.normalize_decoder()
    return metrics
