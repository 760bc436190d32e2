"""Bad input to the CLI, one table: every case ends in one `error: ...` message that names the problem (exit code 2,
no traceback), and loses nothing: every file that existed before is byte-identical after, and nothing is added.

Each row builds its inputs (tiny arrays, configs, a tiny trained run) under the test's folder and returns the
arguments of one `saelab` command, run through the real typer app.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file
from typer.testing import CliRunner

import saelab
from saelab.cli import app
from saelab.run import RunDir
from tests.store.helpers import TINY_TRAINING

ROWS, D = 10, 4


class Inputs:
    """What a row may build on: its own folder, a `memory://` prefix of its own, and session fixtures on demand."""

    def __init__(self, root: Path, request: pytest.FixtureRequest, case: str):
        self.root = root
        self.request = request
        self.memory = f"memory://bad-input-{os.getpid()}-{case}"
        """A `memory://` folder only this row uses (its files are compared too)."""

    @property
    def decoder_dir(self) -> str:
        """The tiny saved decoder of tests/conftest.py."""
        return self.request.getfixturevalue("decoder_dir")

    def path(self, name: str) -> Path:
        return self.root / name

    def write(self, name: str, content: str | bytes) -> str:
        """A file of `content` (its folder created); its path."""
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return str(path)

    def npy(self, name: str, array: np.ndarray) -> str:
        np.save(self.path(name), array, allow_pickle=array.dtype.hasobject)
        return str(self.path(name))

    def truncate(self, path: str, keep: int) -> str:
        Path(path).write_bytes(Path(path).read_bytes()[:keep])
        return path

    def yaml(self, name: str, data: dict[str, Any]) -> str:
        self.path(name).write_text(yaml.safe_dump(data))
        return str(self.path(name))

    def harvest_config(self, **changes: Any) -> str:
        """A harvest config of the tiny decoder, a few hundred tokens of the embedded corpus (`changes` win)."""
        base = dict(
            model=self.decoder_dir,
            hooks=["blocks.0.hook_resid_post"],
            out=str(self.path("acts.zarr")),
            context_length=16,
            batch_size=2,
            max_tokens=64,
            shard_rows=32,
            chunk_rows=16,
        )
        return self.yaml("harvest.yaml", {**base, **changes})

    def store(self, out: str, rows: int = ROWS) -> str:
        """An imported store of random rows at `out` (a path or URL)."""
        x = np.random.default_rng(0).normal(size=(rows, D)).astype(np.float32)
        saelab.import_arrays({"x": x}, out, shard_rows=128, chunk_rows=32, progress=False)
        return out

    def train_config(self, **changes: Any) -> str:
        """A training config of a few steps on a 600-row store inside the run folder (`changes` win)."""
        run = self.path("run")
        if not (run / "activations.zarr").exists():
            self.store(str(RunDir(run).store), rows=600)
        return self.yaml("train.yaml", {"run": str(run), **TINY_TRAINING, **changes})

    def trained_run(self) -> str:
        """A run trained for a few steps (a checkpoint of a TopK SAE of width 2 x 4), and its config file."""
        config = self.train_config()
        saelab.train(saelab.load_config(config, saelab.TrainConfig), progress=False)
        return config


@dataclass(frozen=True)
class Case:
    """One bad input: `args` builds the inputs and returns the command line; `message` must be in the error."""

    id: str
    args: Callable[[Inputs], list[str]]
    message: str
    """A regular expression the error output must match."""


def _thesis(fx: Inputs) -> str:
    (fx.path("mythesis")).mkdir()
    (fx.path("mythesis") / "chapter1.tex").write_text("\\chapter{One}\n")
    return str(fx.path("mythesis"))


def _memory_thesis(fx: Inputs) -> str:
    fs, root = fsspec.core.url_to_fs(fx.memory)
    fs.pipe_file(f"{root}/thesis/chapter1.tex", b"\\chapter{One}\n")
    return f"{fx.memory}/thesis"


def _emb(fx: Inputs) -> str:
    return fx.npy("e.npy", np.ones((ROWS, D), np.float32))


def _nan(fx: Inputs) -> str:
    x = np.ones((ROWS, D), np.float32)
    x[[2, 7], 1] = np.nan
    return fx.npy("nan.npy", x)


def _inf_safetensors(fx: Inputs) -> str:
    x = np.ones((ROWS, D), np.float32)
    x[3, 0] = np.inf
    save_file({"emb": x}, str(fx.path("e.safetensors")))
    return str(fx.path("e.safetensors"))


def _safetensors(fx: Inputs) -> str:
    save_file({"emb": np.ones((ROWS, D), np.float32)}, str(fx.path("e.safetensors")))
    return str(fx.path("e.safetensors"))


def _latin1_text(fx: Inputs) -> str:
    fx.path("corpus.txt").write_bytes("caf\xe9 au lait\n\nna\xefve text\n".encode("latin-1"))
    return str(fx.path("corpus.txt"))


THESIS_REFUSED = r"mythesis is not empty and is not a saelab activation store \(it holds chapter1.tex\)"
TRAIN_ERROR_CASES = [
    Case("train-tokens-0", lambda fx: ["train", fx.train_config(tokens=0)], r"`tokens`"),
    Case("train-batch-size-0", lambda fx: ["train", fx.train_config(batch_size=0)], r"`batch_size`"),
    Case(
        "train-negative-lr",
        lambda fx: ["train", fx.train_config(grid={"arch": ["topk"], "k": [2], "expansion": [2], "lr": [-1e-3]})],
        r"`grid\.lr\.0`",
    ),
    Case("train-tokens-negative", lambda fx: ["train", fx.train_config(tokens=-5)], r"`tokens`"),
    Case(
        "train-resume-into-wider-sae",
        lambda fx: [
            "train",
            fx.trained_run(),
            "--set",
            "grid.expansion=[4]",
        ],
        r"checkpoint .* was made for other SAEs",
    ),
]

CASES = [
    # data loss: a store is never created over what saelab did not write, nor over a store without --overwrite
    Case("import-into-a-folder-of-other-files", lambda fx: ["import", _emb(fx), "--out", _thesis(fx)], THESIS_REFUSED),
    Case(
        "import-overwrite-into-a-folder-of-other-files",
        lambda fx: ["import", _emb(fx), "--out", _thesis(fx), "--overwrite"],
        THESIS_REFUSED,
    ),
    Case(
        "harvest-into-a-folder-of-other-files",
        lambda fx: ["harvest", fx.harvest_config(out=_thesis(fx)), "--quiet"],
        THESIS_REFUSED,
    ),
    Case(
        "harvest-overwrite-into-a-folder-of-other-files",
        lambda fx: ["harvest", fx.harvest_config(out=_thesis(fx)), "--quiet", "--overwrite"],
        THESIS_REFUSED,
    ),
    Case(
        "import-over-a-store",
        lambda fx: ["import", _emb(fx), "--out", fx.store(str(fx.path("s.zarr")))],
        r"s\.zarr already holds an activation store \(10 rows of x\).*--overwrite",
    ),
    Case(
        "import-over-a-memory-store",
        lambda fx: ["import", _emb(fx), "--out", fx.store(f"{fx.memory}/s.zarr")],
        r"already holds an activation store.*--overwrite",
    ),
    Case(
        "import-into-a-memory-folder-of-other-files",
        lambda fx: ["import", _emb(fx), "--out", _memory_thesis(fx)],
        r"thesis is not empty and is not a saelab activation store \(it holds chapter1.tex\)",
    ),
    Case(
        "import-onto-a-file",
        lambda fx: ["import", _emb(fx), "--out", _emb(fx)],
        r"e\.npy is a file, not an activation store",
    ),
    Case(
        "harvest-over-a-store-of-another-config",
        lambda fx: ["harvest", fx.harvest_config(out=fx.store(str(fx.path("s.zarr")))), "--quiet"],
        r"was made with a different config .* never appended to.*--overwrite",
    ),
    # arrays that cannot become a store: nothing is written
    Case("import-strings", lambda fx: ["import", fx.npy("s.npy", np.array([["a", "b"]] * ROWS))], r"holds <U1 values"),
    Case(
        "import-records",
        lambda fx: ["import", fx.npy("r.npy", np.zeros((ROWS, 2), dtype=[("a", "f4"), ("b", "i4")]))],
        r"r\.npy holds .*\('a', '<f4'\).* values, not numbers",
    ),
    Case(
        "import-pickled-objects",
        lambda fx: ["import", fx.npy("o.npy", np.array([[{}, 1]] * ROWS, dtype=object))],
        r"o\.npy holds Python objects \(a pickled object array\), which saelab never loads",
    ),
    Case(
        "import-truncated-npy",
        lambda fx: ["import", fx.truncate(_emb(fx), 150)],
        r"e\.npy is truncated: its header says \(10, 4\) float32",
    ),
    Case("import-zero-columns", lambda fx: ["import", fx.npy("z.npy", np.zeros((ROWS, 0), np.float32))], "no columns"),
    Case("import-zero-rows", lambda fx: ["import", fx.npy("z.npy", np.zeros((0, D), np.float32))], "no rows"),
    Case("import-1d", lambda fx: ["import", fx.npy("v.npy", np.zeros(ROWS, np.float32))], r"must be 2-D"),
    Case(
        "import-not-an-npy",
        lambda fx: ["import", fx.write("fake.npy", "a,b\n1,2\n")],
        r"fake\.npy is not a \.npy file",
    ),
    Case(
        "import-truncated-safetensors",
        lambda fx: ["import", fx.truncate(_safetensors(fx), 100)],
        r"e\.safetensors is not a complete safetensors file",
    ),
    Case(
        "import-nan",
        lambda fx: ["import", _nan(fx)],
        r"array 'nan' from .*nan\.npy has NaN or inf values in 2 of 10 rows; nothing was written\. Drop or fix",
    ),
    Case("import-inf", lambda fx: ["import", _inf_safetensors(fx)], r"'emb' .* NaN or inf values in 1 of 10 rows"),
    Case(
        "import-beyond-float16",
        lambda fx: ["import", fx.npy("big.npy", np.full((ROWS, D), 1e6, np.float32)), "--dtype", "float16"],
        r"values beyond float16's range in 10 of 10 rows.*--dtype float32",
    ),
    Case("import-missing-file", lambda fx: ["import", str(fx.path("none.npy"))], r"no such file: .*none\.npy"),
    Case("import-csv", lambda fx: ["import", fx.write("e.csv", "1,2\n")], r"use a \.npy or \.safetensors file"),
    # configs and overrides
    Case(
        "config-not-utf8",
        lambda fx: ["harvest", fx.write("c.yaml", b"out: caf\xe9\n")],
        r"c\.yaml is not UTF-8 text \(byte 0xe9 on line 1\); save it as UTF-8",
    ),
    Case(
        "set-with-a-yaml-tag",
        lambda fx: ["harvest", fx.harvest_config(), "--set", 'x=!!python/object/apply:os.system ["ls"]'],
        r"uses a YAML tag that saelab refuses",
    ),
    Case(
        "set-with-an-open-bracket",
        lambda fx: ["harvest", fx.harvest_config(), "--set", 'saes["blocks.0=1'],
        r"a `\[` is not closed",
    ),
    Case("config-missing", lambda fx: ["harvest", str(fx.path("none.yaml"))], r"config file not found"),
    Case(
        "harvest-batch-size-0",
        lambda fx: ["harvest", fx.harvest_config(batch_size=0)],
        r"`batch_size`: Input should be greater than 0",
    ),
    # text sources and models
    Case(
        "text-not-utf8",
        lambda fx: ["harvest", fx.harvest_config(text={"source": "files", "path": _latin1_text(fx)}), "-q"],
        r"corpus\.txt is not UTF-8 text .*iconv",
    ),
    Case(
        "text-missing",
        lambda fx: ["harvest", fx.harvest_config(text={"source": "files", "path": str(fx.path("no.txt"))}), "-q"],
        r"text\.path: no such file or folder: .*no\.txt",
    ),
    Case(
        "harvest-unknown-model",
        lambda fx: ["harvest", fx.harvest_config(model="gpt2-smal"), "-q"],
        r"unknown model 'gpt2-smal'.*Closest names: gpt2-small",
    ),
    Case("hooks-unknown-model", lambda fx: ["hooks", "gpt2-smal"], r"unknown model 'gpt2-smal'.*saelab hooks MODEL"),
    Case("hooks-missing-folder", lambda fx: ["hooks", str(fx.path("nowhere"))], r"no model folder .*nowhere"),
    # stores
    Case("info-not-a-store", lambda fx: ["info", _thesis(fx)], r"no activation store at .*mythesis"),
    Case(
        "info-damaged-store",
        lambda fx: ["info", str(Path(fx.write("d.zarr/zarr.json", "{not json")).parent)],
        r"d\.zarr' is not a readable Zarr v3 store",
    ),
    *TRAIN_ERROR_CASES,
]


def _snapshot(root: Path, memory: str) -> dict[str, str]:
    """sha256 of every file under `root` and under the `memory://` folder `memory`."""
    files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    fs, prefix = fsspec.core.url_to_fs(memory)
    files |= {f"memory:{p}": fs.cat_file(p) for p in fs.find(prefix)} if fs.exists(prefix) else {}
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_error_and_loses_nothing(case: Case, tmp_path: Path, request: pytest.FixtureRequest):
    fx = Inputs(tmp_path, request, case.id)
    args = case.args(fx)
    if args[0] == "import" and "--out" not in args:
        args += ["--out", str(fx.path("new.zarr"))]
    before = _snapshot(tmp_path, fx.memory)
    result = CliRunner().invoke(app, args)
    after = _snapshot(tmp_path, fx.memory)
    assert isinstance(result.exception, SystemExit), result.exception  # no exception escaped the CLI
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and "Traceback" not in result.output, result.output
    assert re.search(case.message, result.stderr, flags=re.DOTALL), result.stderr
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == [], "files changed, added or removed"
