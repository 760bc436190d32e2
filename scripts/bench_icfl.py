"""ICFL vs TopK on labelled synthetic data with known answers: the selectivity comparison of Donhauser et al. 2025
("Towards scientific discovery with dictionary learning", section 6.3 and Figure 8), plus dictionary recovery.

The data: `make_synthetic`'s Zipf-frequency dictionary of `--features` unit directions in `--d` dims (the
"variation present in every sample"), and `--labels` classes standing in for the paper's perturbations. Each row has
a label drawn uniformly; the label's own direction (one of the dictionary's, never firing otherwise) fires on
`--p-in` of its rows with a log-normal magnitude times `--label-scale`. So a latent that has learnt label `i`'s
direction has avg selectivity `p-in` for `i`; the best any dictionary can score.

Both dictionaries have the same width and sparsity (`-k` latents per row; ICFL: `k / --block` pursuit iterations
of `--block` latents), the same learning rate (default: saelab's `default_lr(width)`, with `saelab train`'s warmup
and decay) and the same batches, at each token budget of `--budgets`. Scored on held-out labelled rows:

- selectivity (the paper's section 6.1): `rate[m, i]`, the share of label `i`'s rows on which latent `m` is active
  (nonzero); avg selectivity `rate[m, i] - mean_{j != i} rate[m, j]`, max selectivity `rate[m, i] - max_{j != i}
  rate[m, j]`; per label the best latent's score (Figure 8), averaged over labels; and how many latents score above
  0.5 and 0.2 for some label (Table 2);
- recovery: the share of true directions (all, and the label directions) some decoder row matches at cosine >= 0.9;
- FVU, L0, and the share of latents never active on the held-out rows.

    python scripts/bench_icfl.py --json icfl.json
"""

from __future__ import annotations

import time
from typing import Any

import torch
from _bench import load_note, parser, write_json
from torch import Tensor

from saelab.dictionaries import SAE, SAEConfig, train_step
from saelab.dictionaries.icfl import selectivity
from saelab.toys.synthetic import SyntheticData, make_synthetic, recovery
from saelab.train.config import default_lr, lr_factor

WARMUP = 100
DATA_SEED = 1000
THRESHOLDS = (0.5, 0.2)


