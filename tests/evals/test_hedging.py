"""Feature hedging: the reference's formula on decoders built by hand, and the protocol's known answers on trained
toy SAEs (no hedging where the width matches the features, clear hedging where a too-narrow SAE meets correlated
features)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from saelab.errors import ConfigError
from saelab.evals.hedging import extended_copy, hedging, train_hedging_pair, train_steps
from saelab.toys.hedging import parent_child

STEPS, LR, NEW = 300, 1e-2, 8


def test_the_projection_of_a_hedged_latent_is_exact():
    """Control latent 0 is `(p + a c) / |.|` (hedged toward child c); the extended SAE has `p` and, new, `c`. The
    change `p - (p + a c)/|.|` projects onto span(c) with norm `a / sqrt(1 + a^2)`; latent 1 is unchanged."""
    torch.manual_seed(0)
    p, c, q = torch.linalg.qr(torch.randn(16, 3))[0].T
    a = 0.6
    control = torch.stack([(p + a * c) / math.sqrt(1 + a * a), q])
    extended = torch.stack([p, q, c])
    h = hedging(control, extended)
    assert float(h.delta_proj[0]) == pytest.approx(a / math.sqrt(1 + a * a), abs=1e-6)
    assert float(h.delta_norm[0]) == pytest.approx(float((p - control[0]).norm()), abs=1e-6)
    assert float(h.delta_norm[1]) == pytest.approx(0, abs=1e-6) and float(h.per_latent[1]) == 0
    assert float(h.per_latent[0]) > 0.3 and h.rate > 0.1
    mixed = hedging(control, extended[[2, 0, 1]], extends=False)  # the same latents, found by decoder cosine
    assert mixed.matched.tolist() == [1, 2] and mixed.rate == pytest.approx(h.rate, abs=1e-6)


def test_extended_copy_keeps_the_latents_and_adds_new_ones():
    toy = parent_child()
    sae = toy.sae(4)
    wide = extended_copy(sae, 3)
    assert wide.cfg.d_sae == 7
    assert torch.equal(wide.W_dec[:4], sae.W_dec) and torch.equal(wide.W_enc[:, :4], sae.W_enc)
    x = toy.batch(0)
    assert torch.allclose(wide.encode(x)[:, :4], sae.encode(x), atol=1e-6)
    with pytest.raises(ConfigError, match="at least 1"):
        extended_copy(sae, 0)


@functools.cache
def _protocol(width: int, *, correlated: bool):
    """The hedging protocol on the parent/child toy (seed 0), once per setting."""
    toy = parent_child(correlated=correlated)
    initial = train_steps(toy.sae(width), toy.batch, steps=STEPS, lr=LR)
    pair = train_hedging_pair(initial, lambda step: toy.batch(10_000 + step), new_latents=NEW, steps=STEPS, lr=LR)
    return toy, initial, hedging(pair.control, pair.extended)


def test_no_hedging_when_the_width_matches_independent_features():
    """Eight independent features, eight latents at them: the new latents find nothing to take, the old ones stay."""
    _, _, h = _protocol(8, correlated=False)
    assert h.rate < 0.005  # seeds 0-3: 0.000 to 0.001
    assert float(h.per_latent.max()) < 0.01 and float(h.cosine.min()) > 0.99


def test_a_too_narrow_sae_hedges_correlated_features():
    """Four latents for four parents whose children fire only with them: each parent latent takes in part of its
    child (the toy's known answer, checked on the initial SAE), and gives it back once new latents take the children:
    a rate well above the random baseline."""
    toy, initial, h = _protocol(4, correlated=True)
    dirs = torch.nn.functional.normalize(initial.W_dec.detach(), dim=1)
    on_child = (dirs * toy.directions[4:]).sum(1)
    assert float(on_child.min()) > 0.3  # hedged: the parent latents lean toward their children
    assert h.rate > 0.08 and h.rate > 5 * h.baseline_std  # seeds 0-3: 0.098 to 0.175
    assert h.rate > 3 * _protocol(4, correlated=False)[2].rate  # the same width without correlation: 0.021 to 0.030
    assert float(h.per_latent.max()) > 0.15


def test_a_too_narrow_sae_does_not_hedge_independent_features():
    """Hedging needs correlation: four latents at four parents whose 'children' fire independently stay put."""
    assert _protocol(4, correlated=False)[2].rate < 0.05
