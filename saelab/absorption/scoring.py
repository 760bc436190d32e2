"""SAEBench's absorption scores: per probe true positive (`Case`), per label (`LabelScore`), per SAE
(`AbsorptionResult`), and `measure_absorption` / `absorption_result`, which compute them from the probe step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from saelab.absorption.config import AbsorptionSettings
from saelab.absorption.data import ProbeData
from saelab.absorption.probes import f1, k_sparse_probing
from saelab.dictionaries import SAE
from saelab.errors import AbsorptionError
from saelab.resultfile import JsonResult

EPS = 1e-8


@dataclass
class Case:
    """One probe true positive. Latent rows (`absorbers`, `top`) are `[latent, activation, cosine, projection]`."""

    word: str
    """The word."""
    probe_projection: float
    """The activation's projection on the unit probe direction."""
    split_acts: list[float]
    """The split latents' activations (decoder norms folded in)."""
    absorbers: list[list[float]]
    """The potential absorbers, up to `max_absorbers` (3)."""
    top: list[list[float]]
    """The top 3 latents by projection."""
    absorption_fraction: float
    """Its absorption fraction."""
    full_absorption: bool
    """Whether it is full absorption."""


def decoder_cosines(sae: SAE, direction: Tensor) -> tuple[Tensor, Tensor]:
    """Cosine of every decoder row with `direction`, and the rows' norms (folded into activations)."""
    w = sae.W_dec.detach().float().cpu()
    norms = w.norm(dim=1)
    return (w @ (direction / direction.norm())) / norms.clamp_min(EPS), norms


def absorption_scores(
    codes: Tensor,
    x: Tensor,
    direction: Tensor,
    *,
    cos: Tensor,
    norms: Tensor,
    split: list[int],
    s: AbsorptionSettings,
    words: list[str],
) -> list[Case]:
    """SAEBench `FeatureAbsorptionCalculator.calculate_absorption` for activations `x` [n, d] with codes [n, d_sae]:
    with p = direction / |p| and pi_i = a_i |d_i| c_i,

    - fraction: 0 if the split latents' sum pi >= x.p or the top-3 absorbers' sum < 0.4 x.p; 1 if the split's
      sum <= 0; otherwise min(absorbers, x.p - split) / (that + split);
    - full absorption: every split activation is 0, the top latent by pi has c >= 0.025, x.p >= 0, and that
      latent's pi is at least 0.4 x.p."""
    p = direction / direction.norm()
    total = (x @ p).tolist()
    folded = codes * norms
    proj = folded * cos
    outside = torch.ones(len(cos), dtype=torch.bool)
    outside[split] = False
    cases = []
    for i, word in enumerate(words):
        main = float(proj[i, split].sum())
        mask = outside & (cos >= s.absorber_cos_threshold) & (proj[i] > 0)
        cand = mask.nonzero()[:, 0]
        top_abs = cand[proj[i, cand].topk(min(s.max_absorbers, len(cand))).indices]
        absorbed = float(proj[i, top_abs].sum())
        ratio = absorbed / total[i] if total[i] else -math.inf
        if main >= total[i] or ratio < s.projection_proportion_threshold:
            fraction = 0.0
        elif main <= 0:
            fraction = 1.0
        else:
            absorbed = min(absorbed, total[i] - main)
            fraction = float(np.clip(absorbed / (absorbed + main), 0.0, 1.0))
        top = proj[i].topk(min(s.top_latents, len(cos))).indices
        full = (
            bool((folded[i, split].abs() < EPS).all())
            and float(cos[top[0]]) >= s.full_absorption_cos_threshold
            and total[i] >= 0
            and float(proj[i, top[0]]) / total[i] >= s.projection_proportion_threshold
            if total[i]
            else False
        )

        def rows(latents: Tensor, i: int = i) -> list[list[float]]:
            return [[int(j), float(folded[i, j]), float(cos[j]), float(proj[i, j])] for j in latents]

        cases.append(
            Case(word, total[i], [float(folded[i, j]) for j in split], rows(top_abs), rows(top[:3]), fraction, full)
        )
    return cases


@dataclass
class LabelScore:
    """A label's result."""

    label: str
    """The label."""
    probe_f1: float
    """The ground-truth probe's F1 on the test words."""
    split_latents: list[int]
    """The split (main) latents the k-sparse probes accept."""
    k_sparse_f1: list[float]
    """The k-sparse probes' F1 by k."""
    true_positives: int
    """The probe's true positives among the test words."""
    split_true_positives: int
    """How many of those the split's k-sparse probe also finds."""
    mean_absorption_fraction: float
    """The mean absorption fraction over the true positives."""
    full_absorption_rate: float
    """The share of true positives with full absorption."""
    n_full_absorption: int
    """How many true positives have full absorption."""
    scored: bool
    """Whether the label counts in the SAE's score (true positives and probe F1 above `min_probe_f1`)."""
    cases: list[Case] = field(default_factory=list)
    """Its cases with absorption (fraction > 0 or full)."""
    ig: dict[str, Any] | None = None
    """The integrated-gradients variant's numbers (`ig_absorption`), or `{"error": ...}`; None when not run."""


