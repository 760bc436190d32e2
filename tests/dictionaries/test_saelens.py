"""SAELens-format checkpoints: save/load round trips, load errors, and interop with SAELens both ways."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.dictionaries import SAE
from saelab.errors import SaelabError, SAELoadError
from tests.dictionaries.helpers import ARCHS, make_sae


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_roundtrip(arch, tmp_path):
    sae = make_sae(arch, dtype="float32", model_name="gpt2", hook_name="blocks.3.hook_resid_post", context_size=128)
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (
        cfg["architecture"]
        == {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}[arch]
    )
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    loaded = SAE.load(tmp_path)
    assert type(loaded) is type(sae) and loaded.cfg == sae.cfg
    assert loaded.input_scale.item() == 1.0
    x = torch.randn(30, 12) * 2
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    assert sae.input_scale.item() == pytest.approx(1.7)  # saving does not fold the live SAE


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json and sae_weights.safetensors"):
        SAE.load(tmp_path)
    make_sae().save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["metadata"]["saelab_config"]
    cfg["architecture"] = "gated"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'gated' is not supported"):
        SAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text("{not json")
    with pytest.raises(SAELoadError, match=r"cannot load the SAE at .*JSONDecodeError.*saelab or SAELens wrote"):
        SAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg | {"architecture": "topk"}))
    (tmp_path / "sae_weights.safetensors").write_bytes(b"truncated")
    with pytest.raises(SAELoadError, match="SafetensorError"):
        SAE.load(tmp_path)


@pytest.fixture
def sae_lens():
    return pytest.importorskip("sae_lens")


def assert_same_encoding(ours: SAE, theirs, x: torch.Tensor) -> None:
    f = ours.encode(x)
    with torch.no_grad():
        g = theirs.encode(x)
        torch.testing.assert_close(f, g, rtol=1e-5, atol=1e-5)
        assert torch.equal(f != 0, g != 0) and (f != 0).any()
        torch.testing.assert_close(ours.decode(f), theirs.decode(g), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_saelab_checkpoint_loads_in_saelens(arch, tmp_path, sae_lens):
    sae = make_sae(arch, dtype="float32")
    sae.save(tmp_path)
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert theirs.cfg.architecture() == json.loads((tmp_path / "cfg.json").read_text())["architecture"]
    assert_same_encoding(sae, theirs, torch.randn(50, 12) * 2)


def randomise(module, names=("W_enc", "b_enc", "W_dec", "b_dec")) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name in names:
            getattr(module, name).normal_(0, 0.5)


def test_saelens_topk_loads_in_saelab(tmp_path, sae_lens):
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    theirs = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=12, d_sae=48, k=5))  # rescale_acts_by_decoder_norm
    randomise(theirs)  # decoder rows far from unit norm
    theirs.save_inference_model(tmp_path / "inference")
    theirs.save_model(tmp_path / "training")
    x = torch.randn(50, 12)
    for folder in ("inference", "training"):
        ours = SAE.load(tmp_path / folder)
        assert ours.cfg.arch == "topk" and ours.cfg.k == 5
        assert_same_encoding(ours, theirs, x)
        assert_same_encoding(ours, sae_lens.SAE.load_from_disk(tmp_path / folder), x)


def test_saelens_standard_loads_in_saelab(tmp_path, sae_lens):
    from sae_lens import StandardSAE, StandardSAEConfig

    theirs = StandardSAE(StandardSAEConfig(d_in=12, d_sae=48, apply_b_dec_to_input=False))
    randomise(theirs)
    theirs.save_model(tmp_path)
    ours = SAE.load(tmp_path)
    assert ours.cfg.arch == "relu"
    assert_same_encoding(ours, theirs, torch.randn(50, 12))


def test_saelens_jumprelu_loads_in_saelab(tmp_path, sae_lens):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    theirs = JumpReLUSAE(JumpReLUSAEConfig(d_in=12, d_sae=48))
    randomise(theirs)
    with torch.no_grad():
        theirs.threshold.uniform_(0.0, 1.0)
    theirs.save_model(tmp_path)
    ours = SAE.load(tmp_path)
    assert ours.cfg.arch == "jumprelu"
    assert_same_encoding(ours, theirs, torch.randn(50, 12))


def test_saelens_batchtopk_loads_in_saelab(tmp_path, sae_lens):
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    theirs = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=12, d_sae=48, k=5))
    randomise(theirs)
    theirs.topk_threshold.fill_(0.7)
    theirs.save_inference_model(tmp_path)
    ours = SAE.load(tmp_path)
    assert ours.cfg.arch == "batchtopk" and ours.cfg.k == 5
    assert_same_encoding(ours, sae_lens.SAE.load_from_disk(tmp_path), torch.randn(50, 12))


def test_a_folder_without_an_sae_is_a_saelab_error(tmp_path):
    """The CLI prints a `SaelabError` as one line; a missing checkpoint must be one, not a bare `OSError`."""
    with pytest.raises(SaelabError, match=r"needs cfg.json and sae_weights.safetensors .*saelab or SAELens wrote"):
        SAE.load(tmp_path / "nothing here")
