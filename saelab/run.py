"""`RunDir`: the run-directory contract of DESIGN.md, and the only code that knows its folder and file names.

```
RUN/
  activations.zarr/                      the activation store (`saelab harvest`, `saelab import`)
  saes/<hook>/<variant>/                 a dictionary: cfg.json, sae_weights.safetensors, metrics.json
  saes/checkpoint/  saes/train_config.json   training state (resume) and the config that made it
  results.csv  pareto.html               a sweep's table and Pareto plot
  results_by_config.csv                  its configs across seeds: means and t-intervals (`saelab.evals.intervals`)
  analysis/<hook>/<variant>.zarr         feature panels (`saelab analyze`); analysis/vocab.json
  absorption/<hook>/<variant>.json       absorption scores
  circuits/<name>.json                   sparse feature circuits
  graphs/<name>.json                     attribution graphs over transcoders (`saelab graph`)
  steering/<name>.json                   steering runs
  model_diff/<hook>/<variant>.json       a crosscoder's shared / exclusive latents (`saelab diff`)
  evals/<hook>/<variant>/<eval>.json     a dictionary's eval results (`saelab eval`: sparse probing, hedging)
```

Later analyses (evals, feature families, attention heads) add their folders here. Library, CLI and app build
every path through a `RunDir`; the names a request gives (hook, variant, result
name) are checked to be single path components, so no request reaches outside the run.

Every path a run records is recorded so that the run can be moved or copied and still find what it names: a path
inside the run relative to the run folder (`RunDir.relative`, opened again with `RunDir.resolve`), a path a store
records (its model folder, its text file) from the store's own folder (`store_relative`, `store_resolve`); paths
outside are recorded absolute, and fsspec URLs (`memory://`, `s3://`) as given.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from saelab.errors import OverwriteError, RunError

STORE = "activations.zarr"
SAES = "saes"
CHECKPOINT = "checkpoint"
TRAIN_CONFIG = "train_config.json"
SAE_CONFIG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
SAE_METRICS = "metrics.json"
SWEEP_TABLE = "results.csv"
SWEEP_PLOT = "pareto.html"
SWEEP_BY_CONFIG = "results_by_config.csv"
ANALYSIS = "analysis"
VOCAB = "vocab.json"
ABSORPTION = "absorption"
CIRCUITS = "circuits"
STEERING = "steering"
MODEL_DIFF = "model_diff"
HEADS = "heads"
EVALS = "evals"
GRAPHS = "graphs"
# Entries that make a folder a saelab run: it may be written into even when it is not empty.
RUN_ENTRIES = (STORE, SAES, ANALYSIS, ABSORPTION, CIRCUITS, STEERING, MODEL_DIFF, HEADS, EVALS, GRAPHS)
MAX_NAME = 200  # longest hook, variant or result name accepted, in UTF-8 bytes (file systems allow 255)


class SaeEntry(NamedTuple):
    """One dictionary of a run, as `RunDir.saes()` finds it."""

    hook: str
    """The hook point it reads (its folder under `saes/`)."""
    variant: str
    """Its variant name (architecture, k, width, learning rate), the folder under the hook's."""
    path: Path
    """Its folder, holding `cfg.json` and `sae_weights.safetensors`."""


class ResultEntry(NamedTuple):
    """A per-dictionary result file of a run (today: absorption scores)."""

    hook: str
    """The hook point of the dictionary the result is about."""
    variant: str
    """The dictionary's variant name."""
    path: Path
    """The result file."""


def check_name(name: str | None, what: str) -> str:
    """`name` if it is one path component a run may hold; `RunError` naming the problem otherwise."""
    if not isinstance(name, str) or not name:
        raise RunError(f"no {what} given; name one")
    if len(name.encode()) > MAX_NAME:
        raise RunError(
            f"the {what} {name[:40]!r}... is {len(name)} characters long ({len(name.encode())} bytes in UTF-8); "
            f"names have at most {MAX_NAME} bytes"
        )
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise RunError(f"the {what} {name!r} is not a plain name (no '/', '\\', '.' or '..'); give the name alone")
    return name


def is_url(path: str | Path) -> bool:
    """Whether `path` is an fsspec URL (`memory://x`, `s3://bucket/x`) rather than a local path."""
    return "://" in str(path)


def absolute_path(path: str | Path) -> str:
    """`path` as a record that belongs to no run keeps it: absolute (a relative one is taken from the working
    directory); URLs as given."""
    return str(path) if is_url(path) else str(Path(path).resolve())


def is_local(spec: str) -> bool:
    """Whether a store, model or text spec names an existing local file or folder (not a URL or a name)."""
    return not is_url(spec) and Path(spec).exists()


