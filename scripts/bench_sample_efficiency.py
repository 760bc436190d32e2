"""Sample efficiency: how many of a known dictionary's directions saelab, SAELens and sparsify recover per token.

The data is `saelab.toys.benchmark.make_benchmark` (768 Zipf-distributed unit directions in 96 dims with a planted
parent/child hierarchy and Gaussian noise; one dictionary per seed). For each seed every library trains a TopK SAE
(k=16) of every width on the same stream of batches, in lockstep, each with its own defaults:

- saelab: `saelab train`'s defaults and its own per-step code (`DefaultsRun`: `Member.create`, `schedule`,
  `Member.step`; the peak learning rate `default_lr(width, d_in=..., steps=...)`, warmup, decay), one run per budget, as its
  learning rate and schedule depend on the budget;
- SAELens: `TopKTrainingSAE` and `SAETrainer` with their defaults (decoder at norm 0.1, decoder-norm rescaling,
  AuxK after 1000 steps unfired, constant learning rate, no warmup, gradient clipping at 1), at the nominal
  learning rate of Gao et al.'s rule 2e-4 / sqrt(width / 2^14) (the rule of sparsify's Adam; SAELens's own default,
  3e-4, is lower at every width here): one run, read at every budget (its schedule is constant, so the reading at a
  budget is the run of that budget);
- sparsify: `SparseCoder` with its default optimizer (signum: SignSGD in a schedule-free wrapper, momentum 0.95,
  lr 5e-3 / sqrt(width / 2^14)), mean-initialised `b_dec`, unit-norm decoder, no AuxK: one run, its schedule-free
  average read at every budget.

Recovery: the share of the true directions matched by some decoder row at cosine >= 0.9. The targets (issue 15):
saelab >= SAELens at every width and budget, and saelab >= 90% at the smallest budget where SAELens reaches 50%.

`--gao-multiples M ...` is the learning-rate sweep `default_lr` was chosen from: saelab alone (no other library
unless `--libraries` names it), with the same schedule, at M times Gao et al.'s rate, for every width and budget.

    python scripts/bench_sample_efficiency.py [--quick] [--gao-multiples 3 10 30 100] [--jobs N] [--json out.json]

`--jobs N` trains each seed x width in its own process (N at a time), on the same batches.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Protocol, cast

import torch
from _bench import load_note, parser, write_json  # scripts/ is on the path when run as a script
from torch import Tensor

from saelab.dictionaries import SAEConfig
from saelab.dictionaries.base import geometric_median
from saelab.toys.benchmark import DefaultsRun, batches, make_benchmark
from saelab.train.config import TrainConfig, default_lr
from saelab.train.optim import OptimizerName

FULL = {"widths": [768, 1536, 3072], "budgets": [1_000_000, 2_000_000, 4_000_000], "seeds": [0, 1]}
KINDS = ("flat", "parents", "children")
"""The kinds of true direction scored apart (`HierarchicalData.kinds`): children fire only with a parent, so a TopK
SAE absorbs them (Chanin et al.); flat ones are outside the hierarchy."""
QUICK = {"widths": [384, 768, 1536], "budgets": [250_000, 500_000, 1_000_000], "seeds": [0, 1]}


class Learner(Protocol):
    """What the lockstep loop drives: one step per batch, and the decoder rows to score."""

    def step(self, x: Tensor) -> None: ...

    def directions(self) -> Tensor: ...


class SAELensRun:
    """SAELens's `TopKTrainingSAE` (its `MatryoshkaBatchTopKTrainingSAE` when `changes` give `matryoshka_widths`)
    trained by its `SAETrainer` one batch at a time (`SAETrainer.step`, as `fit`)."""

    def __init__(
        self, d: int, width: int, k: int, *, tokens: int, batch_size: int, lr: float, seed: int, **changes: Any
    ):
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.saes.matryoshka_batchtopk_sae import (
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig,
        )
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

        torch.manual_seed(seed)
        shape = {"d_in": d, "d_sae": width, "k": k, "device": "cpu", "dtype": "float32"}
        if "matryoshka_widths" in changes:  # SAELens's one Matryoshka: BatchTopK
            sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(**shape, **changes))
        else:
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(**shape, **changes))
        cfg = SAETrainerConfig(
            total_training_samples=tokens,
            train_batch_size_samples=batch_size,
            lr=lr,
            lr_end=lr,  # `SAETrainer` asks for it; the default constant schedule ignores it
            logger=LoggingConfig(log_to_wandb=False),
        )
        self.sae, self.trainer = sae, SAETrainer(cfg=cfg, sae=sae, data_provider=iter(()))

    def step(self, x: Tensor) -> None:
        self.trainer.step(x)
        self.trainer.n_training_steps += 1

    def directions(self) -> Tensor:
        return self.sae.W_dec.detach()


class SparsifyRun:
    """sparsify's `SparseCoder` with the default optimizer and the steps of its `Trainer.fit` for an FVU loss."""

    def __init__(self, d: int, width: int, k: int, *, seed: int):
        from schedulefree import ScheduleFreeWrapper
        from sparsify import SparseCoder, SparseCoderConfig  # pyright: ignore[reportMissingImports]  # the [bench] extra
        from sparsify.sign_sgd import SignSGD  # pyright: ignore[reportMissingImports]  # the [bench] extra

        torch.manual_seed(seed)
        self.sae = SparseCoder(d, SparseCoderConfig(num_latents=width, k=k), device="cpu", dtype=torch.float32)
        lr = 5e-3 / math.sqrt(width / 2**14)
        self.opt = ScheduleFreeWrapper(SignSGD([{"params": self.sae.parameters(), "lr": lr}]), momentum=0.95)
        self.opt.train()
        self.started = False

    def step(self, x: Tensor) -> None:
        if not self.started:
            self.sae.b_dec.data = x.mean(0)
            self.started = True
        self.sae.set_decoder_norm_to_unit_norm()
        self.sae(x, total_variance=(x - x.mean(0)).pow(2).sum()).fvu.backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()

    def directions(self) -> Tensor:
        self.opt.eval()  # the schedule-free average, as sparsify saves it
        W_dec = self.sae.W_dec
        assert W_dec is not None  # a `SparseCoder` built with its decoder (the default)
        rows = W_dec.detach().clone()
        self.opt.train()
        return rows


