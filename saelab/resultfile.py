"""JSON result files that commands write into a run: circuits, absorption scores, steering runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as JSON at `path`, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path


def read_json(path: str | Path, build: Callable[[dict], T], error: type[Exception], *, what: str, command: str) -> T:
    """`build` applied to the JSON at `path`. A missing file raises `error` naming the `command` that writes
    one; a file that does not parse or build raises `error` saying to compute it again."""
    path = Path(path)
    if not path.is_file():
        raise error(f"no {what} at {path}; compute one with `{command}`")
    try:
        return build(json.loads(path.read_text()))
    except (ValueError, TypeError, KeyError) as err:
        raise error(f"{path} is not a saelab {what} ({type(err).__name__}: {err}); compute it again") from None
