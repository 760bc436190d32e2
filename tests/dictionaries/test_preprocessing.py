"""PCA whitening (`saelab.dictionaries.preprocessing`): the statistics, the singular-covariance rule (on a sample, and
on a training or control store through `train`), the fold into saved weights (same codes on raw activations, in saelab
and in SAELens), and whitening plus masking in a train config with a control store, checkpoints and resume."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from saelab.dictionaries import SAE, BatchTopKSAE, JumpReLUSAE, SAEConfig
from saelab.dictionaries.preprocessing import pca_whitening, whitening_sample
from saelab.errors import ConfigError, StoreError
from saelab.importer import import_arrays
from saelab.toys.synthetic import make_synthetic
from saelab.train import TrainConfig, train
from saelab.train import trainer as trainer_module
from tests.dictionaries.helpers import ARCHS

D = 16


def correlated(n: int, seed: int, d: int = D) -> torch.Tensor:
    """`n` rows (drawn with `seed`) of one distribution: sparse codes of known directions, mixed by a fixed random
    linear map and offset, so the covariance is far from the identity (eigenvalues over about four decades)."""
    data = make_synthetic(n_features=4 * d, d=d, mean_active=3.0, n_pairs=0, noise=0.05, seed=0)
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(0)) * torch.logspace(0, 1, d)
    return data.sample(n, torch.Generator().manual_seed(seed)) @ mix + 2


def test_pca_whitening_gives_zero_mean_and_identity_covariance():
    x = correlated(4000, seed=0).double()
    w = pca_whitening(x)
    z = (x - w.mean) @ w.matrix
    torch.testing.assert_close(z.mean(0), torch.zeros(D, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(z.T @ z / (len(x) - 1), torch.eye(D, dtype=torch.float64), rtol=0, atol=1e-10)
    torch.testing.assert_close(z @ w.inverse + w.mean, x, rtol=1e-10, atol=1e-10)
    assert w.eigenvalues[-1] / w.eigenvalues[0] > 1e3  # the data was far from white


def test_singular_covariance_is_refused_with_the_fix():
    x = torch.randn(500, 8, dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"more rows than the 8 dimensions, but rows x has 8.*with more rows"):
        pca_whitening(x[:8], source="rows x")
    x[:, 7] = x[:, 0] - x[:, 3]  # rank 7
    with pytest.raises(ConfigError, match=r"singular.*at most whiten_rcond=1e-06.*`whiten_store`.*`sae.whiten: false`"):
        pca_whitening(x)


def test_the_rcond_rule_refuses_exactly_below_it():
    white = torch.randn(2000, 6, dtype=torch.float64)
    w = pca_whitening(white)
    spectrum = torch.tensor([1e-7, 1, 2, 3, 4, 5], dtype=torch.float64)  # smallest / largest = 2e-8
    x = ((white - w.mean) @ w.matrix) * spectrum.sqrt()  # sample covariance exactly diag(spectrum)
    with pytest.raises(ConfigError, match="singular"):
        pca_whitening(x, rcond=2.1e-8)
    torch.testing.assert_close(pca_whitening(x, rcond=1.9e-8).eigenvalues, spectrum, rtol=1e-9, atol=0)


def _whitened_sae(arch: str, dtype: str = "float32") -> SAE:
    torch.manual_seed(0)
    sae = SAE.from_config(SAEConfig.model_validate(dict(arch=arch, d_in=D, d_sae=64, k=5, whiten=True, dtype=dtype)))
    sample = correlated(4000, seed=1)
    sae.set_whitening(pca_whitening(sample))
    sae.init_from_sample(sample)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        if isinstance(sae, (JumpReLUSAE, BatchTopKSAE)):
            sae.threshold.fill_(0.4)
    return sae


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("dtype", "tol"), [("float64", 1e-5), ("float32", 2e-4)])
def test_folded_whitening_gives_the_training_codes_on_raw_activations(arch, dtype, tol, tmp_path):
    """To 1e-5 in float64 (the fold is exact: measured ~1e-13); in float32 rounding the raw inputs (norm ~30, mean 2
    per dimension) costs ~1e-6 of their norm: measured up to 4e-5 on codes of order 1."""
    sae = _whitened_sae(arch, dtype)
    x = correlated(200, seed=2).to(getattr(torch, dtype))
    with torch.no_grad():  # the codes training computes: whitened, scaled inputs
        inside = sae.activation(sae.pre_acts(sae.prepare_input(x))) / sae.input_scale
        assert sae.prepare_input(x).norm(dim=1).mean().item() == pytest.approx(D**0.5, rel=0.1)
    sae.save(tmp_path)
    saved = SAE.load(tmp_path)
    assert saved.cfg.whitened and not saved.cfg.whiten and saved.whiten_matrix is None
    assert saved.input_scale.item() == 1.0
    with torch.no_grad():
        raw = saved.encode(x)
        assert (raw != 0).any() and torch.equal(raw != 0, inside != 0)
        torch.testing.assert_close(raw, inside, rtol=tol, atol=tol)
        torch.testing.assert_close(saved.decode(raw), sae.decode(inside), rtol=tol, atol=10 * tol)
        # `forward` (TopK's own sparse path included) reconstructs in raw units too, live and saved alike
        torch.testing.assert_close(sae(x), sae.decode(sae.encode(x)), rtol=tol, atol=10 * tol)
        torch.testing.assert_close(saved(x), sae(x), rtol=tol, atol=10 * tol)
    norms = saved.W_dec.norm(dim=1)
    assert (norms - 1).abs().max() > 0.1  # raw-space directions: no longer unit norm


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_loads_the_folded_sae_with_identical_encodings(arch, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = _whitened_sae(arch)
    sae.save(tmp_path)
    ours, theirs = SAE.load(tmp_path), sae_lens.SAE.load_from_disk(tmp_path)
    x = correlated(200, seed=3)
    with torch.no_grad():
        f, g = ours.encode(x), theirs.encode(x)
        assert torch.equal(f != 0, g != 0) and (f != 0).any()
        torch.testing.assert_close(f, g, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.decode(f), theirs.decode(g), rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The training store, a control store of the same hook point (other data), and one at another width."""
    folder = tmp_path_factory.mktemp("whiten")
    paths = {name: str(folder / f"{name}.zarr") for name in ("train", "control", "narrow")}
    arrays = {
        "train": correlated(12_000, seed=4),
        "control": correlated(6000, seed=5),
        "narrow": correlated(3000, 6, 8),
    }
    for name, x in arrays.items():
        import_arrays({"h0": x.numpy()}, paths[name], shard_rows=4096, chunk_rows=1024, progress=False)
    return paths


