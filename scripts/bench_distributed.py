"""Training on ranks: 1 rank x 2 threads against 2 ranks x 1 thread on the same work, on this machine's CPUs.

`members`: two TopK SAEs (each rank trains one, reading every batch); `ddp`: one TopK SAE (each rank takes half of
every batch; gradients, dead-latent counters and metrics summed in one flat all-reduce per step). Each is `saelab
train`'s own loop (`train`) under torchrun, timed inside the ranks from after start-up to the results; the ratio is
1-rank seconds over 2-rank seconds (above 1: the ranks are faster). On the 2-rank `ddp` launch it also times the
flat all-reduce alone (the buffer one step sends: every gradient, the latents fired, the metric shares) and a whole
step with the flat all-reduce against the same step with torch's `DistributedDataParallel` (bucketed all-reduces that
overlap the backward pass), round-robin. `harvest`: `saelab harvest` of MiniLM (--harvest-tokens tokens, hooks at
layers 1 and 2, float16) into a store of its own per launch, the ranks taking whole shards in turn.

    python scripts/bench_distributed.py [--json out.json] [--steps 30] [--d-in 256] [--expansion 16]
                                        [--harvest-tokens 32768]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _bench import load_note, parser, time_round_robin, write_json  # scripts/ is on the path when run as a script

K, BATCH, EVAL_ROWS = 32, 2048, 4096


def _config(store: str, run: str, args: Any, *, parallel: str, saes: int) -> dict[str, Any]:
    return dict(
        store=store,
        run=run,
        tokens=args.steps * BATCH,
        batch_size=BATCH,
        eval_rows=EVAL_ROWS,
        warmup_steps=5,
        log_every=10,
        ce_contexts=0,
        parallel=parallel,
        grid={"arch": ["topk"], "k": [K, K // 2][:saes], "expansion": [args.expansion]},
        sae={"dead_tokens": 4 * BATCH},  # some latents die, so AuxK runs as in a real run
    )


def _launch(ranks: int, threads: int, spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Run `spec` on `ranks` ranks of `threads` threads each under torchrun; what rank 0 measured."""
    spec_path, out = folder / f"spec-{ranks}.json", folder / f"out-{ranks}.json"
    spec_path.write_text(json.dumps(spec | {"out": str(out)}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    env = os.environ | {"OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([*command, __file__, "--worker", str(spec_path)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"torchrun failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def _step_timings(cfg: Any, repeats: int) -> dict[str, float]:
    """Under `ddp` on several ranks: seconds of the flat all-reduce alone, and of a whole step with it against one
    with torch's `DistributedDataParallel` (median of `repeats`, round-robin), on one batch of the config's store."""
    import torch.distributed as dist
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from saelab.dictionaries import SAE, SAEConfig, train_step
    from saelab.distributed import all_reduce_sum, ranks
    from saelab.store import ActivationStore

    here = ranks()
    batch = ActivationStore.open(cfg.store).activations("h", slice(0, cfg.batch_size))
    d_in = batch.shape[1]
    saes = [SAE.from_config(SAEConfig(d_in=d_in, d_sae=cfg.grid.expansion[0] * d_in, k=K)) for _ in range(2)]
    for sae in saes:
        sae.init_from_sample(batch)
        sae.split = slice(here.rank * cfg.batch_size // here.world, (here.rank + 1) * cfg.batch_size // here.world)
    flat, twin = saes
    flat_opt = torch.optim.Adam(flat.parameters(), lr=1e-4, fused=True)
    buffer = torch.cat([p.detach().flatten() for p in flat.parameters()] + [torch.zeros(flat.cfg.d_sae + 5)])

    class Loss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sae = twin

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            return self.sae.training_loss(x)

    ddp = DistributedDataParallel(Loss(), broadcast_buffers=False)
    ddp_opt = torch.optim.Adam(twin.parameters(), lr=1e-4, fused=True)

    def flat_step() -> None:
        train_step(flat, flat_opt, batch)

    def ddp_step() -> None:
        """`train_step` with DDP's bucketed gradient all-reduce, then one more for the latents fired and metrics."""
        loss, metrics = ddp(batch)
        (loss * here.world).backward()  # DDP averages the gradients; the ranks' shares must be summed
        fired, n_tokens = twin._fired or (torch.zeros(twin.cfg.d_sae), 0)  # pyright: ignore[reportPrivateUsage]
        twin._fired = None  # pyright: ignore[reportPrivateUsage]
        summed = all_reduce_sum(torch.cat([fired, torch.stack([v.float() for v in metrics.values()])]))
        twin.reset_fired(summed[: len(fired)], n_tokens)
        twin.project_decoder_grad()
        ddp_opt.step()
        ddp_opt.zero_grad(set_to_none=True)
        twin.normalize_decoder()

    def all_reduce() -> None:
        all_reduce_sum(buffer)

    steps = {"all_reduce": all_reduce, "step_flat": flat_step, "step_torch_ddp": ddp_step}
    dist.barrier()
    times = time_round_robin(steps, warmup=3, repeats=repeats)
    return {f"{name}_s": seconds for name, seconds in times.items()} | {
        "all_reduce_mb": buffer.numel() * buffer.element_size() / 2**20
    }


def _harvest_config(out: str, tokens: int) -> dict[str, Any]:
    hooks = [f"blocks.{layer}.{name}" for layer in (1, 2) for name in ("hook_resid_post", "hook_mlp_out")]
    return dict(
        model="minilm",
        hooks=hooks,
        out=out,
        max_tokens=tokens,
        context_length=128,
        batch_size=32,
        dtype="float16",
        shard_rows=4096,
        chunk_rows=1024,
        device="cpu",
    )


def worker(spec_path: str) -> None:
    """One rank: harvest or train the spec's config and time it (under 2-rank `ddp` also the steps); rank 0 writes
    the figures."""
    from saelab import distributed
    from saelab.config import HarvestConfig
    from saelab.harvest import harvest
    from saelab.models import load_model
    from saelab.train import TrainConfig, train

    spec = json.loads(Path(spec_path).read_text())
    here = distributed.init()
    if "harvest" in spec:
        harvest_cfg = HarvestConfig(**spec["harvest"])
        model = load_model(harvest_cfg.model, device="cpu")  # loading is start-up, not harvest
        distributed.barrier()
        start = time.perf_counter()
        harvest(harvest_cfg, model, progress=False)
        distributed.barrier()
        figures: dict[str, Any] = {"harvest_s": time.perf_counter() - start, "threads": torch.get_num_threads()}
    else:
        cfg = TrainConfig(**spec["config"])
        distributed.barrier()
        start = time.perf_counter()
        train(cfg, progress=False)
        distributed.barrier()
        figures = {"train_s": time.perf_counter() - start, "threads": torch.get_num_threads()}
        if cfg.parallel == "ddp" and here.many:
            figures |= _step_timings(cfg, 15)
    if here.main:
        Path(spec["out"]).write_text(json.dumps(figures))


def main() -> None:
    args = parser(__doc__, steps=30, d_in=256, expansion=16, harvest_tokens=32768).parse_args()
    from saelab.importer import import_arrays
    from saelab.toys.synthetic import make_synthetic

    print(load_note())
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = make_synthetic(n_features=4 * args.d_in, d=args.d_in, mean_active=8.0, seed=0)
        x = data.sample(8 * BATCH + EVAL_ROWS, torch.Generator().manual_seed(0)).numpy()
        store = str(folder / "store.zarr")
        import_arrays({"h": x}, store, dtype="float32", shard_rows=4096, chunk_rows=1024, progress=False)
        for mode, saes in (("members", 2), ("ddp", 1)):
            runs = {}
            for ranks, threads in ((1, 2), (2, 1)):
                spec = {"config": _config(store, str(folder / f"{mode}-{ranks}"), args, parallel=mode, saes=saes)}
                runs[f"{ranks}x{threads}"] = _launch(ranks, threads, spec, folder)
            one, two = runs["1x2"]["train_s"], runs["2x1"]["train_s"]
            results[mode] = runs | {"saes": saes, "ratio_1rank_over_2ranks": one / two}
            print(
                f"{mode} ({saes} SAE): 1 rank x 2 threads {one:.2f} s, 2 ranks x 1 thread {two:.2f} s, ratio {one / two:.2f}"
            )
        steps = results["ddp"]["2x1"]
        print(
            f"ddp step on 2 ranks: flat all-reduce {1e3 * steps['step_flat_s']:.1f} ms, torch DDP "
            f"{1e3 * steps['step_torch_ddp_s']:.1f} ms; the all-reduce alone ({steps['all_reduce_mb']:.1f} MB) "
            f"{1e3 * steps['all_reduce_s']:.2f} ms"
        )
        runs = {
            f"{ranks}x{threads}": _launch(
                ranks,
                threads,
                {"harvest": _harvest_config(str(folder / f"h{ranks}.zarr"), args.harvest_tokens)},
                folder,
            )
            for ranks, threads in ((1, 2), (2, 1))
        }
        one, two = runs["1x2"]["harvest_s"], runs["2x1"]["harvest_s"]
        results["harvest"] = runs | {"tokens": args.harvest_tokens, "ratio_1rank_over_2ranks": one / two}
        print(
            f"harvest ({args.harvest_tokens:,} tokens): 1 rank x 2 threads {one:.2f} s, 2 ranks x 1 thread {two:.2f} s, "
            f"ratio {one / two:.2f}"
        )
    write_json(args.json, args, results)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2])
    else:
        main()
