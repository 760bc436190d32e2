"""Crosscoders on two CPU ranks (torchrun, gloo): `parallel: members` deals a crosscoder and an SAE to the ranks and
trains the weights of one process bit for bit; `parallel: ddp` with a crosscoder is refused naming the fix.

Run as a script (`python test_distributed_crosscoders.py STORE ROOT`) this file is what the ranks run."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from saelab.errors import DistributedError
from saelab.importer import import_arrays
from saelab.run import RunDir
from saelab.toys.model_diff import make_model_diff
from saelab.train import TrainConfig, train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

D, STEPS, BATCH = 16, 30, 128
BASE: dict[str, Any] = dict(
    hooks=["h_a"],
    crosscoders=[{"sources": ["h_a", "h_b"], "arch": "batchtopk"}],
    tokens=STEPS * BATCH,
    batch_size=BATCH,
    eval_rows=512,
    warmup_steps=2,
    checkpoint_every=10 * BATCH,
    log_every=5,
    ce_contexts=0,
    grid={"k": [4], "expansion": [2]},
    sae={"dead_tokens": BATCH},
)


def _config(store: str, run: Path, parallel: str) -> TrainConfig:
    return TrainConfig.model_validate(BASE | {"store": store, "run": str(run), "parallel": parallel})


def main(store: str, root: str) -> None:
    """What each rank runs: the `members` run, then the `ddp` one, whose refusal it writes to `ROOT/ddp.rank<R>`."""
    train(_config(store, Path(root) / "members", "members"), progress=False)
    try:
        train(_config(store, Path(root) / "ddp", "ddp"), progress=False)
    except DistributedError as err:
        (Path(root) / f"ddp.rank{os.environ['RANK']}").write_text(str(err))


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    saes = RunDir(run).saes_dir
    return {p.parent.relative_to(saes).as_posix(): load_file(str(p)) for p in sorted(saes.glob("*/*/*.safetensors"))}


def test_members_train_a_crosscoder_as_one_process_and_ddp_is_refused(tmp_path):
    from tests.launch import torchrun, tracebacks

    x = make_model_diff(d=D).sample(STEPS * BATCH // 2 + 1024, torch.Generator().manual_seed(0)).x.numpy()
    store = str(tmp_path / "diff.zarr")
    import_arrays({"h_a": x[:, 0], "h_b": x[:, 1]}, store, shard_rows=1024, chunk_rows=256, progress=False)
    two = tmp_path / "two"
    two.mkdir()
    env = {"PYTHONPATH": str(Path(__file__).parents[2])}
    done = torchrun(__file__, store, str(two), env=env, timeout=300)
    assert done.returncode == 0, tracebacks(done)
    for rank in (0, 1):
        assert "set parallel: members" in (two / f"ddp.rank{rank}").read_text()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank has: the CPU kernels' summation order depends on the thread count
    try:
        train(_config(store, tmp_path / "one", "members"), progress=False)
    finally:
        torch.set_num_threads(threads)
    a, b = _weights(two / "members"), _weights(tmp_path / "one")
    assert len(a) == 2 and a.keys() == b.keys() and any("crosscoder-batchtopk" in key for key in a)
    differ = [f"{key}/{name}" for key, t in a.items() for name in t if not torch.equal(t[name], b[key][name])]
    assert not differ, f"differ: {differ}"


if __name__ == "__main__":
    main(*sys.argv[1:])
