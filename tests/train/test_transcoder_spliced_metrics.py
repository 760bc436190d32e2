"""A decoder's loss and KL with an MLP replaced by a transcoder (`spliced_metrics` with `output_hook`), and the
trainer writing them into a transcoder's `metrics.json` and a sweep's table, as it does for SAEs.

Known answers: an exact transcoder (a ReLU MLP's own weights) leaves the loss unchanged; one whose output is half the
MLP's gives the loss of the model with the MLP's output halved; a transcoder trained on a decoder's store moves the
model's predictions by as much as an error of its FVU is predicted to (the bracket is defined in
`test_a_trained_transcoder_leaves_the_loss_in_the_range_its_fvu_predicts`)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from saelab.config import HarvestConfig
from saelab.dashboards.components import fmt, metrics_table
from saelab.dashboards.data import list_saes
from saelab.dictionaries import SAE
from saelab.errors import ConfigError
from saelab.harvest import harvest
from saelab.models import forward_to, load_model
from saelab.train import (
    TrainConfig,
    eval_tokens,
    pareto_figure,
    read_results,
    spliced_metrics,
    train,
    write_sweep_outputs,
)
from tests.conftest import exact_transcoder

SPLICED = ("ce_orig", "ce_sae", "ce_zero", "ce_loss_score", "kl_sae", "kl_zero", "kl_div_score")
CE_CONTEXTS = 8


def mlp_hooks(layer: int) -> tuple[str, str]:
    return f"blocks.{layer}.hook_mlp_in", f"blocks.{layer}.hook_mlp_out"


def loss(model, tokens: torch.Tensor, hooks: list) -> tuple[float, torch.Tensor]:
    """Next-token CE of `model` on `tokens` under `hooks` and its next-token log-probabilities."""
    with torch.no_grad():
        logp = model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")[:, :-1].float().log_softmax(-1)
    return float(-logp.gather(-1, tokens[:, 1:, None]).mean()), logp


def kl(logp_orig: torch.Tensor, logp: torch.Tensor) -> float:
    return float((logp_orig.exp() * (logp_orig - logp)).sum(-1).mean())


@pytest.fixture(scope="module")
def tokens(relu_decoder):
    return torch.randint(relu_decoder.cfg.d_vocab, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("layer", [0, 1])
def test_an_exact_transcoder_leaves_the_loss_unchanged(relu_decoder, tokens, layer):
    """The transcoder that is the ReLU MLP (its neurons as latents) gives CE_orig and no KL, while zero-ablating the
    MLP's output does move the loss (measured: KL 0.34 at layer 0, 0.16 at layer 1)."""
    mlp_in, mlp_out = mlp_hooks(layer)
    m = spliced_metrics(relu_decoder, exact_transcoder(relu_decoder, layer), mlp_in, output_hook=mlp_out, tokens=tokens)
    assert m["ce_sae"] == pytest.approx(m["ce_orig"], abs=1e-5)
    assert abs(m["kl_sae"]) < 1e-6
    assert m["kl_zero"] > 0.05 and abs(m["ce_zero"] - m["ce_orig"]) > 1e-3
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-3) and m["kl_div_score"] == pytest.approx(1.0, abs=1e-5)
    ce_zero, _ = loss(relu_decoder, tokens, [(mlp_out, lambda act, hook: torch.zeros_like(act))])
    assert m["ce_zero"] == pytest.approx(ce_zero, abs=1e-5)  # the baseline zero-ablates the MLP's output


@pytest.mark.parametrize("layer", [0, 1])
def test_a_transcoder_writing_half_the_mlps_output_gives_the_loss_of_the_halved_mlp(relu_decoder, tokens, layer):
    """The splice really replaces the MLP's output (an exact transcoder would also pass if nothing were spliced):
    halving the exact transcoder's decoder gives the CE and KL of the model with `hook_mlp_out` halved."""
    mlp_in, mlp_out = mlp_hooks(layer)
    half = exact_transcoder(relu_decoder, layer)
    with torch.no_grad():
        half.W_dec.mul_(0.5)
        half.b_dec.mul_(0.5)
    m = spliced_metrics(relu_decoder, half, mlp_in, output_hook=mlp_out, tokens=tokens)
    _, logp_orig = loss(relu_decoder, tokens, [])
    ce_half, logp_half = loss(relu_decoder, tokens, [(mlp_out, lambda act, hook: 0.5 * act)])
    assert m["ce_sae"] == pytest.approx(ce_half, abs=1e-5)
    assert m["kl_sae"] == pytest.approx(kl(logp_orig, logp_half), rel=1e-4, abs=1e-7)
    assert m["kl_sae"] > 0.01  # measured: 0.050 at layer 0, 0.030 at layer 1


