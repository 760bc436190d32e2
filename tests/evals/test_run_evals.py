"""`saelab eval RUN`: sparse probing and hedging of a tiny run's SAE, written through `RunDir`, deterministic, and
errors naming the fix."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
from typer.testing import CliRunner

from saelab.analysis.features import vocab_strings
from saelab.cli import app
from saelab.dictionaries import SAE, SAEConfig
from saelab.errors import SaelabError
from saelab.evals.families import FamiliesResult
from saelab.evals.run_evals import HedgingResult
from saelab.evals.sparse_probing import SparseProbingResult
from saelab.models import load_model, tokenizer_of
from saelab.run import RunDir
from saelab.store import ActivationStore
from saelab.toys.runs import small_store
from saelab.train import Grid, TrainConfig, default_lr, train

HOOK = "blocks.0.hook_resid_post"
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, decoder_dir):
    """16k rows of the tests' tiny decoder on the embedded corpus (103 documents) and a TopK SAE (k 8, width 128)
    trained for 5 steps: enough rows for both built-in probing tasks."""
    run = tmp_path_factory.mktemp("evals") / "run"
    store = small_store(run, decoder_dir, HOOK, tokens=16_384)
    train(
        TrainConfig(
            store=store.path,
            run=str(run),
            tokens=512 * 5,
            batch_size=512,
            eval_rows=1024,
            warmup_steps=1,
            grid=Grid(k=[8], expansion=[2], lr=[default_lr(128)]),
            device="cpu",
        ),
        progress=False,
    )
    return RunDir(run)


def test_eval_writes_sparse_probing_and_hedging(tiny_run):
    result = runner.invoke(app, ["eval", str(tiny_run.root), "--hedging-steps", "20"])
    assert result.exit_code == 0, result.output
    (sae,) = tiny_run.saes()
    assert tiny_run.eval_results(sae.hook, sae.variant) == ["families", "hedging", "sparse_probing"]
    probing = SparseProbingResult.load(tiny_run.eval_result(sae.hook, sae.variant, "sparse_probing"))
    assert [t.task for t in probing.tasks] == ["package", "code_literal"]
    assert [t.level for t in probing.tasks] == ["document", "token"]
    for task in probing.tasks:
        assert task.k_values() == [1, 2, 5, 10, 20]
        for label in task.labels:
            assert label.n_train >= 8 and label.n_test >= 8
            assert all(0 <= p.accuracy <= 1 and 0 <= p.f1 <= 1 for p in label.latents + label.raw)
            assert [len(p.features) for p in label.raw] == [1, 2, 5, 10, 20]
            assert label.latents_all is not None and label.raw_all is not None
            assert (label.latents_all.k, label.raw_all.k) == (128, 64)
    assert probing.config["rows"] == [0, 16_384] and probing.config["skipped"] == {}
    hedge = HedgingResult.load(tiny_run.eval_result(sae.hook, sae.variant, "hedging"))
    assert len(hedge.per_latent) == 128 and hedge.config["new_latents"] == 4 and 0 <= hedge.rate <= 1
    assert "hedging rate" in result.output and "wrote" in result.output


def test_eval_families_streams_the_store_and_fills_results_by_config(tiny_run):
    result = runner.invoke(app, ["eval", str(tiny_run.root), "--only", "families", "--max-rows", "10000"])
    assert result.exit_code == 0, result.output
    (sae,) = tiny_run.saes()
    families = FamiliesResult.load(tiny_run.eval_result(sae.hook, sae.variant, "families"))
    assert families.rows == 10_000 and families.config["rows"] == [0, 10_000] and len(families.counts) == 128
    assert sum(families.counts) == pytest.approx(8 * 10_000, rel=0.01)  # TopK k 8: eight latents fire per row
    assert all(link.containment >= 0.1 and link.lift >= 2 for link in families.links)
    table = tiny_run.sweep_by_config.read_text().splitlines()
    assert "families_mean" in table[0] and table[1].count(",") == table[0].count(",")
    assert "parent->child links" in result.output and "results_by_config.csv" in result.output


def test_eval_is_deterministic(tiny_run):
    """The same command twice writes the same bytes (seeded splits, samples, batches and new latents)."""
    (sae,) = tiny_run.saes()
    paths = [tiny_run.eval_result(sae.hook, sae.variant, name) for name in ("sparse_probing", "hedging")]
    outputs = []
    for _ in range(2):
        result = runner.invoke(app, ["eval", str(tiny_run.root), "--hedging-steps", "10"])
        assert result.exit_code == 0, result.output
        outputs.append([path.read_bytes() for path in paths])
    assert outputs[0] == outputs[1]


def test_eval_errors_name_the_fix(tiny_run, tmp_path):
    result = runner.invoke(app, ["eval", str(tiny_run.root), "--only", "sparse_probing,bogus"])
    assert result.exit_code == 2 and "unknown evals ['bogus']; choose from sparse_probing, hedging" in result.output
    result = runner.invoke(app, ["eval", str(tiny_run.root), "--only", "sparse_probing", "--max-rows", "300"])
    assert result.exit_code == 2 and "no probing task fits the 300 rows" in result.output
    assert "Traceback" not in result.output
    result = runner.invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 2 and "has no SAEs to evaluate" in result.output


def test_eval_probes_labels_of_your_own(tiny_run, tmp_path):
    """A token -> class table (the absorption eval's format) becomes a token-level task; one that names no token
    of the rows is refused with the fix."""
    store = ActivationStore.open(str(tiny_run.store))
    strings = vocab_strings(tokenizer_of(load_model(store.model_spec or "", device="cpu")))
    common = [strings[t] for t, _ in Counter(store.tokens().tolist()).most_common(10)]
    table = tmp_path / "labels.json"
    table.write_text(json.dumps({s: "ab"[i % 2] for i, s in enumerate(common)}))
    result = runner.invoke(app, ["eval", str(tiny_run.root), "--only", "sparse_probing", "--labels", str(table)])
    assert result.exit_code == 0, result.output
    (sae,) = tiny_run.saes()
    probing = SparseProbingResult.load(tiny_run.eval_result(sae.hook, sae.variant, "sparse_probing"))
    mine = probing.tasks[-1]
    assert (mine.task, mine.level, [lab.label for lab in mine.labels]) == ("labels", "token", ["a", "b"])
    table.write_text(json.dumps({"no such token here": "a", "nor this one": "b"}))
    result = runner.invoke(app, ["eval", str(tiny_run.root), "--only", "sparse_probing", "--labels", str(table)])
    assert result.exit_code == 2 and "give labels that name tokens of the text" in result.output


def test_hedging_skips_what_it_cannot_extend_and_says_so(tiny_run, tmp_path):
    """A Matryoshka SAE beside the plain one: the plain one is hedged, the Matryoshka one listed as skipped."""
    run = RunDir(shutil.copytree(tiny_run.root, tmp_path / "run"))
    SAE.from_config(SAEConfig(arch="topk", d_in=64, d_sae=32, k=4, matryoshka_prefixes=[8, 32])).save(
        run.sae(HOOK, "matryoshka")
    )
    result = runner.invoke(app, ["eval", str(run.root), "--only", "hedging", "--hedging-steps", "5"])
    assert result.exit_code == 0, result.output
    assert f"skipped hedging of {HOOK}/matryoshka: it is a Matryoshka SAE" in result.output
    assert run.eval_results(HOOK, "matryoshka") == []
    (plain,) = [e for e in run.saes() if e.variant != "matryoshka"]
    assert "hedging" in run.eval_results(plain.hook, plain.variant)


def test_families_skip_signed_codes_and_say_so(tiny_run, tmp_path):
    """An ICFL SAE (signed codes, where "fires" has no sign to read) beside the plain one: listed as skipped."""
    run = RunDir(shutil.copytree(tiny_run.root, tmp_path / "run"))
    SAE.from_config(SAEConfig(arch="icfl", d_in=64, d_sae=32, k=5)).save(run.sae(HOOK, "icfl"))
    result = runner.invoke(app, ["eval", str(run.root), "--only", "families", "--max-rows", "4096"])
    assert result.exit_code == 0, result.output
    assert f"skipped families of {HOOK}/icfl: its codes are signed (icfl)" in result.output
    assert run.eval_results(HOOK, "icfl") == []


def closed_port() -> int:
    """A local port with nothing listening (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_labels_eval_scores_labels_and_survives_an_endpoint_that_does_not_answer(tiny_run, tmp_path, minilm):
    """`--only labels` after `saelab analyze`: a MiniLM AUROC per latent; an LLM endpoint on a closed port is a clear
    line in `skipped`, the labels' MiniLM scores and the other evals are still written."""
    from saelab.analysis import AnalysisConfig, analyze
    from saelab.evals.endpoint import Endpoint
    from saelab.evals.run_evals import EvalSettings, LabelsResult, run_evals

    run = RunDir(shutil.copytree(tiny_run.root, tmp_path / "run"))
    with pytest.raises(SaelabError, match="saelab analyze"):
        run_evals(run.root, settings=EvalSettings(only=("labels",)))
    analyze(run.root, AnalysisConfig(n_top=8, window=4, max_tokens=4096), progress=False)
    endpoint = Endpoint(f"http://127.0.0.1:{closed_port()}/v1", "any", timeout=5)
    settings = EvalSettings(only=("sparse_probing", "labels"), label_latents=8, label_negatives=20, endpoint=endpoint)
    done = run_evals(run.root, settings=settings)
    (sae,) = run.saes()
    assert {"labels", "sparse_probing"} <= set(run.eval_results(sae.hook, sae.variant))
    assert {type(r).__name__ for r, _ in done.written} == {"LabelsResult", "SparseProbingResult"}
    labels = LabelsResult.load(run.eval_result(sae.hook, sae.variant, "labels"))
    assert len(labels.latents) == len(labels.auroc) == 8 and all(0 <= a <= 1 for a in labels.auroc)
    assert labels.llm_explanations is None and all(labels.labels)
    (line,) = done.skipped
    assert "does not answer" in line and "start the server" in line
