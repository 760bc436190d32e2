"""The architecture registry: every `Arch` has a class, `SAE.from_config` builds it, and a new class registers."""

from __future__ import annotations

from typing import get_args

import pytest

from saelab.dictionaries import ARCHITECTURES, SAE, Arch, SAEConfig, register, sae_class
from saelab.errors import ConfigError


def test_every_arch_has_its_class():
    assert set(ARCHITECTURES) == set(get_args(Arch))
    for arch, cls in ARCHITECTURES.items():
        assert cls.arch == arch and sae_class(arch) is cls
        fields = {"arch": arch, "d_in": 4, "d_sae": 8, "k": 2} | ({"icfl_block": 2} if arch == "icfl" else {})
        assert type(SAE.from_config(SAEConfig.model_validate(fields))) is cls


def test_unknown_or_duplicate_registrations_are_refused():
    with pytest.raises(ConfigError, match="no SAE architecture 'gated'; choose one of"):
        sae_class("gated")
    with pytest.raises(TypeError, match="'gated' is not in registry.Arch"):
        register(type("GatedSAE", (SAE,), {"arch": "gated"}))
    with pytest.raises(TypeError, match="'topk' is already registered by TopKSAE"):
        register(type("OtherTopK", (SAE,), {"arch": "topk"}))
