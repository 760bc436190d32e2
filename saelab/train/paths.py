"""How a run records a path, so that a run directory can be moved or copied and still find what it names.

A path inside the run is recorded relative to the run folder (POSIX separators); a path outside it (a store kept
elsewhere, an SAE of another run) is recorded absolute, so a moved run still finds it; an fsspec URL
(`memory://`, `s3://`) is recorded as given. `resolve_recorded` turns a recorded path back into one to open.
"""

from __future__ import annotations

from pathlib import Path

from saelab.run import RunDir


def is_url(path: str | Path) -> bool:
    """Whether `path` is an fsspec URL (`memory://x`, `s3://bucket/x`) rather than a local path."""
    return "://" in str(path)


def recorded_path(path: str | Path, *, run: RunDir | None) -> str:
    """`path` as a result of `run` records it: relative to the run folder when it lies inside it, absolute
    otherwise (`run` `None`: the result belongs to no run); URLs as given.

    A relative `path` is taken from the current working directory, as every path a caller passes is."""
    if is_url(path):
        return str(path)
    absolute = Path(path).resolve()
    if run is not None:
        root = run.root.resolve()
        if absolute.is_relative_to(root):
            return absolute.relative_to(root).as_posix() or "."
    return str(absolute)


def resolve_recorded(recorded: str, *, run: RunDir) -> str:
    """A path that `run` recorded, to open from here: a relative one is joined to the run folder wherever the run
    now is; absolute paths and URLs are returned as they are."""
    if is_url(recorded) or Path(recorded).is_absolute():
        return recorded
    return str(run.root / recorded)
