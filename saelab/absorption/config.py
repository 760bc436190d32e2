"""What `saelab absorption` reads: SAEBench's settings of the metric, and the run's config (no filesystem checks:
`run_absorption` checks that the folders and files it names exist)."""

from __future__ import annotations

from typing import NamedTuple

from pydantic import Field, model_validator

from saelab.config import StrictModel


class ProbeSchedule(NamedTuple):
    """How a one-vs-rest probe is trained (`train_probe`); SAEBench's `train_multi_probe` defaults."""

    epochs: int = 50
    """Passes over the training rows."""
    batch_size: int = 64
    """Rows per step."""
    lr: float = 1e-2
    """The first epoch's learning rate."""
    end_lr: float = 1e-5
    """The learning rate it decays to (exponentially) by the last epoch."""
    weight_decay: float = 1e-4
    """Adam's weight decay."""
    l1: float = 0.0
    """SAEBench's sparse-probe penalty: `l1` times the mean over classes of the sum of |w| (0: none)."""
    seed: int = 0
    """Seeds the initialisation and the batch order."""


class AbsorptionSettings(StrictModel):
    """SAEBench's defaults (`AbsorptionEvalConfig`, `train_and_save_probes`, `FeatureAbsorptionCalculator`)."""

    probe_epochs: int = Field(default=50, ge=1)
    probe_batch_size: int = Field(default=64, ge=1)
    probe_lr: float = Field(default=1e-2, gt=0)
    probe_end_lr: float = Field(default=1e-5, gt=0)
    probe_weight_decay: float = Field(default=1e-4, ge=0)
    l1_decay: float = Field(default=0.01, ge=0)
    l1_epochs: int = Field(default=50, ge=1)
    l1_batch_size: int = Field(default=4096, ge=1)
    l1_weight_decay: float = Field(default=1e-6, ge=0)
    max_k: int = Field(default=10, ge=1)
    f1_jump_threshold: float = Field(default=0.03, ge=0, lt=1)
    min_probe_f1: float = Field(default=0.6, ge=0, lt=1)
    min_labels: int = Field(default=20, ge=1)
    absorber_cos_threshold: float = Field(default=0.1, ge=0, lt=1)  # absorption_fraction_probe_cos_sim_threshold
    full_absorption_cos_threshold: float = Field(default=0.025, ge=0, lt=1)  # full_absorption_probe_cos_sim_threshold
    projection_proportion_threshold: float = Field(default=0.4, gt=0, le=1)
    max_absorbers: int = Field(default=3, ge=1)  # absorption_fraction_max_absorbing_latents
    top_latents: int = Field(default=10, ge=1)  # topk_feats
    seed: int = Field(default=42, ge=0)

    @property
    def probe_schedule(self) -> ProbeSchedule:
        """How the ground-truth probe on the model's activations is trained."""
        return ProbeSchedule(
            epochs=self.probe_epochs,
            batch_size=self.probe_batch_size,
            lr=self.probe_lr,
            end_lr=self.probe_end_lr,
            weight_decay=self.probe_weight_decay,
            seed=self.seed,
        )

    @property
    def l1_schedule(self) -> ProbeSchedule:
        """How the L1-penalised probe on the SAE latents (which ranks them for k-sparse probing) is trained: the
        probe's learning rates and seed, its own epochs, batch size and weight decay."""
        return self.probe_schedule._replace(
            epochs=self.l1_epochs, batch_size=self.l1_batch_size, weight_decay=self.l1_weight_decay, l1=self.l1_decay
        )


class AbsorptionConfig(StrictModel):
    """What `saelab absorption` computes: the absorption of `saes` (SAE folders; default every SAE of the run
    `run`) in `model`, written to the run's absorption results (`RunDir(run).absorption(hook, variant)`).
    `labels`: None for the first-letter task, or a token -> class table (.json object, or .csv/.tsv rows
    token,class)."""

    run: str
    model: str = "minilm"
    saes: list[str] = []
    labels: str | None = None
    template: str | None = None
    icl_examples: int = Field(default=10, ge=1)
    max_words: int | None = Field(default=None, ge=10)
    train_fraction: float = Field(default=0.8, gt=0, lt=1)
    batch_size: int = Field(default=64, ge=1)
    integrated_gradients: bool = False
    ig_steps: int = Field(default=6, ge=1)
    ig_words: int = Field(default=20, ge=1)
    settings: AbsorptionSettings = AbsorptionSettings()
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> AbsorptionConfig:
        if self.template is not None and "{word}" not in self.template:
            raise ValueError("the template needs a {word} placeholder, e.g. '{word} has the first letter:'")
        return self
