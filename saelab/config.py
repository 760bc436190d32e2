"""YAML configs validated by pydantic, with `key=value` overrides and errors that name the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from saelab.errors import ConfigError

Dtype = Literal["float16", "bfloat16", "float32"]


class StrictModel(BaseModel):
    """A config section: unknown keys are refused, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TextConfig(StrictModel):
    """Where text comes from.

    `embedded`: the corpus shipped inside saelab (docstrings of the Python standard library).
    `hf`: a Hugging Face dataset, streamed: `path` is its name, `name` its config, `split` the split.
    `files`: a local `.txt`, `.jsonl` or `.parquet` file, or a folder of them.
    """

    source: Literal["embedded", "hf", "files"] = "embedded"
    path: str | None = None
    name: str | None = None
    split: str = "train"
    text_column: str = "text"
    txt_sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    max_documents: int | None = None

    @model_validator(mode="after")
    def _check_path(self) -> TextConfig:
        if self.source != "embedded" and not self.path:
            raise ValueError(f"text.source={self.source!r} needs text.path (a dataset name or a file/folder)")
        if self.source == "files" and not Path(self.path).exists():
            raise ValueError(
                f"text.path: no such file or folder: {self.path!r}; give an existing .txt/.jsonl/.parquet file or folder"
            )
        return self


class HarvestConfig(StrictModel):
    """Everything that decides what a harvest writes."""

    model: str = "minilm"
    hooks: list[str]
    out: str
    text: TextConfig = TextConfig()
    context_length: int = 128
    batch_size: int = 32
    max_tokens: int | None = None
    dtype: Dtype = "float16"
    drop_special_tokens: bool = True
    shard_rows: int = 8192
    chunk_rows: int = 4096
    compression: Literal["none", "zstd"] = "none"
    device: str = "auto"

    @field_validator("hooks")
    @classmethod
    def _nonempty_hooks(cls, hooks: list[str]) -> list[str]:
        if not hooks:
            raise ValueError("give at least one hook point, e.g. blocks.0.hook_resid_post")
        return hooks

    @field_validator("context_length", "batch_size", "shard_rows", "chunk_rows")
    @classmethod
    def _positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be a positive integer")
        return value

    @model_validator(mode="after")
    def _chunks_divide_shards(self) -> HarvestConfig:
        if self.shard_rows % self.chunk_rows:
            raise ValueError(f"shard_rows ({self.shard_rows}) must be a multiple of chunk_rows ({self.chunk_rows})")
        return self


C = TypeVar("C", bound=BaseModel)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. --set batch_size=64)")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = yaml.safe_load(raw)
    return data


def format_validation_error(err: ValidationError, what: str) -> str:
    """One line per problem, naming the key and the fix."""
    lines = [f"invalid {what}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  unknown key `{key}`; remove it or check its spelling")
        elif e["type"] == "missing":
            lines.append(f"  missing key `{key}`; add it")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"  `{key}`: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def build(cls: type[C], data: dict[str, Any], what: str) -> C:
    """Validate a dict into a config, turning pydantic errors into a ConfigError."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, what)) from None


def load_config(path: str | Path, cls: type[C], overrides: list[str] = ()) -> C:
    """Read a YAML config file, apply overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; give the path to a YAML file (see configs/)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"malformed YAML in {path}{where}: {getattr(err, 'problem', err)}; fix the syntax there"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, not a {type(data).__name__}")
    return build(cls, apply_overrides(data, list(overrides)), f"config {path}")
