"""Crosscoders: one sparse dictionary that reads and writes several sources at once.

A source is one activation array: several hook points of one model (an acausal crosscoder across layers) or the
same hook point in several models (model diffing; `saelab.evals.model_diff`). Every source has the same width
`d_in`. One encoder reads all of them, `f = act(sum_s (x_s * s_s - b_dec[s]) @ W_enc[s] + b_enc)`, and each
source has its own decoder, `x_hat_s = (f @ W_dec[:, s] + b_dec[s]) / s_s`, with `W_enc [S, d_in, d_sae]`,
`W_dec [d_sae, S, d_in]`, `b_dec [S, d_in]` and `s = input_scale [S]` (each source's mean norm `sqrt(d_in)` in
training).

This follows Minder et al. 2025's `BatchTopKCrossCoder` and `BatchTopKCrossCoderTrainer` (science-of-finetuning's
fork of dictionary_learning, `dictionary_learning/dictionary.py` and `trainers/batch_top_k.py`), the crosscoder of
Anthropic's "Sparse Crosscoders" (Lindsey et al. 2024) with a TopK or BatchTopK activation in place of the L1
penalty: latents are chosen by their activation times the sum of their per-source decoder norms (the reference's
`CodeNormalization.CROSSCODER`), the loss is the sum over sources of each source's squared error, and AuxK revives
dead latents on the residual of every source together. Two departures, neither of which changes what the model
can express:

- the per-latent sum of decoder norms is held at 1 (the gradient that would change it is projected out and the
  rows renormalised after each step, as the SAEs keep unit decoder rows), so the reference's selection score is
  the activation itself and saelab's sparse kernels pick and decode the entries; the split of that norm between
  the sources, which model diffing reads, stays free;
- the encoder subtracts `b_dec` from its input, as saelab's SAEs do (the reference's encoder bias absorbs it).

The squared error is normalised like the SAEs' FVU: divided by the summed spread of every source's rows. The
input scales are not folded into the saved weights (one scale per source cannot be folded into one code): a saved
crosscoder keeps `input_scale` and still reads and writes raw activations, and its decoder norms stay in the
normalised units it was trained in, where they can be compared across sources.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saelab.dictionaries.base import DType, StepOptimizer, geometric_median
from saelab.dictionaries.registry import register_kind
from saelab.errors import ConfigError, MissingError, SAELoadError
from saelab.ops import kernels
from saelab.ops.topk import topk_rows
from saelab.run import SAE_CONFIG, SAE_WEIGHTS

_EPS = 1e-12


class CrossCoderConfig(BaseModel):
    """Architecture, training hyper-parameters and provenance of a crosscoder."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    kind: Literal["crosscoder"] = "crosscoder"
    activation: Literal["topk", "batchtopk"] = Field(
        default="batchtopk",
        description="topk: the k highest latents of each row; batchtopk: the k * rows highest of the batch in "
        "training, a learned threshold at inference (Minder et al.'s choice).",
    )
    sources: list[str] = Field(
        min_length=2,
        description="The activation arrays it reads and writes, in order: several hooks of one model "
        "(`blocks.1.hook_resid_post`, `blocks.2.hook_resid_post`) or one hook in several models "
        "(`base/blocks.3.hook_resid_post`, `tuned/blocks.3.hook_resid_post`).",
    )
    d_in: int = Field(gt=0, description="Width of every source.")
    d_sae: int = Field(gt=0, description="Number of latents.")
    k: int = Field(default=32, gt=0, description="Active latents per row (batchtopk: on average); at most d_sae.")
    aux_k: int | None = Field(default=None, ge=0, description="AuxK latents per row; None means d_in // 2.")
    aux_coef: float = Field(default=1 / 32, ge=0, description="AuxK loss weight; 0 disables.")
    dead_tokens: int = Field(default=10_000_000, gt=0, description="A latent is dead after this many rows unfired.")
    threshold_lr: float = Field(default=0.01, gt=0, le=1, description="batchtopk: EMA rate of the inference threshold.")
    dtype: DType = "float32"
    model_name: str = ""
    context_size: int | None = Field(default=None, gt=0, description="Context length of the activations trained on.")
    dataset: str = ""

    @field_validator("sources")
    @classmethod
    def _check_sources(cls, sources: list[str]) -> list[str]:
        if len(set(sources)) != len(sources):
            raise ValueError(f"sources {sources} name one array twice; give each source once")
        return sources

    @model_validator(mode="after")
    def _check_k(self) -> CrossCoderConfig:
        if self.k > self.d_sae:
            raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}; lower k or widen the crosscoder")
        return self

    @property
    def n_sources(self) -> int:
        """How many sources it reads and writes (`S`)."""
        return len(self.sources)

    @property
    def aux_k_resolved(self) -> int:
        """AuxK latents per row."""
        return self.d_in // 2 if self.aux_k is None else self.aux_k

    @classmethod
    def for_sources(cls, widths: Mapping[str, int], **fields: Any) -> CrossCoderConfig:
        """The config of a crosscoder over the sources `widths` (array name -> width, in order), with the other
        `fields`; `ConfigError` when the sources differ in width, which one dictionary cannot read without a
        projection."""
        distinct = sorted(set(widths.values()))
        if len(distinct) > 1:
            listed = ", ".join(f"{name}: {width}" for name, width in widths.items())
            raise ConfigError(
                f"crosscoder sources have different widths ({listed}); give sources of one width (the same hook "
                "kind in every model or layer), or project each to a common width first and give the projected arrays"
            )
        if not distinct:
            raise ConfigError("a crosscoder needs at least two sources; give them")
        return cls.model_validate({"sources": list(widths), "d_in": distinct[0]} | fields)


