"""ICFL, Iterative Codebook Feature Learning (Donhauser et al. 2025, "Towards scientific discovery with dictionary
learning: Extracting biological concepts from microscopy foundation models", ICML, PMLR 267:14321-14343; arXiv
2412.16247, section 4 and Algorithm 1), and the selectivity scores its paper compares dictionaries by (section 6.1).

ICFL is a dictionary without an encoder network: a token's code comes from batched orthogonal matching pursuit over
the decoder rows, and training is gradient descent on the decoder alone with the codes held fixed. Per token
(Algorithm 1), with `J = k / L` iterations of `L = icfl_block` latents each:

1. `r = x - b_dec`;
2. J times: pick the `L` rows of `W_dec` with the largest inner product with `r`, solve least squares for their `L`
   coefficients against `r` (those rows alone), subtract their reconstruction from `r`;
3. the code is the sum of every iteration's coefficients (at most `k = J L` latents; a latent picked again adds up).

Training minimises `|x - z @ W_dec - b_dec|^2` over `W_dec` and `b_dec` with `z` fixed (no gradient through the
pursuit, so any row that some token aligns with is used and trained: few dead latents), and every
`icfl_reset_every` steps each decoder row whose cosine with an earlier row exceeds `icfl_reset_cos` is redrawn
uniformly on the sphere (the paper: every 100 steps, cosine 0.9).

Where this differs from the paper, and why:
- Decoder rows are kept at unit norm (saelab's rule for every SAE; the paper does not say). The pursuit's codes do not
  depend on row norms except through the selection, which with unit rows ranks rows by cosine, as OMP does.
- The least-squares systems get a ridge of `RIDGE` (relative to the unit diagonal) so near-parallel rows cannot make
  them singular; it changes no coefficient beyond float32 rounding for rows below the reset cosine.
- The paper centres tokens on the control mean and scales each to unit norm before ICFL. saelab keeps its own input
  handling (one global `input_scale` to mean norm sqrt(d_in), `b_dec` learned from the geometric median) so that the
  saved dictionary works on raw activations; PCA whitening on a control set is a separate preprocessing option.
- Of a near-duplicate pair the later row is redrawn (the paper redraws "one of the pair"), from a generator seeded by
  the step, so every rank of a `ddp` run and a resumed run redraw exactly the rows an uninterrupted run does. The
  redrawn rows' Adam moments are kept (the SAE does not own its optimiser).

Codes are signed (least squares can give negative coefficients), as in the paper, whose features "activate" and
"anti-correlate"; a latent is active where its code is nonzero. The saved checkpoint keeps the SAELens layout:
`W_enc` is the decoder's transpose (the pursuit's inner products go through it: `pursue`) and `b_enc` zero and
unused, but SAELens has no pursuit encoder, so only saelab reads an ICFL checkpoint (`cfg.json`: `architecture:
icfl`). Whitening (`SAEConfig.whiten`) works as for every SAE and folds into the saved weights exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.dictionaries.base import SAE, SAEConfig
from saelab.dictionaries.registry import register
from saelab.errors import ConfigError
from saelab.ops import kernels
from saelab.ops.topk import topk_rows

RIDGE = 1e-5
"""Added to the diagonal (1 for unit rows) of every least-squares system of the pursuit."""

RESET_BLOCK = 2**24
"""Cosines computed at once when looking for near-duplicate rows (`block x d_sae`), bounding that memory."""


class Pursuit(NamedTuple):
    """A batch's codes as the pursuit found them: `J * L` (latent, coefficient) entries per row."""

    vals: Tensor
    """`[batch, k]` coefficients (signed), in iteration order; a latent picked twice appears twice."""
    idx: Tensor
    """`[batch, k]` the latents they belong to."""


