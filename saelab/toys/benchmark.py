"""A sample-efficiency benchmark with known answers: a Zipf-distributed dictionary with a planted hierarchy.

`make_benchmark` builds `n_features` random unit directions in `d` dims (768 in 96 by default, the issue's
held-out setting). Root features fire independently with Zipf-Mandelbrot probabilities `∝ 1 / (rank + offset)`;
`n_parents` of them (drawn from the frequent half) each have `children` child features, and whenever a parent
fires, one of its children (uniformly) fires with it with probability `child_prob`; a child never fires alone (the
hierarchy that SAELens's `sae_lens.synthetic.hierarchy` plants, with mutually exclusive children). Active
magnitudes are log-normal and every token gets isotropic Gaussian noise. `recovery` (from
`saelab.toys.synthetic`) counts the true directions that some decoder row matches at cosine >= 0.9.

`batches` gives every library the same batches: batch `i` depends only on the benchmark, its seed and `i`.
`DefaultsRun` trains one saelab SAE on such batches step by step with `saelab train`'s own per-step code and defaults.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.dictionaries import SAEConfig
from saelab.errors import ConfigError
from saelab.toys.synthetic import SyntheticData, max_cosines
from saelab.train.config import TrainConfig
from saelab.train.optim import OptimizerName, eval_weights, train_weights
from saelab.train.trainer import Member, schedule

DATA_SEED = 0x5EED_0000
"""Added to a benchmark's seed: torch's global generator seeded alike would draw the same directions."""


@dataclass
class HierarchicalData(SyntheticData):
    """`SyntheticData` whose child features fire only with their parent, at most one child per parent."""

    children: Tensor
    """`[n_parents, children]` the child features of each parent (row `i` belongs to `parents[i]`)."""
    parents: Tensor
    """`[n_parents]` the parent features."""
    child_prob: float
    """The probability that one of a parent's children fires when the parent does."""

    def sample_fires(self, n: int, generator: torch.Generator) -> Tensor:
        """Roots fire independently; each firing parent brings one uniformly chosen child with `child_prob`."""
        fires = torch.rand(n, self.n_features, generator=generator) < self.freqs
        fires[:, self.children.flatten()] = False
        brings = fires[:, self.parents] & (torch.rand(n, len(self.parents), generator=generator) < self.child_prob)
        rows, parent = brings.nonzero(as_tuple=True)
        which = torch.randint(self.children.shape[1], (len(rows),), generator=generator)
        fires[rows, self.children[parent, which]] = True
        return fires

    def kinds(self) -> dict[str, Tensor]:
        """Boolean masks `[n_features]` of the three kinds of feature: `flat` (roots outside the hierarchy),
        `parents` and `children` (which fire only with their parent: the ones a TopK SAE absorbs)."""
        parents = torch.zeros(self.n_features, dtype=torch.bool)
        parents[self.parents] = True
        children = torch.zeros(self.n_features, dtype=torch.bool)
        children[self.children.flatten()] = True
        return {"flat": ~(parents | children), "parents": parents, "children": children}

    def recovery_by_kind(self, learned_dirs: Tensor, threshold: float = 0.9) -> dict[str, float]:
        """`recovery` of all the true directions (`all`) and of each kind of `kinds` alone, by decoder rows
        `[m, d]`."""
        found = max_cosines(self.directions, learned_dirs.to(self.directions.dtype)) >= threshold
        masks = {"all": torch.ones_like(found)} | self.kinds()
        return {kind: found[mask].float().mean().item() for kind, mask in masks.items()}


