"""Head circuits from discrete codes (`saelab.heads.discrete`, O'Neill & Bui 2024) against per-head activation
patching: the positive-only code count on codes with a known answer, the induction model's heads ranked first (and
ahead of silent heads), both methods timed, and prompts whose negatives tokenize to another length refused."""

from __future__ import annotations

import pytest
import torch
import yaml
from typer.testing import CliRunner

from saelab.circuits import induction_task
from saelab.circuits.tasks import Prompt
from saelab.cli import app
from saelab.errors import HeadsError
from saelab.heads.discrete import (
    DiscreteConfig,
    HeadCircuit,
    chance_p_values,
    contrast_task,
    discrete_scores,
    head_circuit,
    positive_only,
)
from saelab.run import RunDir
from saelab.toys.ioi import ioi_prompts, ioi_texts

runner = CliRunner()


def test_positive_only_counts_the_codes_a_head_takes_on_positive_prompts_alone():
    codes = torch.tensor(
        [
            [1, 5, 0],  # positive prompts
            [2, 5, 0],
            [3, 5, 0],
            [1, 6, 0],  # negative prompts
            [4, 5, 0],
        ]
    )
    assert positive_only(codes, 3).tolist() == [2.0, 0.0, 0.0]  # head 0: codes 2 and 3; head 1: 5 is on both
    assert positive_only(codes, 3, normalise=True).tolist() == pytest.approx([2 / 4, 0.0, 0.0])


def test_the_chance_p_value_is_small_only_for_a_head_whose_codes_follow_the_contrast():
    """Head 0 takes one of 4 codes on positive prompts and another 4 on their negatives: a label swap scores its 4 as
    high only when each group of 4 prompts sharing a code is swapped alike, 1 in 4,096 swaps, so p is near 1 / 1001. Head 1 takes its code from the prompt, the same on a positive
    prompt and its negative: every swap scores the same, p = 1. Head 2 takes a prompt-specific code on every row, so
    all 16 positive codes are positive-only whatever the labels: p = 1 again, although it scores highest."""
    n = 16
    prompt = torch.arange(n)
    positive = torch.stack([prompt % 4, prompt % 3, prompt], 1)
    negative = torch.stack([4 + prompt % 4, prompt % 3, n + prompt], 1)
    codes = torch.cat([positive, negative])
    assert positive_only(codes, n).tolist() == [4.0, 0.0, 16.0]
    p = chance_p_values(codes, n, permutations=1000, seed=0)
    assert p[0] <= 3 / 1001 and p[1:].tolist() == [1.0, 1.0], p
    with pytest.raises(HeadsError, match="need 32 rows"):
        chance_p_values(codes[:-1], n)


def test_on_the_induction_model_both_heads_are_found_in_under_10_s_next_to_patching(model, tmp_path):
    """The induction model's two heads (previous-token L0H0, induction L1H0) both take positive-only codes and both
    matter to patching; the method's time is asserted, the patching baseline's recorded beside it."""
    task = induction_task(model, n=16, length=10, seed=3)
    found = head_circuit(model, task)
    assert found.heads == ["L0H0", "L1H0"]
    assert min(found.scores) > 0 and min(found.effects) > 0, (found.scores, found.effects)
    assert found.discrete_seconds < 10, found.discrete_seconds
    assert found.patching_seconds > 0
    saved = HeadCircuit.load(found.save(tmp_path / "circuit.json"))
    assert saved.ranking() == found.ranking() and saved.config["n_codes"] == 200


def test_silent_heads_rank_below_the_previous_token_and_induction_heads(two_heads):
    """`two_heads` adds a head per layer that writes nothing (`W_O = 0`): they never leave their one code, so the
    previous-token and induction heads rank first."""
    task = induction_task(two_heads, n=16, length=10, seed=3)
    scores, _ = discrete_scores(two_heads, task.tokens, task.patch, DiscreteConfig())  # pyright: ignore[reportArgumentType]
    labels = ["L0H0", "L0H1", "L1H0", "L1H1"]
    ranked = [labels[i] for i in scores.argsort(descending=True, stable=True).tolist()]
    assert set(ranked[:2]) == {"L0H0", "L1H0"} and scores[[1, 3]].tolist() == [0.0, 0.0], scores


def test_negative_prompts_of_another_length_are_refused_naming_both_lengths(ioi_model):
    prompts = [Prompt(clean="ABxqAzk+", patch="ABxqCzk+", target="B", distractor="A")]
    task = contrast_task(ioi_model, prompts)
    assert task.tokens.shape == task.patch.shape == (1, 9)  # pyright: ignore[reportOptionalMemberAccess]
    bad = [*prompts, Prompt(clean="ABxqAzk+", patch="ABxqCCzk+", target="B", distractor="A")]
    with pytest.raises(HeadsError, match=r"prompt 1: .* 9 tokens .* 10; make the negative prompt the same length"):
        contrast_task(ioi_model, bad)
    with pytest.raises(HeadsError, match="positive prompts are 9 tokens long and negative ones 10"):
        discrete_scores(ioi_model, task.tokens, torch.zeros(1, 10, dtype=torch.long))


def test_the_cli_writes_the_head_circuit_of_a_config_into_the_run(ioi_dir, tmp_path):
    """`saelab heads CONFIG` on IOI prompts: both rankings, their times and their agreement, in the run's heads
    folder and on the terminal; a config whose negative prompt is longer is refused in one line."""
    prompts = [
        {"clean": t.clean, "patch": t.patch, "target": t.target, "distractor": t.distractor}
        for t in ioi_texts(ioi_prompts(12, seed=4))
    ]
    config = {"model": str(ioi_dir), "run": str(tmp_path / "run"), "name": "ioi", "prompts": prompts, "steps": 100}
    path = tmp_path / "heads.yaml"
    path.write_text(yaml.safe_dump(config))
    done = runner.invoke(app, ["heads", str(path)])
    assert done.exit_code == 0, done.output
    found = HeadCircuit.load(RunDir(tmp_path / "run").heads("ioi"))
    assert found.n_prompts == 12 and len(found.heads) == 6 and found.config["steps"] == 100
    assert f"Pearson {found.pearson:.3f}" in done.output and found.patching_ranking()[0] in ("L0H0", "L1H0")
    assert "patching (" in done.output and "discrete codes (" in done.output
    assert len(found.p_values) == 6 and all(1 / 1001 <= p <= 1 for p in found.p_values)
    assert f"L0H0 {found.p_values[0]:.3f}" in done.output
    config["prompts"][0]["patch"] += "x"
    path.write_text(yaml.safe_dump(config))
    refused = runner.invoke(app, ["heads", str(path)])
    assert refused.exit_code == 2 and "tokenizes to 9 tokens" in refused.output and "Traceback" not in refused.output
