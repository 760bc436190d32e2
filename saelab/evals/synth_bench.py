"""`saelab bench-synth`: a fixed, versioned suite of synthetic data with known features, scoring any SAE architecture
and width on how well it finds them.

SAELens's SynthSAEBench (`sae_lens.synthetic.evals`) is the anchor; its metric definitions are followed exactly:

- **MCC** (mean correlation coefficient, O'Neill et al.): the Hungarian matching of decoder rows to true directions
  on `|cosine|` (`scipy.optimize.linear_sum_assignment`, `min(n_latents, n_features)` pairs), the mean `|cosine|` of
  the matched pairs.
- **Uniqueness**: each latent's best-matching true feature (`argmax |cosine|`); the number of distinct ones over the
  number of latents (1: every latent tracks another feature).
- **Classification** (precision, recall, F1): each latent as a detector of its best-matching true feature (fires
  `> 0` against the feature firing), per latent, then the mean over latents (0 where undefined).

saelab adds **recovery** at cosine thresholds (the fraction of true features that some decoder row matches at
`|cosine| >= t`, `saelab.toys.synthetic.recovery`'s measure), explained variance and L0 on held-out rows, and on the
hierarchy generator **absorption** (Chanin et al., "A is for Absorption"): each parent feature's latent (its best
decoder match) should fire whenever the parent does; the absorption rate is the fraction of rows where the parent
fires with one of its children and the parent's latent stays off, the mean over parents. **Hedging**
(`saelab.evals.hedging`, Chanin et al.'s protocol) needs two more trainings per SAE, so it runs only when asked
(`hedging_steps > 0`) and only on the correlated-pairs generator, where a latent short of room for a follower hedges:
the trained SAE is the initial one, a control copy and one with `HEDGING_NEW_LATENTS` more latents train
`hedging_steps` further steps on the same batches, and the rate compares their decoder changes.

MCC rewards a too-narrow SAE whose few latents all match well (it averages over the matched pairs); read it beside
recovery, which counts the true features found. The suite (`SUITE`, version `SUITE_VERSION`) is part of the output:
a change to any generator changes the version.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, cast, get_args

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from saelab.dictionaries import SAE, SAEConfig, train_step
from saelab.dictionaries.registry import Arch
from saelab.errors import ConfigError
from saelab.evals.hedging import hedging, train_hedging_pair
from saelab.toys.benchmark import DATA_SEED, HierarchicalData, batches, make_benchmark
from saelab.toys.synthetic import SyntheticData, make_synthetic

SUITE_VERSION = "synth-bench-1"
"""The version of `SUITE`, recorded in every result; any change to a generator's parameters bumps it."""

HEDGING_GENERATOR = "correlated-pairs"
"""The generator on which hedging is measured."""
HEDGING_NEW_LATENTS = 4
"""Latents the hedging protocol's extended SAE adds (few against the 32 input dimensions, as the protocol needs)."""

THRESHOLDS = (0.7, 0.8, 0.9)
"""The cosines at which recovery is counted."""


class Generator(NamedTuple):
    """One synthetic data set of the suite."""

    name: str
    """Its name in the table."""
    what: str
    """What it stresses."""
    build: Callable[[int], SyntheticData]
    """The data for a seed."""


SUITE: tuple[Generator, ...] = (
    Generator(
        "frequency-skew",
        "64 features in 32 dims, Zipf firing rates (exponent 1): rare features are hard to learn",
        lambda seed: make_synthetic(64, 32, 3.0, freq_exponent=1.0, n_pairs=0, seed=DATA_SEED + seed),
    ),
    Generator(
        "correlated-pairs",
        "64 features in 32 dims, 16 pairs whose follower fires with its leader 90% of the time",
        lambda seed: make_synthetic(64, 32, 3.0, n_pairs=16, pair_prob=0.9, seed=DATA_SEED + seed),
    ),
    Generator(
        "hierarchy",
        "64 features in 32 dims, 6 parents with 3 mutually exclusive children each (absorption is measured here)",
        lambda seed: make_benchmark(64, 32, 3.0, n_parents=6, children=3, child_prob=0.75, noise=0.01, seed=seed),
    ),
    Generator(
        "noise",
        "64 features in 32 dims, isotropic noise of std 0.1 on every row",
        lambda seed: make_synthetic(64, 32, 3.0, n_pairs=0, noise=0.1, seed=DATA_SEED + seed),
    ),
    Generator(
        "superposition",
        "96 features in 24 dims (4 per dimension), 2 active per row",
        lambda seed: make_synthetic(96, 24, 2.0, n_pairs=0, seed=DATA_SEED + seed),
    ),
)
"""The suite: small enough that every setting trains on every generator and seed in seconds on a CPU."""


