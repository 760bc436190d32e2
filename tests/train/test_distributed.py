"""Training on two CPU ranks (torchrun, gloo) against one process: `members` weights identical, `ddp` (TopK and
BatchTopK) weights and logged loss curves within a stated tolerance, and a `ddp` run whose rank 1 was SIGKILLed midway
resumed (by one process: the checkpoint is per SAE) to the weights of an uninterrupted run.

One torchrun launch serves every test (each launch costs two Python processes importing torch): it trains every
configuration once, `killed` last, whose rank 1 SIGKILLs itself at step `KILL_AT`, which ends the launch. The same
configurations are trained in this process with one rank for the references. Run as a script (`python
test_distributed.py STORE ROOT NAME...`) this file is what the ranks run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from saelab.importer import import_arrays
from saelab.run import RunDir
from saelab.toys.synthetic import make_synthetic
from saelab.train import TrainConfig, train, trainer
from saelab.train.checkpoint import LATEST

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

D, STEPS, BATCH, KILL_AT, CHECKPOINT = 16, 40, 128, 25, 10
BASE: dict[str, Any] = dict(
    hooks=["h"],
    tokens=STEPS * BATCH,
    batch_size=BATCH,
    eval_rows=512,
    warmup_steps=2,
    checkpoint_every=CHECKPOINT * BATCH,
    log_every=5,
    ce_contexts=0,
    sae={"dead_tokens": BATCH},  # a latent unfired for one step is dead: AuxK and the dead-latent counters take part
)
CONFIGS: dict[str, dict[str, Any]] = {
    "members": BASE | dict(parallel="members", grid={"arch": ["topk"], "k": [2, 4], "expansion": [4], "seed": [0, 1]}),
    "ddp": BASE | dict(parallel="ddp", logger="tensorboard", grid={"arch": ["topk"], "k": [4], "expansion": [4]}),
    "batchtopk": BASE
    | dict(parallel="ddp", logger="tensorboard", grid={"arch": ["batchtopk"], "k": [4], "expansion": [4]}),
}
CONFIGS["killed"] = CONFIGS["ddp"]
REL_TOL = 1e-2
"""Largest relative difference (max |a - b| / max |b| per tensor; per point of a curve) allowed between `ddp` on two
ranks and one process: the ranks sum their shares of each gradient in another order than one process does (float32
rounding, ~1e-7 per step) and 40 Adam steps amplify it where a tensor is near zero. Measured here: TopK weights 4e-7,
loss 2e-7; BatchTopK weights 3.4e-4 (`b_enc`), loss 4e-6."""


def _config(store: str, root: Path, name: str) -> TrainConfig:
    return TrainConfig(store=store, run=str(root / name), **CONFIGS[name])


def _kill_rank_1_at(step: int) -> None:
    """SIGKILL rank 1 of this launch when it reaches training step `step` (between two checkpoints)."""
    schedule = trainer.lr_factor

    def lr_factor(at: int, total: int, **kw: Any) -> float:
        if at == step and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
        return schedule(at, total, **kw)

    trainer.lr_factor = lr_factor


def main(store: str, root: str, *names: str) -> None:
    """What each rank runs: train every configuration `names` (`killed`: SIGKILL rank 1 midway), and write what
    `train` returned on this rank to `ROOT/NAME.rank<R>.json`."""
    for name in names:
        if name == "killed":
            _kill_rank_1_at(KILL_AT)
        results = train(_config(store, Path(root), name), progress=False)
        rows = [r.row() for r in results]
        (Path(root) / f"{name}.rank{os.environ['RANK']}.json").write_text(json.dumps(rows))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Every configuration trained on two ranks (under `ROOT/two/NAME`; `killed` then resumed in this process) and in
    this process (`ROOT/one/NAME`)."""
    from tests.launch import torchrun

    root = tmp_path_factory.mktemp("distributed")
    data = make_synthetic(n_features=64, d=D, mean_active=3.0, n_pairs=4, seed=0)
    x = data.sample(STEPS * BATCH // 2 + 1024, torch.Generator().manual_seed(0)).numpy()
    store = str(root / "syn.zarr")
    import_arrays({"h": x}, store, dtype="float32", shard_rows=1024, chunk_rows=256, progress=False)
    env = {"PYTHONPATH": str(Path(__file__).parents[2])}
    two = root / "two"
    two.mkdir()
    done = torchrun(__file__, store, str(two), "members", "ddp", "batchtopk", "killed", env=env, timeout=300)
    assert done.returncode != 0 and (two / "batchtopk.rank1.json").exists(), done.stdout[-3000:] + done.stderr[-3000:]
    assert not (two / "killed.rank0.json").exists(), "rank 1 was not killed"
    (two / "killed.step").write_text((RunDir(two / "killed").checkpoint / LATEST).read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank has: the CPU kernels' summation order depends on the thread count
    try:
        train(_config(store, two, "killed"), progress=False)
        for name in ("members", "ddp", "batchtopk"):
            train(_config(store, root / "one", name), progress=False)
    finally:
        torch.set_num_threads(threads)
    return root


def _weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    saes = RunDir(run).saes_dir
    return {p.parent.relative_to(saes).as_posix(): load_file(str(p)) for p in sorted(saes.glob("*/*/*.safetensors"))}


def _relative_differences(got: Path, want: Path) -> dict[str, float]:
    a, b = _weights(got), _weights(want)
    assert a.keys() == b.keys() and a, f"{sorted(a)} against {sorted(b)}"
    return {
        f"{sae}/{name}": float((t - b[sae][name]).abs().max() / b[sae][name].abs().max().clamp_min(1e-30))
        for sae, tensors in a.items()
        for name, t in tensors.items()
    }


def _curve(run: Path, metric: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(RunDir(run).saes_dir / "tensorboard"))
    events.Reload()
    (tag,) = [t for t in events.Tags()["scalars"] if t.endswith(f"/{metric}")]
    return [(e.step, e.value) for e in events.Scalars(tag)]


def test_members_on_two_ranks_train_the_weights_of_one_process_bit_for_bit(runs):
    a, b = _weights(runs / "two" / "members"), _weights(runs / "one" / "members")
    assert len(a) == 4 and a.keys() == b.keys()  # k x seed: seeds are tied to the SAE, not to the rank training it
    differ = [f"{sae}/{k}" for sae, t in a.items() for k in t if not torch.equal(t[k], b[sae][k])]
    assert not differ, f"differ: {differ}"


def test_every_rank_returns_every_result_and_rank_0_wrote_the_shared_files(runs):
    two, one = runs / "two", runs / "one"
    rows = [json.loads((two / f"members.rank{r}.json").read_text()) for r in (0, 1)]
    assert rows[0] == rows[1] and [(r["k"], r["seed"]) for r in rows[0]] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    for run in ("members", "ddp"):
        assert RunDir(two / run).train_config.read_text() == RunDir(one / run).train_config.read_text()
    metrics = sorted(p.parent.name for p in RunDir(two / "members").saes_dir.glob("h/*/metrics.json"))
    assert metrics == sorted(p.parent.name for p in RunDir(one / "members").saes_dir.glob("h/*/metrics.json"))


@pytest.mark.parametrize("name", ["ddp", "batchtopk"])
def test_ddp_weights_and_loss_curve_match_one_process(runs, name):
    differences = _relative_differences(runs / "two" / name, runs / "one" / name)
    assert max(differences.values()) < REL_TOL, differences
    for metric in ("loss", "l0", "dead_frac"):
        got, want = _curve(runs / "two" / name, metric), _curve(runs / "one" / name, metric)
        assert [s for s, _ in got] == [s for s, _ in want] == [BATCH * s for s in range(5, STEPS + 1, 5)]
        worst = max(abs(g - w) / max(abs(w), 1e-6) for (_, g), (_, w) in zip(got, want, strict=True))
        assert worst < REL_TOL, f"{metric}: {got} against {want}"
    assert max(v for _, v in _curve(runs / "one" / name, "dead_frac")) > 0  # the dead-latent counters took part


def test_a_rank_sigkilled_midway_resumes_to_the_weights_of_an_uninterrupted_run(runs):
    latest = json.loads((runs / "two" / "killed.step").read_text())
    assert latest["step"] == KILL_AT // CHECKPOINT * CHECKPOINT  # killed between checkpoints, after the last one
    # Resumed by one process from the two ranks' checkpoint (the state is per SAE, the same for any rank count), so
    # within the `ddp` tolerance of an uninterrupted run.
    differences = _relative_differences(runs / "two" / "killed", runs / "one" / "ddp")
    assert max(differences.values()) < REL_TOL, differences


if __name__ == "__main__":
    main(*sys.argv[1:])
