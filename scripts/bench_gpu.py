"""The GPU hot path: a TopK training step at d_in 768, width 32768, k 32, batch 8192 under bf16 autocast, saelab
against sparsify and SAELens in the same run; the encoder matmul's share of the GPU's peak bf16 matmul rate; the
harvest / bare-forward ratio of MiniLM; and 1 against 2 ranks (`parallel: ddp`) when two GPUs exist.

    python scripts/bench_gpu.py [--json out.json]                 # on a CUDA machine
    python scripts/bench_gpu.py --device cpu --small [--json ...] # the same code on small sizes, anywhere

- Steps: forward, loss with AuxK, backward, optimiser (fused Adam for all three), decoder renormalisation and
  dead-latent bookkeeping, each library as its own trainer runs them (as `scripts/bench_train.py`), on the same
  activations (a synthetic sparse dictionary), round-robin, medians; tokens/s is batch / step time.
- Matmul share: the encoder's dense product alone, as saelab issues it under autocast (`addmm` in bf16), counted as
  2 * batch * d_in * width FLOPs over its time, against the best rate of a large square bf16 `torch.matmul` (the
  peak this GPU reaches in this run, not the datasheet's).
- Harvest: `scripts/bench_harvest.py` in a child process (MiniLM, six hooks; harvest tokens/s over the bare forward
  pass to the same layer).
- Ranks: the saelab step on a global batch of --batch rows on one GPU, then on two (each rank its half, one flat
  all-reduce of the gradients: `parallel: ddp`), launched with torchrun. On the CPU (`--device cpu`) the two ranks
  run with gloo, which checks the path but measures nothing useful on a shared CPU.

Every timer is read between `torch.cuda.synchronize()` calls on CUDA. Needs the `[bench]` extra (sparsify,
SAELens): `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from _bench import (  # scripts/ is on the path when run as a script
    load_note,
    parser,
    step_figures,
    time_round_robin,
    write_json,
)

from saelab import distributed
from saelab.dictionaries import SAE, SAEConfig, train_step
from saelab.toys.synthetic import make_synthetic

LR = 2e-4
SMALL = {"d_in": 64, "d_sae": 1024, "k": 8, "batch": 512}
"""The sizes of `--small`, for a CPU run that checks the script end to end in seconds."""
HERE = Path(__file__).resolve().parent

Step = Callable[[], None]


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on `device`, as saelab's trainer runs a CUDA step."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


def synced(step: Step, device: torch.device) -> Step:
    """`step` under bf16 autocast, followed by a sync, so that a timer around it measures its GPU work."""

    def run() -> None:
        with autocast(device):
            step()
        sync(device)

    return run


def saelab_sae(x: torch.Tensor, d_sae: int, k: int) -> SAE:
    """saelab's TopK SAE as its trainer builds it (seed 0, `b_dec` at the geometric median of `x`)."""
    torch.manual_seed(0)
    sae = SAE.from_config(SAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k), device=x.device)
    sae.init_from_sample(x)
    return sae


def saelab_step(x: torch.Tensor, d_sae: int, k: int) -> Step:
    """`saelab.dictionaries.train_step` (AuxK, decoder projection and renormalisation, dead counters)."""
    sae = saelab_sae(x, d_sae, k)
    opt = torch.optim.Adam(sae.parameters(), lr=LR, fused=True)

    def step() -> None:
        train_step(sae, opt, x)

    return step


