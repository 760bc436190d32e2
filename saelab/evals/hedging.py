"""Feature hedging (Chanin et al. 2025, "Feature Hedging: Correlated Features Break Narrow Sparse Autoencoders"): an
SAE too narrow to give each of two correlated features a latent mixes part of the missing one into the latent of the
other, in its decoder (and encoder). Hedging shows when the SAE is given room: the latents it had move away from the
directions the new latents take.

It follows the paper's hedging eval (github.com/chanind/feature-hedging-paper, `hedging_paper/evals/hedging_eval.py`,
`calculate_hedging_stats`; the protocol in `scripts/train_hedging_eval_batch_topk_sae.py`): train an SAE (the
initial one), then train it on for the same steps twice, as it is (the control) and with `n` new latents added (the
extended SAE, `extended_copy`). With unit decoder rows (the reference folds the decoder norms first), `delta` is the
change of each of the control's latents, `extended.W_dec[:width] - control.W_dec[:width]`; its projection onto the
span of the new latents' decoder rows, against the projection onto the span of as many random Gaussian directions
(`n_baselines` draws), gives the hedging rate `max(0, (proj - baseline) / (1 - baseline))` (means over latents, with
the control's mean decoder norm, 1 here, as the unit). The same formula on each latent's own projection and baseline
gives the per-latent rate that `Hedging.per_latent` holds (the reference reports the SAE's alone).

The rate presumes that the extended SAE learns the features the control lacked, so that what its old latents give
up is what they hedged. Where it does not, the rate reads other changes as hedging: on `saelab.toys.hedging`'s toy
with TopK (k 2) instead of ReLU/L1, the extended SAE's old latents take in parts of other features, and the rate is
0.36 to 0.82 on the control with independent children (seeds 0-2), where the control SAE's latents lean toward no
child (cosine <= 0.09), against 0.41 to 0.50 with correlated children. Read it with the per-latent `cosine`.

Where no such pair exists, `hedging` takes any wider SAE of the same hook point with `extends=False`: its latents
are matched to the narrow one's by decoder cosine (Hungarian, `saelab.evals.matching.one_to_one`), `delta` is the
matched latent's direction minus the narrow latent's, and the unmatched latents play the new ones. Matching reads
only directions, so this version is noisier: two trainings differ latent by latent even without hedging.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from saelab.dictionaries import SAE, train_step
from saelab.errors import ConfigError
from saelab.evals.matching import Decoder, directions, one_to_one


@dataclass
class Hedging:
    """How much a dictionary's latents hedge, from its control and extended versions."""

    rate: float
    """The SAE's hedging rate, `(proj - baseline) / (1 - baseline)` on means over latents, clipped to [0, 1] (the
    reference's `hedging_rate`; 0: no hedging, 1: every latent's change lies in the new latents' span)."""
    per_latent: Tensor
    """`[width]`: each latent's rate, the same formula on its own projection and baseline, clipped the same way."""
    delta_proj: Tensor
    """`[width]`: the norm of each latent's decoder change projected onto the new latents' span."""
    baseline_proj: Tensor
    """`[width]`: the same onto random subspaces of the same dimension, mean over the draws."""
    delta_norm: Tensor
    """`[width]`: the norm of each latent's decoder change."""
    cosine: Tensor
    """`[width]`: the cosine of each latent's control and extended decoder rows."""
    matched: Tensor
    """`[width]` long: the extended dictionary's latent that each control latent became."""
    baseline_std: float
    """The standard deviation over the draws of the random baseline's mean projection."""

    def summary(self) -> str:
        """One line: the rate, the mean projection against its random baseline, the mean cosine."""
        return (
            f"hedging rate {self.rate:.3f} ({len(self.per_latent)} latents): decoder change {self.delta_norm.mean():.3f}, "
            f"in the new latents' span {self.delta_proj.mean():.3f} against {self.baseline_proj.mean():.3f} "
            f"+- {self.baseline_std:.3f} at random; cosine to the control {self.cosine.mean():.3f}"
        )


def _projection_norms(delta: Tensor, vectors: Tensor) -> Tensor:
    """`|P delta_i|` for each row of `delta` `[n, d]`, `P` the projection onto the span of the rows of `vectors`
    (QR, rank-deficient spans cut to their rank, as the reference's `measure_subspace_projection`)."""
    q, r = torch.linalg.qr(vectors.T.double())
    q = q[:, : int(torch.linalg.matrix_rank(r))]
    return (delta.double() @ q).norm(dim=1)


def _rate(proj: Tensor, baseline: Tensor) -> Tensor:
    """`(proj - baseline) / (1 - baseline)` clipped to [0, 1] (a latent that moved by more than its own norm, whose
    random baseline reaches 1, would divide by zero or less; the reference clips at 0 alone)."""
    return ((proj - baseline) / (1 - baseline).clamp_min(1e-6)).clamp(0, 1)


