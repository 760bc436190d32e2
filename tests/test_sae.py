"""SAE behaviour: losses against a naive reference, bookkeeping, folding, checkpoints, SAELens interop."""

import json
import math

import pytest
import torch
from pydantic import ValidationError

from saelab.errors import SAELoadError
from saelab.sae import SAE, SAEConfig, geometric_median, train_step

ARCHS = ["topk", "batchtopk", "jumprelu", "relu"]


def make_sae(arch: str = "topk", dtype: str = "float64", seed: int = 0, **kw) -> SAE:
    """An SAE with non-trivial biases, thresholds and input scale."""
    torch.manual_seed(seed)
    cfg = SAEConfig(**({"arch": arch, "d_in": 12, "d_sae": 48, "k": 5, "dtype": dtype} | kw))
    sae = SAE.from_config(cfg)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.3)
        sae.input_scale.fill_(1.7)
        if arch in ("jumprelu", "batchtopk"):
            sae.threshold.fill_(0.4)
    return sae


def test_config_refuses_unknown_fields_and_bad_k():
    with pytest.raises(ValidationError, match="extra"):
        SAEConfig(d_in=8, d_sae=16, kk=3)
    with pytest.raises(ValidationError, match="k=40 exceeds d_sae=16"):
        SAEConfig(d_in=8, d_sae=16, k=40)
    assert SAEConfig(d_in=8, d_sae=64).aux_k_resolved == 4


@pytest.mark.parametrize("arch", ARCHS)
def test_init(arch):
    sae = SAE.from_config(SAEConfig(arch=arch, d_in=8, d_sae=32))
    assert type(sae).arch == arch
    assert sae.W_enc.shape == (8, 32) and sae.W_dec.shape == (32, 8)
    assert sae.b_enc.shape == (32,) and sae.b_dec.shape == (8,)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert torch.equal(sae.W_enc, sae.W_dec.T)


def test_wrong_input_width_is_named():
    sae = make_sae()
    with pytest.raises(ValueError, match=r"d_in=12\], got shape \(3, 7\)"):
        sae.encode(torch.randn(3, 7, dtype=torch.float64))


def test_geometric_median_known_answers():
    line = torch.tensor([[0.0], [1.0], [2.0], [3.0], [100.0]])
    assert geometric_median(line, iters=200).item() == pytest.approx(2.0, abs=1e-3)
    square = torch.tensor([[1.0, 1], [1, -1], [-1, 1], [-1, -1], [0.2, 0.1]])
    assert geometric_median(square, iters=200).tolist() == pytest.approx([0.2, 0.1], abs=1e-3)


def test_init_from_sample_scales_and_centres():
    sae = SAE.from_config(SAEConfig(d_in=16, d_sae=64))
    x = torch.randn(2000, 16) * 7 + 30
    sae.init_from_sample(x)
    scaled = x * sae.input_scale
    assert scaled.norm(dim=1).mean().item() == pytest.approx(4.0, rel=1e-4)
    torch.testing.assert_close(sae.b_dec, geometric_median(scaled), rtol=0, atol=1e-5)
    assert (sae.b_dec / sae.input_scale - 30).abs().max() < 0.6  # the centre of the cloud


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_input_scale_keeps_encodings(arch):
    sae = make_sae(arch)
    x = torch.randn(20, 12, dtype=torch.float64) * 3
    f, recon = sae.encode(x), sae(x)
    assert (f != 0).any()
    sae.fold_input_scale()
    assert sae.input_scale.item() == 1.0
    torch.testing.assert_close(sae.encode(x), f)
    torch.testing.assert_close(sae(x), recon)


def test_topk_encode_decode_forward():
    sae = make_sae()
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    f = sae.encode(x)
    assert f.shape == (3, 7, 48)
    assert ((f > 0).sum(-1) <= 5).all() and ((f != 0).sum(-1) >= 1).all()
    pre = sae.pre_acts(x.reshape(-1, 12) * sae.input_scale)
    expected = torch.zeros_like(pre).scatter(1, pre.topk(5).indices, pre.topk(5).values.relu())
    torch.testing.assert_close(f.reshape(-1, 48), expected / sae.input_scale)
    torch.testing.assert_close(sae(x), sae.decode(f))


