"""Architecture name -> SAE class: `SAE.from_config(cfg)` builds the class registered for `cfg.arch`; `cfg.json`'s
`kind` -> the class of another dictionary kind, which `load_dictionary` dispatches on.

A new architecture is one module that defines its class (with `arch = "name"`) decorated with `@register`, and
its name added to `Arch`, which configs are validated against.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeVar, get_args

from saelab.errors import ConfigError, MissingError, SAELoadError
from saelab.run import SAE_CONFIG

if TYPE_CHECKING:
    import torch

    from saelab.dictionaries.base import SAE
    from saelab.dictionaries.crosscoder import CrossCoder

Arch = Literal["topk", "batchtopk", "jumprelu", "relu", "icfl"]

ARCHITECTURES: dict[str, type[SAE]] = {}
"""Every registered architecture, in registration order."""

S = TypeVar("S", bound="type[SAE]")


def register(cls: S) -> S:
    """Class decorator: make `cls` the class `SAE.from_config` builds for `cls.arch`."""
    if cls.arch not in get_args(Arch):
        raise TypeError(f"{cls.__name__}.arch={cls.arch!r} is not in registry.Arch; add it there")
    if cls.arch in ARCHITECTURES:
        raise TypeError(f"arch {cls.arch!r} is already registered by {ARCHITECTURES[cls.arch].__name__}")
    ARCHITECTURES[cls.arch] = cls
    return cls


def sae_class(arch: str) -> type[SAE]:
    """The class registered for `arch`; `ConfigError` naming the known ones if there is none."""
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise ConfigError(f"no SAE architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}") from None


KINDS: dict[str, type] = {}
"""Dictionary kinds beside the SAE family (whose architectures are `ARCHITECTURES`), by the `kind` their `cfg.json`
records, each a class with `load(path, device)`: `crosscoder` (`saelab.dictionaries.crosscoder.CrossCoder`)."""

K = TypeVar("K", bound=type)


def register_kind(cls: K) -> K:
    """Class decorator: record `cls` in `KINDS` under its class attribute `kind`."""
    kind = getattr(cls, "kind")  # noqa: B009 (`type` declares no `kind` for pyright)
    if kind in KINDS:
        raise TypeError(f"kind {kind!r} is already registered by {KINDS[kind].__name__}")
    KINDS[kind] = cls
    return cls


def load_dictionary(path: str | Path, device: torch.device | str | None = None) -> SAE | CrossCoder:
    """The dictionary saved in the folder `path`, by the `kind` its `cfg.json` records: a kind of `KINDS` (a
    crosscoder) by its class's `load`, anything else (saelab's and SAELens's SAEs and transcoders, which record no
    kind) by `SAE.load`. `MissingError` if the folder has no `cfg.json`; `SAELoadError` naming what is wrong if it
    cannot be read."""
    from saelab.dictionaries.base import SAE  # the SAE family registers itself here

    config = Path(path) / SAE_CONFIG
    if not config.is_file():
        raise MissingError(f"{path} has no {SAE_CONFIG}; give a folder that saelab or SAELens wrote a dictionary to")
    try:
        kind = json.loads(config.read_text()).get("kind")
    except (ValueError, AttributeError) as err:
        raise SAELoadError(
            f"cannot read {config} ({type(err).__name__}: {err}); give a folder that saelab wrote"
        ) from None
    if kind is None:
        return SAE.load(path, device)
    if kind not in KINDS:
        raise SAELoadError(
            f"{config} records kind {kind!r}, which saelab does not know; it loads {', '.join(KINDS)} and SAEs "
            "(no kind); give a folder that saelab wrote, or upgrade saelab"
        )
    return KINDS[kind].load(path, device)
