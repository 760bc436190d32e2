"""SAEs and transcoders of one model of a multi-model store (arrays `<alias>/<hook>`), trained in one pass with a
crosscoder over both models (`two_model_run`): each reads its own model's rows, saves under the array's folder
(`<alias>__<hook>`) with the array in its config, and is evaluated on its own model; a transcoder across two models
and a `model` override are refused before training with the fix."""

from __future__ import annotations

import pytest
import torch

from saelab.dictionaries import SAE, CrossCoder, load_dictionary
from saelab.errors import ConfigError
from saelab.importer import import_arrays
from saelab.models import load_model
from saelab.run import RunDir, array_folder
from saelab.store import ActivationStore
from saelab.train import TrainConfig, train
from saelab.train.metrics import eval_tokens
from tests.conftest import TWO_MODEL_HOOKS

MLP_IN, MLP_OUT = TWO_MODEL_HOOKS


def _fvu(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    return float((y - y_hat).square().sum() / (y - y.mean(0)).square().sum())


def test_the_dictionaries_are_saved_under_their_arrays_folders(two_model_run):
    run, results = two_model_run
    assert [(r.hook, r.arch) for r in results] == [
        ("tuned__blocks.0.hook_mlp_out", "topk"),
        ("tuned__blocks.0.hook_mlp_in", "transcoder-topk"),
        ("base__blocks.0.hook_mlp_out", "crosscoder-topk"),
    ]
    sae, transcoder, cc = (load_dictionary(r.path) for r in results)
    assert isinstance(sae, SAE) and isinstance(transcoder, SAE) and isinstance(cc, CrossCoder)
    assert results[0].path == RunDir(run).sae(array_folder(f"tuned/{MLP_OUT}"), results[0].path.name)
    assert (sae.cfg.hook_name, sae.cfg.d_out) == (f"tuned/{MLP_OUT}", None)
    assert (transcoder.cfg.hook_name, transcoder.cfg.hook_name_out) == (f"tuned/{MLP_IN}", f"tuned/{MLP_OUT}")
    assert sae.cfg.model_name == ActivationStore.open(str(RunDir(run).store)).models["tuned"]


def test_the_sae_and_the_transcoder_read_the_tuned_models_rows(two_model_run):
    """Layer 0's MLP was drawn again in the tuned model: the SAE trained on `tuned/...hook_mlp_out` reconstructs
    that array well and the base model's badly, and the transcoder maps the (shared) MLP input to the tuned output,
    not to the base one; the held-out metrics say the same FVU."""
    run, results = two_model_run
    store = ActivationStore.open(str(RunDir(run).store))
    held_out = slice(store.n_tokens - 1024, store.n_tokens)
    x = {a: store.activations(f"{a}/{MLP_OUT}", held_out) for a in ("base", "tuned")}
    x_in = store.activations(f"tuned/{MLP_IN}", held_out)
    torch.testing.assert_close(x_in, store.activations(f"base/{MLP_IN}", held_out))  # the MLP's input is shared
    sae, transcoder = (SAE.load(r.path) for r in results[:2])
    with torch.no_grad():
        own, other = _fvu(x["tuned"], sae(x["tuned"])), _fvu(x["base"], sae(x["base"]))
        mapped = transcoder(x_in)
        to_tuned, to_base = _fvu(x["tuned"], mapped), _fvu(x["base"], mapped)
    assert own < 0.55 and other > own + 0.4, (own, other)
    assert to_tuned < 0.85 and to_base > to_tuned + 0.5, (to_tuned, to_base)
    assert results[0].reconstruction is not None and results[1].reconstruction is not None
    assert results[0].reconstruction["fvu"] == pytest.approx(own, abs=2e-3)
    assert results[1].reconstruction["fvu"] == pytest.approx(to_tuned, abs=2e-3)


def test_the_sae_is_spliced_into_its_own_model(two_model_run, decoder_dir, tuned_decoder_dir):
    """The spliced metrics of the SAE and of the transcoder ran the tuned model (its loss on the eval contexts, not
    the base model's) at the plain hook points."""
    run, results = two_model_run
    store = ActivationStore.open(str(RunDir(run).store))
    losses = {}
    for alias, spec in (("base", decoder_dir), ("tuned", tuned_decoder_dir)):
        model = load_model(spec, device="cpu")
        tokens = eval_tokens(store.config | {"text": store.text}, model, 4)
        with torch.no_grad():
            losses[alias] = float(model(tokens, return_type="loss"))
    for result in results[:2]:  # the SAE, the transcoder
        spliced = result.spliced
        assert spliced is not None and spliced["ce_orig"] == pytest.approx(losses["tuned"], rel=1e-4)
        assert spliced["ce_orig"] != pytest.approx(losses["base"], rel=1e-3)  # measured: 0.5% apart
        assert spliced["ce_sae"] < spliced["ce_zero"]
    assert results[2].spliced is None  # the crosscoder


@pytest.fixture
def aliased_store(tmp_path) -> str:
    """An imported store of arrays named as a two-model harvest names them."""
    g = torch.Generator().manual_seed(0)
    arrays = {f"{a}/{h}": torch.randn(2048, 8, generator=g).numpy() for a in ("base", "tuned") for h in TWO_MODEL_HOOKS}
    store = str(tmp_path / "two.zarr")
    import_arrays(arrays, store, shard_rows=1024, chunk_rows=512, progress=False)
    return store


def _config(store: str, run: str, **kw) -> TrainConfig:
    base = dict(store=store, run=run, tokens=256 * 4, batch_size=256, eval_rows=512, grid={"k": [2], "expansion": [1]})
    return TrainConfig.model_validate(base | kw)


def test_a_transcoder_across_two_models_is_refused_with_the_fix(aliased_store, tmp_path):
    across = {"input": f"base/{MLP_IN}", "output": f"tuned/{MLP_OUT}"}
    with pytest.raises(ValueError, match=f"not such a pair; give input base/{MLP_IN} and output base/{MLP_OUT}"):
        _config(aliased_store, str(tmp_path / "run"), transcoders=[across])


def test_one_model_named_for_the_arrays_of_several_is_refused(aliased_store, tmp_path):
    cfg = _config(aliased_store, str(tmp_path / "run"), hooks=[f"tuned/{MLP_OUT}"], model="gpt2")
    with pytest.raises(ConfigError, match="names one model.*leave `model` unset"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "saes").exists()
    (result,) = train(_config(aliased_store, str(tmp_path / "run"), hooks=[f"tuned/{MLP_OUT}"]), progress=False)
    assert result.hook == "tuned__blocks.0.hook_mlp_out" and result.spliced is None  # an import records no model