def test_a_transcoder_without_its_output_hook_is_refused(relu_decoder, tokens):
    mlp_in, mlp_out = mlp_hooks(0)
    with pytest.raises(ConfigError, match="give output_hook"):
        spliced_metrics(relu_decoder, exact_transcoder(relu_decoder, 0), mlp_in, tokens=tokens)
    sae = SAE.from_config(exact_transcoder(relu_decoder, 0).cfg.model_copy(update={"d_out": None, "skip": False}))
    with pytest.raises(ConfigError, match="give no output_hook"):
        spliced_metrics(relu_decoder, sae, mlp_out, output_hook=mlp_out, tokens=tokens)


@pytest.fixture(scope="module")
def decoder_run(trained_decoder_dir, tmp_path_factory):
    """A store of the trained tiny decoder's layer-0 MLP (20k tokens) and, trained on it in one pass (40 steps), a
    TopK transcoder, a skip transcoder, a TopK SAE on the MLP's output and a BatchTopK crosscoder of the MLP's input
    and output. The run folder, the decoder, the store's config and the `TrainedSAE`s by `arch`."""
    mlp_in, mlp_out = mlp_hooks(0)
    tmp = tmp_path_factory.mktemp("tc-spliced")
    cfg = HarvestConfig(
        model=trained_decoder_dir,
        hooks=[mlp_in, mlp_out],
        out=str(tmp / "s.zarr"),
        context_length=32,
        batch_size=8,
        max_tokens=20_000,
        shard_rows=4096,
        chunk_rows=1024,
    )
    store = harvest(cfg, progress=False)
    train_cfg = dict(store=store.path, run=str(tmp / "run"), tokens=256 * 40, batch_size=256, eval_rows=2048)
    pair = {"input": mlp_in, "output": mlp_out}
    train_cfg |= dict(transcoders=[pair, pair | {"skip": True}], crosscoders=[{"sources": [mlp_in, mlp_out]}])
    train_cfg |= dict(hooks=[mlp_out], grid={"k": [8], "expansion": [4]}, ce_contexts=CE_CONTEXTS, device="cpu")
    results = {r.arch: r for r in train(TrainConfig.model_validate(train_cfg), progress=False)}
    return tmp / "run", load_model(trained_decoder_dir, device="cpu"), store.config, results


def test_the_trainer_writes_a_transcoders_spliced_metrics_into_metrics_json(decoder_run):
    _, _, _, results = decoder_run
    assert sorted(results) == ["crosscoder-batchtopk", "skiptranscoder-topk", "topk", "transcoder-topk"]
    assert results["crosscoder-batchtopk"].spliced is None  # it writes two hook points: no one activation to replace
    for r in (results[arch] for arch in ("skiptranscoder-topk", "topk", "transcoder-topk")):
        metrics = json.loads((r.path / "metrics.json").read_text())
        assert r.spliced is not None and {k: metrics[k] for k in SPLICED} == r.spliced, r.arch
        assert metrics["ce_zero"] > metrics["ce_sae"] > metrics["ce_orig"], r.arch
        assert 0 < metrics["kl_sae"] < metrics["kl_zero"], r.arch
    # one model and one baseline: the SAE on the MLP's output zero-ablates the same activation
    ce_zero = {r.spliced["ce_zero"] for r in results.values() if r.spliced is not None}
    assert max(ce_zero) - min(ce_zero) < 1e-6


def test_a_sweeps_table_and_pareto_plot_hold_the_transcoders_and_the_crosscoder_beside_the_sae(decoder_run, tmp_path):
    """`results.csv` (what `saelab sweep` writes from the `TrainedSAE` rows) carries each transcoder's CE and KL scores
    as the SAE's and every dictionary's FVU and L0, and the Pareto plot draws the transcoders and the crosscoder (all
    filed under the hook point they read first, the SAE's input) as series of their own."""
    _, _, _, results = decoder_run
    table, plot = write_sweep_outputs([r.row() for r in results.values()], tmp_path)
    rows = {r["arch"]: r for r in read_results(table)}
    assert sorted(rows) == sorted(results)
    for arch, r in results.items():
        assert r.reconstruction is not None
        assert float(rows[arch]["fvu"]) == pytest.approx(r.reconstruction["fvu"], rel=1e-6)
        assert float(rows[arch]["l0"]) == pytest.approx(r.reconstruction["l0"], rel=1e-6)
        if r.spliced is not None:
            assert float(rows[arch]["ce_loss_score"]) == pytest.approx(r.spliced["ce_loss_score"], rel=1e-6)
            assert float(rows[arch]["kl_div_score"]) == pytest.approx(r.spliced["kl_div_score"], rel=1e-6)
    assert rows["crosscoder-batchtopk"]["ce_loss_score"] == ""
    names = {trace["name"] for trace in pareto_figure(read_results(table)).to_dict()["data"]}
    assert names == {
        "blocks.0.hook_mlp_in transcoder-topk w256",
        "blocks.0.hook_mlp_in skiptranscoder-topk w256",
        "blocks.0.hook_mlp_in crosscoder-batchtopk w256",
        "blocks.0.hook_mlp_out topk w256",
    }
    assert all(name in plot.read_text() for name in names)


