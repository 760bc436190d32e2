"""Transcoders and skip transcoders: SAELens checkpoints both ways, the scales folded on save, the sparse kernels
against dense autograd, the configs and hook pairs refused, and training from a store through the trainer."""

from __future__ import annotations

import json

import pytest
import torch

from saelab.config import build
from saelab.dictionaries import SAE, SAEConfig
from saelab.dictionaries.transcoder import aligned_rows, mlp_layer, transcoder_metrics
from saelab.errors import ConfigError, StoreError
from saelab.train import TrainConfig, train

D_IN, D_OUT = 12, 7


def make_transcoder(arch: str = "topk", *, skip: bool = False, dtype: str = "float32", seed: int = 0, **kw) -> SAE:
    """A transcoder with non-trivial biases, thresholds, skip and input and target scales."""
    torch.manual_seed(seed)
    fields = {"arch": arch, "d_in": D_IN, "d_sae": 48, "k": 5, "d_out": D_OUT, "skip": skip, "dtype": dtype}
    sae = SAE.from_config(SAEConfig(**(fields | kw)))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        sae.input_scale.fill_(1.7)
        assert sae.target_scale is not None
        sae.target_scale.fill_(0.6)
        if sae.W_skip is not None:
            sae.W_skip.normal_(0, 0.3)
        threshold = getattr(sae, "threshold", None)
        if isinstance(threshold, torch.Tensor):
            threshold.fill_(0.4)
    return sae


def inputs(n: int = 50) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(3)) * 2


@pytest.fixture
def sae_lens():
    return pytest.importorskip("sae_lens")


SAELENS_CLASSES = {
    ("relu", False): "Transcoder",
    ("relu", True): "SkipTranscoder",
    ("jumprelu", False): "JumpReLUTranscoder",
    ("jumprelu", True): "JumpReLUSkipTranscoder",
    ("batchtopk", False): "JumpReLUTranscoder",
    ("batchtopk", True): "JumpReLUSkipTranscoder",
}


@pytest.mark.parametrize(("arch", "skip"), list(SAELENS_CLASSES))
def test_saelab_transcoder_loads_in_saelens_with_identical_outputs(arch, skip, tmp_path, sae_lens):
    ours = make_transcoder(arch, skip=skip)
    ours.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["d_out"] == D_OUT and cfg["apply_b_dec_to_input"] is False
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    assert type(theirs).__name__ == SAELENS_CLASSES[arch, skip]
    x = inputs()
    with torch.no_grad():
        f, g = ours.encode(x), theirs.encode(x)
        assert torch.equal(f != 0, g != 0) and (f != 0).any()
        torch.testing.assert_close(f, g, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.decode(f), theirs.decode(g), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        assert (ours(x) - ours.decode(f)).abs().max() > 0.1 if skip else torch.equal(ours(x), ours.decode(f))
    loaded = SAE.load(tmp_path)
    assert loaded.cfg == ours.cfg and loaded.input_scale.item() == 1.0 and loaded.output_scale.item() == 1.0
    torch.testing.assert_close(loaded(x), ours(x), rtol=1e-5, atol=1e-5)
    assert ours.output_scale.item() == pytest.approx(0.6)  # saving does not fold the live transcoder


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("prefixes", [None, [12, 48]])
def test_topk_transcoder_round_trip_and_saelens_refuses_it_by_name(skip, prefixes, tmp_path, sae_lens):
    """SAELens has no TopK transcoder: saelab saves one under its own name, which SAELens refuses, not misreads."""
    ours = make_transcoder("topk", skip=skip, matryoshka_prefixes=prefixes)
    ours.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == ("topk_skip_transcoder" if skip else "topk_transcoder")
    loaded = SAE.load(tmp_path)
    x = inputs()
    torch.testing.assert_close(loaded(x), ours(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(KeyError, match="transcoder"):
        sae_lens.SAE.load_from_disk(tmp_path)


def _saelens_transcoder(sae_lens, name: str):
    cls = getattr(sae_lens, name)
    cfg_cls = getattr(sae_lens, f"{name}Config")
    theirs = cls(cfg_cls(d_in=D_IN, d_sae=48, d_out=D_OUT, apply_b_dec_to_input=False))
    torch.manual_seed(1)
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0, 0.5)
        if hasattr(theirs, "threshold"):
            theirs.threshold.uniform_(0.0, 1.0)
    return theirs


@pytest.mark.parametrize("name", sorted(set(SAELENS_CLASSES.values())))
def test_saelens_transcoder_loads_in_saelab_with_identical_outputs(name, tmp_path, sae_lens):
    theirs = _saelens_transcoder(sae_lens, name)
    theirs.save_model(tmp_path)
    ours = SAE.load(tmp_path)
    assert ours.cfg.d_out == D_OUT and ours.cfg.skip == ("Skip" in name)
    assert ours.cfg.arch == ("jumprelu" if "JumpReLU" in name else "relu")
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])  # BatchTopK selects per batch in training alone
def test_training_fvu_is_the_raw_output_fvu(arch):
    """The loss reads scaled inputs and outputs; its FVU is the FVU of the transcoder's raw output (scale-free)."""
    tc = make_transcoder(arch, skip=True)
    x, y = inputs(200), torch.randn(200, D_OUT, generator=torch.Generator().manual_seed(4)) * 5 + 2
    _, metrics = tc.training_loss(x, y)
    assert float(metrics["fvu"]) == pytest.approx(transcoder_metrics(tc, x, y)["fvu"], rel=1e-4)


