"""ICFL (Donhauser et al. 2025): the batched-OMP codes against a naive Algorithm 1, exact codes on an orthonormal
dictionary, recovery of a known dictionary, near-duplicate resets, exact resume, the `split` loss, save/load, the
selectivity scores, and bad input."""

from __future__ import annotations

import copy

import pytest
import torch

from saelab.config import build
from saelab.dictionaries import SAE, Arch, SAEConfig, train_step
from saelab.dictionaries.icfl import ICFLSAE, selectivity
from saelab.dictionaries.preprocessing import pca_whitening
from saelab.errors import ConfigError
from saelab.toys.synthetic import make_synthetic, max_cosines

STEPS, BATCH, LR = 400, 512, 5e-3


def make_icfl(d_in: int = 12, d_sae: int = 48, k: int = 6, block: int = 3, **kw) -> ICFLSAE:
    torch.manual_seed(0)
    cfg = SAEConfig(arch="icfl", d_in=d_in, d_sae=d_sae, k=k, icfl_block=block, dtype="float64", **kw)
    sae = SAE.from_config(cfg)
    assert isinstance(sae, ICFLSAE)
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
        sae.input_scale.fill_(1.7)
    return sae


def naive_pursuit(sae: ICFLSAE, x: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 row by row with `torch.linalg.lstsq`, written independently of the batched code."""
    W, block = sae.W_dec.detach(), sae.cfg.icfl_block
    codes = torch.zeros(len(x), sae.cfg.d_sae, dtype=x.dtype)
    for i, row in enumerate(x * sae.input_scale):
        r = row - sae.b_dec.detach()
        for _ in range(sae.iterations):
            chosen = (W @ r).topk(block).indices
            coef = torch.linalg.lstsq(W[chosen].T, r).solution
            r = r - coef @ W[chosen]
            codes[i, chosen] += coef
    return codes / sae.input_scale


def test_codes_match_a_naive_algorithm_1():
    sae = make_icfl()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    f = sae.encode(x)
    assert f.shape == (2, 5, 48) and ((f != 0).sum(-1) <= 6).all()
    # The ridge (1e-5 on a unit diagonal) moves coefficients by about 1e-5 relative on this random dictionary.
    torch.testing.assert_close(f.reshape(-1, 48), naive_pursuit(sae, x.reshape(-1, 12)), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(sae(x), sae.decode(f))


def test_an_orthonormal_dictionary_gives_the_exact_codes():
    """Known answer: with orthonormal rows and `k` active atoms, the pursuit finds exactly those coefficients."""
    sae = make_icfl(d_in=16, d_sae=16, k=4, block=2)
    with torch.no_grad():
        sae.W_dec.copy_(torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))[0])
        sae.normalize_decoder()
        sae.b_dec.zero_()
        sae.input_scale.fill_(1.0)
    codes = torch.zeros(8, 16, dtype=torch.float64)
    for row in codes:
        row[torch.randperm(16)[:4]] = torch.rand(4, dtype=torch.float64) + 0.5
    found = sae.encode(codes @ sae.W_dec.detach())
    torch.testing.assert_close(found, codes, rtol=0, atol=1e-4)  # the ridge shrinks each coefficient by ~1e-5


def fit(arch: Arch, pool: torch.Tensor) -> tuple[SAE, dict[str, torch.Tensor]]:
    """`STEPS` Adam steps of `BATCH` rows of `pool`, the same batches for every arch; the SAE and its last metrics."""
    torch.manual_seed(0)
    sae = SAE.from_config(SAEConfig(arch=arch, d_in=32, d_sae=256, k=8, icfl_block=4, dead_tokens=20_000))
    sae.init_from_sample(pool[:4096])
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    starts = torch.randint(0, len(pool) - BATCH, (STEPS,), generator=torch.Generator().manual_seed(2)).tolist()
    for start in starts:
        metrics = train_step(sae, opt, pool[start : start + BATCH])
    return sae, metrics


@pytest.fixture(scope="module")
def trained():
    """ICFL (2 pursuit iterations of 4 latents) trained on 128 known directions in 32 dims (4 active per token)."""
    synthetic = make_synthetic(n_features=128, d=32, mean_active=4.0, seed=3)  # not the SAE's seed: see bench_icfl
    pool = synthetic.sample(2**15, torch.Generator().manual_seed(1))
    return synthetic, pool, *fit("icfl", pool)


def test_icfl_recovers_the_known_dictionary_faster_than_topk(trained):
    synthetic, pool, sae, metrics = trained
    recovered = (max_cosines(synthetic.directions, sae.W_dec.detach()) >= 0.9).float().mean().item()
    # Measured: ICFL 98.4% of the 128 directions at cosine >= 0.9 (FVU 0.08), TopK 68% (FVU 0.13) on the same batches.
    assert recovered >= 0.9
    assert metrics["fvu"] < 0.12 and metrics["l0"] <= 8 and metrics["dead_frac"] == 0
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)  # the selection matrix stays tied to the decoder
    topk, _ = fit("topk", pool)
    assert recovered >= (max_cosines(synthetic.directions, topk.W_dec.detach()) >= 0.9).float().mean().item() + 0.15


def test_save_and_load_round_trip(trained, tmp_path):
    _, pool, sae, _ = trained
    sae.save(tmp_path / "icfl")
    loaded = SAE.load(tmp_path / "icfl")
    assert isinstance(loaded, ICFLSAE) and loaded.cfg == sae.cfg
    x = pool[:256]
    # The input scale is folded into the saved biases: float32 rounding only, which each pursuit round's least-squares
    # solve can amplify (measured up to 2.6e-5 on one code of 65,536 on one CPU, 0 on another): 1e-4 on codes of order
    # 1; the latents chosen are the same.
    with torch.no_grad():
        got, want = loaded.encode(x), sae.encode(x)
        assert torch.equal(got != 0, want != 0)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(loaded(x), sae(x), rtol=1e-4, atol=1e-4)


def test_whitening_folds_into_the_pursuit_exactly():
    """The pursuit's inner products go through `W_enc`, so the folded SAE's codes on raw activations are the whitened
    SAE's (least squares in the whitened metric, not the raw one)."""
    x = torch.randn(512, 12, dtype=torch.float64) * torch.linspace(0.2, 3.0, 12, dtype=torch.float64) + 1.0
    sae = make_icfl(whiten=True)
    sae.set_whitening(pca_whitening(x))
    sae.init_from_sample(x)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    for rows in x.split(128):
        train_step(sae, opt, rows)
    folded = sae.folded()
    with torch.no_grad():
        torch.testing.assert_close(folded.encode(x), sae.encode(x), rtol=1e-7, atol=1e-9)  # float64 rounding
        torch.testing.assert_close(folded(x), sae(x), rtol=1e-7, atol=1e-9)


def test_near_duplicate_rows_are_redrawn_deterministically():
    sae = make_icfl()
    with torch.no_grad():
        sae.W_dec[7] = sae.W_dec[3] + 0.01 * torch.randn(12, dtype=torch.float64)
        sae.normalize_decoder()
    before = sae.W_dec.detach().clone()
    other = copy.deepcopy(sae)
    assert sae.reset_duplicates(torch.Generator().manual_seed(5)) == 1
    changed = (sae.W_dec != before).any(1).nonzero().flatten().tolist()
    assert changed == [7]  # the later row of the pair, nothing else
    assert other.reset_duplicates(torch.Generator().manual_seed(5)) == 1
    torch.testing.assert_close(other.W_dec, sae.W_dec, rtol=0, atol=0)
    torch.testing.assert_close(sae.W_enc, sae.W_dec.T)
    assert sae.reset_duplicates(torch.Generator().manual_seed(5)) == 0


def test_resume_from_a_mid_run_state_equals_an_uninterrupted_run():
    """The reset schedule's step counter is saved state: 4 + 4 steps from a checkpoint equal 8 steps."""
    x = torch.randn(8, 32, 12, dtype=torch.float64)

    def run(sae: SAE, opt: torch.optim.Optimizer, steps: range) -> None:
        for i in steps:
            train_step(sae, opt, x[i])

    whole = make_icfl(icfl_reset_every=3, icfl_reset_cos=0.5)  # low cosine: 48 rows in 12 dims reset often
    opt = torch.optim.Adam(whole.parameters(), lr=1e-2)
    run(whole, opt, range(8))
    first = make_icfl(icfl_reset_every=3, icfl_reset_cos=0.5)
    first_opt = torch.optim.Adam(first.parameters(), lr=1e-2)
    run(first, first_opt, range(4))
    resumed = make_icfl(icfl_reset_every=3, icfl_reset_cos=0.5)
    resumed_opt = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    run(resumed, resumed_opt, range(1))  # its own host-side counter must give way to the loaded one
    resumed.load_state_dict(first.state_dict())
    resumed_opt.load_state_dict(first_opt.state_dict())
    run(resumed, resumed_opt, range(4, 8))
    assert int(resumed.icfl_step) == 8
    torch.testing.assert_close(resumed.W_dec, whole.W_dec, rtol=0, atol=0)


def test_split_losses_sum_to_the_whole_batch():
    """`parallel: ddp`: each rank's share of the loss (whole-batch denominator) sums to the one-process loss."""
    x = torch.randn(32, 12, dtype=torch.float64)
    whole = make_icfl()
    loss, _ = whole.training_loss(x)
    grad = torch.autograd.grad(loss, whole.W_dec)[0]
    total, total_grad = 0.0, torch.zeros_like(grad)
    for part in (slice(0, 13), slice(13, 32)):
        sae = make_icfl()
        sae.split = part
        share, _ = sae.training_loss(x)
        total += share.item()
        total_grad += torch.autograd.grad(share, sae.W_dec)[0]
    assert total == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(total_grad, grad)


def test_selectivity_scores_have_the_papers_definition():
    # Latent 0 fires on every row of label 0 only; latent 1 on half the rows of every label; latent 2 never.
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    codes = torch.zeros(6, 3)
    codes[labels == 0, 0] = 1.0
    codes[[0, 2, 4], 1] = -0.5  # signed codes count as active
    sel = selectivity(codes, labels)
    torch.testing.assert_close(sel.rate[0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(sel.avg[0], torch.tensor([1.0, -0.5, -0.5], dtype=torch.float64))
    torch.testing.assert_close(sel.max[0], torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(sel.avg[1], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(sel.best("avg"), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert sel.selective(0.5) == 1 and sel.selective(-0.1) == 3


@pytest.mark.parametrize(
    "changes, message",
    [({"k": 10, "icfl_block": 4}, "multiple of it"), ({"d_sae": 4, "k": 8, "icfl_block": 8}, "at most d_sae")],
)
def test_a_block_that_does_not_fit_is_refused_with_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        build(SAEConfig, {"arch": "icfl", "d_in": 8, "d_sae": 32} | changes, "SAE config")


@pytest.mark.parametrize(
    "labels, message", [(torch.tensor([0, 0, 0]), "at least two"), (torch.tensor([0, 2, 2]), "consecutive")]
)
def test_selectivity_refuses_labels_it_cannot_score(labels, message):
    with pytest.raises(ConfigError, match=message):
        selectivity(torch.ones(3, 4), labels)
    with pytest.raises(ConfigError, match="one integer label per row"):
        selectivity(torch.ones(3, 4), torch.zeros(2, dtype=torch.long))