def gao_lr(width: int) -> float:
    """Gao et al.'s rule, 2e-4 / sqrt(width / 2^14): sparsify's Adam default and the base of `--gao-multiples`."""
    return 2e-4 / math.sqrt(width / 2**14)


def ablations(args: Any, cfg: SAEConfig, sample: Tensor, seed: int) -> dict[str, Learner]:
    """One candidate cause of the per-token gap at a time (`--ablate`; one budget, as saelab's schedule needs it)."""
    steps, width = args.budgets[0] // args.batch_size, cfg.d_sae

    def run(lr: float, **changes: Any) -> DefaultsRun:
        return DefaultsRun(cfg, sample, steps, batch_size=args.batch_size, lr=lr, seed=seed, **changes)

    out: dict[str, Learner] = {f"saelab_gao_x{m:g}": run(m * gao_lr(width)) for m in (1, 3, 10, 30)}
    out["saelab_gao_constant"] = run(gao_lr(width), warmup_steps=0, decay_start=1.0)
    unscaled = run(gao_lr(width))
    unscaled.sae.input_scale.fill_(1.0)  # SAELens's default: raw inputs
    unscaled.sae.b_dec.data.copy_(geometric_median(sample))
    out["saelab_gao_raw_inputs"] = unscaled
    lens = {"tokens": args.budgets[0], "batch_size": args.batch_size, "lr": gao_lr(width), "seed": seed}
    out["sae_lens_unit_init"] = SAELensRun(cfg.d_in, width, cfg.k, decoder_init_norm=1.0, **lens)
    return out


def learners(
    args: Any, d: int, width: int, sample: Tensor, seed: int
) -> tuple[dict[tuple[str, int], DefaultsRun], dict[str, Learner]]:
    """saelab's runs by name and budget (`saelab`: its defaults; or one per `--gao-multiples` entry; with
    `--matryoshka`, `saelab_matryoshka` too), and the other libraries' single runs (and `--ablate`'s), for one width
    and seed."""
    cfg = SAEConfig(d_in=d, d_sae=width, k=args.k)
    multiples: list[float] = args.gao_multiples or []
    lrs: dict[str, tuple[SAEConfig, OptimizerName, float | None, float]] = {}  # name: SAE, optimizer, rate, scale
    if multiples:
        lrs = {f"saelab_gao_x{m:g}": (cfg, "adam", m * gao_lr(width), 1.0) for m in multiples}
    for optimizer in args.optimizers or ([] if multiples else ["default"]):
        for scale in args.lr_scales:
            name = "saelab" if optimizer == "default" else f"saelab_{optimizer}"
            chosen = cast(OptimizerName, TrainConfig(run="").optimizer if optimizer == "default" else optimizer)
            lrs[name + ("" if scale == 1 else f"_x{scale:g}")] = (cfg, chosen, None, scale)
    matryoshka = SAEConfig(d_in=d, d_sae=width, k=args.k, arch="batchtopk", matryoshka_prefixes=args.matryoshka)
    if args.matryoshka:
        lrs["saelab_matryoshka"] = (matryoshka, TrainConfig(run="").optimizer, None, 1.0)

    def run(budget: int, sae: SAEConfig, optimizer: OptimizerName, lr: float | None, scale: float) -> DefaultsRun:
        steps = budget // args.batch_size
        if lr is None:
            lr = scale * TrainConfig(run="", tokens=budget, batch_size=args.batch_size, optimizer=optimizer).peak_lr(
                width, d_in=d
            )
        return DefaultsRun(sae, sample, steps, batch_size=args.batch_size, lr=lr, optimizer=optimizer, seed=seed)

    ours = {(name, budget): run(budget, *spec) for name, spec in lrs.items() for budget in args.budgets}
    others: dict[str, Learner] = {}
    lens = {"tokens": max(args.budgets), "batch_size": args.batch_size, "lr": gao_lr(width), "seed": seed}
    if "sae_lens" in args.libraries:
        others["sae_lens"] = SAELensRun(d, width, args.k, **lens)
        if args.matryoshka:
            widths = matryoshka.matryoshka_prefixes
            others["sae_lens_matryoshka"] = SAELensRun(d, width, args.k, matryoshka_widths=widths, **lens)
    if "sparsify" in args.libraries:
        others["sparsify"] = SparsifyRun(d, width, args.k, seed=seed)
    return ours, others | (ablations(args, cfg, sample, seed) if args.ablate else {})


