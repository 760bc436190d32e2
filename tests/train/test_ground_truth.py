"""Ground truth: SAEs trained on synthetic activations must find the known dictionary.

1024 unit directions in 128 dims, ~8 active per token with power-law frequencies,
log-normal magnitudes and 64 correlated pairs (see saelab.toys.synthetic).
"""

import math
import time

import pytest
import torch

from saelab.dictionaries import SAE, SAEConfig, train_step
from saelab.toys.benchmark import DefaultsRun, batches, make_benchmark
from saelab.toys.synthetic import make_synthetic, max_cosines, recovery

STEPS, BATCH, WARMUP, LR = 1000, 1024, 100, 3e-3
# The other architectures get half the steps: their loose bounds hold with margin there (measured at 500 steps:
# BatchTopK FVU 0.40, L0 17; ReLU+L1 FVU 0.25, L0 183, below its 189 at 1000), at half the suite's time.
OTHER_STEPS = STEPS // 2


@pytest.fixture(scope="module")
def data():
    synthetic = make_synthetic(n_features=1024, d=128, seed=1234)
    return synthetic, synthetic.sample(2**17, torch.Generator().manual_seed(1))


def fit(arch: str, pool: torch.Tensor, steps: int = STEPS, **overrides) -> tuple[SAE, float]:
    """Train `steps` steps on random slices of `pool` with Adam and linear warm-up; returns the SAE and seconds."""
    torch.manual_seed(0)
    cfg = SAEConfig(**({"arch": arch, "d_in": 128, "d_sae": 2048, "k": 16, "dead_tokens": 50_000} | overrides))
    sae = SAE.from_config(cfg)
    sae.init_from_sample(pool[:4096])
    opt = torch.optim.Adam(sae.parameters(), lr=LR, fused=True)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / WARMUP))
    starts = torch.randint(0, len(pool) - BATCH, (steps,), generator=torch.Generator().manual_seed(2)).tolist()
    start_time = time.perf_counter()
    for start in starts:
        train_step(sae, opt, pool[start : start + BATCH])
        warmup.step()
    return sae, time.perf_counter() - start_time


def evaluate(name: str, sae: SAE, seconds: float, data, steps: int = STEPS) -> tuple[float, float, float]:
    """Print and return the recovered fraction, held-out-free FVU and L0 on the pool."""
    synthetic, pool = data
    cos = max_cosines(synthetic.directions, sae.W_dec.detach())
    recovered = (cos >= 0.9).float().mean().item()
    with torch.no_grad():
        x = pool[:8192]
        fvu = ((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
        l0 = (sae.encode(x) > 0).sum(1).float().mean().item()
    print(
        f"\n{name}: recovered {recovered:.1%} of 1024 directions (max cos >= 0.9), median max cos "
        f"{cos.median():.3f}, FVU {fvu:.3f}, L0 {l0:.1f}, {steps * BATCH:,} tokens in {seconds:.1f}s"
    )
    return recovered, fvu, l0


def test_topk_recovers_the_dictionary(data):
    sae, seconds = fit("topk", data[1])
    recovered, fvu, l0 = evaluate("TopK", sae, seconds, data)
    assert recovered >= 0.9
    assert l0 <= 16 and fvu < 0.3


def test_random_decoder_recovers_nothing(data):
    """The metric can fail: an untrained SAE of the same width matches no direction."""
    torch.manual_seed(0)
    sae = SAE.from_config(SAEConfig(d_in=128, d_sae=2048, k=16))
    assert (max_cosines(data[0].directions, sae.W_dec.detach()) >= 0.9).sum() == 0


@pytest.mark.parametrize("arch, overrides", [("batchtopk", {}), ("relu", {"l1_coef": 1.0})])
def test_other_architectures_on_the_same_data(data, arch, overrides):
    """Same data, half the steps; recovery is printed for comparison, a sparse fit is asserted."""
    sae, seconds = fit(arch, data[1], OTHER_STEPS, **overrides)
    _, fvu, l0 = evaluate({"batchtopk": "BatchTopK", "relu": "ReLU+L1"}[arch], sae, seconds, data, OTHER_STEPS)
    assert fvu < 0.6 and l0 < 200


def test_thirty_times_gaos_learning_rate_learns_far_more_per_token():
    """150 steps of 1024 tokens with `saelab train`'s schedule: 30x Gao et al.'s rate recovers most of a small
    benchmark's dictionary, their 2e-4 / sqrt(width / 2^14) (the default) none of it (measured: 62% and 54% on seeds
    0 and 1 against 0% and 0%)."""
    data = make_benchmark(n_features=128, d=32, mean_active=4.0, n_parents=8, children=3, seed=0)
    sample = data.sample(4096, torch.Generator().manual_seed(5))
    xs = list(batches(data, 150, 1024))
    cfg = SAEConfig(d_in=32, d_sae=256, k=8)
    found = {}
    gao = 2e-4 / math.sqrt(256 / 2**14)
    for name, lr in (("30x", 30 * gao), ("gao", gao)):
        run = DefaultsRun(cfg, sample, len(xs), lr=lr)
        for x in xs:
            run.step(x)
        found[name] = recovery(data.directions, run.directions())
    assert found["30x"] >= 0.4 and found["gao"] <= 0.05
