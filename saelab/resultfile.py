"""JSON result files that commands write into a run: circuits, absorption scores, steering runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar, TypeVar

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


R = TypeVar("R", bound="JsonResult")


class JsonResult:
    """A dataclass result saved as one JSON file (circuits, absorption scores, steering runs).

    A subclass names `what` it is, the `command` that computes one and the `error` its reading raises, and
    builds itself from the parsed JSON in `from_json`."""

    what: ClassVar[str]
    command: ClassVar[str]
    error: ClassVar[type[Exception]]

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any]) -> R:
        """The result from its parsed JSON."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        """The result as written to its file (every field, by default)."""
        return asdict(self)  # pyright: ignore[reportArgumentType]  (subclasses are dataclasses)

    def save(self, path: str | Path) -> Path:
        """Write it as JSON to `path` (creating its folder); returns the path."""
        return write_json(path, self.to_json())

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        """Read a result `save` wrote; `error` naming the fix when the file is missing or not one."""
        return read_json(path, cls.from_json, cls.error, what=cls.what, command=cls.command)
