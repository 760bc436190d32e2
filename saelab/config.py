"""YAML configs validated by pydantic, with `key=value` overrides and errors that name the fix.

Validators here never touch the filesystem: a config can be built and checked on any machine, and the function
that runs it checks that its files exist.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from saelab.errors import ConfigError, MissingError
from saelab.run import RunDir

Dtype = Literal["float16", "bfloat16", "float32"]

SET_SYNTAX = (
    "a key is dotted (`text.source`); quote or bracket a part that holds dots itself, as in "
    "`saes[\"blocks.0.attn.hook_z\"]=PATH` or `saes['blocks.0.attn.hook_z']=PATH`"
)


class StrictModel(BaseModel):
    """A config section: unknown keys are refused, values are checked on assignment too.

    `renamed` maps keys of an earlier release to their new names, so that the unknown-key error says which
    key to use instead.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    renamed: ClassVar[dict[str, str]] = {}


class TextConfig(StrictModel):
    """Where text comes from.

    `embedded`: the corpus shipped inside saelab (docstrings of the Python standard library).
    `hf`: a Hugging Face dataset, streamed: `path` is its name, `name` its config, `split` the split.
    `files`: a local `.txt`, `.jsonl` or `.parquet` file, or a folder of them (checked when the text is read).
    """

    source: Literal["embedded", "hf", "files"] = "embedded"
    path: str | None = None
    name: str | None = None
    split: str = Field(default="train", min_length=1)
    text_column: str = Field(default="text", min_length=1)
    txt_sample_by: Literal["line", "paragraph", "document"] = "paragraph"
    max_documents: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _check_path(self) -> TextConfig:
        if self.source != "embedded" and not self.path:
            raise ValueError(f"text.source={self.source!r} needs text.path (a dataset name or a file/folder)")
        return self


MODEL_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


class HarvestConfig(StrictModel):
    """Everything that decides what a harvest writes.

    Where the store goes: `run` (a run directory; the store is its `RunDir.store`) or `out` (a store path or
    fsspec URL of its own); give one.

    Which model: `model` (one; its arrays are named by hook, `blocks.1.hook_resid_post`) or `models` (several, by
    alias, run over the same tokens; their arrays are named `<alias>/<hook>`, `base/blocks.1.hook_resid_post`, row for
    row aligned); give one. Every hook of `hooks` is harvested from every model.
    """

    model: str = Field(default="minilm", min_length=1)
    """The model spec (what `saelab.models.load_model` takes); unused when `models` is given."""
    models: dict[str, str] | None = None
    """Alias -> model spec of each model to harvest over the same tokens; their tokenizers must be the same."""
    hooks: list[str]
    run: str | None = Field(default=None, min_length=1)
    out: str = Field(min_length=1)
    text: TextConfig = TextConfig()
    context_length: int = Field(default=128, gt=0)
    batch_size: int = Field(default=32, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)
    dtype: Dtype = "float16"
    drop_special_tokens: bool = True
    shard_rows: int = Field(default=8192, gt=0)
    chunk_rows: int = Field(default=4096, gt=0)
    compression: Literal["none", "zstd"] = "none"
    device: str = "auto"

    @model_validator(mode="before")
    @classmethod
    def _store_in_run(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("run") is not None:
            if data.get("out") is not None and data["out"] != str(RunDir(data["run"]).store):
                raise ValueError("give `run` (the store goes into the run directory) or `out`, not both")
            data = {**data, "out": str(RunDir(data["run"]).store)}
        return data

    @field_validator("hooks")
    @classmethod
    def _nonempty_hooks(cls, hooks: list[str]) -> list[str]:
        if not hooks:
            raise ValueError("give at least one hook point, e.g. blocks.0.hook_resid_post")
        return hooks

    @model_validator(mode="after")
    def _one_way_to_give_models(self) -> HarvestConfig:
        if self.models is None:
            return self
        if "model" in self.model_fields_set:
            raise ValueError("give `model` (one model) or `models` (aliases -> model specs), not both")
        if not self.models:
            raise ValueError("`models` is empty; give at least one `alias: model spec`, e.g. {base: minilm}")
        bad = [a for a in self.models if not MODEL_ALIAS.match(a)]
        if bad:
            raise ValueError(
                f"model aliases {bad} are not names: start with a letter, then letters, digits, `_` or `-` (they "
                "name the store's arrays, `<alias>/<hook>`)"
            )
        empty = [a for a, spec in self.models.items() if not spec]
        if empty:
            raise ValueError(f"models {empty} have an empty spec; give a model spec such as `minilm` or a folder")
        return self

    @property
    def model_specs(self) -> dict[str, str]:
        """Alias -> spec of every model harvested: `models`, or `{"": model}` for one model (arrays named by hook)."""
        return dict(self.models) if self.models is not None else {"": self.model}

    @model_validator(mode="after")
    def _chunks_divide_shards(self) -> HarvestConfig:
        if self.shard_rows % self.chunk_rows:
            raise ValueError(f"shard_rows ({self.shard_rows}) must be a multiple of chunk_rows ({self.chunk_rows})")
        return self


C = TypeVar("C", bound=BaseModel)

_BARE_PART = re.compile(r"[^.\[\]\"'=]+")


def split_override(item: str) -> tuple[list[str], str]:
    """The key path and the raw value of one `key=value` override.

    Key parts are separated by dots; a part that holds dots (or `=`) is quoted (`"a.b"`, `'a.b'`) or bracketed
    (`["a.b"]`, `['a.b']`, `[a.b]`).
    """
    parts: list[str] = []
    i = 0
    while True:
        if item.startswith("[", i):
            quote = item[i + 1 : i + 2] if item[i + 1 : i + 2] in ("'", '"') else ""
            end = item.find(quote + "]", i + 1 + len(quote))
            if end < 0:
                raise ConfigError(f"override {item!r}: a `[` is not closed by `{quote}]`; {SET_SYNTAX}")
            parts.append(item[i + 1 + len(quote) : end])
            i = end + len(quote) + 1
        elif item[i : i + 1] in ("'", '"'):
            end = item.find(item[i], i + 1)
            if end < 0:
                raise ConfigError(f"override {item!r}: the quote {item[i]} is not closed; {SET_SYNTAX}")
            parts.append(item[i + 1 : end])
            i = end + 1
        elif match := _BARE_PART.match(item, i):
            parts.append(match.group())
            i = match.end()
        elif not parts or "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. --set batch_size=64)")
        else:
            raise ConfigError(f"override {item!r}: no key part at position {i + 1}; {SET_SYNTAX}")
        if item.startswith("=", i):
            return parts, item[i + 1 :]
        if i == len(item):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. --set batch_size=64)")
        if item.startswith(".", i):
            i += 1
        elif not item.startswith("[", i):
            raise ConfigError(f"override {item!r}: unexpected {item[i]!r} at position {i + 1}; {SET_SYNTAX}")