def store_relative(path: str | Path, *, store: str | Path) -> str:
    """`path`, a local file or folder, as the store at `store` records it: from the store's own folder (`../model`,
    POSIX separators) when it lies in the folder that holds the store (the run directory, for a run's store), so that
    folder can move; absolute when it lies elsewhere, or the store is at a URL. A relative `path` or `store` is taken
    from the working directory."""
    absolute = Path(path).resolve()
    holder = None if is_url(store) else Path(store).resolve().parent
    if holder is None or not absolute.is_relative_to(holder):
        return str(absolute)
    return PurePosixPath("..", absolute.relative_to(holder).as_posix()).as_posix()


def store_resolve(recorded: str, *, store: str | Path) -> str:
    """A path that the store at `store` recorded, to open from here: one from the store's folder (`..`, `../...`,
    what `store_relative` writes) is joined to the store wherever it now is; names (`minilm`, `gpt2`), absolute
    paths and URLs are returned as they are."""
    if is_url(store) or not (recorded == ".." or recorded.startswith("../")):
        return recorded
    return os.path.normpath(Path(store) / recorded)


def array_folder(array: str) -> str:
    """The folder under `RUN/saes/` (and `analysis/`, `model_diff/`, ...) of the dictionaries that read the store's
    array `array` (a crosscoder's: its first source): the array's name with a model alias's `/` written `__`
    (`tuned/blocks.3.hook_mlp_out` -> `tuned__blocks.3.hook_mlp_out`), since a run's folder names are plain names."""
    return array.replace("/", "__")


def saved_kind(folder: str | Path) -> str:
    """The kind of dictionary saved in `folder`, as its `cfg.json` records it (`crosscoder`), `sae` for the SAE
    family (whose configs record none), or `""` when the file is missing or is not a JSON object."""
    try:
        config = json.loads((Path(folder) / SAE_CONFIG).read_text())
    except (OSError, ValueError):
        return ""
    return str(config.get("kind") or "sae") if isinstance(config, dict) else ""