@dataclass(frozen=True)
class BenchSetting:
    """One SAE configuration to score: trained with `saelab.dictionaries.train_step` (Adam, `saelab train`'s step)."""

    name: str
    """Its name in the table."""
    arch: Arch = "topk"
    """The architecture (any of `saelab.dictionaries.ARCHITECTURES` that `train_step` trains)."""
    width: float = 1.0
    """Latents per true feature (1: as many latents as features)."""
    k: int = 4
    """Active latents per row (TopK kinds)."""
    steps: int = 400
    """Training steps; 0 scores the initialisation (a random decoder), the floor any training should beat."""
    batch_size: int = 512
    """Rows per step."""
    lr: float = 3e-3
    """Adam's learning rate."""
    l1_coef: float = 1.0
    """The L1 weight of ReLU SAEs."""

    def config(self, data: SyntheticData) -> SAEConfig:
        """The SAE's config for `data`."""
        d_sae = max(1, round(self.width * data.n_features))
        return SAEConfig(
            arch=self.arch,
            d_in=data.directions.shape[1],
            d_sae=d_sae,
            k=min(self.k, d_sae),
            l1_coef=self.l1_coef,
            dead_tokens=20 * self.batch_size,
        )


@dataclass
class SynthScores:
    """One SAE's scores against one generator's true features, on held-out rows."""

    recovery: dict[str, float]
    """Threshold (as text, e.g. `"0.9"`) -> the fraction of true features some decoder row matches at `|cos| >= t`."""
    mcc: float
    """SynthSAEBench's MCC: the mean `|cos|` over the Hungarian matching of latents to features."""
    uniqueness: float
    """SynthSAEBench's uniqueness: distinct best-matching features over latents."""
    precision: float
    """The mean over latents of the precision of each as a detector of its best-matching feature."""
    recall: float
    """The same, recall."""
    f1: float
    """The same, F1 (SynthSAEBench's classification F1)."""
    explained_variance: float
    """`1 - E|x - x_hat|^2 / Var(x)` on the held-out rows."""
    l0: float
    """Mean active latents per row."""
    true_l0: float
    """Mean true features per row."""
    dead: int
    """Latents that never fired on the held-out rows."""
    absorption: float | None
    """The hierarchy generator's absorption rate (see the module docstring); None on the others."""
    hedging: float | None = None
    """The hedging rate on the correlated-pairs generator when asked for (`hedging_steps`); None otherwise."""


