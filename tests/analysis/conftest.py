"""Fixtures of the analysis tests: a small store of the tiny decoder, and a run with a trained SAE."""

from __future__ import annotations

import shutil

import pytest

from saelab.config import HarvestConfig, TextConfig
from saelab.harvest import harvest
from saelab.run import RunDir


@pytest.fixture(scope="module")
def store(decoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("a") / "acts.zarr"
    return harvest(
        HarvestConfig(
            model="tiny",
            hooks=["blocks.1.hook_resid_post", "blocks.0.attn.hook_z"],
            out=str(out),
            context_length=16,
            batch_size=8,
            max_tokens=3000,
            shard_rows=1024,
            chunk_rows=256,
            text=TextConfig(max_documents=300),
        ),
        model=decoder,
        progress=False,
    )


@pytest.fixture(scope="package")
def trained_run(decoder_dir, tmp_path_factory):
    """A run of the tiny decoder (one `hook_mlp_out` store) with one trained TopK SAE and no analysis yet."""
    from saelab.toys.induction import harvest_and_train
    from saelab.train import Grid

    run = RunDir(tmp_path_factory.mktemp("trained") / "run")
    harvest_and_train(
        HarvestConfig(
            model=decoder_dir,
            hooks=["blocks.0.hook_mlp_out"],
            out=str(run.store),
            context_length=16,
            batch_size=8,
            max_tokens=6000,
            shard_rows=1024,
            chunk_rows=256,
        ),
        run.root,
        tokens=256 * 10,
        batch_size=256,
        eval_rows=1024,
        grid=Grid(k=[4], expansion=[2]),
        progress=False,
    )
    return run.root


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of `trained_run` that a test may write its analysis into."""
    return shutil.copytree(trained_run, tmp_path / "run")
