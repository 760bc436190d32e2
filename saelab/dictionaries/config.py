"""`SAEConfig`: the architecture, training hyper-parameters and provenance of every dictionary, range-checked where
each field is declared."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from saelab.dictionaries.matryoshka import resolve_prefixes
from saelab.dictionaries.registry import Arch

DType = Literal["float32", "float64", "bfloat16", "float16"]


class SAEConfig(BaseModel):
    """Architecture, training hyper-parameters and provenance of an SAE."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    arch: Arch = "topk"
    d_in: int = Field(gt=0, description="Width of the activations the SAE reads.")
    d_sae: int = Field(gt=0, description="Number of latents.")
    k: int = Field(default=32, gt=0, description="Active latents per token (batchtopk: on average); at most d_sae.")
    aux_k: int | None = Field(default=None, ge=0, description="AuxK latents per token; None: d_out_resolved // 2.")
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
    icfl_block: int = Field(
        default=5, gt=0, description="ICFL: latents chosen per pursuit iteration (L); k / icfl_block iterations (J)."
    )
    icfl_reset_every: int = Field(
        default=100, gt=0, description="ICFL: training steps between resets of near-duplicate decoder rows."
    )
    icfl_reset_cos: float = Field(
        default=0.9, gt=0, le=1, description="ICFL: of two decoder rows above this cosine, one is redrawn at random."
    )
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
    mask_fraction: float | None = Field(
        default=None,
        description="Masked objective (Chidambaram et al. 2023): the fraction of input dimensions hidden from the "
        "encoder in each training step, the loss taken on them alone; in (0, 1). None: off (inference never masks).",
    )
    whiten: bool = False
    """Train on PCA-whitened inputs (statistics from the training store, or `TrainConfig.whiten_store`; see
    `saelab.dictionaries.preprocessing`). A saved SAE has the whitening folded into its weights and says `whiten:
    false, whitened: true`."""
    whiten_rcond: float = Field(
        default=1e-6,
        gt=0,
        lt=1,
        description="Whitening refuses a covariance whose smallest eigenvalue is at most this times its largest.",
    )
    whitened: bool = False
    """Provenance: the weights have PCA whitening folded in, so decoder rows are raw-space directions, not unit norm."""
    d_out: int | None = Field(
        default=None,
        gt=0,
        description="Transcoder: the width of the output it writes (an MLP's output) from its input of width d_in; "
        "None: an SAE, which reconstructs its input. See `saelab.dictionaries.transcoder`.",
    )
    skip: bool = Field(
        default=False,
        description="Skip transcoder (Paulo et al. 2025): a linear skip `W_skip [d_out, d_in]`, zero at the start, "
        "adds `x @ W_skip.T` to the output. Needs d_out.",
    )
    hook_name_out: str = ""
    """Transcoder: the hook point it writes (`hook_name` is the one it reads)."""

    @model_validator(mode="after")
    def _check_transcoder(self) -> SAEConfig:
        if self.skip and self.d_out is None:
            raise ValueError("skip: true makes a skip transcoder, which needs d_out (its output width); set d_out")
        if self.d_out is not None and self.arch == "icfl":
            raise ValueError("arch icfl pursues codes over its own decoder, so it cannot transcode; use another arch")
        if self.d_out is not None and (self.whiten or self.mask_fraction is not None):
            raise ValueError(
                "transcoders neither whiten nor mask (both assume the output is the input); drop whiten and "
                "mask_fraction"
            )
        return self

    @property
    def d_out_resolved(self) -> int:
        """The width of what the dictionary writes: `d_out` for a transcoder, `d_in` for an SAE."""
        return self.d_in if self.d_out is None else self.d_out

    @field_validator("mask_fraction")
    @classmethod
    def _check_mask_fraction(cls, fraction: float | None) -> float | None:
        if fraction is not None and not 0 < fraction < 1:
            raise ValueError(
                f"mask_fraction={fraction} is outside (0, 1); give the fraction of input dimensions to hide from the "
                "encoder (the paper hides about 0.1), or null to train on whole inputs"
            )
        return fraction

    @model_validator(mode="after")
    def _check_mask_dims(self) -> SAEConfig:
        if self.mask_fraction is not None and not 0 < round(self.mask_fraction * self.d_in) < self.d_in:
            raise ValueError(
                f"mask_fraction={self.mask_fraction} of d_in={self.d_in} dimensions hides none or all of them; give "
                f"a fraction between {1 / self.d_in:.3g} and {1 - 1 / self.d_in:.3g}"
            )
        return self

    @property
    def masked_dims(self) -> int:
        """Input dimensions hidden from the encoder in each masked training step (0: no masking)."""
        return 0 if self.mask_fraction is None else round(self.mask_fraction * self.d_in)

    @model_validator(mode="after")
    def _check_k(self) -> SAEConfig:
        if self.arch in ("topk", "batchtopk") and self.k > self.d_sae:
            raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}; lower k or widen the SAE")
        return self

    @model_validator(mode="after")
    def _check_icfl(self) -> SAEConfig:
        if self.arch == "icfl" and (self.k % self.icfl_block or self.icfl_block > self.d_sae):
            raise ValueError(
                f"ICFL picks icfl_block={self.icfl_block} latents per iteration, so k={self.k} must be a multiple "
                f"of it and icfl_block at most d_sae={self.d_sae}; set k to a multiple of icfl_block "
                f"(e.g. {max(1, self.k // self.icfl_block) * self.icfl_block}) or change icfl_block"
            )
        return self

    @field_validator("matryoshka_prefixes", mode="before")
    @classmethod
    def _resolve_prefixes(
        cls, prefixes: list[int | float] | None, info: ValidationInfo
    ) -> list[int | float] | list[int] | None:
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
        return self.d_out_resolved // 2 if self.aux_k is None else self.aux_k
