"""Harvest on several ranks (torchrun, 2 CPU ranks): the store of one process byte for byte, progress from rank 0
only, and a resume with one rank after a rank is SIGKILLed mid-harvest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import yaml

from saelab.config import HarvestConfig, load_config
from saelab.harvest import harvest
from saelab.store import ActivationStore
from tests.launch import torchrun, tracebacks
from tests.store.helpers import shard_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # two torchrun launches of two ranks: about 30 s

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]
SHARD = 256
ROWS = 3000  # 11 whole shards of 256 rows and a last one of 184; batches of about 124 rows straddle shards
HELPER = str(Path(__file__).with_name("harvest_ranks.py"))


class Runs(NamedTuple):
    """The stores and outputs that every test here reads (one set of torchrun launches for the module)."""

    reference: Path
    """The store one process (no torchrun, one thread as each rank has) writes."""
    two: Path
    """The store `torchrun --nproc-per-node 2 -m saelab harvest` writes, given a `file://` URL."""
    two_stdout: str
    """What that command printed on stdout."""
    two_stderr: str
    """And on stderr (its progress bars)."""
    killed: Path
    """The store two ranks left when rank 1 SIGKILLed itself after writing its second shard."""
    killed_meta: dict
    """That store's `saelab` attribute as the kill left it."""
    killed_returncode: int
    """The exit status of that torchrun."""
    killed_log: dict[int, list[tuple[str, float, float]]]
    """What each rank of that run logged: `(put|reserve, start, end)` of every shard write and array resize."""


def _config(folder: Path, name: str, model: str, *, url: bool = False) -> Path:
    """A harvest config writing `folder/name.zarr`, given as a `file://` fsspec URL when `url` (what a store on an
    object store goes through: the same code, the same bytes)."""
    path = folder / f"{name}.zarr"
    fields = dict(
        model=model,
        hooks=HOOKS,
        out=f"file://{path}" if url else str(path),
        context_length=32,
        batch_size=4,
        max_tokens=ROWS,
        dtype="float32",  # float32 sums depend on their order: the statistics show that rank 0 adds in shard order
        shard_rows=SHARD,
        chunk_rows=128,
    )
    config = folder / f"{name}.yaml"
    config.write_text(yaml.safe_dump(fields))
    return config


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_thread_harvest(config: Path, model) -> ActivationStore:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank runs (OMP_NUM_THREADS=1): the same float bits
    try:
        return harvest(load_config(config, HarvestConfig, []), model=model, progress=False)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(decoder, decoder_dir, tmp_path_factory) -> Runs:
    folder = tmp_path_factory.mktemp("ranks")
    _one_thread_harvest(_config(folder, "reference", decoder_dir), decoder)
    two = torchrun("-m", "saelab", "harvest", str(_config(folder, "two", decoder_dir, url=True)), ranks=2, timeout=240)
    assert two.returncode == 0, tracebacks(two)
    killed = torchrun(HELPER, str(_config(folder, "killed", decoder_dir)), "1", "2", ranks=2, timeout=240)
    meta = json.loads((folder / "killed.zarr" / "zarr.json").read_text())["attributes"]["saelab"]
    log = {r: [_event(line) for line in (folder / f"killed.yaml.rank{r}.log").read_text().splitlines()] for r in (0, 1)}
    return Runs(
        folder / "reference.zarr",
        folder / "two.zarr",
        two.stdout,
        two.stderr,
        folder / "killed.zarr",
        meta,
        killed.returncode,
        log,
    )


def _event(line: str) -> tuple[str, float, float]:
    what, start, end = line.split()
    return what, float(start), float(end)


def test_two_ranks_write_the_store_of_one_process_byte_for_byte_through_an_fsspec_url(runs):
    want, got = _files(runs.reference), _files(runs.two)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []  # every shard, and zarr.json (no timings in it)
    store = ActivationStore.open(str(runs.two))
    assert store.complete and store.n_tokens == ROWS and store.check().damaged == []
    assert len(store.meta["checksums"]["shards"]["tokens"]) == 12


def test_only_rank_0_prints_the_summary_and_progress(runs):
    assert runs.two_stdout.count("rows         3,000 complete") == 1
    # Each bar shows its empty state once, when it starts (later redraws, the last one included, depend on timing).
    assert runs.two_stderr.count("harvest ") >= 1 and runs.two_stderr.count(" 0.00/3.00k") == 1


def test_no_rank_writes_a_shard_while_rank_0_resizes_the_arrays(runs):
    # A resize rewrites each array's `zarr.json` (in place on fsspec stores), which a writing rank reads: another
    # rank's write during one read half a file (seen in CI as a rank dying of a JSONDecodeError).
    reserves = [(a, b) for what, a, b in runs.killed_log[0] if what == "reserve"]
    puts = [(a, b) for rank in (0, 1) for what, a, b in runs.killed_log[rank] if what == "put"]
    assert len(reserves) >= 2 and len(puts) >= 3  # the first round's reserve, and the one after it
    assert [(p, r) for p in puts for r in reserves if p[0] < r[1] and r[0] < p[1]] == []


def test_a_harvest_whose_rank_was_killed_resumes_on_one_rank_to_the_same_store(runs, decoder):
    assert runs.killed_returncode != 0 and not runs.killed_meta["complete"]
    # Rank 1 wrote shards 1 and 3 and died before rank 0 could commit the second round (shards 2 and 3).
    assert runs.killed_meta["rows_complete"] in (0, 2 * SHARD)
    assert shard_file(runs.killed, "tokens", 3).exists()
    assert all(len(t) <= 2 for t in runs.killed_meta["checksums"]["shards"].values())  # shard 3 is not recorded
    store = _one_thread_harvest(runs.killed.with_suffix(".yaml"), decoder)
    assert store.complete and store.n_tokens == ROWS
    want, got = _files(runs.reference), _files(runs.killed)
    assert sorted(got) == sorted(want)
    assert [name for name in want if got[name] != want[name]] == []