def make_benchmark(
    n_features: int = 768,
    d: int = 96,
    mean_active: float = 8.0,
    *,
    zipf_exponent: float = 1.0,
    zipf_offset: float = 5.0,
    n_parents: int = 48,
    children: int = 4,
    child_prob: float = 0.75,
    noise: float = 0.05,
    magnitude_sigma: float = 0.3,
    seed: int = 0,
) -> HierarchicalData:
    """The benchmark's dictionary and code distribution (see the module docstring); `mean_active` is the expected
    number of roots firing per token (children come on top). The dictionary is drawn from a generator seeded with
    `DATA_SEED + seed`, so an SAE initialised after `torch.manual_seed(seed)` does not start at the answer."""
    n_children = n_parents * children
    if n_parents + n_children > n_features:
        raise ConfigError(
            f"{n_parents} parents with {children} children each need {n_parents + n_children} features, got "
            f"{n_features}; give fewer parents or children, or more features"
        )
    gen = torch.Generator().manual_seed(DATA_SEED + seed)
    directions = torch.randn(n_features, d, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)
    order = torch.randperm(n_features, generator=gen)
    roots, child_ids = order[: n_features - n_children], order[n_features - n_children :]
    zipf = (torch.arange(len(roots), dtype=torch.float32) + zipf_offset) ** -zipf_exponent
    zipf *= mean_active / zipf.sum()
    if zipf.max() >= 1:
        raise ConfigError(
            f"mean_active={mean_active} makes the most frequent feature fire always; give a smaller mean_active, "
            "a larger zipf_offset or more features"
        )
    parents = roots[torch.randperm(len(roots) // 2, generator=gen)[:n_parents]]  # roots are in frequency order
    freqs = torch.zeros(n_features)
    freqs[roots] = zipf
    child_grid = child_ids.view(n_parents, children)
    freqs[child_grid] = (freqs[parents] * child_prob / children)[:, None]  # their marginal rates, for reference
    bias = torch.randn(d, generator=gen) / d**0.5
    no_pairs = torch.zeros(0, 2, dtype=torch.long)
    return HierarchicalData(
        directions, freqs, no_pairs, 0.0, bias, noise, magnitude_sigma, child_grid, parents, child_prob
    )


def batches(data: SyntheticData, n_batches: int, batch_size: int, *, seed: int = 0) -> Iterator[Tensor]:
    """`n_batches` batches `[batch_size, d]` of `data`, the same ones on every call with the same arguments."""
    for i in range(n_batches):
        yield data.sample(batch_size, torch.Generator().manual_seed(DATA_SEED + 1 + seed * 1_000_003 + i))


class DefaultsRun:
    """One saelab SAE trained on given batches by `saelab train`'s own per-step code, with `TrainConfig`'s defaults
    for a run of `total_steps` batches of `batch_size` rows: `Member.create` (seeded initialisation, Adam), the peak
    learning rate `TrainConfig.peak_lr` resolves (`default_lr` for the width and step count unless `lr` is given),
    `init_from_sample`, and per step `schedule` (warmup, decay, AuxK's dead-set refreshes) and `Member.step`.
    `warmup_steps`, `decay_start` and `optimizer` override `TrainConfig`'s."""

    def __init__(
        self,
        cfg: SAEConfig,
        sample: Tensor,
        total_steps: int,
        *,
        batch_size: int = 4096,
        lr: float | None = None,
        warmup_steps: int | None = None,
        decay_start: float | None = None,
        optimizer: OptimizerName = "adam",
        seed: int = 0,
    ):
        changes = {"warmup_steps": warmup_steps, "decay_start": decay_start}
        self.train_cfg = TrainConfig(
            run="",
            tokens=total_steps * batch_size,
            batch_size=batch_size,
            optimizer=optimizer,
            **{key: value for key, value in changes.items() if value is not None},
        )
        self.member = Member.create(
            cfg,
            lr=self.train_cfg.peak_lr(cfg.d_sae, d_in=cfg.d_in, lr=lr),
            seed=seed,
            device="cpu",
            optimizer=optimizer,
        )
        self.sae = self.member.sae
        self.sae.init_from_sample(sample)
        self.total_steps, self.steps = total_steps, 0

    @property
    def lr(self) -> float:
        """The peak learning rate."""
        return self.member.lr

    def step(self, x: Tensor) -> None:
        """One training step on the raw batch `x`."""
        factor, refresh = schedule(self.train_cfg, self.steps)
        self.member.step(x, factor=factor, refresh=refresh)
        self.steps += 1

    def directions(self) -> Tensor:
        """The decoder rows `[d_sae, d_in]` (a schedule-free optimiser's averaged ones, as `saelab train` saves)."""
        eval_weights(self.member.opt)
        rows = self.sae.W_dec.detach().clone()
        train_weights(self.member.opt)
        return rows