@torch.no_grad()
def score_sae(sae: SAE, data: SyntheticData, *, rows: int = 8192, seed: int = 0) -> SynthScores:
    """`sae`'s `SynthScores` on `rows` held-out rows of `data` (drawn from `seed`, apart from any training batch)."""
    sae.eval()
    sample = data.sample_labelled(rows, torch.Generator().manual_seed(DATA_SEED - 1 - seed))
    codes = sae.encode(sample.x)
    x_hat = sae.decode(codes)
    learned = sae.W_dec.detach().float()
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = (learned @ data.directions.T.float()).abs()  # [latents, features]
    best_cos = cos.amax(0)
    matched = linear_sum_assignment(cos.numpy(), maximize=True)
    best = cos.argmax(1)
    fired, truth = codes > 0, sample.fires[:, best]
    tp = (fired & truth).sum(0).float()
    precision = torch.where(fired.sum(0) > 0, tp / fired.sum(0).clamp_min(1), 0.0)
    recall = torch.where(truth.sum(0) > 0, tp / truth.sum(0).clamp_min(1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
    variance = (sample.x - sample.x.mean(0)).pow(2).sum(1).mean()
    return SynthScores(
        recovery={str(t): float((best_cos >= t).float().mean()) for t in THRESHOLDS},
        mcc=float(cos.numpy()[matched].mean()),
        uniqueness=len(best.unique()) / len(best),
        precision=float(precision.mean()),
        recall=float(recall.mean()),
        f1=float(f1.mean()),
        explained_variance=float(1 - (sample.x - x_hat).pow(2).sum(1).mean() / variance),
        l0=float(fired.sum(1).float().mean()),
        true_l0=float(sample.fires.sum(1).float().mean()),
        dead=int((~fired.any(0)).sum()),
        absorption=absorption_rate(fired, sample.fires, cos, data) if isinstance(data, HierarchicalData) else None,
    )


def absorption_rate(fired: Tensor, fires: Tensor, cos: Tensor, data: HierarchicalData) -> float:
    """The mean over parents of the fraction of rows where the parent fires with a child and the parent's latent
    (its best decoder match in `cos [latents, features]`) does not; `fired [rows, latents]`, `fires [rows, features]`."""
    rates = []
    for parent, children in zip(data.parents.tolist(), data.children, strict=True):
        with_child = fires[:, parent] & fires[:, children].any(1)
        if with_child.any():
            rates.append(float((~fired[with_child, int(cos[:, parent].argmax())]).float().mean()))
    return float(np.mean(rates)) if rates else 0.0


def train_setting(setting: BenchSetting, data: SyntheticData, *, seed: int) -> SAE:
    """An SAE of `setting` trained on `data`'s batches (the same for every setting of one seed)."""
    cfg = setting.config(data)
    torch.manual_seed(seed)
    sae = SAE.from_config(cfg)
    stream = batches(data, setting.steps + 1, setting.batch_size, seed=seed)
    sae.init_from_sample(next(stream))
    if setting.steps:
        sae.train()
        opt = torch.optim.Adam(sae.parameters(), lr=setting.lr)
        for x in stream:
            train_step(sae, opt, x)
    return sae.eval()


def setting_grid(
    archs: Sequence[str], widths: Sequence[float], *, k: int = 4, steps: int = 400, lr: float = 3e-3
) -> list[BenchSetting]:
    """One `BenchSetting` per architecture and width, named `ARCH-wWIDTH`."""
    unknown = [a for a in archs if a not in get_args(Arch)]
    if unknown:
        raise ConfigError(f"unknown architectures {unknown}; choose among {', '.join(get_args(Arch))}")
    return [
        BenchSetting(f"{a}-w{w:g}", arch=cast(Arch, a), width=w, k=k, steps=steps, lr=lr) for a in archs for w in widths
    ]


def hedging_rate(sae: SAE, data: SyntheticData, *, setting: BenchSetting, steps: int, seed: int) -> float:
    """Chanin et al.'s hedging rate of the trained `sae`: a control copy and one with `HEDGING_NEW_LATENTS` more
    latents train `steps` further steps on the same fresh batches of `data` (`train_hedging_pair`)."""
    fresh = list(batches(data, steps, setting.batch_size, seed=seed + 7919))  # not the training batches
    pair = train_hedging_pair(
        sae, lambda step: fresh[step], new_latents=HEDGING_NEW_LATENTS, steps=steps, lr=setting.lr, seed=seed
    )
    return hedging(pair.control, pair.extended, seed=seed).rate


class SynthRow(NamedTuple):
    """One setting on one generator and seed."""

    setting: str
    """The setting's name."""
    generator: str
    """The generator's name."""
    seed: int
    """The seed of the data and the SAE's initialisation."""
    scores: SynthScores
    """What it scored."""


METRICS = ("recovery@0.9", "mcc", "uniqueness", "f1", "explained_variance", "l0", "absorption", "hedging")
"""The table's columns, means over seeds (`recovery@T` reads `recovery[T]`)."""


def _metric(scores: SynthScores, metric: str) -> float | None:
    if metric.startswith("recovery@"):
        return scores.recovery[metric.removeprefix("recovery@")]
    return getattr(scores, metric)


@dataclass
class SynthBench:
    """A `bench_synth` run: every setting on every generator and seed."""

    version: str
    """`SUITE_VERSION` when it ran."""
    settings: list[BenchSetting]
    """The settings scored."""
    seeds: list[int]
    """The seeds."""
    rows: list[SynthRow] = field(default_factory=list)
    """One per setting, generator and seed."""
    seconds: float = 0.0
    """Wall time of the run."""

    def values(self, setting: str, generator: str, metric: str) -> list[float]:
        """`metric` of `setting` on `generator`, one value per seed (in `seeds` order); empty where undefined."""
        found = [_metric(r.scores, metric) for r in self.rows if r.setting == setting and r.generator == generator]
        return [v for v in found if v is not None]

    def table(self) -> str:
        """The table: one line per setting and generator, each metric's mean +- std over seeds."""
        header = f"{'setting':<16} {'generator':<17} " + " ".join(f"{m:>18}" for m in METRICS)
        lines = [f"{self.version}, seeds {self.seeds}", header]
        for setting in self.settings:
            for gen in dict.fromkeys(r.generator for r in self.rows):
                cells = []
                for metric in METRICS:
                    vals = self.values(setting.name, gen, metric)
                    cells.append(f"{np.mean(vals):>9.3f} +- {np.std(vals):5.3f}" if vals else f"{'-':>18}")
                lines.append(f"{setting.name:<16} {gen:<17} " + " ".join(cells))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Everything, JSON-ready: the version, the suite's generators, the settings and every row's scores."""
        return {
            "version": self.version,
            "generators": {g.name: g.what for g in SUITE},
            "settings": [asdict(s) for s in self.settings],
            "seeds": self.seeds,
            "seconds": self.seconds,
            "rows": [
                {"setting": r.setting, "generator": r.generator, "seed": r.seed, **asdict(r.scores)} for r in self.rows
            ],
        }

    def figure(self, metric: str = "recovery@0.9") -> dict[str, Any]:
        """A plotly figure (plain dict): `metric` per generator, one bar group per setting, std over seeds as error."""
        generators = list(dict.fromkeys(r.generator for r in self.rows))
        data = []
        for setting in self.settings:
            vals = [self.values(setting.name, g, metric) for g in generators]
            data.append(
                {
                    "type": "bar",
                    "name": setting.name,
                    "x": generators,
                    "y": [float(np.mean(v)) if v else None for v in vals],
                    "error_y": {"type": "data", "array": [float(np.std(v)) if v else 0.0 for v in vals]},
                }
            )
        return {
            "data": data,
            "layout": {
                "title": {"text": f"{self.version}: {metric} (mean +- std over seeds {self.seeds})"},
                "barmode": "group",
                "yaxis": {"title": {"text": metric}},
                "template": "plotly_white",
            },
        }


def bench_synth(
    settings: Sequence[BenchSetting],
    *,
    seeds: Iterable[int] = (0, 1, 2),
    generators: Sequence[str] | None = None,
    eval_rows: int = 8192,
    hedging_steps: int = 0,
    progress: Callable[[str], None] | None = None,
) -> SynthBench:
    """Train and score every setting on every generator of `SUITE` (or those named in `generators`) and seed;
    `hedging_steps > 0` adds the hedging rate on the correlated-pairs generator (see the module docstring)."""
    if not settings:
        raise ConfigError("bench_synth needs at least one setting; give e.g. BenchSetting('topk')")
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise ConfigError(f"setting names must differ, got {names}; name each setting")
    known = {g.name: g for g in SUITE}
    chosen = list(known) if generators is None else list(generators)
    unknown = [g for g in chosen if g not in known]
    if unknown:
        raise ConfigError(f"unknown generators {unknown}; the suite {SUITE_VERSION} has {list(known)}")
    seeds = list(seeds)
    start = time.perf_counter()
    bench = SynthBench(SUITE_VERSION, list(settings), seeds)
    for gen in chosen:
        for seed in seeds:
            data = known[gen].build(seed)
            for setting in settings:
                sae = train_setting(setting, data, seed=seed)
                scores = score_sae(sae, data, rows=eval_rows, seed=seed)
                if hedging_steps > 0 and gen == HEDGING_GENERATOR and not sae.signed_codes:
                    scores.hedging = hedging_rate(sae, data, setting=setting, steps=hedging_steps, seed=seed)
                bench.rows.append(SynthRow(setting.name, gen, seed, scores))
                if progress is not None:
                    progress(f"{setting.name} on {gen}, seed {seed}")
    bench.seconds = time.perf_counter() - start
    return bench


def write_bench(bench: SynthBench, *, json_path: Path | None = None, figure_path: Path | None = None) -> list[Path]:
    """Write the JSON results and the figure (`.html` through plotly, self-contained for offline use; anything else
    as the figure's JSON)."""
    written = []
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(bench.to_json(), indent=1))
        written.append(json_path)
    if figure_path is not None:
        figure_path.parent.mkdir(parents=True, exist_ok=True)
        if figure_path.suffix == ".html":
            import plotly.io

            plotly.io.write_html(bench.figure(), figure_path, include_plotlyjs=True)
        else:
            figure_path.write_text(json.dumps(bench.figure()))
        written.append(figure_path)
    return written