def run_part(args: Any, seed: int, widths: list[int]) -> list[dict[str, Any]]:
    """Every library at each of `widths` trained in lockstep on one seed's batches; one row per width x budget x
    library."""
    torch.set_num_threads(args.threads)
    data = make_benchmark(args.features, args.d, seed=seed)
    d = data.directions.shape[1]
    sample = data.sample(8192, torch.Generator().manual_seed(10_000 + seed))
    runs = {width: learners(args, d, width, sample, seed) for width in widths}
    seconds: dict[tuple[int, str], float] = {}
    rows = []
    n_steps = max(args.budgets) // args.batch_size
    for i, x in enumerate(batches(data, n_steps, args.batch_size, seed=seed)):
        tokens = (i + 1) * args.batch_size
        for width, (ours, others) in runs.items():
            active = [(name, run) for (name, _), run in ours.items() if run.steps < run.total_steps]
            for name, run in active + list(others.items()):
                start = time.perf_counter()
                run.step(x)
                seconds[width, name] = seconds.get((width, name), 0.0) + time.perf_counter() - start
            for budget in args.budgets:
                if tokens != budget // args.batch_size * args.batch_size:
                    continue
                scored = {name: run for (name, b), run in ours.items() if b == budget} | others
                for library, run in scored.items():
                    rec = data.recovery_by_kind(run.directions())
                    row = {"seed": seed, "width": width, "budget": budget, "library": library}
                    rows.append(row | {"recovery": rec["all"]} | {kind: rec[kind] for kind in KINDS})
                    kinds = ", ".join(f"{kind} {rec[kind]:6.1%}" for kind in KINDS)
                    print(
                        f"  seed {seed} width {width:5d} {budget / 1e6:5.2f}M {library:9s} {rec['all']:6.1%} ({kinds})"
                    )
    for (width, library), s in seconds.items():
        print(f"  seed {seed} width {width:5d} {library:9s} {s:7.1f} s of steps")
    return rows


def table(rows: list[dict[str, Any]], args: Any, key: str = "recovery") -> dict[str, dict[str, float]]:
    """Mean of `key` (`recovery`, or one of `KINDS`) over the seeds per width x budget x library, printed as a table
    and returned."""
    means: dict[str, dict[str, float]] = {}
    libraries = list(dict.fromkeys(row["library"] for row in rows))
    what = "of all the true directions" if key == "recovery" else f"of the {key} directions"
    print(f"\nrecovery {what} at cosine >= 0.9 (mean of seeds {args.seeds}), k={args.k}, batch {args.batch_size}")
    print("| width | tokens | " + " | ".join(libraries) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in libraries) + " |")
    for width in args.widths:
        for budget in args.budgets:
            cell = {}
            for library in libraries:
                got = [r[key] for r in rows if (r["width"], r["budget"], r["library"]) == (width, budget, library)]
                cell[library] = sum(got) / len(got)
            means[f"w{width}/{budget}"] = cell
            print(f"| {width} | {budget / 1e6:g}M | " + " | ".join(f"{cell[lib]:.1%}" for lib in libraries) + " |")
    return means


