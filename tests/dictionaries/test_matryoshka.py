"""Matryoshka SAEs (`SAEConfig.matryoshka_prefixes` / `matryoshka_sample` on TopK and BatchTopK): the known answer on
a planted hierarchy, the prefix losses against a dense reference, SAELens interop, prefixes used alone, a split
batch, sampled prefixes across a resume, a sweep, and bad prefix lists."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.absorption import AbsorptionSettings, absorption_result, single_thread
from saelab.config import build
from saelab.dictionaries import SAE, BatchTopKSAE, SAEConfig, TopKSAE, train_step
from saelab.dictionaries.matryoshka import sample_prefixes
from saelab.errors import ConfigError
from saelab.importer import import_arrays
from saelab.toys.planted import planted_absorption, planted_probe_data
from saelab.train import Grid, TrainConfig, train
from tests.dictionaries.helpers import make_sae

FAST = AbsorptionSettings(probe_batch_size=1024)  # the metric's known answers do not depend on the probe's batch
N_PARENTS, FIRST, WIDTH, K, BATCH = 2, 4, 64, 2, 256


def _train(planted, prefixes: list[int] | None, steps: int = 200):
    """A TopK SAE (k=2, width 64) trained on the planted rows. Both SAEs start from the same decoder, unit rows of
    labelled data rows (centred on `b_dec`), so they differ only in their objective; from the default random start a
    k=2 TopK SAE needs thousands of steps to learn 40 rare children at all."""
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=planted.x.shape[1], d_sae=WIDTH, k=K, matryoshka_prefixes=prefixes, dead_tokens=2048)
    sae = SAE.from_config(cfg)
    sae.init_from_sample(planted.x[:1024])
    g = torch.Generator().manual_seed(1)
    labelled = torch.from_numpy(np.nonzero(planted.y >= 0)[0])
    with torch.no_grad():
        rows = planted.x[labelled[torch.randperm(len(labelled), generator=g)[:WIDTH]]] * sae.input_scale - sae.b_dec
        sae.W_dec.copy_(rows / rows.norm(dim=1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    with single_thread():  # a 64 x 64 SAE: threads only add overhead
        for step in range(steps):
            if step % 20 == 0:
                sae.plan_aux()
            train_step(sae, opt, planted.x[torch.randint(0, len(planted.x), (BATCH,), generator=g)])
    return sae.eval()


@pytest.fixture(scope="module")
def hierarchy():
    """Two parents with 20 children each: half the rows hold a parent, 70% of those also one of its children (never
    without it); a TopK SAE and a Matryoshka one (first prefix: two latents per parent) of the same width and k."""
    p = planted_absorption(n_rows=10_000, n_parents=N_PARENTS, n_children=20, child_prob=0.7, parent_prob=0.5, d=64)
    data = planted_probe_data(p, s=FAST)
    saes = {name: _train(p, prefixes) for name, prefixes in (("topk", None), ("matryoshka", [FIRST, WIDTH]))}
    scores = {name: absorption_result(sae, data, "synthetic", variant=name, s=FAST) for name, sae in saes.items()}
    return p, saes, scores


def test_matryoshka_keeps_the_parents_that_topk_absorbs(hierarchy):
    p, saes, scores = hierarchy
    topk, mat = scores["topk"].mean_absorption_fraction, scores["matryoshka"].mean_absorption_fraction
    assert topk is not None and mat is not None
    assert topk >= 0.3  # TopK's children latents carry their parent: up to 0.7 of a parent's rows
    assert mat <= topk / 2
    assert scores["topk"].l0 == pytest.approx(scores["matryoshka"].l0, abs=0.3)  # the same k, about the same L0
    parents = p.directions[:N_PARENTS]
    first = torch.nn.functional.normalize(saes["matryoshka"].W_dec.detach()[:FIRST], dim=1)
    assert ((first @ parents.T).max(0).values >= 0.9).all()  # every parent is a latent of the first prefix


def _dense_reference(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Bussmann et al.'s prefix losses with dense tensors and plain autograd: the batch's top-k activations, each
    prefix reconstructing from its own latents, the mean of the prefixes' FVUs (no AuxK)."""
    xs = sae.prepare_input(x)
    pre = sae.pre_acts(xs)
    idx = pre.topk(sae.cfg.k, dim=1).indices
    acts = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    total = (xs - xs.mean(0)).square().sum()
    widths = sae.cfg.matryoshka_prefixes or [sae.cfg.d_sae]
    fvus = [(xs - acts[:, :w] @ sae.W_dec[:w] - sae.b_dec).square().sum() / total for w in widths]
    return torch.stack(fvus).mean()