def parse_yaml(text: str, where: str) -> Any:
    """`text` parsed as plain YAML (no tags that build Python objects); `ConfigError` naming `where` otherwise."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        if isinstance(err, yaml.constructor.ConstructorError):
            raise ConfigError(
                f"{where}{at} uses a YAML tag that saelab refuses ({err.problem}): configs hold plain values "
                "only; remove the tag, or quote the value to pass it as text"
            ) from None
        raise ConfigError(
            f"malformed YAML in {where}{at}: {getattr(err, 'problem', None) or err}; fix the syntax there"
        ) from None


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply `a.b=value` overrides (values parsed as YAML) to a nested dict, in place (see `split_override`)."""
    for item in overrides:
        (*parents, leaf), raw = split_override(item)
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = parse_yaml(raw, f"override {item!r}")
    return data


def _section(cls: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    """The config class of the section at `loc` inside `cls`, when it is a model."""
    for part in loc:
        field = cls.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        cls = annotation
    return cls


def format_validation_error(err: ValidationError, what: str, cls: type[BaseModel] | None = None) -> str:
    """One line per problem, naming the key and the fix (and a key's new name, from `cls`'s `renamed`)."""
    lines = [f"invalid {what}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            section = _section(cls, e["loc"][:-1]) if cls is not None else None
            new = getattr(section, "renamed", {}).get(str(e["loc"][-1])) if section is not None else None
            if new:
                lines.append(f"  unknown key `{key}`: it is now called `{new}`; rename it")
            else:
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
        raise ConfigError(format_validation_error(err, what, cls)) from None


def load_config(path: str | Path, cls: type[C], overrides: Sequence[str] = ()) -> C:
    """Read a YAML config file (UTF-8), apply overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise MissingError(f"config file not found: {path}; give the path to a YAML file (see configs/)")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}; check its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {raw[err.start]:#04x} on line {line}); save it as UTF-8"
        ) from None
    data = parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, not a {type(data).__name__}")
    return build(cls, apply_overrides(data, overrides), f"config {path}")
