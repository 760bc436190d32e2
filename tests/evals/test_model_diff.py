"""Model diffing on known answers: a BatchTopK crosscoder trained on two synthetic models classifies shared, A-only
and B-only features by relative decoder norm (AUROC >= 0.95); the decoupled shared features, which decoder norms
report exclusive, are found shared by latent scaling; the betas are the least-squares solution; bad input refused."""

from __future__ import annotations

import itertools

import pytest
import torch

from saelab.dictionaries import CrossCoder, CrossCoderConfig
from saelab.dictionaries.crosscoder import train_crosscoder
from saelab.errors import ConfigError
from saelab.evals.model_diff import (
    A_ONLY,
    B_ONLY,
    CLASS_NAMES,
    SHARED,
    auroc,
    latent_scaling,
    model_diff,
    norm_classes,
)
from saelab.toys.model_diff import make_model_diff

ROWS = 1024


@pytest.fixture(scope="module")
def trained():
    """The toy's two models (16 shared, 8 A-only, 8 B-only and 6 decoupled features in 32 dimensions, 3 active per
    row), a BatchTopK crosscoder of 64 latents (k 4) trained on them for 400 steps of 1024 rows, and its model diff
    over 8192 fresh rows."""
    data = make_model_diff()
    gen = torch.Generator().manual_seed(1)
    pool = data.sample(16 * ROWS, gen).x
    torch.manual_seed(0)
    cfg = CrossCoderConfig(sources=["a/h", "b/h"], d_in=32, d_sae=64, k=4, dead_tokens=30 * ROWS)
    cc = CrossCoder(cfg)
    batches = (pool[i * ROWS : (i + 1) * ROWS] for i in itertools.cycle(range(16)))
    train_crosscoder(cc, batches, steps=400, lr=5e-3)
    x = data.sample(8192, gen).x
    return data, cc, x, model_diff(cc, [x[:4096], x[4096:]])


