"""`saelab heads RUN` (`saelab.heads.run`): the composition scores and channels it writes into the run are the
library's, the per-head census counts latents by their DFA (a known answer, and the induction run's one head per
layer), and a dictionary that is not on `attn.hook_z` is refused with the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saelab.circuits import repeated_tokens
from saelab.cli import app
from saelab.errors import HeadsError
from saelab.heads import (
    Channels,
    CompositionScores,
    channel,
    composition_scores,
    direct_feature_attribution,
    head_census,
)
from saelab.heads.run import attention_saes, census, composition_run
from saelab.run import RunDir

runner = CliRunner()


def test_composition_run_writes_the_scores_and_the_channels_of_the_top_pairs(model, induction_run):
    written = composition_run(induction_run, top=2)
    assert written.scores_path == RunDir(induction_run).heads("composition")
    saved = CompositionScores.load(written.scores_path)
    for mode, scores in composition_scores(model).scores.items():
        torch.testing.assert_close(saved.scores[mode], scores)
    channels = Channels.load(written.channels_path).channels
    assert [(c.mode, c.writer.label, c.reader.label) for c in channels] == [
        ("K", "L0H0", "L1H0"),
        ("Q", "L0H0", "L1H0"),
    ]
    torch.testing.assert_close(channels[0].energy, channel(model, (0, 0), (1, 0), mode="K").energy)


def test_the_census_counts_latents_by_the_head_that_carries_most_of_their_attribution():
    # latent 0: head 1 (0.8 of it over two examples); 1: head 0; 2: split evenly (mixed); 3: dead; 4: head 1, whose
    # large negative term counts by its size
    heads = np.array(
        [
            [[1, 4], [1, 4]],
            [[3, 0], [0, 0]],
            [[1, -1], [2, 2]],
            [[0, 0], [0, 0]],
            [[0.5, -9], [7, 7]],  # the second example is padding: not counted
        ],
        np.float32,
    )
    rows = np.array([[0, 1], [2, -1], [3, 4], [-1, -1], [5, -1]])
    found = head_census(heads, rows, hook="blocks.3.attn.hook_z")
    assert found.counts == [1, 2] and found.mixed == 1 and found.dead == 1
    assert found.dead_latents.tolist() == [False, False, False, True, False]
    assert found.head_of.tolist() == [1, 0, -1, -1, 1] and [h.label for h in found.heads] == ["L3H0", "L3H1"]
    with pytest.raises(HeadsError, match=r"\[0.5, 1\)"):
        head_census(heads, rows, hook="blocks.3.attn.hook_z", threshold=0.3)


def test_every_live_latent_of_the_induction_run_reads_its_layers_one_head(induction_run):
    for hook, variant in attention_saes(induction_run):
        found = census(induction_run, hook, variant)
        assert found.mixed == 0 and found.dead < 64 and found.counts[0] + found.dead == 128, (hook, found)


def test_the_cli_prints_the_top_pairs_and_the_census_and_refuses_a_dictionary_that_is_not_on_attn_hook_z(induction_run):
    hook, variant = attention_saes(induction_run)[1]
    every = runner.invoke(app, ["heads", str(induction_run), "--top", "1"])
    assert every.exit_code == 0 and "K L0H0 -> L1H0  score 0.266" in every.output, every.output
    assert every.output.count("latents by head") == 2 and "composition.json" in every.output
    done = runner.invoke(app, ["heads", str(induction_run), "--sae", f"{hook}/{variant}"])
    assert done.exit_code == 0 and "latents by head L1H0" in done.output, done.output
    refused = runner.invoke(app, ["heads", str(induction_run), "--sae", "blocks.1.hook_resid_post/topk"])
    assert refused.exit_code == 2 and "not attention heads" in refused.output and f"{hook}/{variant}" in refused.output
    assert "Traceback" not in refused.output


def test_the_census_of_two_heads_gives_each_latent_the_head_its_decoder_lives_in(two_heads, two_heads_sae):
    """Layer 1 of `two_heads` holds the induction head and a previous-token head: the census of the SAE on its
    `hook_z`, from each latent's top 20 examples' per-head DFA, puts the latents whose decoder lives in one head's
    block on that head (measured: all 60 of the induction head's and all 12 of the copy's; 76 latents on the
    induction head, 18 on the copy, none mixed, 34 without a firing on these 16 sequences)."""
    found = direct_feature_attribution(two_heads, two_heads_sae, repeated_tokens(16, 10, seed=3))
    acts = found.acts.flatten(0, 1)  # [example, latent]
    per_head = found.per_head.flatten(0, 1)  # [example, head, latent]
    top = acts.topk(20, dim=0)  # each latent's top 20 positions
    dfa_heads = per_head[top.indices, :, torch.arange(acts.shape[1])].transpose(0, 1).numpy()  # [latent, 20, head]
    top_rows = torch.where(top.values.T > 0, top.indices.T, -1).numpy()
    census_found = head_census(dfa_heads, top_rows, hook="blocks.1.attn.hook_z")
    decoder = two_heads_sae.W_dec.detach().reshape(-1, 2, two_heads.cfg.d_head).pow(2).sum(-1)
    block = decoder / decoder.sum(1, keepdim=True)
    for head in (0, 1):
        lives = ((block[:, head] > 0.9) & torch.from_numpy(top_rows[:, 0] >= 0)).numpy()
        agree = float((census_found.head_of[lives] == head).mean())
        assert lives.sum() >= 10 and agree >= 0.9, (head, int(lives.sum()), agree)
    assert sum(census_found.counts) + census_found.mixed + census_found.dead == two_heads_sae.cfg.d_sae