def hedging(
    control: Decoder, extended: Decoder, *, extends: bool = True, n_baselines: int = 50, seed: int = 0
) -> Hedging:
    """The hedging of `control`'s latents, seen from `extended`, a wider dictionary of the same hook point (SAEs, or
    decoder rows `[n_latents, d]`). `extends`: `extended`'s first latents continue `control`'s (the paper's protocol:
    both trained on from one initial SAE, `extended_copy`); otherwise they are matched by decoder cosine."""
    a, b = directions(control), directions(extended)
    if a.shape[1] != b.shape[1]:
        raise ConfigError(
            f"the dictionaries read different widths ({a.shape[1]} and {b.shape[1]}); give two of one hook"
        )
    if len(b) <= len(a):
        raise ConfigError(
            f"the extended dictionary has {len(b)} latents, the control {len(a)}; hedging needs a wider one: give the "
            "control first"
        )
    if extends:
        matched = torch.arange(len(a))
    else:
        matched = one_to_one(a, b).partner
        if (matched < 0).any():
            raise ConfigError(
                f"{int((matched < 0).sum())} latents found no partner among their nearest candidates; give smaller "
                "dictionaries, or the extended one of the hedging protocol (`extends=True`)"
            )
    new = torch.ones(len(b), dtype=torch.bool)
    new[matched] = False
    delta = b[matched] - a
    proj = _projection_norms(delta, b[new])
    g = torch.Generator().manual_seed(seed)
    draws = torch.stack(
        [_projection_norms(delta, torch.randn(int(new.sum()), a.shape[1], generator=g)) for _ in range(n_baselines)]
    )
    baseline = draws.mean(0)
    rate = _rate(proj.mean(), baseline.mean())
    return Hedging(
        float(rate),
        _rate(proj, baseline).float(),
        proj.float(),
        baseline.float(),
        delta.norm(dim=1),
        (a * b[matched]).sum(1),
        matched,
        float(draws.mean(1).std()),
    )


def extended_copy(sae: SAE, new_latents: int, *, seed: int = 0) -> SAE:
    """A copy of `sae` with `new_latents` latents added after its own, freshly initialised (as `SAE.from_config`
    initialises them, from `seed`), its own latents and biases as they are: the extended SAE of the hedging protocol,
    to train on beside a plain copy of `sae` (the control)."""
    if new_latents < 1:
        raise ConfigError(f"new_latents {new_latents} must be at least 1")
    if sae.cfg.matryoshka_prefixes or sae.cfg.matryoshka_sample:
        raise ConfigError("extending a Matryoshka SAE would change its prefixes; measure hedging on a plain SAE")
    cfg = sae.cfg.model_copy(update={"d_sae": sae.cfg.d_sae + new_latents})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = SAE.from_config(cfg, device=sae.W_enc.device)
    width = sae.cfg.d_sae
    state = out.state_dict()
    with torch.no_grad():
        for name, mine in sae.state_dict().items():
            if name == "W_enc":
                state[name][:, :width].copy_(mine)
            elif state[name].shape == mine.shape:
                state[name].copy_(mine)
            else:  # the latent axis first: b_enc, W_dec, threshold, dead-latent counters
                state[name][:width].copy_(mine)
    return out


class HedgingPair(NamedTuple):
    """The two SAEs of the hedging protocol, trained on from one initial SAE on the same batches."""

    control: SAE
    """The initial SAE, trained on as it is."""
    extended: SAE
    """The initial SAE with new latents, trained on."""


def train_hedging_pair(
    initial: SAE, batches: Callable[[int], Tensor], *, new_latents: int, steps: int, lr: float, seed: int = 0
) -> HedgingPair:
    """The hedging protocol's control and extended SAEs: copies of `initial`, one with `new_latents` more latents
    (`extended_copy`, from `seed`), each trained `steps` steps (Adam at `lr`, `saelab.dictionaries.train_step`) on the same
    batches, `batches(step)` giving step `step`'s raw activations."""
    control = SAE.from_config(initial.cfg, device=initial.W_enc.device)
    control.load_state_dict(initial.state_dict())
    extended = extended_copy(initial, new_latents, seed=seed)
    return HedgingPair(
        train_steps(control, batches, steps=steps, lr=lr), train_steps(extended, batches, steps=steps, lr=lr)
    )


def train_steps(sae: SAE, batches: Callable[[int], Tensor], *, steps: int, lr: float) -> SAE:
    """`sae` trained in place for `steps` steps of Adam at `lr` on `batches(step)` (`train_step`: the trainer's
    step, decoder rows kept at unit norm), then put in eval mode; returns it."""
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    for step in range(steps):
        train_step(sae, opt, batches(step))
    return sae.eval()