def test_the_apps_run_page_shows_a_transcoders_ce_score(decoder_run):
    """The overview page's table of the run's dictionaries (`metrics_table`) shows each transcoder's architecture and
    CE score from its `metrics.json`, as the SAE's."""
    run, _, _, results = decoder_run
    saes = list_saes(str(run))
    table = metrics_table(saes, {}, {(s.hook, s.variant): None for s in saes})
    parts: Any = table.children
    head, body = parts
    columns = [str(cell.children) for cell in head.children.children]
    ce, arch_column = columns.index("CE score"), columns.index("arch")
    shown = {str(row.children[arch_column].children): [str(c.children) for c in row.children] for row in body.children}
    for arch in ("transcoder-topk", "skiptranscoder-topk", "topk"):
        spliced = results[arch].spliced
        assert spliced is not None and shown[arch][ce] == fmt(spliced["ce_loss_score"]), shown[arch]
    assert shown["crosscoder-batchtopk"][ce] == ""


@pytest.mark.parametrize("arch", ["transcoder-topk", "skiptranscoder-topk"])
def test_a_trained_transcoder_leaves_the_loss_in_the_range_its_fvu_predicts(decoder_run, arch):
    """The FVU-predicted range. Let `f` be the transcoder's FVU of the MLP's output `y` on the very positions the
    spliced metrics run on (the trainer's eval contexts), `mu` the mean of `y` there. Two errors of exactly that FVU
    bracket the KL its own error should cause:

    - isotropic Gaussian noise, `y + sigma * eps` with `sigma^2 = f * sum |y - mu|^2 / y.numel()`: the error spread
      evenly over every direction, most of which the rest of the model does not read (the least harmful error of that
      size), a lower bound;
    - shrinkage toward the mean, `mu + (1 - sqrt(f)) * (y - mu)`: the error lying wholly along the MLP's own
      variation, every direction the model reads losing the same share (the most aligned), an upper bound.

    An MSE-trained transcoder's error lies in between: it misses the parts of `y` it cannot code, which are part of
    what the model reads but not all of it. So KL_noise < KL_sae < KL_shrink, and CE_orig < CE_sae < CE_shrink (the
    noise's CE is no bound: on this barely trained decoder a random error can lower the loss a little). Measured with
    40 steps: FVU 0.53 / 0.29 (skip), KL 0.0033 < 0.0055 < 0.016 and 0.0018 < 0.0029 < 0.0097; the bracket also held
    at FVU 0.16 to 1.6 (TopK and BatchTopK, 10 to 100 steps). The test also recomputes the spliced CE and KL from the
    transcoder's output put in place of the MLP's by hand."""
    _, model, store_config, results = decoder_run
    r = results[arch]
    assert r.spliced is not None
    mlp_in, mlp_out = mlp_hooks(0)
    tokens = eval_tokens(store_config, model, CE_CONTEXTS)
    transcoder = SAE.load(r.path).eval()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[mlp_out])
        y, y_hat = cache[mlp_out], transcoder(forward_to(model, tokens, mlp_in))
    mu = y.flatten(0, 1).mean(0)
    spread = float((y - mu).square().sum())
    f = float((y - y_hat).square().sum()) / spread
    assert 0.05 < f < 1.0, f  # a transcoder that learnt something, and not everything
    sigma = (f * spread / y.numel()) ** 0.5
    noise = sigma * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    ce_orig, logp_orig = loss(model, tokens, [])
    ce_sae, logp_sae = loss(model, tokens, [(mlp_out, lambda act, hook: y_hat)])
    ce_shrink, logp_shrink = loss(model, tokens, [(mlp_out, lambda act, hook: mu + (1 - f**0.5) * (act - mu))])
    _, logp_noise = loss(model, tokens, [(mlp_out, lambda act, hook: act + noise)])
    s = r.spliced
    assert s["ce_orig"] == pytest.approx(ce_orig, abs=1e-5) and s["ce_sae"] == pytest.approx(ce_sae, abs=1e-5)
    assert s["kl_sae"] == pytest.approx(kl(logp_orig, logp_sae), rel=1e-4)
    kl_noise, kl_shrink = kl(logp_orig, logp_noise), kl(logp_orig, logp_shrink)
    assert kl_noise < s["kl_sae"] < kl_shrink, (f, kl_noise, s["kl_sae"], kl_shrink)
    assert ce_orig < s["ce_sae"] < ce_shrink, (f, ce_orig, s["ce_sae"], ce_shrink)