@pytest.mark.parametrize("prefixes", [None, [12, 48]])
def test_sparse_kernels_give_dense_autograd_gradients(prefixes):
    """The TopK step's sparse kernels (no bias subtracted from the input, output bias plus the skip) against the
    dense reference step with plain autograd, in float64, dead latents included (AuxK on the output residual)."""
    grads = []
    for density in (1.0, 0.0):
        tc = make_transcoder("topk", skip=True, dtype="float64", sparse_density=density, matryoshka_prefixes=prefixes)
        tc.tokens_since_fired[::3] = tc.cfg.dead_tokens
        x, y = inputs(64).double(), torch.randn(64, D_OUT, generator=torch.Generator().manual_seed(5)).double()
        loss, metrics = tc.training_loss(x, y)
        assert metrics["auxk"] > 0
        loss.backward()
        grads.append({name: p.grad for name, p in tc.named_parameters()})
    assert set(grads[0]) == {"W_enc", "b_enc", "W_dec", "b_dec", "W_skip"}
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-9, atol=1e-12, msg=name)


def test_init_from_sample_scales_and_centres_both_sides():
    torch.manual_seed(0)
    tc = SAE.from_config(SAEConfig(d_in=D_IN, d_sae=48, k=5, d_out=D_OUT))
    x, y = inputs(500) + 3, torch.randn(500, D_OUT) * 4 - 1
    tc.init_from_sample(x, y)
    assert (x * tc.input_scale).norm(dim=1).mean().item() == pytest.approx(D_IN**0.5, rel=1e-5)
    assert (y * tc.output_scale).norm(dim=1).mean().item() == pytest.approx(D_OUT**0.5, rel=1e-5)
    # b_enc centres the pre-activations on the inputs' centre, where they are near zero on average
    pre = tc.pre_acts(tc.prepare_input(x))
    assert pre.mean().abs().item() < 0.1 * pre.std().item()
    assert tc.W_dec.norm(dim=1).sub(1).abs().max().item() < 1e-5


def test_configs_a_transcoder_cannot_have():
    with pytest.raises(ValueError, match="needs d_out"):
        SAEConfig(d_in=8, d_sae=16, k=2, skip=True)
    with pytest.raises(ValueError, match="icfl .* cannot transcode"):
        SAEConfig(arch="icfl", d_in=8, d_sae=16, k=5, d_out=4)
    with pytest.raises(ValueError, match="drop whiten and mask_fraction"):
        SAEConfig(d_in=8, d_sae=16, k=2, d_out=4, whiten=True)
    tc = make_transcoder()
    with pytest.raises(ValueError, match="pass y for a transcoder only"):
        tc.training_loss(inputs())
    with pytest.raises(ValueError, match="d_out=7"):
        tc.training_loss(inputs(), torch.zeros(50, 3))