def targets(
    means: dict[str, dict[str, float]],
    args: Any,
    values: dict[str, dict[str, float]] | None = None,
    kind: str = "all",
) -> dict[str, dict[str, Any]]:
    """Issue 15's targets per width and saelab entry (`saelab`, and `saelab_matryoshka` with `--matryoshka`), on the
    mean recoveries `values` of `kind`'s directions (default: `means`, all of them): the entry >= SAELens's TopK at
    every budget, and >= 90% at the smallest budget where SAELens's TopK recovers 50% of all the directions (`means`;
    `None` where it never does). Printed and returned."""
    out: dict[str, dict[str, Any]] = {}
    values = means if values is None else values
    for width in args.widths:
        half = next((b for b in args.budgets if means[f"w{width}/{b}"].get("sae_lens", 0.0) >= 0.5), None)
        cells = [values[f"w{width}/{budget}"] for budget in args.budgets]
        for entry in ("saelab", "saelab_matryoshka"):
            if not all(entry in cell and "sae_lens" in cell for cell in cells):
                continue
            at_least = all(cell[entry] >= cell["sae_lens"] for cell in cells)
            there = None if half is None else values[f"w{width}/{half}"][entry]
            out[f"w{width}/{entry}"] = {"at_least_sae_lens": at_least, "sae_lens_half_budget": half, "there": there}
            where = "SAELens never reaches 50%" if there is None else f"{there:.1%} where SAELens first >= 50%"
            print(f"width {width}, {kind} directions: {entry} >= SAELens at every budget: {at_least}; {where}")
    return out


def main() -> None:
    cli = parser(__doc__, k=16, batch_size=4096, threads=1, jobs=1)
    cli.add_argument("--quick", action="store_true", help=f"a small setting: {QUICK}; default {FULL}")
    cli.add_argument("--d", type=int, default=96, help="the benchmark's dimension (default 96)")
    cli.add_argument("--features", type=int, default=768, help="its number of true directions (default 768)")
    cli.add_argument("--widths", type=int, nargs="+")
    cli.add_argument("--budgets", type=int, nargs="+")
    cli.add_argument("--seeds", type=int, nargs="+")
    cli.add_argument("--ablate", action="store_true", help="also train one candidate cause at a time (one budget)")
    cli.add_argument("--gao-multiples", type=float, nargs="+", help="the learning-rate sweep (saelab alone)")
    cli.add_argument(
        "--optimizers",
        nargs="+",
        choices=["default", "adam", "signum_sf", "adamw_sf"],
        help="saelab's runs: one per optimizer (`TrainConfig.optimizer`) at its default rate; default: `default`",
    )
    cli.add_argument("--lr-scales", type=float, nargs="+", default=[1.0], help="multiples of each one's default rate")
    cli.add_argument(
        "--matryoshka",
        type=float,
        nargs="+",
        help="also train saelab's and SAELens's Matryoshka BatchTopK with these prefix widths (counts or fractions "
        "of the width, the last = the width), e.g. 0.0625 0.25 1",
    )
    cli.add_argument("--libraries", nargs="*", choices=["sae_lens", "sparsify"], help="default: both (none in a sweep)")
    args = cli.parse_args()
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.libraries is None:
        args.libraries = [] if args.gao_multiples else ["sae_lens", "sparsify"]
    if args.ablate and len(args.budgets) != 1:
        cli.error("--ablate trains each variant for one budget; give one with --budgets")
    torch.set_num_threads(args.threads)
    lrs = ", ".join(
        f"w{w}/{b / 1e6:g}M {default_lr(w, d_in=args.d, steps=b // args.batch_size):.2e}"
        for w in args.widths
        for b in args.budgets
    )
    print(f"widths {args.widths}, budgets {args.budgets}, seeds {args.seeds}; default_lr: {lrs}; {load_note()}")
    start = time.perf_counter()
    if args.jobs == 1:
        rows = [row for seed in args.seeds for row in run_part(args, seed, args.widths)]
    else:  # one process per seed and width, each on its own copy of the seed's batches (the same ones)
        parts = [(seed, [width]) for seed in args.seeds for width in args.widths]
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = [pool.submit(run_part, args, seed, widths) for seed, widths in parts]
            rows = [row for part in done for row in part.result()]
    means = table(rows, args)
    by_kind = {kind: table(rows, args, kind) for kind in KINDS}
    met = targets(means, args) | {
        f"{kind}/{key}": value for kind in KINDS for key, value in targets(means, args, by_kind[kind], kind).items()
    }
    elapsed = time.perf_counter() - start
    print(f"{elapsed:.0f} s in all; {load_note()}")
    results = {"rows": rows, "mean_recovery": means, "mean_recovery_by_kind": by_kind, "targets": met}
    write_json(args.json, args, results | {"seconds": elapsed})


if __name__ == "__main__":
    main()