class RunDir:
    """One experiment's folder: every path inside it, SAE and result discovery, and the write guard."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        """The run folder."""
        self.store = self.root / STORE
        """The activation store."""
        self.saes_dir = self.root / SAES
        """The dictionaries and the training state."""
        self.checkpoint = self.saes_dir / CHECKPOINT
        """Training checkpoints, for resuming."""
        self.train_config = self.saes_dir / TRAIN_CONFIG
        """The training config the run's dictionaries were made with."""
        self.sweep_table = self.root / SWEEP_TABLE
        """A sweep's results table; `sweep_plot` is its Pareto plot (FVU against L0)."""
        self.sweep_plot = self.root / SWEEP_PLOT
        self.sweep_by_config = self.root / SWEEP_BY_CONFIG
        """One row per config of the sweep (every setting but the seed): each metric's mean and t-interval over the
        seeds (`saelab.evals.intervals.write_by_config`)."""
        self.analysis_dir = self.root / ANALYSIS
        """Feature analyses; `vocab` holds the display strings of the run model's tokens."""
        self.vocab = self.analysis_dir / VOCAB

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def __fspath__(self) -> str:
        return str(self.root)

    def relative(self, path: str | Path) -> str:
        """`path` as a result of the run records it: relative to the run folder (POSIX separators) when it lies
        inside it, absolute otherwise, so a moved run still finds both; URLs as given. A relative `path` is taken
        from the working directory, as every path a caller passes is."""
        if is_url(path):
            return str(path)
        absolute, root = Path(path).resolve(), self.root.resolve()
        return absolute.relative_to(root).as_posix() if absolute.is_relative_to(root) else str(absolute)

    def resolve(self, recorded: str) -> str:
        """A path that the run recorded (`relative`), to open from here: a relative one is joined to the run folder
        wherever the run now is; absolute paths and URLs are returned as they are."""
        if is_url(recorded) or Path(recorded).is_absolute():
            return recorded
        return str(self.root / recorded)

    def sae(self, hook: str, variant: str) -> Path:
        """The folder of dictionary `hook`/`variant` (it need not exist yet)."""
        return self.saes_dir / check_name(hook, "hook point") / check_name(variant, "SAE variant")

    def sae_metrics(self, hook: str, variant: str) -> Path:
        """The held-out metrics of dictionary `hook`/`variant`."""
        return self.sae(hook, variant) / SAE_METRICS

    def saes(self) -> list[SaeEntry]:
        """Every dictionary of the run (a folder `saes/<hook>/<variant>/` with a `cfg.json`), sorted."""
        found = sorted(p.parent for p in self.saes_dir.glob(f"*/*/{SAE_CONFIG}") if p.parent.parent.name != CHECKPOINT)
        return [SaeEntry(f.parent.name, f.name, f) for f in found]

    def find_sae(self, hook: str | None, variant: str | None) -> SaeEntry:
        """The dictionary `hook`/`variant`; `RunError` naming the ones the run has when it is not there."""
        path = self.sae(check_name(hook, "hook point"), check_name(variant, "SAE variant"))
        if (path / SAE_CONFIG).is_file():
            return SaeEntry(path.parent.name, path.name, path)
        known = ", ".join(f"{s.hook}/{s.variant}" for s in self.saes()) or "none"
        raise RunError(f"the run {self.root} has no SAE {hook}/{variant}; it has: {known}")

    # ------------------------------------------------------------------------------------------ results
    def analysis(self, hook: str, variant: str) -> Path:
        """The feature analysis (a Zarr group) of dictionary `hook`/`variant`."""
        return self.analysis_dir / check_name(hook, "hook point") / f"{check_name(variant, 'SAE variant')}.zarr"

    def absorption(self, hook: str, variant: str) -> Path:
        """The absorption scores of dictionary `hook`/`variant`."""
        return self._per_sae(ABSORPTION, hook, variant)

    def absorption_results(self) -> list[ResultEntry]:
        """Every absorption result of the run, sorted by hook and variant."""
        return self._per_sae_results(ABSORPTION)

    def model_diff(self, hook: str, variant: str) -> Path:
        """The model diff (shared and exclusive latents) of crosscoder `hook`/`variant`."""
        return self._per_sae(MODEL_DIFF, hook, variant)

    def model_diffs(self) -> list[ResultEntry]:
        """Every model diff of the run, sorted by hook and variant."""
        return self._per_sae_results(MODEL_DIFF)

    def eval_result(self, hook: str, variant: str, name: str) -> Path:
        """Eval `name`'s result (`sparse_probing`, `hedging`) for dictionary `hook`/`variant`."""
        folder = self.root / EVALS / check_name(hook, "hook point") / check_name(variant, "SAE variant")
        return folder / f"{check_name(name, 'eval name')}.json"

    def eval_results(self, hook: str, variant: str) -> list[str]:
        """The names of the evals with a result for dictionary `hook`/`variant`, sorted."""
        folder = self.root / EVALS / check_name(hook, "hook point") / check_name(variant, "SAE variant")
        return sorted(p.stem for p in folder.glob("*.json"))

    def circuit(self, name: str) -> Path:
        """Circuit `name`."""
        return self._named(CIRCUITS, name, "circuit name")

    def circuits(self) -> list[str]:
        """The names of the run's circuits, sorted."""
        return self._names(CIRCUITS)

    def graph(self, name: str) -> Path:
        """Attribution graph `name`."""
        return self._named(GRAPHS, name, "graph name")

    def graphs(self) -> list[str]:
        """The names of the run's attribution graphs, sorted."""
        return self._names(GRAPHS)

    def steering(self, name: str) -> Path:
        """Steering run `name`."""
        return self._named(STEERING, name, "steering run name")

    def steering_runs(self) -> list[str]:
        """The names of the run's steering runs, sorted."""
        return self._names(STEERING)

    def heads(self, name: str) -> Path:
        """Attention-head result `name` (composition scores, direct feature attribution)."""
        return self._named(HEADS, name, "heads result name")

    def _per_sae(self, folder: str, hook: str, variant: str) -> Path:
        return self.root / folder / check_name(hook, "hook point") / f"{check_name(variant, 'SAE variant')}.json"

    def _per_sae_results(self, folder: str) -> list[ResultEntry]:
        return [ResultEntry(p.parent.name, p.stem, p) for p in sorted((self.root / folder).glob("*/*.json"))]

    def _named(self, folder: str, name: str, what: str) -> Path:
        return self.root / folder / f"{check_name(name, what)}.json"

    def _names(self, folder: str) -> list[str]:
        return sorted(p.stem for p in (self.root / folder).glob("*.json"))

    # -------------------------------------------------------------------------------------------- guard
    def is_run(self) -> bool:
        """Whether the folder holds anything a saelab stage writes."""
        return any((self.root / name).exists() for name in RUN_ENTRIES)

    def prepare(self) -> RunDir:
        """Create the folder, or check that an existing one may be written into: a folder that is not empty
        and holds nothing saelab writes is someone else's, and is refused (`OverwriteError`)."""
        if self.root.exists() and not self.root.is_dir():
            raise OverwriteError(f"{self.root} is a file, not a run directory; choose another `run` folder")
        if self.root.is_dir() and not self.is_run():
            held = sorted(p.name for p in self.root.iterdir())
            if held:
                shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
                raise OverwriteError(
                    f"{self.root} is not empty and is not a saelab run directory (it holds {shown}); "
                    "choose a new or empty folder for the run"
                )
        self.root.mkdir(parents=True, exist_ok=True)
        return self
