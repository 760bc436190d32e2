"""Trainer: several SAEs per pass, exact resume after SIGKILL, NaN isolation, sweep outputs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from saelab.cli import app
from saelab.dictionaries import SAE
from saelab.errors import ConfigError, StoreError
from saelab.importer import import_arrays
from saelab.store import ActivationStore
from saelab.toys.synthetic import make_synthetic
from saelab.train import (
    Grid,
    ReconstructionMetrics,
    TrainConfig,
    TrainedSAE,
    default_lr,
    lr_factor,
    read_results,
    train,
)

D = 32


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """Sparse combinations of 128 known directions in 32 dims, under two hook names."""
    data = make_synthetic(n_features=128, d=D, mean_active=4.0, n_pairs=8, seed=0)
    x = data.sample(24_000, torch.Generator().manual_seed(0)).numpy()
    out = str(tmp_path_factory.mktemp("store") / "syn.zarr")
    import_arrays({"h0": x, "h1": 2 * x + 1}, out, shard_rows=4096, chunk_rows=1024, progress=False)
    return out


def config(store_path, out, **kw):
    base = dict(
        store=store_path,
        run=str(out),
        tokens=256 * 120,
        batch_size=256,
        eval_rows=4096,
        warmup_steps=10,
        checkpoint_every=256 * 20,
        log_every=10,
        grid={"arch": ["topk"], "k": [4], "expansion": [4]},
        sae={"dead_tokens": 5000},
    )
    return {**base, **kw}


def test_schedule_and_default_lr():
    assert default_lr(2**14) == pytest.approx(2e-4) and default_lr(2**16) == pytest.approx(1e-4)
    f = [lr_factor(s, 100, warmup=10, decay_start=0.8) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == 1.0 and f[50] == 1.0 and f[90] == pytest.approx(0.5) and f[99] < 0.1


def test_grid_trains_every_sae_in_one_pass_and_saves_saelens_layout(store_path, tmp_path):
    cfg = TrainConfig(
        **config(
            store_path,
            tmp_path,
            grid={"arch": ["topk", "batchtopk", "relu"], "k": [4, 8], "expansion": [4], "lr": [2.5e-3]},
            sae={"dead_tokens": 5000, "l1_coef": 1.0},
        )
    )
    results = train(cfg, progress=False)
    assert len(results) == 2 * 3 * 2  # hooks x arch x k
    assert all(r.spliced is None for r in results)  # no decoder, no spliced metrics
    by = {(r.hook, r.arch, r.k): (r.path, _metrics(r)) for r in results}
    assert by[("h0", "topk", 8)][1]["fvu"] < by[("h0", "topk", 4)][1]["fvu"] < 0.5
    assert by[("h0", "topk", 4)][1]["l0"] == pytest.approx(4, abs=0.01)
    x = ActivationStore.open(store_path).activations("h1", slice(-4096, None))
    for path, m in by.values():
        assert set(os.listdir(path)) >= {"cfg.json", "sae_weights.safetensors", "metrics.json"}
        assert m["dead_frac"] <= 1 and 0 <= m["dense_frac"] <= 1
    path, m = by[("h1", "topk", 8)]
    sae = SAE.load(path)  # the input scale is folded: it works on raw activations
    fvu = ((x - sae(x)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
    assert fvu == pytest.approx(m["fvu"], rel=1e-4)


def _metrics(result: TrainedSAE) -> ReconstructionMetrics:
    assert result.reconstruction is not None, f"{result.variant} was stopped: {result.stopped}"
    return result.reconstruction


def test_metrics_json_holds_the_flat_row_with_the_path_relative_to_the_run(store_path, tmp_path):
    (r,) = train(TrainConfig(**config(store_path, tmp_path, hooks=["h0"], tokens=256 * 20)), progress=False)
    saved = (r.path / "metrics.json").read_text()
    row = json.loads(saved)
    assert list(row) == [*"hook arch k width lr seed tokens path".split(), *ReconstructionMetrics.__annotations__]
    assert row["path"] == f"saes/h0/{r.variant}" and (tmp_path / row["path"]) == r.path
    assert row == r.row() and saved == json.dumps(r.row(), indent=1)
    assert (row["hook"], row["arch"], row["k"], row["width"], row["tokens"]) == ("h0", "topk", 4, 128, 256 * 20)
    assert row["seed"] == 0 and r.variant == f"topk-k4-w128-lr{r.lr:.3g}"  # no `grid.seed`: named as before seeds
    saved = json.loads((tmp_path / "saes" / "train_config.json").read_text())
    assert "seed" not in saved["grid"]  # recorded as before seeds, so runs trained then still resume


def test_grid_seeds_train_distinct_saes_on_the_same_batches_in_one_pass(store_path, tmp_path):
    grid = {"arch": ["topk"], "k": [4], "expansion": [4]}
    seeds = dict(hooks=["h0"], tokens=256 * 20, grid=grid | {"seed": [0, 1]})
    one_pass = train(TrainConfig(**config(store_path, tmp_path / "both", **seeds)), progress=False)
    name = f"topk-k4-w128-lr{one_pass[0].lr:.3g}"
    assert [(r.variant, r.seed) for r in one_pass] == [(f"{name}-s0", 0), (f"{name}-s1", 1)]
    w0, w1 = (load_file(str(r.path / "sae_weights.safetensors")) for r in one_pass)
    assert not torch.allclose(w0["W_dec"], w1["W_dec"], atol=0.1)  # each seed its own initialisation
    # Seed 1 alone trains the same weights bit for bit: the same batches, and its start is its seed's alone.
    alone = seeds | {"grid": grid | {"seed": [1]}}
    (r1,) = train(TrainConfig(**config(store_path, tmp_path / "alone", **alone)), progress=False)
    w = load_file(str(r1.path / "sae_weights.safetensors"))
    assert w.keys() == w1.keys() and all(torch.equal(w[k], w1[k]) for k in w)
    # The batch order is `TrainConfig.seed`'s: another one trains other weights from the same start.
    (other,) = train(TrainConfig(**config(store_path, tmp_path / "other", seed=7, **alone)), progress=False)
    assert not torch.equal(load_file(str(other.path / "sae_weights.safetensors"))["W_dec"], w1["W_dec"])
    assert [json.loads((r.path / "metrics.json").read_text())["seed"] for r in (*one_pass, other)] == [0, 1, 1]
    assert json.loads((tmp_path / "both" / "saes" / "train_config.json").read_text())["grid"]["seed"] == [0, 1]


def test_diverging_sae_is_stopped_and_others_go_on(store_path, tmp_path):
    cfg = TrainConfig(
        **config(
            store_path, tmp_path, hooks=["h0"], grid={"arch": ["topk"], "k": [4], "expansion": [4], "lr": [1e-3, 1e38]}
        )
    )
    ok, bad = sorted(train(cfg, progress=False), key=lambda r: r.lr)
    assert ok.stopped is None and _metrics(ok)["fvu"] < 0.5
    assert bad.stopped is not None and "NaN/inf at step" in bad.stopped and bad.reconstruction is None
    assert not (bad.path / "sae_weights.safetensors").exists()
    row = json.loads((bad.path / "metrics.json").read_text())
    assert row == bad.row() and row["stopped"] == bad.stopped and "fvu" not in row


def test_bad_inputs_are_refused(store_path, tmp_path):
    with pytest.raises(StoreError, match="not in store"):
        train(TrainConfig(**config(store_path, tmp_path, hooks=["blocks.0.hook_resid_post"])), progress=False)
    with pytest.raises(ConfigError, match="k=64 exceeds d_sae=32"):
        train(TrainConfig(**config(store_path, tmp_path, grid={"k": [64], "expansion": [1]})), progress=False)
    train(TrainConfig(**config(store_path, tmp_path, hooks=["h0"], tokens=256 * 20)), progress=False)
    with pytest.raises(ConfigError, match="different config"):
        train(TrainConfig(**config(store_path, tmp_path, hooks=["h0"], tokens=256 * 30)), progress=False)


@pytest.mark.parametrize(
    ("sae", "problem"),
    [
        (
            {"matryoshka_prefixes": [8, 128]},
            r"\(topk, k=4, x1\).*must end at the whole dictionary; give increasing "
            r"widths ending at d_sae=32 \(e.g. \[4, 32\]\) or fractions of it",
        ),
        ({"matryoshka_sample": 64}, r"\(topk, k=4, x1\).*matryoshka_sample=64 exceeds d_sae=32; lower it"),
        ({"mask_fraction": 1.0}, r"mask_fraction=1.0 is outside \(0, 1\); give the fraction of input dimensions"),
        ({"mask_fraction": 0.01}, r"hides none or all of them; give a fraction between 0.0312 and 0.969"),
    ],
)
def test_sae_options_that_do_not_fit_a_member_of_the_sweep_are_refused_before_anything_is_written(
    store_path, tmp_path, sae, problem
):
    """`sae:` applies to every member of the grid (here widths 32 and 128 over d=32): one that does not fit is named,
    with the fix, and the run folder is not created."""
    grid = {"arch": ["topk"], "k": [4], "expansion": [1, 4]}
    with pytest.raises(ConfigError, match=f"(?s){problem}"):  # the member on one line, its problem on the next
        train(TrainConfig(**config(store_path, tmp_path / "run", hooks=["h0"], grid=grid, sae=sae)), progress=False)
    assert not (tmp_path / "run").exists()


def _latest_step(out) -> int:
    try:
        return json.loads((out / "saes" / "checkpoint" / "latest.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _train_cli(path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "saelab.cli", "train", str(path), "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _stderr_tail(proc: subprocess.Popen[bytes]) -> str:
    return proc.stderr.read().decode()[-2000:] if proc.stderr is not None else ""


def test_resume_after_sigkill_ends_with_the_same_weights(store_path, tmp_path):
    def write(name):
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            yaml.safe_dump(
                config(
                    store_path,
                    tmp_path / name,
                    tokens=256 * 400,
                    checkpoint_every=256 * 25,
                    grid={"arch": ["topk"], "k": [4], "expansion": [8]},
                )
            )
        )
        return path

    ref = _train_cli(write("ref"))
    assert ref.wait(timeout=300) == 0, _stderr_tail(ref)
    proc = _train_cli(write("killed"))
    deadline = time.time() + 120
    while _latest_step(tmp_path / "killed") < 100 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _latest_step(tmp_path / "killed")
    assert 100 <= killed_at < 400, f"training was not killed midway (checkpoint step {killed_at})"
    proc = _train_cli(write("killed"))
    assert proc.wait(timeout=300) == 0, _stderr_tail(proc)
    weights = sorted((tmp_path / "ref" / "saes").glob("h*/*/sae_weights.safetensors"))
    assert len(weights) == 2
    for path in weights:
        want = load_file(str(path))
        got = load_file(str(tmp_path / "killed" / path.relative_to(tmp_path / "ref")))
        differ = {k: float((want[k] - got[k]).abs().max()) for k in want if not torch.equal(want[k], got[k])}
        assert want.keys() == got.keys() and not differ, (
            f"resumed from step {killed_at}: {path.parent.name} differs in {differ}"
        )


def test_sweep_cli_writes_table_and_pareto(store_path, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            config(
                store_path,
                tmp_path / "run",
                hooks=["h0"],
                tokens=256 * 30,
                grid={"arch": ["topk"], "k": [2, 4], "expansion": [2, 4]},
            )
        )
    )
    result = CliRunner().invoke(app, ["sweep", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    rows = read_results(tmp_path / "run" / "results.csv")
    assert sorted((r["k"], r["width"]) for r in rows) == [("2", "128"), ("2", "64"), ("4", "128"), ("4", "64")]
    assert all((tmp_path / "run" / r["path"] / "cfg.json").is_file() for r in rows)  # relative to the run
    html = (tmp_path / "run" / "pareto.html").read_text()
    assert "h0 topk w64" in html and "h0 topk w128" in html


def test_ce_loss_recovered_on_a_decoder_store(trained_decoder_dir, tmp_path):
    from saelab.config import HarvestConfig
    from saelab.dictionaries import SAEConfig
    from saelab.harvest import harvest
    from saelab.models import load_model
    from saelab.train import eval_tokens, spliced_metrics

    store = harvest(
        HarvestConfig(
            model=trained_decoder_dir,
            hooks=["blocks.0.hook_resid_post", "blocks.0.attn.hook_z"],
            out=str(tmp_path / "s.zarr"),
            context_length=32,
            batch_size=8,
            max_tokens=20_000,
            shard_rows=4096,
            chunk_rows=1024,
        ),
        progress=False,
    )
    model = load_model(trained_decoder_dir, device="cpu")
    tokens = eval_tokens(store.config, model, 4)
    bos = model.tokenizer.bos_token_id if model.tokenizer is not None else None
    assert isinstance(bos, int)
    assert tokens.shape == (4, 32) and (tokens[:, 0] == bos).all()

    # A TopK SAE with W_enc = [I, -I], W_dec = [I; -I], k = d reconstructs exactly: score 1, KL 0.
    d = 64
    exact = SAE.from_config(SAEConfig(arch="topk", d_in=d, d_sae=2 * d, k=d))
    eye = torch.eye(d)
    with torch.no_grad():
        exact.W_enc.copy_(torch.cat([eye, -eye], 1))
        exact.W_dec.copy_(torch.cat([eye, -eye], 0))
        exact.b_enc.zero_()
        exact.b_dec.zero_()
    m = spliced_metrics(model, exact, "blocks.0.attn.hook_z", tokens=tokens)
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-4) and m["kl_sae"] == pytest.approx(0.0, abs=1e-5)
    assert m["ce_zero"] > m["ce_orig"] and m["kl_zero"] > 0

    # Zero-ablating the residual stream is catastrophic, so the score's denominator is stable there.
    rows = train(
        TrainConfig(
            store=store.path,
            run=str(tmp_path / "run"),
            tokens=256 * 40,
            batch_size=256,
            eval_rows=2048,
            hooks=["blocks.0.hook_resid_post"],
            grid=Grid(k=[8], expansion=[4]),
            ce_contexts=4,
        ),
        progress=False,
    )
    (r,) = rows
    s = r.spliced
    assert s is not None and s["ce_zero"] - s["ce_orig"] > 0.1
    assert 0.3 < s["ce_loss_score"] <= 1 and 0.5 < s["kl_div_score"] <= 1 and s["ce_sae"] > s["ce_orig"]
    assert r.row().items() >= dict(s).items()  # metrics.json holds the spliced metrics beside the others


def test_tensorboard_logger_records_the_progress_metrics(store_path, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(
        TrainConfig(
            # lr 0.01: this dense toy (every feature fires 3% of the time) learns best at ~3x under `default_lr`'s floor
            **config(
                store_path,
                tmp_path,
                hooks=["h0"],
                tokens=256 * 30,
                logger="tensorboard",
                grid={"arch": ["topk"], "k": [4], "expansion": [4], "lr": [0.01]},
            )
        ),
        progress=False,
    )
    events = EventAccumulator(str(tmp_path / "saes" / "tensorboard"))
    events.Reload()
    key = "h0/" + next((tmp_path / "saes" / "h0").iterdir()).name
    fvu = events.Scalars(f"{key}/fvu")
    assert [e.step for e in fvu] == [256 * 10, 256 * 20, 256 * 30]  # one point per log interval, in tokens
    assert fvu[-1].value < fvu[0].value
    assert {f"{key}/{m}" for m in ("loss", "l0", "dead_frac", "auxk")} <= set(events.Tags()["scalars"])


def test_wandb_logger_logs_offline_to_the_run_directory(store_path, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged: list[tuple[dict, int]] = []
    real_init = wandb.init

    def spy_init(**kwargs):
        run = real_init(**kwargs)
        real_log = run.log
        run.log = lambda data, step: (logged.append((data, step)), real_log(data, step=step))
        return run

    monkeypatch.setattr(wandb, "init", spy_init)
    train(TrainConfig(**config(store_path, tmp_path, hooks=["h0"], tokens=256 * 20, logger="wandb")), progress=False)
    assert list((tmp_path / "saes" / "wandb").glob("offline-run-*/run-*.wandb"))
    fvu = [(step, data) for data, step in logged if any(k.endswith("/fvu") for k in data)]
    assert [step for step, _ in fvu] == [256 * 10, 256 * 20]
