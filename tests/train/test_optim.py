"""Optimisers (`TrainConfig.optimizer`): schedule-free ones recover a known dictionary, save and checkpoint their
averaged weights, and resume to the weights of an uninterrupted run."""

import pytest
import torch
from safetensors.torch import load_file

from saelab.dictionaries import SAE, SAEConfig
from saelab.importer import import_arrays
from saelab.toys.synthetic import make_synthetic, recovery
from saelab.train import Member, TrainConfig, train
from saelab.train import trainer as trainer_module
from saelab.train.checkpoint import save_checkpoint
from saelab.train.optim import SIGNUM_MOMENTUM, eval_weights, signum_lr, train_weights
from saelab.train.trainer import schedule
from tests.train.test_trainer import config as trainer_config

D = 32


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_features=128, d=D, mean_active=4.0, n_pairs=8, seed=0)


@pytest.fixture(scope="module")
def store_path(data, tmp_path_factory):
    """Sparse combinations of 128 known directions in 32 dims."""
    x = data.sample(24_000, torch.Generator().manual_seed(0)).numpy()
    out = str(tmp_path_factory.mktemp("store") / "syn.zarr")
    import_arrays({"h0": x}, out, shard_rows=4096, chunk_rows=1024, progress=False)
    return out


def config(store_path, out, **kw) -> TrainConfig:
    """`test_trainer`'s small run over this module's store, validated."""
    return TrainConfig.model_validate(trainer_config(store_path, out, **kw))


def test_schedule_free_rates_and_schedule():
    cfg = TrainConfig(run="", tokens=4096 * 100, optimizer="signum_sf", warmup_steps=10)
    assert cfg.peak_lr(2**14, d_in=96) == pytest.approx(5e-3) == signum_lr(2**14)
    assert cfg.peak_lr(2**16, d_in=96, lr=0.1) == 0.1
    assert schedule(cfg, 0)[0] == pytest.approx(0.1) and schedule(cfg, 99)[0] == 1.0  # warmup, no decay
    assert schedule(cfg.model_copy(update={"optimizer": "adam"}), 99)[0] < 0.1
    assert "optimizer" not in TrainConfig(run="").identity()  # older runs (Adam) resume
    assert TrainConfig(run="", optimizer="adamw_sf").identity()["optimizer"] == "adamw_sf"


@pytest.mark.parametrize("optimizer", ["adam", "signum_sf", "adamw_sf"])
def test_every_optimizer_recovers_the_directions(optimizer, data, store_path, tmp_path):
    (result,) = train(config(store_path, tmp_path, optimizer=optimizer, tokens=256 * 400), progress=False)
    assert result.reconstruction is not None
    sae = SAE.load(result.path)
    got = recovery(data.directions, sae.W_dec.detach())
    # measured: 100% recovered by each, held-out FVU 0.16 (adam, adamw_sf) and 0.21 (signum_sf)
    assert got >= 0.9 and result.reconstruction["fvu"] < 0.25, optimizer  # the width is 128: one row per direction


def test_eval_weights_are_the_average_and_are_checkpointed(data, tmp_path):
    member = Member.create(SAEConfig(d_in=D, d_sae=64, k=4), lr=1e-2, seed=0, device="cpu", optimizer="signum_sf")
    member.sae.init_from_sample(data.sample(2048, torch.Generator().manual_seed(1)))
    for i in range(5):
        member.step(data.sample(256, torch.Generator().manual_seed(2 + i)), factor=1.0, refresh=i == 0)
    y = member.sae.W_dec.detach().clone()
    z = member.opt.state[member.sae.W_dec]["z"].clone()
    x = (y - (1 - SIGNUM_MOMENTUM) * z) / SIGNUM_MOMENTUM  # y = lerp(x, z, 1 - momentum)
    eval_weights(member.opt)
    torch.testing.assert_close(member.sae.W_dec.detach(), x, atol=1e-6, rtol=0)
    train_weights(member.opt)
    torch.testing.assert_close(member.sae.W_dec.detach(), y, atol=1e-6, rtol=0)
    save_checkpoint(tmp_path, [member], 5)
    saved = load_file(str(tmp_path / "step-5" / f"{member.key}.safetensors"))
    torch.testing.assert_close(saved["sae.W_dec"], x, atol=1e-6, rtol=0)
    assert int(saved["group.0.k"]) == 5 and saved["group.0.weight_sum"].dtype == torch.float64
    torch.testing.assert_close(member.sae.W_dec.detach(), y, atol=1e-6, rtol=0)  # training goes on at y


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["signum_sf", "adamw_sf"])
def test_resume_after_a_checkpoint_ends_with_the_uninterrupted_weights(optimizer, store_path, tmp_path, monkeypatch):
    cfg = {"optimizer": optimizer, "tokens": 256 * 100, "grid": {"arch": ["topk"], "k": [4], "expansion": [4, 8]}}
    (want_a, want_b) = train(config(store_path, tmp_path / "ref", **cfg), progress=False)
    real = trainer_module.save_checkpoint

    def interrupt_after_step_40(folder, members, step):
        real(folder, members, step)
        if step == 40:
            raise Interrupted

    monkeypatch.setattr(trainer_module, "save_checkpoint", interrupt_after_step_40)
    with pytest.raises(Interrupted):
        train(config(store_path, tmp_path / "cut", **cfg), progress=False)
    monkeypatch.setattr(trainer_module, "save_checkpoint", real)
    got = train(config(store_path, tmp_path / "cut", **cfg), progress=False)
    for want, result in zip((want_a, want_b), got, strict=True):
        a = load_file(str(want.path / "sae_weights.safetensors"))
        b = load_file(str(result.path / "sae_weights.safetensors"))
        assert a.keys() == b.keys()
        for key in a:  # exact in practice; the tolerance allows another summation order
            torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=f"{result.path.name} {key}")