@dataclass
class AbsorptionResult(JsonResult):
    """Absorption of one SAE: per label, and the means over scored labels (SAEBench's
    `mean_absorption_fraction_score`, `mean_full_absorption_score`, `mean_num_split_features`)."""

    what: ClassVar[str] = "absorption result"
    command: ClassVar[str] = "saelab absorption CONFIG.yaml"
    error: ClassVar[type[Exception]] = AbsorptionError

    hook: str
    """The hook point the SAE reads."""
    variant: str
    """The SAE's variant name."""
    sae: str
    """The SAE's folder ("" when it has none)."""
    model: str
    """The model spec."""
    task: str
    """`first_letter`, or the name of the label table."""
    d_sae: int
    """The SAE's width."""
    l0: float
    """Mean active latents on the test words."""
    labels: list[LabelScore]
    """Every label's result."""
    mean_absorption_fraction: float | None
    """Mean over scored labels of their mean absorption fraction (None: no label scored)."""
    mean_full_absorption_rate: float | None
    """Mean over scored labels of their full-absorption rate."""
    mean_num_split_features: float | None
    """Mean over scored labels of their number of split latents."""
    n_scored: int
    """How many labels are scored."""
    enough_labels: bool
    """Whether at least `min_labels` labels are scored (SAEBench reports nothing with fewer)."""
    n_train: int = 0
    """Training words of the probe."""
    n_test: int = 0
    """Test words."""
    config: dict[str, Any] = field(default_factory=dict)
    """The settings (or the whole `saelab absorption` config) that made it."""

    def summary(self) -> str:
        """One line: the SAE's scores, how many labels they cover, L0 and width."""

        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.4f}"

        note = "" if self.enough_labels else " (too few labels pass the probe-F1 bar for SAEBench to score this SAE)"
        return (
            f"{self.hook}/{self.variant}: mean absorption fraction {fmt(self.mean_absorption_fraction)}, "
            f"full-absorption rate {fmt(self.mean_full_absorption_rate)}, split latents "
            f"{fmt(self.mean_num_split_features)}, over {self.n_scored} of {len(self.labels)} labels{note}; "
            f"L0 {self.l0:.1f}, width {self.d_sae}"
        )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AbsorptionResult:
        """The result from its parsed JSON."""
        labels = [LabelScore(**(lab | {"cases": [Case(**c) for c in lab["cases"]]})) for lab in data.pop("labels")]
        return AbsorptionResult(labels=labels, **data)


@torch.no_grad()
def _codes(sae: SAE, x: Tensor, batch: int = 4096) -> Tensor:
    device = sae.W_dec.device
    return torch.cat([sae.encode(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])


def measure_absorption(
    sae: SAE, data: ProbeData, s: AbsorptionSettings = AbsorptionSettings(), *, progress: bool = False
) -> tuple[list[LabelScore], dict[str, Any]]:
    """k-sparse probing, feature splits and absorption of every label; returns the label scores and the SAE-level
    means (over labels with true positives and probe F1 > `min_probe_f1`)."""
    if sae.cfg.d_in != data.train_x.shape[1]:
        raise AbsorptionError(
            f"the SAE reads d_in={sae.cfg.d_in} but the activations have width "
            f"{data.train_x.shape[1]}; give an SAE trained on this hook point"
        )
    codes_train, codes_test, codes_abs = _codes(sae, data.train_x), _codes(sae, data.test_x), _codes(sae, data.absorb_x)
    ks = k_sparse_probing(
        codes_train, data.train_y, codes_test, y_test=data.test_y, n_classes=len(data.classes), s=s, progress=progress
    )
    probe_scores = data.scores()
    labels = []
    for c, name in enumerate(data.classes):
        truth = data.test_y == c
        probe_f1 = f1(truth, probe_scores[:, c] > 0)
        split = ks[c].split(s.f1_jump_threshold)
        tp = np.nonzero(truth & (probe_scores[:, c] > 0))[0]
        split_tp = int((ks[c].scores[max(len(split), 1) - 1][tp] > 0).sum()) if split else 0
        cos, norms = decoder_cosines(sae, data.probe.weight[c].detach().cpu())
        cases = absorption_scores(
            codes_abs[tp],
            data.absorb_x[tp],
            data.probe.weight[c].detach().cpu(),
            cos=cos,
            norms=norms,
            split=split,
            s=s,
            words=[data.test_words[i] for i in tp],
        )
        n = max(len(tp), 1)
        labels.append(
            LabelScore(
                name,
                probe_f1,
                split,
                ks[c].f1,
                len(tp),
                split_tp,
                sum(x.absorption_fraction for x in cases) / n,
                sum(x.full_absorption for x in cases) / n,
                sum(x.full_absorption for x in cases),
                len(tp) > 0 and probe_f1 > s.min_probe_f1,
                [x for x in cases if x.absorption_fraction > 0 or x.full_absorption],
            )
        )
    scored = [lab for lab in labels if lab.scored]

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    summary = {
        "mean_absorption_fraction": mean([lab.mean_absorption_fraction for lab in scored]),
        "mean_full_absorption_rate": mean([lab.full_absorption_rate for lab in scored]),
        "mean_num_split_features": mean([float(len(lab.split_latents)) for lab in scored]),
        "n_scored": len(scored),
        "enough_labels": len(scored) >= s.min_labels,
        "l0": float((codes_test != 0).sum(1).float().mean()) if len(codes_test) else 0.0,
    }
    return labels, summary


def absorption_result(
    sae: SAE,
    data: ProbeData,
    hook: str,
    *,
    variant: str,
    s: AbsorptionSettings = AbsorptionSettings(),
    sae_path: str = "",
    model: str = "",
    task: str = "first_letter",
    progress: bool = False,
) -> AbsorptionResult:
    """`measure_absorption` packed as a result that the app and `AbsorptionResult.load` read."""
    labels, summary = measure_absorption(sae, data, s, progress=progress)
    return AbsorptionResult(
        hook,
        variant,
        sae_path,
        model,
        task,
        sae.cfg.d_sae,
        summary.pop("l0"),
        labels,
        n_train=len(data.train_y),
        n_test=len(data.test_y),
        config=s.model_dump(),
        **summary,
    )