def naive_topk_loss(sae: SAE, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """Gao et al. TopK loss with AuxK, written densely and independently of saelab's code paths."""
    xs = x * sae.input_scale
    pre = (xs - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = pre.topk(sae.cfg.k)
    recon = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu()) @ sae.W_dec + sae.b_dec
    residual = xs - recon
    fvu = residual.pow(2).sum() / (xs - xs.mean(0)).pow(2).sum()
    if not dead.any():
        return fvu
    aux = pre.masked_fill(~dead, -math.inf).topk(sae.cfg.aux_k_resolved)
    e_hat = torch.zeros_like(pre).scatter(1, aux.indices, aux.values.relu()) @ sae.W_dec
    e = residual.detach()
    return fvu + sae.cfg.aux_coef * (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()


@pytest.mark.parametrize(
    ("sparse_density", "aux_sparse_density"),
    [(1.0, 1.0), (1.0, 0.0), (0.0, 0.0)],
    ids=["sparse", "sparse+dense-auxk", "dense"],
)
@pytest.mark.parametrize("n_dead", [0, 20])
def test_topk_training_loss_matches_naive_reference(sparse_density, aux_sparse_density, n_dead):
    sae = make_sae(sparse_density=sparse_density, aux_sparse_density=aux_sparse_density, aux_k=6, dead_tokens=100)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[torch.randperm(48)[:n_dead]] = True
    sae.tokens_since_fired[dead] = 100
    x = torch.randn(32, 12, dtype=torch.float64)

    loss, metrics = sae.training_loss(x)
    expected = naive_topk_loss(sae, x, dead)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert (metrics["auxk"] > 0).item() == (n_dead > 0)
    grads = torch.autograd.grad(loss, list(sae.parameters()))
    ref = torch.autograd.grad(expected, list(sae.parameters()))
    for (name, _), g, r in zip(sae.named_parameters(), grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


def test_aux_coef_zero_disables_auxk():
    sae = make_sae(aux_coef=0.0, dead_tokens=10)
    sae.tokens_since_fired.fill_(10)
    _, metrics = sae.training_loss(torch.randn(16, 12, dtype=torch.float64))
    assert metrics["auxk"].item() == 0 and metrics["dead_frac"].item() == 1


def test_metrics_are_tensors():
    for arch in ARCHS:
        _, metrics = make_sae(arch).training_loss(torch.randn(8, 12, dtype=torch.float64))
        assert {"loss", "fvu", "l0"} <= set(metrics)
        assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in metrics.values())


def test_dead_latent_counts_tokens_and_resets_only_firing_latents():
    sae = make_sae()
    sae.tokens_since_fired.fill_(7)
    latents = torch.tensor([[1, 2], [2, 5]])
    acts = torch.tensor([[0.5, 0.0], [1.0, -0.3]])  # latent 5 was selected but did not fire
    sae.update_dead(latents, acts, n_tokens=2)
    expected = torch.full((48,), 9)
    expected[[1, 2]] = 0
    assert torch.equal(sae.tokens_since_fired, expected)


def test_training_loss_updates_dead_counters():
    sae = make_sae(dead_tokens=64)
    x = torch.randn(16, 12, dtype=torch.float64)
    _, metrics = sae.training_loss(x)
    fired = sae.encode(x).gt(0).any(0)
    assert torch.equal(sae.tokens_since_fired == 0, fired)
    assert (sae.tokens_since_fired[~fired] == 16).all()
    for _ in range(2):
        sae.training_loss(x)
    assert not sae.dead_mask().any()  # 48 tokens unfired < dead_tokens
    sae.training_loss(x)
    assert torch.equal(sae.dead_mask(), ~fired)  # exactly 64 tokens unfired: dead


@pytest.mark.parametrize("arch", ARCHS)
def test_train_step_keeps_unit_decoder_and_lowers_loss(arch):
    sae = make_sae(arch, dtype="float32", l1_coef=0.5, l0_coef=0.1)
    sae.input_scale.fill_(1.0)
    x = torch.randn(256, 12) @ torch.randn(12, 12)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    first = sae.training_loss(x)[0].item()
    for _ in range(100):
        train_step(sae, opt, x)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(48))
    assert sae.training_loss(x)[0].item() < 0.8 * first


def test_project_decoder_grad_removes_parallel_part():
    sae = make_sae()
    sae.W_dec.grad = torch.randn_like(sae.W_dec) + 3 * sae.W_dec.detach()
    before = sae.W_dec.grad.clone()
    sae.project_decoder_grad()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-12
    torch.testing.assert_close(before - sae.W_dec.grad, (before * sae.W_dec).sum(1, keepdim=True) * sae.W_dec)


def test_batch_topk_selects_k_per_token_on_average_and_learns_threshold():
    sae = make_sae("batchtopk", threshold_lr=0.5)
    sae.threshold.fill_(0.0)
    x = torch.randn(40, 12, dtype=torch.float64)
    _, metrics = sae.training_loss(x)
    pre = sae.pre_acts(x * sae.input_scale)
    kth = pre.flatten().topk(5 * 40).values
    assert metrics["l0"].item() == pytest.approx((kth > 0).sum().item() / 40)
    assert sae.threshold.item() == pytest.approx(0.5 * kth[kth > 0].min().item())
    assert ((sae.encode(x) > 0) == (pre > sae.threshold)).all()


def test_jumprelu_straight_through_gradients():
    sae = make_sae("jumprelu", jumprelu_bandwidth=0.2, l0_coef=2.0)
    x = torch.randn(64, 12, dtype=torch.float64)
    loss, _ = sae.training_loss(x)
    (grad_threshold,) = torch.autograd.grad(loss, [sae.threshold])
    pre = sae.pre_acts(x * sae.input_scale)
    acts = pre * (pre > sae.threshold)
    recon = acts @ sae.W_dec + sae.b_dec
    xs = x * sae.input_scale
    total_var = (xs - xs.mean(0)).pow(2).sum()
    grad_acts = (2 * (recon - xs) @ sae.W_dec.T / total_var).detach()
    window = ((pre - sae.threshold).abs() < 0.1).double()
    expected = -(sae.threshold / 0.2 * window * grad_acts).sum(0) - 2.0 * window.sum(0) / 0.2 / total_var
    torch.testing.assert_close(grad_threshold, expected.detach())
    assert (grad_threshold != 0).any()


def test_cpu_autocast_matches_float32():
    sae = make_sae(dtype="float32")
    x = torch.randn(64, 12)
    loss, _ = sae.training_loss(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, metrics = sae.training_loss(x)
    assert low.dtype == torch.float32 and low.item() == pytest.approx(loss.item(), rel=0.05)
    low.backward()
    assert sae.W_enc.grad.dtype == torch.float32


# -------------------------------------------------------------------- checkpoints


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
