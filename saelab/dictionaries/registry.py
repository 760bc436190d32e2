"""Architecture name -> SAE class: `SAE.from_config(cfg)` builds the class registered for `cfg.arch`.

A new architecture is one module that defines its class (with `arch = "name"`) decorated with `@register`, and
its name added to `Arch`, which configs are validated against.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, TypeVar, get_args

from saelab.errors import ConfigError

if TYPE_CHECKING:
    from saelab.dictionaries.base import SAE

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
