"""What checking shards against their checksums costs, and which hash and which bytes to check.

    python scripts/bench_store_verify.py [--rows 262144] [--d 384] [--json out.json]

Builds a float16 store `[rows, d]` in shards of 8,192 rows (the harvest default) in a temporary folder and prints
(a) the MB/s of candidate hashes on one shard's rows, (b) one epoch of the shuffled batch iterator with `verify` off
and on (each shard checked on first touch), as seconds and overhead, (c) the alternative of hashing the shard objects
as stored, which needs a second read of every object through the Zarr store, as a fraction of that epoch, and (d)
the MB/s of a full `check()` (`saelab info --verify`). Runs alternate and the best of each is kept (a noisy machine).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable

import numpy as np
import torch
import xxhash
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

import saelab.store.reader
from saelab.importer import import_arrays
from saelab.store import ActivationStore, node_array

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # CPU time: of this process, all its threads
HASHES: dict[str, Callable[[memoryview], object]] = {
    "hashlib.blake2b": lambda b: hashlib.blake2b(b, digest_size=8).digest(),
    "zlib.crc32": zlib.crc32,
    "xxhash.xxh3_64": xxhash.xxh3_64_intdigest,
}


def best_of(repeats: int, fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rows", type=int, default=262_144)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shard_rows = 8192

    x = np.random.default_rng(0).standard_normal((args.rows, args.d)).astype(np.float16)
    shard = np.ascontiguousarray(x[:shard_rows]).data.cast("B")
    hash_mb_s = {k: shard.nbytes / best_of(2 * args.repeats, lambda f=f: f(shard)) / 1e6 for k, f in HASHES.items()}

    folder = tempfile.mkdtemp(prefix="bench_store_verify_")
    try:
        path = f"{folder}/s.zarr"
        import_arrays({"h": x}, path, dtype="float16", shard_rows=shard_rows, chunk_rows=4096, progress=False)

        def epoch(verify: bool) -> None:
            saelab.store.reader._VERIFIED.clear()  # every shard is checked again, as in a new process
            for _ in ActivationStore.open(path, verify=verify).batches("h", args.batch_size, seed=0):
                pass

        def stored_objects() -> None:
            array = node_array(ActivationStore.open(path).group, "activations/h")
            for s in range(-(-args.rows // shard_rows)):
                key = f"{array.path}/{array.metadata.encode_chunk_key((s, 0))}"
                data = sync(array.store.get(key, prototype=default_buffer_prototype()))
                assert data is not None
                xxhash.xxh3_64_intdigest(data.to_bytes())

        checking = [0.0]  # seconds spent inside the checks of an epoch, measured in place (robust to noise)
        verify = ActivationStore._verify

        def timed_verify(self: ActivationStore, *a: object, **kw: object) -> None:
            start = time.perf_counter()
            verify(self, *a, **kw)  # pyright: ignore[reportArgumentType]
            checking[0] += time.perf_counter() - start

        epoch(False)  # warm-up: the page cache holds the store from here on
        runs: dict[str, Callable[[], object]] = {"off": lambda: epoch(False), "on": lambda: epoch(True)}
        runs |= {"stored": stored_objects, "check": lambda: ActivationStore.open(path).check()}
        best = {(k, c): float("inf") for k in runs for c in CLOCKS}
        for _ in range(args.repeats):
            for (name, clock), seconds in best.items():
                best[name, clock] = min(seconds, best_of(1, runs[name], CLOCKS[clock]))
        in_checks = []
        for _ in range(args.repeats):
            checking[0] = 0.0
            ActivationStore._verify = timed_verify  # pyright: ignore[reportAttributeAccessIssue]
            epoch(True)
            ActivationStore._verify = verify
            in_checks.append(checking[0])
    finally:
        shutil.rmtree(folder)

    mb = x.nbytes / 1e6
    result = {
        "rows": args.rows,
        "d": args.d,
        "store_mb": mb,
        "threads": args.threads,
        "hash_mb_per_s": hash_mb_s,
        **{
            f"{clock}_s": {"epoch_verify_off": best["off", clock], "epoch_verify_on": best["on", clock]}
            for clock in CLOCKS
        },
        **{f"verify_overhead_{clock}": best["on", clock] / best["off", clock] - 1 for clock in CLOCKS},
        "seconds_in_checks_per_epoch": min(in_checks),
        "checks_fraction_of_epoch_wall": min(in_checks) / best["off", "wall"],
        "stored_object_hash_fraction_of_epoch_wall": best["stored", "wall"] / best["off", "wall"],
        "check_mb_per_s": mb / best["check", "wall"],
    }
    print(
        f"float16 store [{args.rows:,}, {args.d}] ({mb:,.0f} MB), shards of {shard_rows:,} rows, {args.threads} threads"
    )
    for k, v in hash_mb_s.items():
        print(f"  {k:<16} {v:>9,.0f} MB/s on one shard's rows")
    for clock in CLOCKS:
        off, on = best["off", clock], best["on", clock]
        print(f"  epoch of batches({args.batch_size}), {clock:>4} time: verify off {off:.2f} s, on {on:.2f} s")
        print(f"    verify overhead: {100 * (on / off - 1):+.1f}%")
    print(
        f"  time inside the checks of one epoch: {min(in_checks):.3f} s, "
        f"{100 * result['checks_fraction_of_epoch_wall']:.2f}% of the epoch with verify off (wall)"
    )
    fraction = result["stored_object_hash_fraction_of_epoch_wall"]
    print(f"  reading and hashing the stored shard objects instead: {100 * fraction:.1f}% of an epoch (wall)")
    print(f"  full check (saelab info --verify): {result['check_mb_per_s']:,.0f} MB/s")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
