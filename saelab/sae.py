"""Sparse autoencoders (TopK, BatchTopK, JumpReLU, ReLU+L1) and SAELens-format checkpoints.

Every SAE has ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]`` and
``b_dec [d_in]`` and computes ``f = act((x * s - b_dec) @ W_enc + b_enc) / s`` and
``x_hat = f @ W_dec + b_dec / s``, where ``s = input_scale`` makes the mean input norm
``sqrt(d_in)`` during training. ``save`` folds ``s`` into the weights, so saved SAEs
(and SAELens, which loads them) work on raw activations.
"""

import json
import math
from pathlib import Path
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import kernels
from .errors import SAELoadError
from .topk import topk_rows

Arch = Literal["topk", "batchtopk", "jumprelu", "relu"]
DType = Literal["float32", "float64", "bfloat16", "float16"]

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
# cfg.json layout version that SAELens reads without legacy conversion.
SAELENS_FORMAT_VERSION = "6.0.0"
# saelab arch -> SAELens inference architecture (BatchTopK is saved as JumpReLU, as SAELens does).
SAELENS_ARCH = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}


class SAEConfig(BaseModel):
    """Architecture, training hyper-parameters and provenance of an SAE."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    arch: Arch = "topk"
    d_in: int = Field(gt=0)
    d_sae: int = Field(gt=0)
    k: int = Field(32, gt=0, description="Active latents per token (batchtopk: on average).")
    aux_k: int | None = Field(None, description="AuxK latents per token; None means d_in // 2.")
    aux_coef: float = Field(1 / 32, ge=0, description="AuxK loss weight (topk/batchtopk); 0 disables.")
    dead_tokens: int = Field(10_000_000, gt=0, description="A latent is dead after this many tokens unfired.")
    l1_coef: float = Field(5.0, ge=0, description="ReLU SAE: L1 weight (loss = (SSE + l1_coef * L1) / variance).")
    l0_coef: float = Field(1.0, ge=0, description="JumpReLU SAE: L0 weight (loss = (SSE + l0_coef * L0) / variance).")
    jumprelu_bandwidth: float = Field(0.05, gt=0)
    jumprelu_init_threshold: float = Field(0.1, ge=0)
    threshold_lr: float = Field(0.01, gt=0, le=1, description="BatchTopK: EMA rate of the inference threshold.")
    sparse_density: float = Field(
        1 / 16, ge=0, description="Use the sparse kernels when k / d_sae <= this, else dense matmuls."
    )
    aux_sparse_density: float = Field(
        1 / 6,
        ge=0,
        description="With sparse main latents, AuxK uses the sparse kernels when k_aux / n_dead "
        "<= this, else dense products over the dead latents only (CPU break-even measured at about 0.15).",
    )
    dtype: DType = "float32"
    model_name: str = ""
    hook_name: str = ""
    context_size: int | None = None
    dataset: str = ""

    @model_validator(mode="after")
    def _check_k(self) -> "SAEConfig":
        if self.arch in ("topk", "batchtopk") and self.k > self.d_sae:
            raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}; lower k or widen the SAE")
        return self

    @property
    def aux_k_resolved(self) -> int:
        return self.d_in // 2 if self.aux_k is None else self.aux_k


@torch.no_grad()
def geometric_median(x: Tensor, iters: int = 8, eps: float = 1e-6) -> Tensor:
    """Geometric median of the rows of ``x`` by Weiszfeld iterations from the mean."""
    median = x.mean(0)
    for _ in range(iters):
        weights = 1 / (x - median).norm(dim=1).clamp_min(eps)
        median = (weights @ x) / weights.sum()
    return median


def _spread(x: Tensor) -> Tensor:
    """Summed squared deviation of the rows of ``x`` from their mean (``x.var(0).sum() * n``,
    several times faster than ``var`` on CPU)."""
    return (x - x.mean(0)).square().sum()


class SAE(nn.Module):
    """Base class; build with ``SAE.from_config(cfg)`` or ``SAE.load(path)``."""

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
        self.register_buffer("input_scale", torch.ones((), dtype=dtype, device=device))
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long, device=device))
        self._pre_buf: Tensor | None = None
        self._aux_plan: Tensor | None = None  # dead latents AuxK trains on

    @staticmethod
    def from_config(cfg: SAEConfig, device: torch.device | str | None = None) -> "SAE":
        """A freshly initialised SAE of the class for ``cfg.arch``."""
        return ARCHITECTURES[cfg.arch](cfg, device)

    # ----------------------------------------------------------------- inference

    def prepare_input(self, x: Tensor) -> Tensor:
        """Raw activations `[..., d_in]` as the encoder reads them: `[batch, d_in]` in the SAE's dtype, times
        `input_scale` (which makes the mean input norm sqrt(d_in) in training; 1 once folded, as in a saved SAE)."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"expected activations [..., d_in={self.cfg.d_in}], got shape {tuple(x.shape)}")
        return x.reshape(-1, self.cfg.d_in).to(self.W_enc.dtype) * self.input_scale

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations ``[batch, d_sae]`` of already scaled inputs ``[batch, d_in]``."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def activation(self, pre: Tensor) -> Tensor:
        """Dense latent activations from pre-activations."""
        raise NotImplementedError

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations ``[..., d_sae]`` of raw activations ``[..., d_in]``."""
        f = self.activation(self.pre_acts(self.prepare_input(x))) / self.input_scale
        return f.view(*x.shape[:-1], self.cfg.d_sae)

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction ``[..., d_in]`` from latent activations ``[..., d_sae]``."""
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec / self.input_scale

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of raw activations ``x``."""
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ training

    def training_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of a batch of raw activations ``[..., d_in]`` and detached metric tensors.

        Also updates the dead-latent counters. Metrics never synchronise with the device.
        """
        raise NotImplementedError

    def _loss_terms(self, x: Tensor, recon: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Residual, total variance of ``x`` and fraction of variance unexplained."""
        residual = x - recon
        total_var = _spread(x)
        return residual, total_var, F.mse_loss(recon, x, reduction="sum") / total_var

    @torch.no_grad()
    def plan_aux(self) -> None:
        """Fix the dead latents AuxK trains on until the next call.

        Sizing AuxK needs the number of dead latents on the host, one device sync. A trainer calls
        this every few steps so the hot loop never waits; without it, each step syncs once."""
        self._aux_plan = self.dead_mask().nonzero().squeeze(1)

    def dead_mask(self) -> Tensor:
        """Latents that have not fired in the last ``cfg.dead_tokens`` tokens."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    @torch.no_grad()
    def update_dead(self, latents: Tensor, acts: Tensor, n_tokens: int) -> None:
        """Count ``n_tokens`` more tokens and reset latents with a positive activation.

        ``latents`` and ``acts`` are matching flat (latent, activation) entries, e.g. the
        top-k indices and values; nothing of size ``[batch, d_sae]`` is needed.
        """
        self.tokens_since_fired += n_tokens
        never = torch.iinfo(torch.long).max
        reset = torch.where(acts.flatten() > 0, 0, never)
        self.tokens_since_fired.scatter_reduce_(0, latents.flatten(), reset, reduce="amin")

    @torch.no_grad()
    def init_from_sample(self, x: Tensor) -> None:
        """Set ``input_scale`` so the mean norm is sqrt(d_in), and ``b_dec`` to the
        geometric median of the scaled sample ``[n, d_in]``."""
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
        """Fold ``input_scale`` into the biases (and thresholds) so the SAE takes raw
        activations with ``input_scale == 1``; encodings and reconstructions are unchanged."""
        for tensor in self._scaled_tensors().values():
            tensor /= self.input_scale
        self.input_scale.fill_(1.0)

    def _scaled_tensors(self) -> dict[str, Tensor]:
        """Tensors in units of the scaled input, keyed by their SAELens name."""
        return {"b_enc": self.b_enc, "b_dec": self.b_dec}

    # --------------------------------------------------------------- checkpoints

    @torch.no_grad()
    def save(self, path: str | Path) -> None:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` in SAELens 6 layout (scale folded)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"W_enc": self.W_enc, "W_dec": self.W_dec}
        tensors |= {name: t / self.input_scale for name, t in self._scaled_tensors().items()}
        tensors = {name: self._export_tensor(name, t).detach().contiguous().cpu() for name, t in tensors.items()}
        save_file(tensors, path / WEIGHTS_FILENAME)
        (path / CFG_FILENAME).write_text(json.dumps(self._saelens_cfg(), indent=2))

    def _export_tensor(self, name: str, tensor: Tensor) -> Tensor:
        return tensor

    def _saelens_cfg(self) -> dict:
        cfg = self.cfg
        topk = {"k": cfg.k, "rescale_acts_by_decoder_norm": False} if cfg.arch == "topk" else {}
        return topk | {
            "architecture": SAELENS_ARCH[cfg.arch],
            "d_in": cfg.d_in,
            "d_sae": cfg.d_sae,
            "dtype": cfg.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {
                "sae_lens_version": SAELENS_FORMAT_VERSION,
                "model_name": cfg.model_name,
                "hook_name": cfg.hook_name,
                "context_size": cfg.context_size,
                "dataset_path": cfg.dataset,
                "training_architecture": cfg.arch,
                "training_architecture_details": {"k": cfg.k},
                "saelab_config": cfg.model_dump(),
            },
        }

    @staticmethod
    def load(path: str | Path, device: torch.device | str | None = None) -> "SAE":
        """Load an SAE saved by saelab or SAELens (``SAE.save_model`` / ``save_inference_model``).

        A folder without the two files raises ``FileNotFoundError``; one whose files cannot be read as an SAE
        raises ``SAELoadError`` naming what is wrong."""
        path = Path(path)
        if not (path / CFG_FILENAME).is_file() or not (path / WEIGHTS_FILENAME).is_file():
            raise FileNotFoundError(f"{path} needs {CFG_FILENAME} and {WEIGHTS_FILENAME} (SAELens layout)")
        try:
            raw = json.loads((path / CFG_FILENAME).read_text())
            cfg, tensors = _from_saelens(raw, load_file(path / WEIGHTS_FILENAME))
        except (ValueError, KeyError, TypeError, SafetensorError) as err:
            raise SAELoadError(
                f"cannot load the SAE at {path} ({type(err).__name__}: {err}); give a folder that "
                "saelab or SAELens wrote"
            ) from None
        sae = SAE.from_config(cfg)
        missing = set(sae.state_dict()) - {"input_scale", "tokens_since_fired"} - set(tensors)
        unexpected = set(tensors) - set(sae.state_dict())
        if missing or unexpected:
            raise SAELoadError(
                f"{path / WEIGHTS_FILENAME}: missing {sorted(missing)}, unexpected {sorted(unexpected)}; "
                "give a folder that saelab or SAELens wrote"
            )
        dtype = sae.W_enc.dtype
        sae.load_state_dict({name: t.to(dtype) for name, t in tensors.items()}, strict=False)
        return sae.to(device) if device is not None else sae


def _from_saelens(raw: dict, tensors: dict[str, Tensor]) -> tuple[SAEConfig, dict[str, Tensor]]:
    """saelab config and state-dict tensors from a SAELens (or saelab) cfg.json + weights."""
    meta = raw.get("metadata") or {}
    if "saelab_config" in meta:
        cfg = SAEConfig(**meta["saelab_config"])
    else:
        for field, ok in (("normalize_activations", "none"), ("reshape_activations", "none")):
            if raw.get(field, ok) != ok:
                raise ValueError(
                    f"{field}={raw[field]!r} is not supported; fold it into the weights in SAELens first "
                    f"(e.g. fold_activation_norm_scaling_factor) or flatten inputs yourself"
                )
        arch = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}.get(
            raw.get("architecture", "standard")
        )
        if arch is None:
            raise ValueError(
                f"SAELens architecture {raw['architecture']!r} is not supported; saelab reads "
                "topk, batchtopk, jumprelu and standard"
            )
        details = meta.get("training_architecture_details") or {}
        if arch == "jumprelu" and meta.get("training_architecture") == "batchtopk":
            arch = "batchtopk"
        k = raw.get("k", details.get("k", 32))
        cfg = SAEConfig(
            arch=arch,
            d_in=raw["d_in"],
            d_sae=raw["d_sae"],
            k=int(k),
            dtype=str(raw.get("dtype", "float32")).removeprefix("torch."),
            model_name=meta.get("model_name") or "",
            hook_name=meta.get("hook_name") or "",
            context_size=meta.get("context_size"),
            dataset=meta.get("dataset_path") or "",
        )
    tensors = dict(tensors)
    W_enc, W_dec = tensors["W_enc"], tensors["W_dec"]
    if not raw.get("apply_b_dec_to_input", True):
        tensors["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ W_enc
    if raw.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.norm(dim=1).clamp_min(1e-8)
        tensors |= {"W_enc": W_enc * norms, "b_enc": tensors["b_enc"] * norms, "W_dec": W_dec / norms[:, None]}
    if "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if cfg.arch == "batchtopk":
        threshold = tensors.pop("topk_threshold", None)
        if threshold is None:
            threshold = tensors.pop("threshold")
            if not torch.all(threshold == threshold[0]):
                raise ValueError("BatchTopK checkpoint has per-latent thresholds; load it as arch 'jumprelu'")
            threshold = threshold[0]
        tensors["threshold"] = threshold.reshape(())
    return cfg, tensors


# ---------------------------------------------------------------------- TopK family


class TopKSAE(SAE):
    """TopK SAE (Gao et al. 2024): the k largest pre-activations per token, ReLU'd."""

    arch = "topk"

    def activation(self, pre: Tensor) -> Tensor:
        vals, idx = topk_rows(pre, self.cfg.k)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def forward(self, x: Tensor) -> Tensor:
        vals, idx = topk_rows(self.pre_acts(self.prepare_input(x)), self.cfg.k)
        recon = kernels.sparse_decode(vals.relu(), idx, self.W_dec) + self.b_dec
        return (recon / self.input_scale).view(x.shape)

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Main (values, columns, rows) entries chosen from pre-activations."""
        return kernels.topk_entries(pre, self.cfg.k)

    def training_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.prepare_input(x)
        n_rows, cfg = x.shape[0], self.cfg
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
            recon, aux_recon, vals, lat = step(x, dead_cols if k_aux else None, k_aux, mm_dtype)

            residual, total_var, fvu = self._loss_terms(x, recon)
            auxk = fvu.new_zeros(())
            if aux_recon is not None:
                residual = residual.detach()
                auxk = F.mse_loss(aux_recon, residual, reduction="sum") / _spread(residual)
            loss = fvu + cfg.aux_coef * auxk
        self.update_dead(lat, vals, n_rows)
        metrics = {
            "loss": loss.detach(),
            "fvu": fvu.detach(),
            "auxk": auxk.detach(),
            "l0": (vals > 0).sum() / n_rows,
            "dead_frac": dead.float().mean(),
        }
        return loss, metrics

    def _sparse_step(self, x, dead_cols, k_aux, mm_dtype):
        """Top-k forward with the sparse kernels: the only dense op is the encoder matmul.

        AuxK takes the sparse kernels too while ``k_aux / n_dead`` is at most ``aux_sparse_density``;
        with fewer dead latents the dense products over them are cheaper (:meth:`_dense_aux`)."""
        n_rows = x.shape[0]
        aux_sparse = k_aux > 0 and k_aux / len(dead_cols) <= self.cfg.aux_sparse_density
        with torch.no_grad():
            xc = (x - self.b_dec).to(mm_dtype)
            pre = torch.addmm(
                self.b_enc.to(mm_dtype), xc, self.W_enc.to(mm_dtype), out=self._workspace(n_rows, mm_dtype)
            )
            vals, lat, rows = self._select(pre)
            n_main = vals.numel()
            if aux_sparse:  # AuxK entries from the same pre-activations, in bags [B, 2B)
                aux_vals, aux_lat, aux_rows = kernels.topk_entries(pre, k_aux, dead_cols)
                vals = torch.cat([vals, aux_vals])
                lat = torch.cat([lat, aux_lat])
                rows = torch.cat([rows, aux_rows + n_rows])
            vals = vals.to(x.dtype)
        groups = [n_main, len(vals) - n_main] if aux_sparse else [n_main]
        out = kernels.sparse_autoencode(x, self.b_dec, self.W_enc, self.b_enc, self.W_dec, vals, lat, rows, groups)
        aux_recon = None
        if k_aux:
            aux_recon = out[1] if aux_sparse else self._dense_aux(x, dead_cols, k_aux, mm_dtype)
        return out[0] + self.b_dec, aux_recon, vals[:n_main], lat[:n_main]

    def _dense_step(self, x, dead_cols, k_aux, mm_dtype):
        """Reference top-k forward with dense matmuls and plain autograd."""
        pre = torch.addmm(self.b_enc.to(mm_dtype), (x - self.b_dec).to(mm_dtype), self.W_enc.to(mm_dtype))
        pre = pre.to(x.dtype)
        with torch.no_grad():
            vals, cols, rows = self._select(pre.detach())
        acts = torch.zeros_like(pre).index_put((rows, cols), pre[rows, cols].relu())
        aux_recon = self._dense_aux(x, dead_cols, k_aux, mm_dtype) if k_aux else None
        return acts @ self.W_dec + self.b_dec, aux_recon, vals, cols

    def _dense_aux(self, x, dead_cols, k_aux, mm_dtype):
        """AuxK reconstruction from the top ``k_aux`` dead latents, with dense products over the
        ``dead_cols`` columns only (cost ~ batch x n_dead x d_in) and plain autograd."""
        W_enc, b_enc = self.W_enc[:, dead_cols], self.b_enc[dead_cols]
        pre = torch.addmm(b_enc.to(mm_dtype), (x - self.b_dec).to(mm_dtype), W_enc.to(mm_dtype)).to(x.dtype)
        with torch.no_grad():
            _, idx = topk_rows(pre.detach(), k_aux)
        acts = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
        return acts @ self.W_dec[dead_cols]

    def _workspace(self, n_rows: int, dtype: torch.dtype) -> Tensor:
        """Reused pre-activation buffer: allocating ``[batch, d_sae]`` anew every step
        costs page faults comparable to the matmul itself on CPU."""
        buf = self._pre_buf
        if buf is None or buf.shape[0] != n_rows or buf.dtype != dtype or buf.device != self.W_enc.device:
            buf = self._pre_buf = torch.empty(n_rows, self.cfg.d_sae, dtype=dtype, device=self.W_enc.device)
        return buf


class BatchTopKSAE(TopKSAE):
    """BatchTopK SAE (Bussmann et al. 2024): the ``k * batch`` largest pre-activations of
    the batch in training; at inference a JumpReLU with one learned threshold (as SAELens)."""

    arch = "batchtopk"

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__(cfg, device)
        self.register_buffer("threshold", torch.zeros((), dtype=self.W_enc.dtype, device=device))

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu() * (pre > self.threshold)

    def forward(self, x: Tensor) -> Tensor:
        return SAE.forward(self, x)

    def _select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        vals, cols, rows = kernels.batch_topk_entries(pre, self.cfg.k)
        smallest = torch.where(vals > 0, vals, math.inf).min()
        ema = torch.lerp(self.threshold, smallest, self.cfg.threshold_lr)
        self.threshold.copy_(torch.where(smallest.isfinite(), ema, self.threshold))
        return vals, cols, rows

    def _scaled_tensors(self) -> dict[str, Tensor]:
        return super()._scaled_tensors() | {"threshold": self.threshold}

    def _export_tensor(self, name: str, tensor: Tensor) -> Tensor:
        return tensor.expand(self.cfg.d_sae) if name == "threshold" else tensor


# ---------------------------------------------------------------- dense families


class _JumpReLUFn(torch.autograd.Function):
    """``pre * (pre > threshold)`` with the straight-through threshold gradient of
    Rajamanoharan et al. 2024 (rectangle kernel of width ``bandwidth``)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        grad_threshold = -(threshold / ctx.bandwidth * window * grad).sum(0)
        return grad * (pre > threshold), grad_threshold, None


class _StepFn(torch.autograd.Function):
    """Heaviside ``pre > threshold`` with a straight-through gradient to the threshold only."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        window = ((pre - threshold).abs() < ctx.bandwidth / 2).to(grad.dtype)
        return None, -(window * grad).sum(0) / ctx.bandwidth, None


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

    def training_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            self.threshold.clamp_(min=0)
        x = self.prepare_input(x)
        pre = self.pre_acts(x)
        bandwidth = self.cfg.jumprelu_bandwidth
        acts = _JumpReLUFn.apply(pre, self.threshold, bandwidth)
        _, total_var, fvu = self._loss_terms(x, acts @ self.W_dec + self.b_dec)
        l0 = _StepFn.apply(pre, self.threshold, bandwidth).sum()
        loss = fvu + self.cfg.l0_coef * l0 / total_var
        self.update_dead(torch.arange(self.cfg.d_sae, device=x.device), acts.detach().amax(0), x.shape[0])
        return loss, {"loss": loss.detach(), "fvu": fvu.detach(), "l0": l0.detach() / x.shape[0]}


class ReLUSAE(SAE):
    """ReLU SAE with an L1 penalty weighted by decoder norms (SAELens "standard")."""

    arch = "relu"

    def activation(self, pre: Tensor) -> Tensor:
        return pre.relu()

    def training_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x = self.prepare_input(x)
        acts = self.pre_acts(x).relu()
        _, total_var, fvu = self._loss_terms(x, acts @ self.W_dec + self.b_dec)
        l1 = acts.sum(0) @ self.W_dec.norm(dim=1)
        loss = fvu + self.cfg.l1_coef * l1 / total_var
        self.update_dead(torch.arange(self.cfg.d_sae, device=x.device), acts.detach().amax(0), x.shape[0])
        l0 = (acts.detach() > 0).sum() / x.shape[0]
        return loss, {"loss": loss.detach(), "fvu": fvu.detach(), "l0": l0}


ARCHITECTURES: dict[str, type[SAE]] = {
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "relu": ReLUSAE,
}


def train_step(sae: SAE, optimizer: torch.optim.Optimizer, x: Tensor) -> dict[str, Tensor]:
    """One optimisation step on raw activations ``x``: loss, backward, decoder-gradient
    projection, optimiser step, decoder renormalisation. Returns detached metrics."""
    loss, metrics = sae.training_loss(x)
    loss.backward()
    sae.project_decoder_grad()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sae.normalize_decoder()
    return metrics