def dominant_cosines(cc: CrossCoder, delta: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """`[d_sae, n_features]` the cosine of each latent's decoder in its dominant source with each true direction."""
    rows = cc.W_dec.detach()[torch.arange(cc.cfg.d_sae), (delta >= 0.5).long()]
    return (rows / rows.norm(dim=1, keepdim=True)) @ directions.T


def test_decoder_norms_classify_the_genuine_features(trained):
    """At least 90% of the shared, A-only and B-only features (the decoupled ones aside) have a latent at cosine
    >= 0.9, and the relative decoder norms of those latents tell the classes apart: AUROC >= 0.95 for B-only, A-only
    and exclusive vs shared; the crosscoder reconstructs both models (FVU per source <= 0.02)."""
    data, cc, x, diff = trained
    assert cc.fvu(x).max() <= 0.02
    cos = dominant_cosines(cc, diff.delta_norm, data.directions)
    best_cos, best = cos.max(0)
    genuine = ~data.decoupled
    assert (best_cos[genuine] >= 0.9).float().mean() >= 0.9
    genuine &= best_cos >= 0.9
    delta, kinds = diff.delta_norm[best[genuine]], data.kinds[genuine]
    assert auroc(delta, kinds == B_ONLY) >= 0.95
    assert auroc(-delta, kinds == A_ONLY) >= 0.95
    assert auroc((delta - 0.5).abs(), kinds != SHARED) >= 0.95
    assert (diff.norm_class[best[genuine]] == kinds).float().mean() >= 0.95


def test_latent_scaling_fixes_the_false_exclusives(trained):
    """The crosscoder gives decoupled features latents that decode one model alone: decoder norms report them
    exclusive (here at least one per two decoupled features). Latent scaling finds the other model's reconstruction holding
    their direction (`nu_recon`), which separates them from the genuine exclusives (AUROC >= 0.95, theirs near 0)
    and reclassifies every one of them shared, while the genuine exclusives stay exclusive."""
    data, cc, _, diff = trained
    cos = dominant_cosines(cc, diff.delta_norm, data.directions)
    lat_cos, feature = cos.max(1)
    matched = (lat_cos >= 0.9) & (diff.fired > 0)
    decoupled = matched & data.decoupled[feature]
    reported = decoupled & (diff.norm_class != SHARED)
    assert int(reported.sum()) >= int(data.decoupled.sum()) // 2  # 3 to 10 over five seeds of data and init
    best_cos, best = cos.max(0)
    genuine = (data.kinds != SHARED) & (best_cos >= 0.9)
    genuine_latents = best[genuine]
    assert (diff.norm_class[genuine_latents] == data.kinds[genuine]).all()
    assert (diff.scaling_class[reported] == SHARED).all()
    assert (diff.scaling_class[genuine_latents] == data.kinds[genuine]).all()
    nu = torch.cat([diff.nu_recon[reported], diff.nu_recon[genuine_latents]])
    labels = torch.cat([torch.ones(int(reported.sum())), torch.zeros(len(genuine_latents))]).bool()
    assert auroc(nu, labels) >= 0.95
    assert diff.nu_recon[genuine_latents].abs().max() < 0.2
    assert diff.nu_error[reported].max() < 0.3  # no Complete Shrinkage: the other model's error does not hold them
    row = diff.latent(int(reported.nonzero()[0]))
    assert row.norm_class in ("a_only", "b_only") and row.scaling_class == "shared" and row.fired > 0
    assert diff.exclusive(B_ONLY).tolist() == (diff.scaling_class == B_ONLY).nonzero().squeeze(1).tolist()


def test_betas_are_the_least_squares_solution():
    """Each beta is the least-squares coefficient of `f_j * d_j` (with a constant offset) for its target, solved here
    directly: the reconstruction and the error with the latent's own part put back, in every source."""
    torch.manual_seed(0)
    cfg = CrossCoderConfig(sources=["a", "b"], d_in=5, d_sae=12, k=3, activation="topk", dtype="float64")
    cc = CrossCoder(cfg)
    with torch.no_grad():
        cc.b_dec.normal_(0, 0.5)
        cc.input_scale.copy_(torch.tensor([0.7, 1.6], dtype=torch.float64))
    x = torch.randn(300, 2, 5, dtype=torch.float64)
    latents, target = torch.tensor([0, 3, 7]), torch.tensor([1, 0, 1])
    scaling = latent_scaling(cc, [x[:100], x[100:]], latents=latents, target=target)
    with torch.no_grad():
        xs = cc.prepare_input(x).view(300, 2, 5)
        f = cc.activation(cc.pre_acts(xs.view(300, -1)))
        recon = cc.decode_scaled(f)
    for i, (j, t) in enumerate(zip(latents.tolist(), target.tolist(), strict=True)):
        d = cc.W_dec.detach()[j, t]
        design = torch.zeros(300 * 5, 6, dtype=torch.float64)
        design[:, 0] = (f[:, j, None] * d).flatten()
        design[:, 1:] = torch.eye(5, dtype=torch.float64).repeat(300, 1)  # the constant offset
        for s in range(2):
            error = xs[:, s] - recon[:, s] + f[:, j, None] * cc.W_dec.detach()[j, s]
            for y, beta in ((recon[:, s], scaling.beta_recon), (error, scaling.beta_error)):
                solved = torch.linalg.lstsq(design, y.flatten()[:, None]).solution[0, 0]
                torch.testing.assert_close(beta[i, s], solved, rtol=1e-9, atol=1e-12)
        assert int(scaling.fired[i]) == int((f[:, j] > 0).sum())
    nu_error, nu_recon = scaling.nu(1 - target)
    rows = torch.arange(3)
    torch.testing.assert_close(nu_recon, scaling.beta_recon[rows, 1 - target] / scaling.beta_recon[rows, target])
    torch.testing.assert_close(nu_error, scaling.beta_error[rows, 1 - target] / scaling.beta_error[rows, target])


def test_auroc_and_classes_known_answers():
    labels = torch.tensor([0, 0, 1, 1]).bool()
    assert auroc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert auroc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert auroc(torch.tensor([0.5, 0.1, 0.5, 0.9]), labels) == 0.875  # the tie counts half
    delta = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0])
    assert norm_classes(delta).tolist() == [A_ONLY, A_ONLY, SHARED, B_ONLY, B_ONLY]
    assert [CLASS_NAMES[c] for c in (SHARED, A_ONLY, B_ONLY)] == ["shared", "a_only", "b_only"]


def test_bad_input_refused():
    with pytest.raises(ConfigError, match="both classes"):
        auroc(torch.tensor([0.1, 0.2]), torch.tensor([True, True]))
    with pytest.raises(ConfigError, match=r"in \(0, 0.5\)"):
        norm_classes(torch.tensor([0.5]), exclusive=0.6)
    cc = CrossCoder(CrossCoderConfig(sources=["a", "b"], d_in=4, d_sae=8, k=2))
    with pytest.raises(ConfigError, match="two different sources"):
        model_diff(cc, [torch.zeros(4, 2, 4)], a=1, b=1)
    with pytest.raises(ConfigError, match="one target per latent"):
        latent_scaling(cc, [torch.zeros(4, 2, 4)], latents=torch.arange(3), target=torch.tensor([0]))