@register
class ICFLSAE(SAE):
    """ICFL dictionary (Donhauser et al. 2025): codes by batched OMP over the decoder rows, `k = J * icfl_block`."""

    arch = "icfl"
    signed_codes = True

    def __init__(self, cfg: SAEConfig, device: torch.device | str | None = None):
        super().__init__(cfg, device)
        self.W_enc.requires_grad_(False)  # the decoder's transpose, re-tied after every step
        self.b_enc.requires_grad_(False)  # zero and unused: the layout has it
        self.icfl_step: Tensor
        self.register_buffer("icfl_step", torch.zeros((), dtype=torch.long, device=device))
        self._step: int | None = None  # `icfl_step` on the host, read once (then kept in step) to spare a sync per step
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_step", None))

    @property
    def iterations(self) -> int:
        """`J`: pursuit iterations per token."""
        return self.cfg.k // self.cfg.icfl_block

    def pursue(self, x: Tensor) -> Pursuit:
        """Algorithm 1 (batched OMP) on scaled inputs `[batch, d_in]`: the entries of each row's code.

        Inner products go through the encoder: row `m`'s score is `r @ W_enc[:, m]` and the least-squares Gram matrix
        of the chosen rows `S` is `W_dec[S] @ W_enc[:, S]`. In training `W_enc = W_dec^T`, so these are the plain ones;
        once whitening is folded into a saved SAE (`W_enc = P W_dec^T`, `W_dec -> W_dec P^-1`) they are the whitened
        ones, so the saved SAE gives the same codes on raw activations as the whitened SAE on whitened ones.
        Differentiable in `x` and the weights through the coefficients (the choice of rows is not); training calls
        it without gradients."""
        block, W_dec, W_enc = self.cfg.icfl_block, self.W_dec, self.W_enc
        ridge = torch.eye(block, dtype=W_dec.dtype, device=W_dec.device) * RIDGE
        r = x - self.b_dec
        vals, idx = [], []
        for _ in range(self.iterations):
            scores = r @ W_enc
            _, chosen = topk_rows(scores.detach(), block)
            gram = F.embedding(chosen, W_dec) @ W_enc.T[chosen].transpose(1, 2) + ridge  # [batch, L, L]
            rhs = scores.gather(1, chosen).unsqueeze(2)
            coef = torch.cholesky_solve(rhs, torch.linalg.cholesky_ex(gram).L).squeeze(2)
            r = r - kernels.sparse_decode(coef, chosen, W_dec)
            vals.append(coef)
            idx.append(chosen)
        return Pursuit(torch.cat(vals, 1), torch.cat(idx, 1))

    def encode(self, x: Tensor) -> Tensor:
        """Dense codes `[..., d_sae]` of raw activations `[..., d_in]` (signed; at most `k` nonzero per row)."""
        xs = self.prepare_input(x)
        vals, idx = self.pursue(xs)
        f = vals.new_zeros(xs.shape[0], self.cfg.d_sae).scatter_add_(1, idx, vals) / self.input_scale
        return f.view(*x.shape[:-1], self.cfg.d_sae)

    def training_loss(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self._step is None:
            self._step = int(self.icfl_step)
        if self._step > 0 and self._step % self.cfg.icfl_reset_every == 0:
            self.reset_duplicates(torch.Generator().manual_seed(self._step))
        batch = self.training_batch(x)
        with torch.autocast(batch.x.device.type, enabled=False), torch.no_grad():
            vals, idx = self.pursue(batch.x)
        with torch.autocast(batch.x.device.type, enabled=False):
            recon = kernels.sparse_decode(vals, idx, self.W_dec) + self.b_dec
            _, _, fvu = self._loss_terms(batch, recon)
        self.update_dead(idx, vals.abs(), batch.rows)
        self._step += 1
        self.icfl_step.fill_(self._step)
        picked = idx.sort(1).values
        distinct = len(picked) + (picked[:, 1:] != picked[:, :-1]).sum()  # latents per row, each counted once
        metrics = {
            "loss": fvu.detach(),
            "fvu": fvu.detach(),
            "l0": distinct / batch.rows,
            "dead_frac": self.dead_mask().float().mean(),
        }
        return fvu, metrics

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        super().normalize_decoder()
        self.W_enc.copy_(self.W_dec.T)

    @torch.no_grad()
    def reset_duplicates(self, generator: torch.Generator) -> int:
        """Redraw (uniformly on the sphere, from `generator` on the CPU) every decoder row whose cosine with an
        earlier row exceeds `cfg.icfl_reset_cos`; their dead-latent counters restart. Returns how many were redrawn.

        The cosines are computed a block of rows at a time (`RESET_BLOCK` entries), never the whole `d_sae^2`."""
        W, n = self.W_dec, self.cfg.d_sae
        step = max(1, RESET_BLOCK // n)
        twins = []
        for start in range(0, n, step):
            cos = W[start : start + step] @ W[: start + step].T  # rows j against every row i up to the block's end
            earlier = (
                torch.arange(cos.shape[1], device=W.device)
                < torch.arange(start, start + len(cos), device=W.device)[:, None]
            )
            twins.append(((cos > self.cfg.icfl_reset_cos) & earlier).any(1))
        redraw = torch.cat(twins).nonzero().squeeze(1)
        if len(redraw):
            fresh = torch.randn(len(redraw), self.cfg.d_in, generator=generator, dtype=W.dtype).to(W.device)
            W[redraw] = fresh / fresh.norm(dim=1, keepdim=True)
            self.W_enc.copy_(W.T)
            self.tokens_since_fired[redraw] = 0
        return len(redraw)


class Selectivity(NamedTuple):
    """The selectivity scores of every latent for every label (Donhauser et al. 2025, section 6.1, after Hubel &
    Wiesel 1968): from `rate[m, i]`, the share of the rows of label `i` on which latent `m` is active (nonzero)."""

    rate: Tensor
    """`[d_sae, n_labels]` share of each label's rows on which each latent is active."""
    avg: Tensor
    """`[d_sae, n_labels]` avg selectivity: `rate[m, i]` minus the mean of `rate[m, j]` over the other labels `j`."""
    max: Tensor
    """`[d_sae, n_labels]` max selectivity: `rate[m, i]` minus the largest `rate[m, j]` over the other labels."""

    def best(self, kind: str = "avg") -> Tensor:
        """`[n_labels]` the highest score any latent has for each label (the paper's Figure 8 curves, unsorted)."""
        return getattr(self, kind).amax(0)

    def selective(self, threshold: float, kind: str = "avg") -> int:
        """How many latents score above `threshold` for at least one label (the paper's Table 2 counts)."""
        return int((getattr(self, kind) > threshold).any(1).sum())


def selectivity(codes: Tensor, labels: Tensor) -> Selectivity:
    """Selectivity scores of the latents of `codes [n, d_sae]` (any values; active means nonzero) for integer
    `labels [n]` (at least two distinct, each label `0..n_labels-1` present)."""
    if codes.ndim != 2 or labels.shape != codes.shape[:1]:
        raise ConfigError(
            f"selectivity needs codes [n, d_sae] and labels [n]; got {tuple(codes.shape)} and {tuple(labels.shape)}; "
            "give one integer label per row of codes"
        )
    counts = np.bincount(labels.cpu().numpy(), minlength=1)
    if len(counts) < 2 or (counts == 0).any():
        raise ConfigError(
            f"selectivity compares labels 0..L-1 with L >= 2, each present; got counts {counts.tolist()}; "
            "relabel to consecutive integers from 0 and give at least two labels"
        )
    n = len(counts)
    one_hot = F.one_hot(labels.to(codes.device, torch.long), n).to(torch.float64)
    rate = ((codes != 0).to(torch.float64).T @ one_hot) / torch.from_numpy(counts).to(one_hot)
    others = rate.sum(1, keepdim=True) - rate
    top = rate.topk(2, dim=1)  # the largest rate over the other labels is the first, or the second at the first's label
    at_first = torch.arange(n, device=rate.device) == top.indices[:, :1]
    largest_other = torch.where(at_first, top.values[:, 1:], top.values[:, :1])
    return Selectivity(rate, rate - others / (n - 1), rate - largest_other)
