"""Running a notebook end to end with small sizes, for `test_notebooks.py` and `test_notebook_transcoders.py` (two
files, so that `make test`'s two workers start on notebooks together: see `conftest.LONGEST_FIRST`)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
SMALL = {
    "SAELAB_NB_TOKENS": "20000",
    "SAELAB_NB_TRAIN_TOKENS": "60000",
    # 06's model diff: enough tokens to reach the fine-tuned documents (asyncio's, from about 30k tokens in)
    "SAELAB_NB_DIFF_TOKENS": "50000",
    "SAELAB_NB_DIFF_TRAIN_TOKENS": "100000",
    "SAELAB_NB_FINETUNE_STEPS": "40",
    # 08's induction model: trained until 90% of the repeated half is right (the check every 100 steps finds about
    # 96%), half the steps of the default 98%
    "SAELAB_NB_ACCURACY": "0.9",
}
# The kernel computes on one thread (torch's OpenMP and numba's pool, whose start would reset OpenMP's count): the
# other pytest worker holds the second core, and two threads each on two busy cores wait on each other, ten times
# slower on these small models (measured: 04_circuits' induction model 755 s on two threads, 83 s on one).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}


def run_notebook(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Execute the notebook at `path` in a fresh kernel with `SMALL` sizes on one thread, its run folder under
    `tmp_path`; fail on any cell's error, and unless some code cell printed or showed something."""
    for key, value in {**SMALL, **ONE_THREAD, "SAELAB_NB_RUN": str(tmp_path / "run")}.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
