"""The model-diff page over a run holding one `saelab diff` result with known classes (served by the app's
routing callback, no browser): the counts by norm and after latent scaling, each model's exclusive latents in
order, and the error naming the command when a run has none."""

from __future__ import annotations

from saelab.dashboards.app import create_app
from saelab.evals.diff_run import ModelDiffResult
from saelab.run import RunDir
from tests.dashboards.helpers import components, errors, page, text

HOOK, VARIANT = "base__blocks.1.hook_resid_post", "crosscoder-batchtopk-k4-w6-lr0.005"


def known() -> ModelDiffResult:
    """Six latents: 0 and 1 only in `tuned` (1 less so), 2 only in `base`, 3 shared, 4 exclusive by norm that latent
    scaling makes shared, 5 shared."""
    return ModelDiffResult(
        hook=HOOK,
        variant=VARIANT,
        sources=["base/blocks.1.hook_resid_post", "tuned/blocks.1.hook_resid_post"],
        rows=[100, 200],
        delta_norm=[0.99, 0.95, 0.02, 0.5, 0.97, 0.4],
        norm_class=["b_only", "b_only", "a_only", "shared", "b_only", "shared"],
        scaling_class=["b_only", "b_only", "a_only", "shared", "shared", "shared"],
        nu_error=[0.01, 0.05, 0.02, None, 0.6, 0.9],
        nu_recon=[0.02, 0.1, 0.03, None, 0.2, 0.8],
        fired=[40, 12, 30, 0, 25, 60],
        config={"exclusive": 0.1, "nu_threshold": 0.3},
    )


def _by_id(answer, component_id: str):
    return next(c for c in components(answer) if c["props"].get("id") == component_id)


def test_the_page_shows_the_classes_and_each_models_exclusive_latents(tmp_path):
    run = tmp_path / "run"
    known().save(RunDir(run).model_diff(HOOK, VARIANT))
    answer = page(create_app(str(run)), "/model_diff", hook=HOOK, sae=VARIANT)
    assert errors(answer) == []
    counts = text(_by_id(answer, "diff-counts"))
    assert "shared 3 (2 by norm)" in counts
    assert "only base/blocks.1.hook_resid_post 1 (1 by norm)" in counts
    assert "only tuned/blocks.1.hook_resid_post 2 (3 by norm)" in counts
    b_rows = [text(r) for r in components(_by_id(answer, "diff-b_only")) if r.get("type") == "Tr"][1:]
    assert [r.split()[0] for r in b_rows] == ["#0", "#1"]  # most exclusive first; latent 4 went back to shared
    a_rows = [text(r) for r in components(_by_id(answer, "diff-a_only")) if r.get("type") == "Tr"][1:]
    assert [r.split()[0] for r in a_rows] == ["#2"]


def test_a_run_without_model_diffs_names_the_command(tmp_path):
    run = tmp_path / "run"
    (run / "model_diff").mkdir(parents=True)
    (message,) = errors(page(create_app(str(run)), "/model_diff"))
    assert "No model diffs" in message and f"saelab diff {run.resolve()}" in message


def test_the_page_shows_the_enrichment_on_the_tuned_documents(tmp_path):
    run = tmp_path / "run"
    result = known()
    result.tuned_on, result.enrichment = "asyncio", {"shared": 1.02, "a_only": None, "b_only": 3.5}
    result.save(RunDir(run).model_diff(HOOK, VARIANT))
    counts = text(_by_id(page(create_app(str(run)), "/model_diff", hook=HOOK, sae=VARIANT), "diff-counts"))
    assert "firing on asyncio's documents shared 1.02x, a_only no latents, b_only 3.5x" in counts