def saelens_step(x: torch.Tensor, d_sae: int, k: int) -> Step:
    """SAELens's `SAETrainer._train_step` for a `TopKTrainingSAE` (as `scripts/bench_train.py`)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k, device=str(x.device)))
    opt = torch.optim.Adam(sae.parameters(), lr=LR, fused=True)
    dead = torch.zeros(d_sae, dtype=torch.bool, device=x.device)
    since_fired = torch.zeros(d_sae, device=x.device)

    def step() -> None:
        out = sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
        )
        with torch.no_grad():
            since_fired.add_(1)
            since_fired[out.feature_acts.bool().any(0)] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step


def sparsify_step(x: torch.Tensor, d_sae: int, k: int) -> Step:
    """sparsify's `Trainer` inner loop for one `SparseCoder` (fvu + auxk / 32, as `scripts/bench_train.py`)."""
    from sparsify import SparseCoder, SparseCoderConfig  # pyright: ignore[reportMissingImports]  # the [bench] extra

    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=d_sae, k=k), device=x.device)
    opt = torch.optim.Adam(sae.parameters(), lr=LR, fused=True)
    dead = torch.zeros(d_sae, dtype=torch.bool, device=x.device)
    since_fired = torch.zeros(d_sae, dtype=torch.long, device=x.device)

    def step() -> None:
        out = sae(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        sae.set_decoder_norm_to_unit_norm()
        since_fired.add_(x.shape[0])
        since_fired[out.latent_indices.flatten()] = 0

    return step


def encoder_matmul(x: torch.Tensor, d_sae: int, k: int) -> Step:
    """The encoder's dense forward product alone, as saelab issues it (`SAE.pre_acts`; bf16 under autocast)."""
    sae = saelab_sae(x, d_sae, k)

    @torch.no_grad()
    def step() -> None:
        sae.pre_acts(x)

    return step


def peak_matmul_flops(device: torch.device, n: int, repeats: int) -> float:
    """The best FLOP/s of an `[n, n] @ [n, n]` bf16 `torch.matmul` on `device` (2 n^3 FLOPs each)."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        sync(device)
        start = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def activations(d_in: int, d_sae: int, k: int, batch: int, device: torch.device) -> torch.Tensor:
    """`batch` rows of a synthetic sparse dictionary of `d_sae` features in `d_in` dimensions (about 2k active per
    row), drawn 1024 rows at a time on the CPU so that the dense draw stays small."""
    torch.manual_seed(0)
    data = make_synthetic(n_features=d_sae, d=d_in, mean_active=2 * k, n_pairs=min(256, d_sae // 2))
    parts = [data.sample(min(1024, batch - s), torch.Generator().manual_seed(s)) for s in range(0, batch, 1024)]
    return torch.cat(parts).to(device)


def time_steps(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Step times (ms), tokens/s and ratios of the three libraries, and the encoder matmul's share of the peak."""
    x = activations(args.d_in, args.d_sae, args.k, args.batch, device)
    makers = {"saelab": saelab_step, "sae_lens": saelens_step, "sparsify": sparsify_step, "matmul": encoder_matmul}
    steps = {name: synced(make(x, args.d_sae, args.k), device) for name, make in makers.items()}
    sec = time_round_robin(steps, args.warmup, args.repeats)
    peak = peak_matmul_flops(device, args.peak_n, args.repeats)
    matmul_flops = 2 * args.batch * args.d_in * args.d_sae / sec["matmul"]
    out = step_figures(sec, args.batch)
    out |= {
        "peak_bf16_tflops": peak / 1e12,
        "encoder_matmul_tflops": matmul_flops / 1e12,
        "encoder_matmul_share_of_peak": matmul_flops / peak,
    }
    return out


def harvest_ratio(args: argparse.Namespace) -> dict[str, Any]:
    """`scripts/bench_harvest.py`'s figures (MiniLM on this machine's default device), run in a child process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "harvest.json"
        command = [sys.executable, str(HERE / "bench_harvest.py"), "--tokens", str(args.harvest_tokens)]
        command += ["--threads", str(torch.get_num_threads()), "--json", str(out)]
        if args.device == "cpu":  # bench_harvest loads the model on the default device
            environment = os.environ | {"CUDA_VISIBLE_DEVICES": ""}
        else:
            environment = dict(os.environ)
        subprocess.run(command, check=True, env=environment)
        return json.loads(out.read_text())


def ddp_worker(args: argparse.Namespace) -> None:
    """One rank of the 2-rank measurement: saelab's step on this rank's half of each global batch, the gradients
    summed over the ranks (`SAE.split`, as `parallel: ddp` trains); rank 0 writes the median step time to
    `args.ddp_worker`."""
    here = distributed.init()
    device = distributed.local_device("cpu" if args.device == "cpu" else "auto")
    x = activations(args.d_in, args.d_sae, args.k, args.batch, device)
    sae = saelab_sae(x, args.d_sae, args.k)
    sae.split = slice(here.rank * args.batch // here.world, (here.rank + 1) * args.batch // here.world)
    opt = torch.optim.Adam(sae.parameters(), lr=LR, fused=True)
    times = []
    for i in range(args.warmup + args.repeats):
        distributed.barrier()
        start = time.perf_counter()
        with autocast(device):
            train_step(sae, opt, x)
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    slowest = distributed.gather_objects(statistics.median(times))
    if here.main:
        Path(args.ddp_worker).write_text(json.dumps({"ranks": here.world, "step_s": max(slowest)}))


def two_ranks(args: argparse.Namespace, one_rank_ms: float) -> dict[str, float]:
    """The saelab step on 2 ranks (torchrun, `parallel: ddp`) against the 1-rank step of `time_steps`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ddp.json"
        sizes = [f"--d-in={args.d_in}", f"--d-sae={args.d_sae}", "-k", str(args.k), f"--batch={args.batch}"]
        repeats = [f"--warmup={args.warmup}", f"--repeats={args.repeats}", f"--device={args.device}"]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
        subprocess.run([*command, __file__, f"--ddp-worker={out}", *sizes, *repeats], check=True)
        two_ms = 1e3 * json.loads(out.read_text())["step_s"]
    return {
        "one_rank_ms": one_rank_ms,
        "two_ranks_ms": two_ms,
        "two_ranks_tokens_per_s": args.batch / two_ms * 1e3,
        "speedup_two_ranks": one_rank_ms / two_ms,
    }


def main() -> None:
    cli = parser(__doc__, d_in=768, d_sae=32768, k=32, batch=8192, warmup=3, repeats=10, peak_n=8192)
    cli.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --small: a check of the script)")
    cli.add_argument("--small", action="store_true", help=f"small sizes ({SMALL}, peak-n 1024, 20k harvest tokens)")
    cli.add_argument("--harvest-tokens", type=int, default=200_000, help="tokens of the harvest measurement")
    cli.add_argument("--no-harvest", action="store_true", help="leave out the harvest measurement")
    cli.add_argument("--ddp-worker", help=argparse.SUPPRESS)  # a rank of the 2-rank run: its figures go here
    parsed = cli.parse_args()
    if parsed.small:
        vars(parsed).update(SMALL | {"peak_n": 1024, "harvest_tokens": 20_000, "warmup": 2, "repeats": 5})
    if parsed.ddp_worker:
        return ddp_worker(parsed)
    device = torch.device(parsed.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or check the script with --device cpu --small")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{name}: d_in={parsed.d_in} d_sae={parsed.d_sae} k={parsed.k} batch={parsed.batch}, bf16 autocast; "
        f"{load_note()}",
        flush=True,
    )

    results: dict[str, Any] = {"device": name, "step": time_steps(parsed, device)}
    step = results["step"]
    for lib in ("saelab", "sae_lens", "sparsify"):
        print(f"  {lib:9s} {step[f'{lib}_ms']:8.2f} ms/step {step[f'{lib}_tokens_per_s']:12,.0f} tokens/s")
    print(
        f"  saelab speed-up: {step['speedup_vs_sae_lens']:.2f}x vs SAELens, {step['speedup_vs_sparsify']:.2f}x vs "
        f"sparsify; step / encoder matmul = {step['saelab_step_over_matmul']:.2f}\n"
        f"  encoder matmul {step['matmul_ms']:.2f} ms = {step['encoder_matmul_tflops']:.3g} TFLOP/s, "
        f"{100 * step['encoder_matmul_share_of_peak']:.0f}% of the measured bf16 peak "
        f"({step['peak_bf16_tflops']:.3g} TFLOP/s, [{parsed.peak_n}]^2 matmul)",
        flush=True,
    )
    if device.type == "cpu" or torch.cuda.device_count() >= 2:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the 1-rank steps' tensors are gone: give their memory to the ranks
        ranks = results["ranks"] = two_ranks(parsed, step["saelab_ms"])
        print(
            f"  saelab step on 2 ranks (ddp): {ranks['two_ranks_ms']:.2f} ms, {ranks['speedup_two_ranks']:.2f}x "
            f"the 1-rank step"
            + (" (CPU ranks share the cores: a check, not a measurement)" if device.type == "cpu" else ""),
            flush=True,
        )
    else:
        print("  one GPU: no 1 vs 2 ranks measurement")
    if not parsed.no_harvest:
        harvest = results["harvest"] = harvest_ratio(parsed)
        print(f"  harvest / bare forward to the same layer: {harvest['ratio_harvest_vs_bare_to_layer']:.3f}")
    write_json(parsed.json, parsed, results)


if __name__ == "__main__":
    main()
