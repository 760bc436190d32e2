"""What checking shards against their checksums costs, and which hash and which bytes to check.

    python scripts/bench_store_verify.py [--rows 262144] [--d 384] [--json out.json]

Builds a float16 store `[rows, d]` in shards of 8,192 rows (the harvest default) in a temporary folder and prints
(a) the MB/s of candidate hashes on one shard's rows, (b) one epoch of the shuffled batch iterator with `verify` off
and on (every shard checked on first touch), and the seconds spent inside those checks, measured in place (the
figure that the machine's load does not blur), (c) the alternative of hashing the shard objects as stored, which
needs a second read of every object through the Zarr store, and (d) the MB/s of a full `check()` (`saelab info
--verify`). Runs alternate and the median of each is kept.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable

import numpy as np
import torch
import xxhash
from _bench import load_note, parser, time_round_robin, write_json  # scripts/ is on the path when run as a script
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

import saelab.store.reader
from saelab.importer import import_arrays
from saelab.store import ActivationStore, node_array

SHARD_ROWS = 8192
HASHES: dict[str, Callable[[memoryview], object]] = {
    "hashlib.blake2b": lambda b: hashlib.blake2b(b, digest_size=8).digest(),
    "zlib.crc32": zlib.crc32,
    "xxhash.xxh3_64": xxhash.xxh3_64_intdigest,
}


def main() -> None:
    args = parser(__doc__, rows=262_144, d=384, batch_size=4096, repeats=5, threads=2).parse_args()
    torch.set_num_threads(args.threads)
    x = np.random.default_rng(0).standard_normal((args.rows, args.d)).astype(np.float16)
    shard = np.ascontiguousarray(x[:SHARD_ROWS]).data.cast("B")
    hashes = {k: (lambda f=f: f(shard)) for k, f in HASHES.items()}
    hash_mb_s = {k: shard.nbytes / s / 1e6 for k, s in time_round_robin(hashes, 1, 2 * args.repeats).items()}

    folder = tempfile.mkdtemp(prefix="bench_store_verify_")
    try:
        path = f"{folder}/s.zarr"
        import_arrays({"h": x}, path, dtype="float16", shard_rows=SHARD_ROWS, chunk_rows=4096, progress=False)
        checking = [0.0]  # seconds spent inside the checks, summed over the epochs with verify on
        verify = ActivationStore._verify

        def timed_verify(self: ActivationStore, *a: object, **kw: object) -> None:
            start = time.perf_counter()
            verify(self, *a, **kw)  # pyright: ignore[reportArgumentType]
            checking[0] += time.perf_counter() - start

        def epoch(on: bool) -> None:
            saelab.store.reader._VERIFIED.clear()  # every shard is checked again, as in a new process
            for _ in ActivationStore.open(path, verify=on).batches("h", args.batch_size, seed=0):
                pass

        def stored_objects() -> None:
            array = node_array(ActivationStore.open(path).group, "activations/h")
            for s in range(-(-args.rows // SHARD_ROWS)):
                key = f"{array.path}/{array.metadata.encode_chunk_key((s, 0))}"
                data = sync(array.store.get(key, prototype=default_buffer_prototype()))
                assert data is not None
                xxhash.xxh3_64_intdigest(data.to_bytes())

        def full_check() -> None:
            ActivationStore.open(path).check()

        ActivationStore._verify = timed_verify  # pyright: ignore[reportAttributeAccessIssue]
        seconds = time_round_robin(
            {
                "epoch_verify_off": lambda: epoch(False),
                "epoch_verify_on": lambda: epoch(True),
                "stored_objects_read_and_hashed": stored_objects,
                "full_check": full_check,
            },
            warmup=1,
            repeats=args.repeats,
        )
        in_checks = checking[0] / (args.repeats + 1)
    finally:
        shutil.rmtree(folder)

    mb = x.nbytes / 1e6
    off = seconds["epoch_verify_off"]
    results = {
        "store_mb": mb,
        "hash_mb_per_s": hash_mb_s,
        "seconds": seconds,
        "seconds_in_checks_per_epoch": in_checks,
        "checks_fraction_of_epoch": in_checks / off,
        "stored_objects_fraction_of_epoch": seconds["stored_objects_read_and_hashed"] / off,
        "full_check_mb_per_s": mb / seconds["full_check"],
    }
    print(f"float16 store [{args.rows:,}, {args.d}] ({mb:,.0f} MB), shards of {SHARD_ROWS:,} rows; {load_note()}")
    for k, v in hash_mb_s.items():
        print(f"  {k:<16} {v:>9,.0f} MB/s on one shard's rows")
    print(f"  epoch of batches({args.batch_size}): verify off {off:.2f} s, on {seconds['epoch_verify_on']:.2f} s")
    print(f"  inside the checks: {in_checks:.3f} s per epoch, {100 * results['checks_fraction_of_epoch']:.2f}% of it")
    print(
        "  reading and hashing the stored shard objects instead: "
        f"{100 * results['stored_objects_fraction_of_epoch']:.1f}% of an epoch"
    )
    print(f"  full check (saelab info --verify): {results['full_check_mb_per_s']:,.0f} MB/s")
    write_json(args.json, args, results)


if __name__ == "__main__":
    main()
