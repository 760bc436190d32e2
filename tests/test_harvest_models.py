"""Harvest what transcoders and model diffing need: `hook_mlp_in` (the MLP's own input, exactly), and several models over
the same tokens (`HarvestConfig.models`): row-aligned arrays `<alias>/<hook>`, each model's the same as a harvest of it
alone, refusal of differing tokenizers, and resume after an interruption ending byte for byte as an uninterrupted run."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saelab.cli import app
from saelab.config import HarvestConfig, build
from saelab.errors import ConfigError, StoreError
from saelab.harvest import harvest
from saelab.models import Model, load_model
from saelab.store import ActivationStore
from saelab.toys.synthetic import decoder_config
from tests.conftest import train_bpe_tokenizer
from tests.test_harvest import _files, _harvest_until_interrupted, small_cfg

MLP_HOOKS = [f"blocks.{layer}.hook_mlp_{end}" for layer in (0, 1) for end in ("in", "out")]


def _mlp(model: Model, layer: int, x: torch.Tensor) -> torch.Tensor:
    """Layer `layer`'s MLP run on `x`: the module a `HookedTransformer` calls, or a BERT layer's two linears (the bridge
    of a post-LN BERT; the residual add and `LayerNorm` after them are not the MLP's)."""
    block = model.blocks[layer]
    if hasattr(block, "_original_component"):
        bert_layer: Any = block._original_component
        return bert_layer.output.dense(bert_layer.intermediate(x))
    return block.mlp(x)


def _with_affine_ln2(decoder: Model) -> Model:
    """A copy of the tiny decoder whose `ln2` weights and biases are not 1 and 0 (at initialisation they are, which
    would hide an `hook_mlp_in` read before them)."""
    model = copy.deepcopy(decoder)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for block in model.blocks:
            ln: Any = block.ln2
            ln.w.copy_(1 + 0.5 * torch.randn(ln.w.shape, generator=g))
            ln.b.copy_(0.5 * torch.randn(ln.b.shape, generator=g))
    return model


def _perturbed(model: Model, seed: int = 1) -> Model:
    """A copy of `model` with every weight moved a little: another model with the same tokenizer."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return other


@pytest.mark.parametrize("which", ["minilm", "decoder"])
def test_the_mlp_run_on_stored_mlp_in_gives_stored_mlp_out(which, request, tmp_path):
    model = request.getfixturevalue(which)
    model = _with_affine_ln2(model) if which == "decoder" else model
    store = harvest(small_cfg(tmp_path / "s.zarr", hooks=MLP_HOOKS, max_tokens=96), model=model, progress=False)
    for layer in (0, 1):
        x, y = (store.activations(f"blocks.{layer}.hook_mlp_{end}") for end in ("in", "out"))
        with torch.no_grad():
            got = _mlp(model, layer, x)
        torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5)  # measured: 0.0 on both
        if which == "minilm":  # post-LN: the MLP reads LayerNorm 1's output, which resid_mid is not
            resid_mid = harvest(
                small_cfg(tmp_path / f"m{layer}.zarr", hooks=[f"blocks.{layer}.hook_resid_mid"], max_tokens=96),
                model=model,
                progress=False,
            ).activations(f"blocks.{layer}.hook_resid_mid")
            assert not torch.allclose(resid_mid, x, atol=1e-2)


def _two(out: Any, **kw: Any) -> HarvestConfig:
    return small_cfg(out, models={"base": "minilm", "tuned": "tuned-minilm"}, **kw)


def test_two_models_are_row_aligned_and_each_as_harvested_alone(minilm, tmp_path):
    tuned = _perturbed(minilm)
    hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_in"]
    both = harvest(_two(tmp_path / "two.zarr", hooks=hooks), model={"base": minilm, "tuned": tuned}, progress=False)
    assert both.hooks == [f"{a}/{h}" for a in ("base", "tuned") for h in hooks]
    assert both.models == {"base": "minilm", "tuned": "minilm"}
    assert both.model_specs == {"base": "minilm", "tuned": "tuned-minilm"} and both.model_spec is None
    alone = {
        "base": harvest(small_cfg(tmp_path / "base.zarr", hooks=hooks), model=minilm, progress=False),
        "tuned": harvest(small_cfg(tmp_path / "tuned.zarr", model="x", hooks=hooks), model=tuned, progress=False),
    }
    for alias, store in alone.items():
        assert store.n_tokens == both.n_tokens == 300
        for meta in ("tokens", "doc_ids", "positions", "contexts"):
            assert np.array_equal(getattr(store, meta)(), getattr(both, meta)()), meta
        for h in hooks:
            assert torch.equal(both.activations(f"{alias}/{h}"), store.activations(h)), (alias, h)
            assert both.mean_norm(f"{alias}/{h}") == store.mean_norm(h)
    assert not torch.allclose(both.activations(f"base/{hooks[0]}"), both.activations(f"tuned/{hooks[0]}"))
    batch = next(iter(both.batches([f"base/{hooks[0]}", f"tuned/{hooks[0]}"], 64, seed=0)))
    assert isinstance(batch, dict) and set(batch) == {f"base/{hooks[0]}", f"tuned/{hooks[0]}"}

    result = CliRunner().invoke(app, ["info", str(tmp_path / "two.zarr"), "--verify"])
    assert result.exit_code == 0, result.output
    assert "models       base = minilm (minilm)" in result.stdout and "tuned = minilm (tuned-minilm)" in result.stdout
    assert "  tuned/blocks.2.hook_mlp_in " in result.stdout and "OK: all" in result.stdout


def test_models_with_different_tokenizers_are_refused(minilm, decoder, tmp_path):
    cfg = small_cfg(
        tmp_path / "s.zarr", models={"enc": "minilm", "toy": "tiny-decoder"}, hooks=["blocks.0.hook_mlp_out"]
    )
    with pytest.raises(ConfigError, match=r"models 'enc' \(minilm\) and 'toy' \(tiny-decoder\) have different tok"):
        harvest(cfg, model={"enc": minilm, "toy": decoder}, progress=False)
    smaller = train_bpe_tokenizer(tmp_path / "bpe400", vocab_size=400)  # the same kind of tokenizer, another vocabulary
    other = load_model(decoder_config(len(smaller)), device="cpu", tokenizer=smaller)
    cfg = small_cfg(tmp_path / "s.zarr", models={"a": "x", "b": "y"}, hooks=["blocks.0.hook_mlp_out"])
    with pytest.raises(ConfigError, match=r"'a' \(tiny-decoder\) and 'b' \(tiny-decoder\).*\(their vocabulary"):
        harvest(cfg, model={"a": decoder, "b": other}, progress=False)
    assert not (tmp_path / "s.zarr").exists()
    with pytest.raises(ConfigError, match="the models given \\(a\\) are not the config's `models` \\(a, b\\)"):
        harvest(cfg, model={"a": decoder}, progress=False)


def test_models_config_is_checked():
    base = {"hooks": ["blocks.0.hook_resid_post"], "out": "s.zarr"}
    with pytest.raises(ConfigError, match="give `model` .* or `models` .*, not both"):
        build(HarvestConfig, {**base, "model": "minilm", "models": {"a": "minilm"}}, "config")
    with pytest.raises(ConfigError, match=r"aliases \['a/b'\] are not names"):
        build(HarvestConfig, {**base, "models": {"a/b": "minilm"}}, "config")
    cfg = build(HarvestConfig, {**base, "models": {"base": "minilm", "tuned": "t"}}, "config")
    assert cfg.model_specs == {"base": "minilm", "tuned": "t"}
    assert build(HarvestConfig, base, "config").model_specs == {"": "minilm"}


def test_two_model_harvest_resumes_to_the_store_of_an_uninterrupted_one(decoder, tmp_path, monkeypatch):
    models = {"base": decoder, "tuned": _perturbed(decoder)}

    def cfg(name: str) -> HarvestConfig:
        return small_cfg(
            tmp_path / name, models={"base": "d", "tuned": "t"}, hooks=["blocks.0.hook_mlp_in", "blocks.1.attn.hook_z"]
        )

    reference = harvest(cfg("reference.zarr"), model=models, progress=False)
    _harvest_until_interrupted(cfg("resumed.zarr"), models, monkeypatch)
    resumed = harvest(cfg("resumed.zarr"), model=models, progress=False)
    assert resumed.complete and resumed.n_tokens == reference.n_tokens == 300
    assert _files(tmp_path / "resumed.zarr") == _files(tmp_path / "reference.zarr")
    assert "activations/tuned/blocks.1.attn.hook_z/c/2/0" in _files(tmp_path / "resumed.zarr")
    with pytest.raises(StoreError, match=r"different config \(model: None -> 'minilm', models: "):
        harvest(small_cfg(tmp_path / "resumed.zarr", hooks=cfg("x").hooks), model=decoder, progress=False)
    assert ActivationStore.open(str(tmp_path / "resumed.zarr")).complete


def test_each_arrays_model_is_its_aliass(two_model_run, decoder_dir, tuned_decoder_dir, tmp_path):
    """`spec_of` / `model_of`: the model that made an array `<alias>/<hook>` is its alias's; an alias the store does
    not record is refused naming the ones it does; an import records no model."""
    from saelab.importer import import_arrays
    from saelab.run import RunDir

    run, _ = two_model_run
    store = ActivationStore.open(str(RunDir(run).store))
    assert store.spec_of("base/blocks.0.hook_mlp_out") == decoder_dir
    assert store.spec_of("tuned/blocks.0.hook_mlp_in") == tuned_decoder_dir
    assert store.model_of("tuned/blocks.0.hook_mlp_in") == store.models["tuned"] != store.model
    with pytest.raises(StoreError, match=r"records no model 'other'.*it has \['base', 'tuned'\]"):
        store.spec_of("other/blocks.0.hook_mlp_in")
    imported = str(tmp_path / "imported.zarr")
    import_arrays({"a/h": np.zeros((8, 2), np.float32)}, imported, shard_rows=8, chunk_rows=8, progress=False)
    assert ActivationStore.open(imported).spec_of("a/h") is None
