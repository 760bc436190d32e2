"""`load_dictionary`: a saved folder loads as the kind its `cfg.json` records (a crosscoder as a `CrossCoder`, an SAE
or transcoder as its SAE class), with the same outputs; unknown kinds and missing files are refused naming the fix."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.dictionaries import SAE, CrossCoder, CrossCoderConfig, load_dictionary
from saelab.errors import MissingError, SAELoadError
from tests.dictionaries.helpers import make_sae


def test_each_kind_loads_as_its_class(tmp_path):
    torch.manual_seed(0)
    cc = CrossCoder(CrossCoderConfig(sources=["base/h", "tuned/h"], d_in=8, d_sae=16, k=3, activation="topk"))
    cc.save(tmp_path / "cc")
    sae = make_sae("batchtopk", dtype="float32")
    sae.save(tmp_path / "sae")
    loaded_cc, loaded_sae = load_dictionary(tmp_path / "cc"), load_dictionary(tmp_path / "sae")
    assert isinstance(loaded_cc, CrossCoder) and isinstance(loaded_sae, SAE)
    x, y = torch.randn(5, 2, 8), torch.randn(5, 12)
    assert torch.equal(loaded_cc(x), cc(x))
    assert torch.allclose(loaded_sae(y), sae(y))


def test_unknown_kind_and_missing_files_are_refused(tmp_path):
    with pytest.raises(MissingError, match="has no cfg.json"):
        load_dictionary(tmp_path / "nothing")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "cfg.json").write_text(json.dumps({"kind": "hypercoder"}))
    with pytest.raises(SAELoadError, match="kind 'hypercoder'.*upgrade saelab"):
        load_dictionary(tmp_path / "odd")
    (tmp_path / "odd" / "cfg.json").write_text("[1, 2]")
    with pytest.raises(SAELoadError, match="cannot read"):
        load_dictionary(tmp_path / "odd")