def test_prefix_losses_and_gradients_match_the_dense_reference():
    sae = make_sae("topk", matryoshka_prefixes=[6, 20, 48], aux_coef=0.0)
    x = torch.randn(40, 12, dtype=torch.float64)
    loss, metrics = sae.training_loss(x)
    loss.backward()
    ours = {n: q.grad.clone() for n, q in sae.named_parameters() if q.grad is not None}
    sae.zero_grad()
    reference = _dense_reference(sae, x)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)  # float64: summation order only
    for name, q in sae.named_parameters():
        torch.testing.assert_close(ours[name], q.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert set(metrics) >= {"fvu_6", "fvu_20", "prefix_fvu"}
    torch.testing.assert_close(metrics["prefix_fvu"], reference.detach())


def test_a_split_batch_takes_the_whole_batchs_denominators():
    """`parallel: ddp` in one process: the halves' losses, metrics and gradients add up to the whole batch's."""
    x = torch.randn(40, 12, dtype=torch.float64)
    whole = make_sae("topk", matryoshka_prefixes=[6, 48], dead_tokens=1)
    loss, metrics = whole.training_loss(x)
    loss.backward()
    parts = []
    for rows in (slice(0, 25), slice(25, 40)):
        half = make_sae("topk", matryoshka_prefixes=[6, 48], dead_tokens=1)
        half.split = rows
        parts.append((half, *half.training_loss(x)))
    for _, part_loss, _ in parts:
        part_loss.backward()
    torch.testing.assert_close(sum(part for _, part, _ in parts), loss)
    for key in ("fvu", "fvu_6", "prefix_fvu", "auxk"):
        torch.testing.assert_close(sum(m[key] for _, _, m in parts), metrics[key], msg=key)
    for name, q in whole.named_parameters():
        torch.testing.assert_close(sum(dict(h.named_parameters())[name].grad for h, _, _ in parts), q.grad, msg=name)


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_saved_matryoshka_sae_loads_in_saelens_and_back_with_its_prefixes(arch, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = make_sae(arch, dtype="float32", matryoshka_prefixes=[6, 20, 48])
    sae.save(tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())["metadata"]
    assert meta["training_architecture"] == f"matryoshka_{arch}"
    assert meta["training_architecture_details"]["matryoshka_widths"] == [6, 20, 48]
    theirs = sae_lens.SAE.load_from_disk(tmp_path)
    x = torch.randn(50, 12) * 2
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-5)
    loaded = SAE.load(tmp_path)
    assert loaded.cfg.matryoshka_prefixes == [6, 20, 48]
    torch.testing.assert_close(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
    # as SAELens writes one: its metadata alone (no saelab config) gives back the prefixes
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["metadata"]["saelab_config"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert SAE.load(tmp_path).cfg.matryoshka_prefixes == [6, 20, 48]


def test_a_prefix_works_on_its_own(tmp_path):
    sae = make_sae("batchtopk", matryoshka_prefixes=[6, 20, 48]).eval()
    assert isinstance(sae, BatchTopKSAE)
    x = torch.randn(30, 12, dtype=torch.float64) * 2
    first = sae.prefix(20)
    assert first.cfg.d_sae == 20 and first.cfg.matryoshka_prefixes == [6, 20]
    f = sae.encode(x)
    # a BatchTopK prefix encodes as the whole SAE's first latents, and reconstructs as its prefix does in training
    torch.testing.assert_close(first.encode(x), f[:, :20])
    torch.testing.assert_close(first(x), f[:, :20] @ sae.W_dec[:20] + sae.b_dec / sae.input_scale)
    first.save(tmp_path)
    torch.testing.assert_close(SAE.load(tmp_path).forward(x), first(x))
    whole = make_sae("topk", matryoshka_prefixes=[6, 48])
    assert isinstance(whole, TopKSAE)
    topk = whole.prefix(6)  # a TopK prefix: its own top k of its latents
    assert topk.cfg.k == 5 and topk.encode(x).count_nonzero(1).max() <= 5
    with pytest.raises(ConfigError, match="does not fit d_sae=48"):
        sae.prefix(49)


def test_sampled_prefixes_are_the_same_after_a_resume(tmp_path):
    """Nabeshima's drawn widths follow the SAE's draw counter, which a checkpoint keeps: 6 steps, or 3 steps saved
    and restored (as `saelab.train.checkpoint` does) then 3 more, end with the same weights."""
    assert sample_prefixes(48, 4, draw=7) == sample_prefixes(48, 4, draw=7)
    assert sample_prefixes(48, 4, draw=7)[-1] == 48 and len(set(sample_prefixes(48, 4, draw=7))) == 4
    x = torch.randn(6, 40, 12, dtype=torch.float64)

    def run(sae, opt, steps):
        for i in steps:
            train_step(sae, opt, x[i])

    straight = make_sae("topk", matryoshka_sample=3)
    opt = torch.optim.Adam(straight.parameters(), lr=1e-2)
    run(straight, opt, range(6))
    first = make_sae("topk", matryoshka_sample=3)
    opt = torch.optim.Adam(first.parameters(), lr=1e-2)
    run(first, opt, range(3))
    save_file({k: v.contiguous() for k, v in first.state_dict().items()}, tmp_path / "ckpt.safetensors")
    resumed = make_sae("topk", matryoshka_sample=3, seed=5)
    resumed.load_state_dict(load_file(tmp_path / "ckpt.safetensors"))
    assert isinstance(resumed, TopKSAE)
    assert int(resumed.prefix_draws) == 3
    opt2 = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(opt.state_dict())
    run(resumed, opt2, range(3, 6))
    for name, q in straight.named_parameters():
        torch.testing.assert_close(dict(resumed.named_parameters())[name], q, msg=name)


def test_a_sweep_gives_each_width_its_prefixes(hierarchy, tmp_path):
    """`sae: {matryoshka_prefixes: fractions}` fits every expansion of the grid; each saved SAE loads with its own."""
    p = hierarchy[0]
    store = str(tmp_path / "planted.zarr")
    import_arrays({"h": p.x[:6000].numpy()}, store, shard_rows=2048, chunk_rows=1024, progress=False)
    cfg = TrainConfig(
        store=store,
        run=str(tmp_path / "run"),
        tokens=256 * 12,
        batch_size=256,
        eval_rows=1024,
        warmup_steps=2,
        grid=Grid(arch=["topk", "batchtopk"], k=[2], expansion=[1, 2]),
        sae={"matryoshka_prefixes": [0.125, 0.5, 1.0]},
    )
    results = train(cfg, progress=False)
    assert len(results) == 4 and all(r.stopped is None for r in results)
    for r in results:
        assert SAE.load(r.path).cfg.matryoshka_prefixes == [r.width // 8, r.width // 2, r.width]


@pytest.mark.parametrize(
    ("prefixes", "problem"),
    [
        ([], "is empty"),
        ([16, 8, 64], "strictly increasing"),
        ([8, 32], "must end at the whole dictionary"),
        ([8, 128], "must end at the whole dictionary"),
        ([0.5, 64], "mixes widths and fractions"),
        ([0.5, 1.5], r"must lie in \(0, 1\]"),
    ],
)
def test_prefix_lists_that_do_not_fit_the_width_are_refused(prefixes, problem):
    fields = {"d_in": 16, "d_sae": 64, "k": 4, "matryoshka_prefixes": prefixes}
    with pytest.raises(ConfigError, match=f"{problem}.*give increasing widths ending at d_sae=64"):
        build(SAEConfig, fields, "SAE config")
    with pytest.raises(ConfigError, match="need arch topk or batchtopk"):
        build(SAEConfig, fields | {"arch": "relu", "matryoshka_prefixes": [8, 64]}, "SAE config")