def test_hook_pairs_that_are_not_one_mlp_are_refused_with_the_pair_to_give():
    assert mlp_layer("blocks.3.hook_mlp_in", "blocks.3.hook_mlp_out") == 3
    assert mlp_layer("base/blocks.0.hook_mlp_in", "base/blocks.0.hook_mlp_out") == 0
    bad = [
        ("blocks.1.hook_mlp_in", "blocks.2.hook_mlp_out"),
        ("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out"),
        ("blocks.1.hook_mlp_out", "blocks.1.hook_mlp_in"),
        ("base/blocks.1.hook_mlp_in", "tuned/blocks.1.hook_mlp_out"),
    ]
    for pair in bad:
        with pytest.raises(
            ConfigError, match=r"give input .*blocks\.1\.hook_mlp_in and output .*blocks\.1\.hook_mlp_out"
        ):
            mlp_layer(*pair)
    pair = {"input": "blocks.1.hook_resid_mid", "output": "blocks.1.hook_mlp_out"}
    with pytest.raises(ConfigError, match=r"transcoders\.0.*give input blocks\.1\.hook_mlp_in"):
        build(TrainConfig, {"run": "r", "transcoders": [pair]}, "train config")


def test_aligned_rows():
    batch = {"a": torch.zeros(4, 2), "b": torch.ones(4, 3), "c": torch.ones(5, 3)}
    x, y = aligned_rows(batch, ["b", "a"])
    assert x.shape == (4, 3) and y.shape == (4, 2)
    with pytest.raises(StoreError, match=r"\['z'\] are not in the batch"):
        aligned_rows(batch, ["a", "z"])
    with pytest.raises(StoreError, match="different row counts"):
        aligned_rows(batch, ["a", "c"])


def test_train_config_names_transcoder_pairs_and_the_trainer_pairs_store_rows(tmp_path, sae_lens):
    """A store with an MLP's input and output (the synthetic MLP of `saelab.toys.transcoders`, imported): the trainer
    trains a TopK transcoder and a skip transcoder of it in one pass, saved under the input hook in SAELens layout with
    the output's FVU in `metrics.json`; the skip transcoder explains the linear part the plain one cannot."""
    from saelab.importer import import_arrays
    from saelab.toys.transcoders import make_synthetic_mlp

    mlp = make_synthetic_mlp(n_features=32, d_in=16, d_out=12, linear_scale=2.0, dense=0.5)
    rows = mlp.sample(12_000, torch.Generator().manual_seed(0))
    store = str(tmp_path / "store.zarr")
    import_arrays({"blocks.0.hook_mlp_in": rows.x, "blocks.0.hook_mlp_out": rows.y}, store, progress=False)
    pair = {"input": "blocks.0.hook_mlp_in", "output": "blocks.0.hook_mlp_out"}
    cfg = TrainConfig.model_validate(
        {
            "run": str(tmp_path / "run"),
            "store": store,
            "transcoders": [pair, pair | {"skip": True}],
            "grid": {"k": [4], "expansion": [4], "lr": [1e-2]},
            "tokens": 150 * 256,
            "batch_size": 256,
            "eval_rows": 2048,
            "warmup_steps": 5,
        }
    )
    plain, skip = train(cfg, progress=False)
    assert plain.path.parent.name == skip.path.parent.name == "blocks.0.hook_mlp_in"
    assert plain.path.name.startswith("transcoder-topk-k4-w64") and skip.path.name.startswith("skiptranscoder-topk")
    assert plain.reconstruction is not None and skip.reconstruction is not None
    assert skip.reconstruction["fvu"] < 0.7 * plain.reconstruction["fvu"]
    saved = json.loads((skip.path / "metrics.json").read_text())
    assert saved["fvu"] == pytest.approx(skip.reconstruction["fvu"])
    loaded = SAE.load(skip.path)
    assert loaded.cfg.hook_name == pair["input"] and loaded.cfg.hook_name_out == pair["output"]
    x, y = rows.x[-2048:], rows.y[-2048:]
    assert transcoder_metrics(loaded, x, y)["fvu"] == pytest.approx(skip.reconstruction["fvu"], rel=1e-4)
    assert set(json.loads((tmp_path / "run" / "saes" / "train_config.json").read_text())) >= {"transcoders"}
    other_mlp = {"input": "blocks.1.hook_mlp_in", "output": "blocks.1.hook_mlp_out"}
    with pytest.raises(StoreError, match=r"\['blocks.1.hook_mlp_in', 'blocks.1.hook_mlp_out'\] are not in store"):
        train(TrainConfig.model_validate(cfg.model_dump() | {"transcoders": [other_mlp]}), progress=False)