@register_kind
class CrossCoder(nn.Module):
    """A crosscoder over `cfg.n_sources` sources of width `cfg.d_in` (see the module docstring); build it with
    `CrossCoder(cfg)` or `CrossCoder.load(path)`. Activations are `[..., S, d_in]`, the sources in the order of
    `cfg.sources`; codes are `[..., d_sae]`, in the normalised units of training."""

    kind: ClassVar[str] = "crosscoder"

    def __init__(self, cfg: CrossCoderConfig, device: torch.device | str | None = None):
        super().__init__()
        self.cfg = cfg
        n, d, m = cfg.n_sources, cfg.d_in, cfg.d_sae
        dtype = getattr(torch, cfg.dtype)
        W_dec = torch.randn(m, n, d, dtype=dtype, device=device)
        W_dec /= W_dec.norm(dim=2, keepdim=True) * n  # each source 1/S: every latent's norms sum to 1
        self.W_enc = nn.Parameter(W_dec.permute(1, 2, 0).contiguous())  # the reference's init_with_transpose
        self.b_enc = nn.Parameter(torch.zeros(m, dtype=dtype, device=device))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(n, d, dtype=dtype, device=device))
        self.input_scale: Tensor
        self.tokens_since_fired: Tensor
        self.register_buffer("input_scale", torch.ones(n, dtype=dtype, device=device))
        self.register_buffer("tokens_since_fired", torch.zeros(m, dtype=torch.long, device=device))
        self.threshold: Tensor | None
        threshold = torch.zeros((), dtype=dtype, device=device) if cfg.activation == "batchtopk" else None
        self.register_buffer("threshold", threshold)

    @property
    def inputs(self) -> list[str]:
        """The arrays it reads."""
        return list(self.cfg.sources)

    @property
    def outputs(self) -> list[str]:
        """The arrays it writes (the ones it reads)."""
        return list(self.cfg.sources)

    # ----------------------------------------------------------------- inference

    def _flat(self) -> tuple[Tensor, Tensor, Tensor]:
        """`W_enc [S * d_in, d_sae]`, `W_dec [d_sae, S * d_in]` and `b_dec [S * d_in]`: views over the sources laid
        end to end, in which the crosscoder is an SAE on the concatenated, scaled sources."""
        m = self.cfg.d_sae
        return self.W_enc.view(-1, m), self.W_dec.view(m, -1), self.b_dec.view(-1)

    def prepare_input(self, x: Tensor) -> Tensor:
        """Raw activations `[..., S, d_in]` as the encoder reads them: `[rows, S * d_in]` in its dtype, each source
        times its `input_scale`."""
        n, d = self.cfg.n_sources, self.cfg.d_in
        if x.shape[-2:] != (n, d):
            raise ValueError(
                f"expected activations [..., n_sources={n}, d_in={d}] (the sources {self.cfg.sources} in order), "
                f"got shape {tuple(x.shape)}"
            )
        return (x.reshape(-1, n, d).to(self.W_enc.dtype) * self.input_scale[:, None]).view(-1, n * d)

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations `[rows, d_sae]` of prepared inputs `[rows, S * d_in]`."""
        W_enc, _, b_dec = self._flat()
        return torch.addmm(self.b_enc, x - b_dec, W_enc)

    def activation(self, pre: Tensor) -> Tensor:
        """Codes from pre-activations: the top `k` of each row (topk) or those above the learned threshold
        (batchtopk, at inference), ReLU'd."""
        if self.threshold is not None:
            return pre.relu() * (pre > self.threshold)
        vals, idx = topk_rows(pre, self.cfg.k)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    def encode(self, x: Tensor) -> Tensor:
        """Codes `[..., d_sae]` of raw activations `[..., S, d_in]`."""
        return self.activation(self.pre_acts(self.prepare_input(x))).view(*x.shape[:-2], self.cfg.d_sae)

    def decode_scaled(self, f: Tensor) -> Tensor:
        """Reconstruction `[rows, S, d_in]` from codes `[rows, d_sae]` in the normalised units the crosscoder
        trains in (before the input scale is undone)."""
        _, W_dec, b_dec = self._flat()
        return torch.addmm(b_dec, f.to(W_dec.dtype), W_dec).view(-1, self.cfg.n_sources, self.cfg.d_in)

    def decode(self, f: Tensor) -> Tensor:
        """Reconstruction `[..., S, d_in]` of raw activations from codes `[..., d_sae]`."""
        recon = self.decode_scaled(f.reshape(-1, self.cfg.d_sae)) / self.input_scale[:, None]
        return recon.view(*f.shape[:-1], self.cfg.n_sources, self.cfg.d_in)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction of raw activations `x` `[..., S, d_in]`."""
        return self.decode(self.encode(x))

    def decoder_norms(self) -> Tensor:
        """`[d_sae, S]` the norm of each latent's decoder in each source (normalised units; each row sums to 1)."""
        return self.W_dec.detach().norm(dim=2)

    @torch.no_grad()
    def fvu(self, x: Tensor) -> Tensor:
        """`[S]` each source's fraction of variance unexplained on raw activations `x` `[rows, S, d_in]`."""
        x = x.reshape(-1, self.cfg.n_sources, self.cfg.d_in).to(self.W_enc.dtype)
        sse = (x - self(x)).square().sum((0, 2))
        return sse / (x - x.mean(0)).square().sum((0, 2))

    # ------------------------------------------------------------------ training

    def dead_mask(self) -> Tensor:
        """Latents that have not fired in the last `cfg.dead_tokens` rows."""
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def _select(self, pre: Tensor) -> kernels.Entries:
        """The training step's entries: the top `k` of each row, or the top `k * rows` of the batch (moving the
        inference threshold towards the smallest positive one chosen, as `BatchTopKSAE` does)."""
        if self.threshold is None:
            return kernels.topk_entries(pre, self.cfg.k)
        entries = kernels.batch_topk_entries(pre, self.cfg.k)
        smallest = torch.where(entries.vals > 0, entries.vals, math.inf).min()
        ema = torch.lerp(self.threshold, smallest, self.cfg.threshold_lr)
        self.threshold.copy_(torch.where(smallest.isfinite(), ema, self.threshold))
        return entries

    def training_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss of a batch of raw activations `[..., S, d_in]` and detached metrics (`fvu`, `fvu_s{i}` per source,
        `auxk`, `l0`, `dead_frac`); updates the dead-latent counters."""
        cfg = self.cfg
        xs = self.prepare_input(x)
        rows = xs.shape[0]
        W_enc, W_dec, b_dec = self._flat()
        dead = self.dead_mask()
        with torch.no_grad():
            entries = self._select(torch.addmm(self.b_enc, xs - b_dec, W_enc))
        (decoded,) = kernels.sparse_autoencode(
            xs, entries, [len(entries.vals)], W_enc=W_enc, b_enc=self.b_enc, W_dec=W_dec, b_dec=b_dec
        )
        residual = (xs - decoded - b_dec).view(rows, cfg.n_sources, cfg.d_in)
        sse = residual.square().sum((0, 2))
        spreads = (xs.view_as(residual) - xs.view_as(residual).mean(0)).square().sum((0, 2))
        fvu = sse.sum() / spreads.sum()
        auxk = self._auxk(xs, residual.detach().view(rows, -1), dead)
        loss = fvu + cfg.aux_coef * auxk
        with torch.no_grad():
            fired = torch.zeros(cfg.d_sae, dtype=torch.bool, device=xs.device)
            fired[entries.cols[entries.vals > 0]] = True
            self.tokens_since_fired.add_(rows).masked_fill_(fired, 0)
        metrics = {
            "loss": loss.detach(),
            "fvu": fvu.detach(),
            "auxk": auxk.detach(),
            "l0": (entries.vals > 0).sum() / rows,
            "dead_frac": dead.float().mean(),
        }
        return loss, metrics | {f"fvu_s{i}": v for i, v in enumerate((sse / spreads).detach())}

    def _auxk(self, xs: Tensor, residual: Tensor, dead: Tensor) -> Tensor:
        """AuxK (Gao et al.; the reference trainer's `get_auxiliary_loss`): the top `aux_k` dead latents of each row
        reconstruct the residual of all sources, its squared error over the residual's spread; 0 with none dead."""
        dead_cols = dead.nonzero().squeeze(1)
        k_aux = min(self.cfg.aux_k_resolved, len(dead_cols))
        if not (self.cfg.aux_coef > 0 and k_aux):
            return xs.new_zeros(())
        W_enc, W_dec, b_dec = self._flat()
        pre = torch.addmm(self.b_enc[dead_cols], xs - b_dec, W_enc[:, dead_cols])
        _, idx = topk_rows(pre.detach(), k_aux)
        acts = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
        return F.mse_loss(acts @ W_dec[dead_cols], residual, reduction="sum") / (
            (residual - residual.mean(0)).square().sum().clamp_min(_EPS)
        )

    @torch.no_grad()
    def init_from_sample(self, x: Tensor) -> None:
        """Set each source's `input_scale` so its mean norm is `sqrt(d_in)` on the sample `[rows, S, d_in]`, and
        `b_dec` to the geometric median of the scaled sample."""
        n, d = self.cfg.n_sources, self.cfg.d_in
        x = x.reshape(-1, n, d).to(self.W_enc.dtype)
        self.input_scale.copy_(math.sqrt(d) / x.norm(dim=2).mean(0))
        self.b_dec.copy_(geometric_median(self.prepare_input(x)).view(n, d))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the part of each latent's decoder gradient that would change the sum of its per-source norms
        (the direction of that sum's gradient, each source's unit row); call before the optimiser step."""
        grad = self.W_dec.grad
        if grad is None:
            return
        unit = self.W_dec / self.W_dec.norm(dim=2, keepdim=True).clamp_min(_EPS)
        coef = (grad * unit).sum((1, 2)) / unit.square().sum((1, 2)).clamp_min(_EPS)
        grad.sub_(coef[:, None, None] * unit)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale each latent's decoder so its per-source norms sum to 1 (call after the optimiser step)."""
        self.W_dec /= self.W_dec.norm(dim=2).sum(1).clamp_min(_EPS)[:, None, None]

    # --------------------------------------------------------------- checkpoints

    def save(self, path: str | Path) -> None:
        """Write `cfg.json` (`kind: crosscoder` and the config) and `sae_weights.safetensors` (`W_enc [S, d_in,
        d_sae]`, `b_enc`, `W_dec [d_sae, S, d_in]`, `b_dec [S, d_in]`, `input_scale [S]`, and batchtopk's
        `threshold`) to the folder `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}
        del tensors["tokens_since_fired"]
        save_file(tensors, path / SAE_WEIGHTS)
        cfg = {
            "kind": self.kind,
            "architecture": self.kind,  # a reader of SAELens checkpoints refuses it by this name
            "sources": self.cfg.sources,
            "d_in": self.cfg.d_in,
            "d_sae": self.cfg.d_sae,
            "crosscoder_config": self.cfg.model_dump(),
        }
        (path / SAE_CONFIG).write_text(json.dumps(cfg, indent=2))

    @staticmethod
    def load(path: str | Path, device: torch.device | str | None = None) -> CrossCoder:
        """The crosscoder that `save` wrote to the folder `path`. `MissingError` if a file is missing;
        `SAELoadError` naming what is wrong if they are not a crosscoder's."""
        path = Path(path)
        if not (path / SAE_CONFIG).is_file() or not (path / SAE_WEIGHTS).is_file():
            raise MissingError(f"{path} needs {SAE_CONFIG} and {SAE_WEIGHTS}; give a folder that CrossCoder.save wrote")
        try:
            raw = json.loads((path / SAE_CONFIG).read_text())
            if raw.get("kind") != CrossCoder.kind:
                raise ValueError(f"its {SAE_CONFIG} says kind {raw.get('kind')!r}, not {CrossCoder.kind!r}")
            cfg = CrossCoderConfig.model_validate(raw["crosscoder_config"])
            tensors = load_file(path / SAE_WEIGHTS)
        except (ValueError, KeyError, TypeError, SafetensorError) as err:
            raise SAELoadError(
                f"cannot load the crosscoder at {path} ({type(err).__name__}: {err}); give a folder that "
                "CrossCoder.save wrote"
            ) from None
        cc = CrossCoder(cfg)
        expected = {name: t.shape for name, t in cc.state_dict().items() if name != "tokens_since_fired"}
        found = {name: t.shape for name, t in tensors.items()}
        if found != expected:
            raise SAELoadError(
                f"{path / SAE_WEIGHTS} holds {found}, but its config needs {expected}; give a folder that "
                "CrossCoder.save wrote"
            )
        cc.load_state_dict({name: t.to(cc.W_enc.dtype) for name, t in tensors.items()}, strict=False)
        return cc.to(device) if device is not None else cc


def train_step(cc: CrossCoder, optimizer: StepOptimizer, x: Tensor) -> dict[str, Tensor]:
    """One optimisation step on raw activations `x` `[rows, S, d_in]`: loss, backward, decoder-gradient projection,
    optimiser step, decoder renormalisation. Returns detached metrics."""
    loss, metrics = cc.training_loss(x)
    loss.backward()
    cc.project_decoder_grad()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    cc.normalize_decoder()
    return metrics


def train_crosscoder(cc: CrossCoder, batches: Iterable[Tensor], *, steps: int, lr: float) -> dict[str, float]:
    """Train `cc` for `steps` steps with Adam on `batches` of raw activations `[rows, S, d_in]` (one each), the
    input scales and decoder bias set from the first, the rate `lr` decaying linearly to 0 over the last fifth (as
    Gao et al. and Minder et al.'s trainer); returns the last step's metrics."""
    optimizer = torch.optim.Adam(cc.parameters(), lr=lr)
    decay = max(1, steps // 5)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (steps - step) / decay))
    metrics: dict[str, Tensor] = {}
    for step, x in zip(range(steps), batches, strict=False):
        if step == 0:
            cc.init_from_sample(x)
        metrics = train_step(cc, optimizer, x)
        schedule.step()
    return {name: float(v) for name, v in metrics.items()}
