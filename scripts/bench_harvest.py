"""Harvest throughput against the bare forward pass of the same model on the same batches.

    python scripts/bench_harvest.py [--tokens 200000] [--json out.json]

Prints tokens/s of (a) the bare forward pass stopped at the same layer as the harvest (the same
compute, nothing stored), (b) the full bare forward pass, (c) `saelab.harvest` end to end (text
packing, forward, casting, the writer thread, Zarr shards), and the ratios harvest / bare.
Runs come in `--repeats` back-to-back pairs, bare first in even pairs and harvest first in odd ones (so a drift in the
machine's speed does not favour either); the full forward runs once, after them. This machine's speed drifts by 10-20%
over minutes (a first run is often the fastest), so the ratio printed first is the median over the pairs of
bare / harvest; the ratio of the best of each is printed beside it.
It also prints the same ratios in process CPU time (every thread, torch's included): on a machine shared with
other jobs the wall-clock ratio says little, and harvest and bare forward are both CPU-bound, so bare CPU / harvest
CPU is what the wall-clock ratio would be on an idle one. The 1-minute load average before and after is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from itertools import islice

import torch

from saelab.config import HarvestConfig
from saelab.harvest import harvest
from saelab.models import capture, is_encoder, load_model, resolve_hooks
from saelab.text import SpecialTokens, batch_contexts, iter_documents, pack_contexts

HOOKS = [f"blocks.{layer}.{kind}" for layer in (1, 2) for kind in ("hook_resid_post", "hook_mlp_out", "attn.hook_z")]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--context-length", type=int, default=128)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--repeats", type=int, default=5, help="(bare, harvest) pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model)
    device = next(model.parameters()).device
    cfg = HarvestConfig(
        model=args.model,
        hooks=HOOKS,
        out="bench.zarr",  # replaced by a temporary folder in each run
        context_length=args.context_length,
        batch_size=args.batch_size,
        max_tokens=args.tokens,
        dtype=args.dtype,
        drop_special_tokens=False,
    )
    special = SpecialTokens.for_tokenizer(model.tokenizer, is_encoder(model))
    contexts = pack_contexts(iter_documents(cfg.text), model.tokenizer, special, context_length=cfg.context_length)
    n_batches = -(-args.tokens // (args.batch_size * args.context_length))
    batches = [
        torch.from_numpy(b.tokens).to(device)
        for b in islice(batch_contexts(contexts, args.batch_size, special), n_batches)
    ]
    n_tokens = min(args.tokens, sum(b.numel() for b in batches))
    points = resolve_hooks(model, HOOKS)
    last_layer = resolve_hooks(model, [f"blocks.{max(p.layer for p in points)}.hook_resid_post"])

    def bare_to_layer() -> None:
        for tokens in batches:
            capture(model, tokens, last_layer)

    @torch.inference_mode()
    def bare_full() -> None:
        for tokens in batches:
            model(tokens, return_type=None)

    scratch = tempfile.mkdtemp(prefix="bench_harvest_")

    def harvest_once() -> None:
        """A harvest into a new store (each deleted after its timing: deleting is not part of a harvest)."""
        harvest(cfg.model_copy(update={"out": f"{scratch}/s.zarr"}), model=model, progress=False)

    def timed(fn) -> tuple[float, float]:
        """Wall-clock and process CPU seconds of `fn()`."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        t, cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t, time.process_time() - cpu

    bare_to_layer()  # warm-up
    start_load = os.getloadavg()[0]
    walls: dict[str, list[float]] = {"bare_to_layer": [], "harvest": []}
    cpus: dict[str, list[float]] = {"bare_to_layer": [], "harvest": []}
    for i in range(args.repeats):
        pair = [("bare_to_layer", bare_to_layer), ("harvest", harvest_once)]
        for name, fn in pair if i % 2 == 0 else pair[::-1]:
            wall, cpu = timed(fn)
            shutil.rmtree(f"{scratch}/s.zarr", ignore_errors=True)
            walls[name].append(wall)
            cpus[name].append(cpu)
    shutil.rmtree(scratch)
    full_wall, _ = timed(bare_full)
    paired = [b / h for b, h in zip(walls["bare_to_layer"], walls["harvest"], strict=True)]
    paired_cpu = [b / h for b, h in zip(cpus["bare_to_layer"], cpus["harvest"], strict=True)]
    best = {name: min(v) for name, v in walls.items()} | {"bare_full": full_wall}
    tps = {k: n_tokens / v for k, v in best.items()}
    load = [start_load, os.getloadavg()[0]]
    result = {
        "model": args.model,
        "hooks": HOOKS,
        "dtype": args.dtype,
        "tokens": n_tokens,
        "device": str(device),
        "threads": args.threads,
        "tokens_per_s": tps,
        "wall_s": walls,
        "cpu_s": cpus,
        "ratio_harvest_vs_bare_to_layer": statistics.median(paired),
        "ratio_paired": paired,
        "ratio_best_of_each": best["bare_to_layer"] / best["harvest"],
        "ratio_harvest_vs_bare_full": tps["harvest"] / tps["bare_full"],
        "cpu_ratio_harvest_vs_bare_to_layer": statistics.median(paired_cpu),
        "load_average": load,
    }
    print(
        f"{args.model}, {len(HOOKS)} hooks at layers 1-2, {args.dtype}, {n_tokens:,} tokens, {device}, {args.threads} threads"
    )
    for k, v in tps.items():
        print(f"  {k:<15} {v:>10,.0f} tokens/s")
    print(
        f"  harvest / bare forward to the same layer: {result['ratio_harvest_vs_bare_to_layer']:.3f} (median of "
        f"{args.repeats} pairs, from {min(paired):.3f} to {max(paired):.3f}; best of each: {result['ratio_best_of_each']:.3f})"
    )
    print(f"  harvest / bare full forward:             {result['ratio_harvest_vs_bare_full']:.3f}")
    print(f"  the same in CPU time (median of pairs):  {result['cpu_ratio_harvest_vs_bare_to_layer']:.3f}")
    print(f"  load average (1 min) before and after:   {load[0]:.2f}, {load[1]:.2f}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