def _config(stores, run, **kw) -> TrainConfig:
    base: dict[str, Any] = dict(
        store=stores["train"],
        run=str(run),
        whiten_store=stores["control"],
        tokens=256 * 40,
        batch_size=256,
        eval_rows=2048,
        warmup_steps=5,
        checkpoint_every=256 * 10,
        log_every=10,
        ce_contexts=0,
        grid={"arch": ["topk", "relu"], "k": [4], "expansion": [4]},
        sae={"whiten": True, "mask_fraction": 0.25, "dead_tokens": 2000, "l1_coef": 1.0},
    )
    return TrainConfig.model_validate(base | kw)


def test_whitened_masked_training_resumes_to_the_same_weights(stores, tmp_path, monkeypatch):
    ref = train(_config(stores, tmp_path / "ref"), progress=False)
    assert [r.stopped for r in ref] == [None, None] and all(r.reconstruction is not None for r in ref)
    step_calls = {"n": 0}
    real_step = trainer_module.train_step

    def dies_at_step_25(sae, opt, x, y=None):  # two SAEs per step: the 50th call is step 25, after the checkpoint at 20
        step_calls["n"] += 1
        if step_calls["n"] > 50:
            raise KeyboardInterrupt
        return real_step(sae, opt, x, y)

    monkeypatch.setattr(trainer_module, "train_step", dies_at_step_25)
    with pytest.raises(KeyboardInterrupt):
        train(_config(stores, tmp_path / "killed"), progress=False)
    monkeypatch.setattr(trainer_module, "train_step", real_step)
    assert json.loads((tmp_path / "killed" / "saes" / "checkpoint" / "latest.json").read_text())["step"] == 20
    resumed = train(_config(stores, tmp_path / "killed"), progress=False)
    for want, got in zip(ref, resumed, strict=True):
        a, b = (
            load_file(str(want.path / "sae_weights.safetensors")),
            load_file(str(got.path / "sae_weights.safetensors")),
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), want.path.name
        saved = json.loads((got.path / "cfg.json").read_text())["metadata"]["saelab_config"]
        assert saved["whitened"] and not saved["whiten"] and saved["mask_fraction"] == 0.25
    # the statistics came from the control store, not the training store
    ckpt = next((tmp_path / "ref" / "saes" / "checkpoint").glob("step-*/h0/topk-*.safetensors"))
    control = pca_whitening(whitening_sample(stores["control"], {"h0": D}, seed=2)["h0"])
    torch.testing.assert_close(load_file(str(ckpt))["sae.whiten_mean"], control.mean.float(), rtol=0, atol=1e-5)


def test_control_store_of_another_width_is_refused_before_anything_is_written(stores, tmp_path):
    with pytest.raises(StoreError, match=r"holds 'h0' at d=8, but the SAEs read d=16; give a `whiten_store`"):
        train(_config(stores, tmp_path / "run", whiten_store=stores["narrow"]), progress=False)
    assert not (tmp_path / "run" / "saes").exists()
    with pytest.raises(ValueError, match="`whiten_store` gives whitening statistics, but no SAE whitens"):
        _config(stores, tmp_path / "run", sae={"mask_fraction": 0.25})


def test_a_singular_store_is_refused_before_anything_is_written(stores, tmp_path):
    """Rows centred across their dimensions (what a post-LayerNorm residual stream holds, e.g. MiniLM's) have no
    variance along the all-ones direction: as the training store, or as the control store, `train` names the store
    and the fixes, and writes nothing."""
    x = correlated(3000, seed=7)
    paths = {name: str(tmp_path / f"{name}.zarr") for name in ("centred", "other_hook")}
    import_arrays({"h0": (x - x.mean(1, keepdim=True)).numpy()}, paths["centred"], shard_rows=4096, progress=False)
    import_arrays({"h1": x.numpy()}, paths["other_hook"], shard_rows=4096, progress=False)
    fixes = r"whiten with a `whiten_store` that spans every direction.*`sae.whiten: false`"
    as_training = dict(store=paths["centred"], whiten_store=None, eval_rows=512)
    centred = re.escape(paths["centred"])
    with pytest.raises(ConfigError, match=rf"'h0' in the training store '{centred}' is singular.*{fixes}"):
        train(_config(stores, tmp_path / "run", **as_training), progress=False)
    with pytest.raises(ConfigError, match=rf"'h0' in the control store '{centred}' is singular.*{fixes}"):
        train(_config(stores, tmp_path / "run", whiten_store=paths["centred"]), progress=False)
    with pytest.raises(StoreError, match=r"has no hook 'h0' \(it has \['h1'\]\); give a `whiten_store` harvested at"):
        train(_config(stores, tmp_path / "run", whiten_store=paths["other_hook"]), progress=False)
    assert not (tmp_path / "run" / "saes").exists()
