"""`saelab analyze` on two ranks writes the analysis that one rank writes, array for array and attribute for
attribute; the rows are split in whole batches; only rank 0 reports."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import zarr

from saelab.analysis import AnalysisConfig, analyze
from saelab.analysis.codes import rank_rows
from saelab.distributed import Ranks
from saelab.run import RunDir
from tests.launch import torchrun, tracebacks

BATCH = 700  # 6000 rows in 9 batches: rank 0 encodes 4 of them, rank 1 the other 5 (the last one short)


class Analyses(NamedTuple):
    """The analysis of the same run by one rank in this process and by two ranks under torchrun."""

    one: Path
    """The analysis store written by `analyze` in this process, on one thread as each torchrun rank has."""
    two: Path
    """The analysis store written by `torchrun --nproc-per-node 2 -m saelab analyze`."""
    launch: subprocess.CompletedProcess[str]
    """The two-rank launch."""


@pytest.fixture(scope="module")
def analyses(trained_run, tmp_path_factory) -> Analyses:
    one, two = (RunDir(shutil.copytree(trained_run, tmp_path_factory.mktemp(name) / "run")) for name in ("r1", "r2"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (path,) = analyze(one.root, AnalysisConfig(batch_size=BATCH, device="cpu"), progress=False)
    finally:
        torch.set_num_threads(threads)
    launch = torchrun("-m", "saelab", "analyze", str(two.root), "--set", f"batch_size={BATCH}", "--set", "device=cpu")
    assert launch.returncode == 0, tracebacks(launch)
    entry = two.saes()[0]
    return Analyses(path, two.analysis(entry.hook, entry.variant), launch)


def _read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Every array of the analysis at `path`, and its attributes."""
    group = zarr.open_group(str(path), mode="r")
    return {name: np.asarray(array[...]) for name, array in group.arrays()}, dict(group.attrs)


@pytest.mark.distributed
def test_two_ranks_write_the_same_analysis_as_one(analyses):
    (one, one_attrs), (two, two_attrs) = (_read(path) for path in analyses[:2])
    assert sorted(one) == sorted(two) and {"quantile_rows", "cooc_ids", "logit_top_ids"} <= set(one)
    for name, a in one.items():
        assert a.dtype == two[name].dtype and np.array_equal(a, two[name]), name
    assert one_attrs == two_attrs
    assert one["count"].sum() > 0 and (one["quantile_rows"] >= 0).any() and (one["cooc_ids"] >= 0).any()


@pytest.mark.distributed
def test_only_rank_0_reports_and_it_says_what_was_gathered(analyses):
    out = analyses.launch.stdout
    assert out.count("wrote ") == 1 and str(analyses.two) in out
    assert "rows encoded on 2 ranks" in out and "codes gathered in" in out


def test_ranks_encode_whole_batches_covering_every_row_once_in_order():
    for n_rows, world in ((6000, 2), (6000, 4), (100, 3), (701, 2)):
        shares = [rank_rows(n_rows, BATCH, Ranks(rank=r, world=world, local_rank=r)) for r in range(world)]
        assert [row for share in shares for row in share] == list(range(n_rows))
        assert all(share.start % BATCH == 0 for share in shares)
    assert rank_rows(6000, BATCH, Ranks(rank=0, world=1, local_rank=0)) == range(6000)