class LabelledData:
    """`make_synthetic` data plus one label per row, whose own direction fires on `p_in` of the label's rows."""

    def __init__(self, synthetic: SyntheticData, n_labels: int, *, p_in: float, label_scale: float):
        self.synthetic = synthetic
        self.label_features = torch.arange(n_labels)  # the directions are random, so any n_labels of them will do
        synthetic.freqs[self.label_features] = 0.0  # a label's direction fires with its label only
        synthetic.pairs = synthetic.pairs[~torch.isin(synthetic.pairs, self.label_features).any(1)]
        self.p_in, self.label_scale = p_in, label_scale

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Rows `[n, d]` and their labels `[n]`."""
        syn = self.synthetic
        labels = torch.randint(len(self.label_features), (n,), generator=generator)
        fires = torch.rand(n, generator=generator) < self.p_in
        magnitude = (torch.randn(n, generator=generator) * syn.magnitude_sigma).exp() * self.label_scale
        planted = (fires * magnitude)[:, None] * syn.directions[self.label_features[labels]]
        return syn.sample(n, generator) + planted, labels


def fit(arch: str, cfg: SAEConfig, pool: Tensor, *, steps: int, batch: int, lr: float, seed: int) -> tuple[SAE, float]:
    """`steps` Adam steps on batches of `pool` drawn by `seed` (the same for every arch); the SAE and CPU seconds."""
    torch.manual_seed(seed)
    sae = SAE.from_config(cfg.model_copy(update={"arch": arch}))
    sae.init_from_sample(pool[:4096])
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    starts = torch.randint(0, len(pool) - batch, (steps,), generator=torch.Generator().manual_seed(seed + 1))
    begin = time.process_time()
    for step, start in enumerate(starts.tolist()):
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(step, steps, warmup=WARMUP, decay_start=0.8)
        train_step(sae, opt, pool[start : start + batch])
    return sae, time.process_time() - begin


@torch.no_grad()
def score(sae: SAE, data: LabelledData, x: Tensor, labels: Tensor) -> dict[str, Any]:
    """Selectivity, recovery, FVU, L0 and never-active share of `sae` on held-out rows `x` with `labels`."""
    codes = sae.encode(x)
    sel = selectivity(codes, labels)
    directions, W_dec = data.synthetic.directions, sae.W_dec.detach()
    best_avg, best_max = sel.best("avg"), sel.best("max")
    out: dict[str, Any] = {
        "sel_avg": best_avg.mean().item(),
        "sel_max": best_max.mean().item(),
    }
    out |= {f"n_avg_above_{t}": sel.selective(t) for t in THRESHOLDS}
    out |= {
        "recovery_all": recovery(directions, W_dec),
        "recovery_labels": recovery(directions[data.label_features], W_dec),
        "fvu": ((sae.decode(codes) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(),
        "l0": (codes != 0).sum(1).float().mean().item(),
        "never_active": ((codes != 0).sum(0) == 0).float().mean().item(),
        "best_avg_per_label": best_avg.sort(descending=True).values.tolist(),
    }
    return out


def main() -> None:
    args = parser(__doc__, features=512, d=64, width=1024, k=16, block=4, labels=32, batch=1024, seed=0, pool=2**17)
    args.add_argument("--budgets", default="200000,800000", help="training tokens, comma-separated")
    args.add_argument("--lr", type=float, default=None, help="learning rate of both (default: default_lr(width))")
    args.add_argument("--p-in", type=float, default=0.9, help="share of a label's rows its direction fires on")
    args.add_argument("--label-scale", type=float, default=1.0, help="label magnitudes relative to the others'")
    args.add_argument("--threads", type=int, default=2, help="torch threads")
    opts = args.parse_args()
    torch.set_num_threads(opts.threads)
    # The data's seed is offset: the SAEs' initialisation, seeded with `seed`, would draw the true directions.
    synthetic = make_synthetic(n_features=opts.features, d=opts.d, mean_active=6.0, seed=opts.seed + DATA_SEED)
    data = LabelledData(synthetic, opts.labels, p_in=opts.p_in, label_scale=opts.label_scale)
    pool, _ = data.sample(opts.pool, torch.Generator().manual_seed(opts.seed + 10))
    x_eval, labels_eval = data.sample(16_384, torch.Generator().manual_seed(opts.seed + 20))
    lr = opts.lr if opts.lr is not None else default_lr(opts.width)
    cfg = SAEConfig(d_in=opts.d, d_sae=opts.width, k=opts.k, icfl_block=opts.block, dead_tokens=100_000)
    print(
        f"{opts.features} directions in {opts.d} dims, {opts.labels} labels (p_in {opts.p_in}); width {opts.width}, "
        f"k {opts.k} (ICFL {opts.k // opts.block} x {opts.block}), lr {lr:.3g}, batch {opts.batch}; {load_note()}"
    )
    header = (
        f"{'tokens':>9} {'arch':>5} {'sel avg':>8} {'sel max':>8} {'>0.5':>5} {'>0.2':>5} {'rec all':>8} "
        f"{'rec lab':>8} {'FVU':>6} {'L0':>5} {'never':>6} {'cpu s':>6}"
    )
    print(header)
    results = []
    for tokens in (int(b) for b in opts.budgets.split(",")):
        steps = max(1, tokens // opts.batch)
        for arch in ("icfl", "topk"):
            sae, seconds = fit(arch, cfg, pool, steps=steps, batch=opts.batch, lr=lr, seed=opts.seed)
            row = {"tokens": steps * opts.batch, "arch": arch, "cpu_seconds": seconds} | score(
                sae, data, x_eval, labels_eval
            )
            results.append(row)
            print(
                f"{row['tokens']:>9,} {arch:>5} {row['sel_avg']:>8.3f} {row['sel_max']:>8.3f} "
                f"{row['n_avg_above_0.5']:>5} {row['n_avg_above_0.2']:>5} {row['recovery_all']:>8.1%} "
                f"{row['recovery_labels']:>8.1%} {row['fvu']:>6.3f} {row['l0']:>5.1f} {row['never_active']:>6.1%} "
                f"{seconds:>6.1f}"
            )
    write_json(opts.json, opts, {"lr": lr, "best_possible_avg_selectivity": opts.p_in, "rows": results})


if __name__ == "__main__":
    main()
