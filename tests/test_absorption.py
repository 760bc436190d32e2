"""Feature absorption (saelab.absorption): planted absorption as the known answer, SAEBench's metric pieces on
hand-computed cases, prompts and word positions for decoders and encoders, custom labels, the CLI and errors."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from saelab.absorption import (
    FIRST_LETTER_TEMPLATE,
    AbsorptionConfig,
    AbsorptionError,
    AbsorptionResult,
    AbsorptionSettings,
    KSparse,
    LabelScore,
    PromptStyle,
    Word,
    absorption_result,
    absorption_scores,
    alpha_tokens,
    f1,
    first_letter,
    icl_prompt,
    ig_absorption,
    labelled_vocabulary,
    load_label_table,
    planted_absorption,
    planted_probe_data,
    probe_data,
    result_path,
    run_absorption,
    single_thread,
    train_probe,
    word_activations,
)
from saelab.cli import app as cli
from saelab.config import ConfigError, build
from saelab.models import capture, resolve_hooks
from saelab.sae import SAE, SAEConfig, train_step

FAST = AbsorptionSettings(probe_batch_size=1024)  # the metric's known answers do not depend on the probe's batch


# ------------------------------------------------------------------------------------ planted absorption


@pytest.fixture(scope="module")
def planted():
    """Parents with 20 children each; a child fires on 40% of a parent's rows and never without its parent."""
    p = planted_absorption(n_rows=20_000, hierarchy=True)
    data = planted_probe_data(p, s=FAST)
    return p, absorption_result(p.sae, data, "synthetic", "absorbing", FAST), data


@pytest.fixture(scope="module")
def control():
    """The same features, children independent of the label, and one latent per feature."""
    p = planted_absorption(n_rows=20_000, hierarchy=False)
    data = planted_probe_data(p, s=FAST)
    return p, absorption_result(p.sae, data, "synthetic", "control", FAST), data


def test_planted_absorption_is_found_in_the_child_latents(planted):
    p, result, _ = planted
    cut = int(len(p.x) * 0.8)
    child = p.child[cut:]
    for c, lab in enumerate(result.labels):
        assert lab.probe_f1 == 1.0 and lab.true_positives == int((p.y[cut:] == c).sum())
        assert p.parent_latent[c] in lab.split_latents  # the parent latent is the label's main latent
        split_children = {p.child_latent.index(i) for i in lab.split_latents if i in p.child_latent}
        # every row with a child outside the split is fully absorbed by that child's latent, and nothing else is
        expected = [
            w
            for w, k in zip(np.array(p.words[cut:])[p.y[cut:] == c], child[p.y[cut:] == c])
            if k >= 0 and k not in split_children
        ]
        assert sorted(case.word for case in lab.cases) == sorted(expected)
        for case in lab.cases:
            kid = int(case.word.split(".c")[1])
            assert case.full_absorption and case.absorption_fraction == 1.0
            assert case.split_acts == [0.0] * len(lab.split_latents)
            assert [int(a[0]) for a in case.absorbers] == [p.child_latent[kid]]
            assert case.absorbers[0][2] >= 0.1  # the child's decoder (u_p + u_c)/sqrt2 carries the probe direction
        assert lab.mean_absorption_fraction == pytest.approx(len(expected) / lab.true_positives)
        assert lab.full_absorption_rate == lab.mean_absorption_fraction
    assert 0.3 < result.mean_absorption_fraction < 0.45  # 40% of rows have a child, minus split children
    assert result.n_scored == 4 and not result.enough_labels  # 4 labels < SAEBench's 20


def test_independent_features_score_zero(control):
    _, result, _ = control
    assert result.mean_absorption_fraction == 0.0 and result.mean_full_absorption_rate == 0.0
    assert all(not lab.cases and lab.split_latents == [c] for c, lab in enumerate(result.labels))


def _trained(planted, steps: int = 1500):
    """A ReLU SAE (L1) with one latent per feature, trained on the planted activations."""
    torch.manual_seed(0)
    sae = SAE.from_config(SAEConfig(arch="relu", d_in=planted.x.shape[1], d_sae=len(planted.directions), l1_coef=0.3))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    with single_thread():  # a 128 x 84 SAE: threads only add overhead
        for _ in range(steps):
            train_step(sae, opt, planted.x[torch.randint(0, len(planted.x), (512,), generator=g)])
    return sae.eval()


def test_a_trained_sae_learns_to_absorb_only_under_a_hierarchy(planted, control):
    """Sparsity alone makes a trained SAE absorb parents into children: full absorption appears with the
    hierarchy and not without it, and the absorbing latents are the words' own children."""
    p, _, data = planted
    sae = _trained(p)
    absorbing = absorption_result(sae, data, "synthetic", "trained", FAST)
    independent = absorption_result(_trained(control[0]), control[2], "synthetic", "trained-control", FAST)
    assert absorbing.mean_full_absorption_rate > 0.3 and independent.mean_full_absorption_rate < 0.01
    assert absorbing.mean_absorption_fraction > 2.5 * independent.mean_absorption_fraction
    children = p.directions[len(p.classes) :]
    for lab in absorbing.labels:
        for case in [x for x in lab.cases if x.full_absorption]:
            latent = int(case.top[0][0])
            kid = int(case.word.split(".c")[1])
            decoder = sae.W_dec[latent].detach()
            assert torch.cosine_similarity(decoder, children[kid], dim=0) > 0.5  # the word's child feature


def test_results_round_trip_through_json(planted, tmp_path):
    _, result, _ = planted
    path = result.save(result_path(tmp_path, "synthetic", "absorbing"))
    assert path == tmp_path / "absorption" / "synthetic" / "absorbing.json"
    assert AbsorptionResult.load(path) == result
    path.write_text("[]")
    with pytest.raises(AbsorptionError, match="not a saelab absorption result"):
        AbsorptionResult.load(path)
    with pytest.raises(AbsorptionError, match="saelab absorption CONFIG.yaml"):
        AbsorptionResult.load(tmp_path / "missing.json")


# ------------------------------------------------------------------------------- the metric, by hand


def _one(codes, x, cos, split, s=AbsorptionSettings()):
    """absorption_scores for one row, with unit decoder norms and probe direction e0."""
    cos = torch.tensor(cos)
    return absorption_scores(
        torch.tensor([codes]), torch.tensor([x]), torch.tensor([1.0, 0.0]), cos, torch.ones(len(cos)), split, s, ["w"]
    )[0]


def test_absorption_fraction_follows_saebench_by_hand():
    # latents: 0 the split latent, 1-4 candidates; projections pi = a * c
    partial = _one([0.3, 1.0, 0.0, 0.0, 0.0], [1.0, 0.0], [1.0, 0.5, 0.0, 0.0, 0.0], [0])
    assert partial.absorption_fraction == pytest.approx(0.5 / 0.8)  # min(0.5, 1 - 0.3) / (0.5 + 0.3)
    assert not partial.full_absorption  # the split latent fires
    capped = _one([0.3, 2.0, 0.0, 0.0, 0.0], [1.0, 0.0], [1.0, 0.5, 0.0, 0.0, 0.0], [0])
    assert capped.absorption_fraction == pytest.approx(0.7 / 1.0)  # absorbers capped at x.p - split
    full = _one([0.0, 1.0, 0.0, 0.0, 0.0], [0.9, 0.0], [1.0, 0.9, 0.0, 0.0, 0.0], [0])
    assert full.absorption_fraction == 1.0 and full.full_absorption
    assert full.absorbers == [[1, 1.0, pytest.approx(0.9), pytest.approx(0.9)]]
    # split explains it all / absorbers below 40% / cosine below 0.1 / negative projection: no absorption
    assert _one([1.0, 1.0, 0, 0, 0], [1.0, 0.0], [1.0, 0.5, 0, 0, 0], [0]).absorption_fraction == 0.0
    assert _one([0.0, 1.0, 0, 0, 0], [1.0, 0.0], [1.0, 0.39, 0, 0, 0], [0]).absorption_fraction == 0.0
    low_cos = _one([0.0, 10.0, 0, 0, 0], [1.0, 0.0], [1.0, 0.09, 0, 0, 0], [0])
    assert low_cos.absorption_fraction == 0.0 and not low_cos.absorbers
    assert low_cos.full_absorption  # full absorption only needs cosine >= 0.025 (and 0.9 >= 0.4 of x.p)
    assert _one([0.0, 1.0, 0, 0, 0], [-1.0, 0.0], [1.0, 0.9, 0, 0, 0], [0]).absorption_fraction == 0.0


def test_at_most_three_absorbers_count():
    case = _one([0.0, 0.2, 0.2, 0.2, 0.2], [1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0], [0])
    assert len(case.absorbers) == 3 and case.absorption_fraction == 1.0  # 0.6 >= 0.4, split 0
    weak = _one([0.0, 0.12, 0.12, 0.12, 0.12], [1.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0], [0])
    assert weak.absorption_fraction == 0.0  # three carry 0.36 < 0.4 even though all four carry 0.48


def test_decoder_norms_fold_into_activations():
    cos = torch.tensor([1.0, 0.5])
    case = absorption_scores(
        torch.tensor([[0.0, 1.0]]),
        torch.tensor([[1.0, 0.0]]),
        torch.tensor([2.0, 0.0]),
        cos,
        torch.tensor([1.0, 2.0]),
        [0],
        AbsorptionSettings(),
        ["w"],
    )[0]
    assert case.absorbers == [[1, 2.0, 0.5, 1.0]] and case.probe_projection == 1.0  # x.p with p normalised


def test_feature_splitting_accepts_k_while_f1_jumps():
    ks = KSparse([[1], [1, 2], [1, 2, 3], [1, 2, 3, 4]], [0.5, 0.6, 0.62, 0.9], [])
    assert ks.split(0.03) == [1, 2]  # 0.62 is not more than 0.6 + 0.03, so k stops at 2 even though k=4 is better
    assert KSparse([[7], [7, 8]], [0.5, 0.52], []).split(0.03) == [7]


def test_f1_and_probe_by_hand():
    y = np.array([1, 1, 0, 0], bool)
    assert f1(y, np.array([1, 0, 1, 0], bool)) == pytest.approx(0.5)  # tp 1, fp 1, fn 1
    assert f1(np.zeros(3, bool), np.zeros(3, bool)) == 0.0
    g = torch.Generator().manual_seed(0)
    y = torch.stack([torch.rand(800, generator=g) < 0.1, torch.rand(800, generator=g) < 0.5], 1)  # rare, balanced
    x = torch.randn(800, 8, generator=g)
    x[:, :2] += 8 * y  # class c shifts dimension c
    probe = train_probe(x, y, epochs=30)
    score = probe(x).detach()
    for c in range(2):  # positives rank above negatives (AUC), and pos_weight keeps the rare class's recall at 1
        auc = (score[y[:, c], c][:, None] > score[~y[:, c], c][None]).float().mean()
        assert auc > 0.99 and (score[y[:, c], c] > 0).all()
    assert probe.weight[0].argmax() == 0 and probe.weight[1].argmax() == 1


# ------------------------------------------------------------------------------- vocabulary and prompts


def test_vocabulary_and_prompts(bpe_tokenizer):
    words = labelled_vocabulary(bpe_tokenizer)
    assert words and all(w.label == w.text.strip()[0].lower() for w in words)
    assert all(w.text.strip().isalpha() and w.text.strip().isascii() for w in words)
    assert len(words) == len(alpha_tokens(bpe_tokenizer)) and first_letter(" Cat") == "c" and first_letter("12") is None
    cat, dog, eel = Word(1, " cat", "c"), Word(2, "dog", "d"), Word(3, " eel", "e")
    prompt = icl_prompt(cat, [cat, dog, eel], FIRST_LETTER_TEMPLATE, 2, random.Random(0), True)
    lines = prompt.split("\n")
    assert lines[-1] == " cat has the first letter:" and len(lines) == 3
    assert sorted(lines[:2]) == [" eel has the first letter: E", "dog has the first letter: D"]  # never the word
    assert (
        icl_prompt(cat, [dog], FIRST_LETTER_TEMPLATE, 10, random.Random(0), True, prepend_separator=True)
        == "\ndog has the first letter: D\n cat has the first letter:"
    )


def test_decoder_reads_the_word_token(decoder, bpe_tokenizer):
    words = [w for w in labelled_vocabulary(bpe_tokenizer) if w.text.startswith(" ")][:6]
    prompts = [icl_prompt(w, words, FIRST_LETTER_TEMPLATE, 2, random.Random(0), True) for w in words]
    x, kept = word_activations(decoder, "blocks.0.hook_resid_post", words, prompts, FIRST_LETTER_TEMPLATE)
    assert kept == list(range(6))
    for row, (w, prompt) in enumerate(zip(words, prompts)):
        toks = [bpe_tokenizer.bos_token_id, *bpe_tokenizer(prompt)["input_ids"]]
        pos = len(toks) - 1 - len(bpe_tokenizer(" has the first letter:")["input_ids"])  # GPT-2: 5, SAEBench's -6
        assert toks[pos] == w.token
        ref = capture(decoder, torch.tensor([toks]), resolve_hooks(decoder, ["blocks.0.hook_resid_post"]))
        assert torch.allclose(x[row], ref["blocks.0.hook_resid_post"][0, pos], atol=1e-5)
    with pytest.raises(AbsorptionError, match="use fewer in-context examples"):
        long = [icl_prompt(w, words, FIRST_LETTER_TEMPLATE, 5, random.Random(0), True) * 3 for w in words]
        word_activations(decoder, "blocks.0.hook_resid_post", words, long, FIRST_LETTER_TEMPLATE)


def test_encoder_reads_the_word_in_the_bare_template(minilm):
    style = PromptStyle.for_model(minilm)
    assert style == PromptStyle(FIRST_LETTER_TEMPLATE, 0)
    data = probe_data(minilm, "blocks.0.hook_resid_post", max_words=200, s=FAST)
    assert data.absorb_x is data.test_x  # no generation and no fresh examples: one prompt per word
    tok = minilm.tokenizer
    word = data.test_words[0]
    toks = tok(FIRST_LETTER_TEMPLATE.format(word=word))["input_ids"]  # [CLS] word has the first letter : [SEP]
    assert toks[1] == data.test_tokens[0] and len(toks) == 8
    ref = capture(minilm, torch.tensor([toks]), resolve_hooks(minilm, ["blocks.0.hook_resid_post"]))
    assert torch.allclose(data.test_x[0], ref["blocks.0.hook_resid_post"][0, 1], atol=1e-4)
    assert len(data.train_y) + len(data.test_y) == 200 and len(data.test_y) == 40  # 80/20 by token


# ------------------------------------------------------------------------------- custom labels and IG


def test_custom_labels_from_a_function_or_a_table(decoder, bpe_tokenizer, tmp_path):
    vowel = labelled_vocabulary(
        bpe_tokenizer,
        lambda t: None if not t.strip().isalpha() else ("vowel" if t.strip()[0].lower() in "aeiou" else "consonant"),
    )
    assert {w.label for w in vowel} == {"vowel", "consonant"}
    table = {w.text: w.label for w in vowel[:60]}
    (tmp_path / "labels.json").write_text(json.dumps(table))
    with (tmp_path / "labels.csv").open("w") as f:
        f.writelines(f"{k},{v}\n" for k, v in table.items() if "," not in k)
    assert load_label_table(tmp_path / "labels.json") == table == load_label_table(tmp_path / "labels.csv")
    words = labelled_vocabulary(bpe_tokenizer, table)
    assert [(w.token, w.label) for w in words] == [(w.token, w.label) for w in vowel[:60]]
    data = probe_data(decoder, "blocks.1.hook_resid_post", table, PromptStyle("{word} is a", 2), s=FAST)
    assert data.classes == ["consonant", "vowel"]
    sae = SAE.from_config(SAEConfig(d_in=64, d_sae=128, k=4))
    result = absorption_result(sae, data, "blocks.1.hook_resid_post", "random", FAST, task="vowels")
    assert [lab.label for lab in result.labels] == ["consonant", "vowel"] and result.l0 == 4.0


def test_label_errors_name_the_fix(bpe_tokenizer, tmp_path):
    with pytest.raises(AbsorptionError, match="not single tokens of this tokenizer"):
        labelled_vocabulary(bpe_tokenizer, {"notasingletokenatall": "x"})
    (tmp_path / "bad.csv").write_text("a,b,c\n")
    with pytest.raises(AbsorptionError, match="exactly two columns"):
        load_label_table(tmp_path / "bad.csv")
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(AbsorptionError, match="JSON object"):
        load_label_table(tmp_path / "bad.json")
    with pytest.raises(AbsorptionError, match="no label table"):
        load_label_table(tmp_path / "missing.csv")


def test_integrated_gradients_variant(decoder, bpe_tokenizer, minilm):
    hook = "blocks.0.hook_resid_post"
    words = [w for w in labelled_vocabulary(bpe_tokenizer) if w.label == "a"][:4]  # " A" is one token here
    sae = SAE.from_config(SAEConfig(d_in=64, d_sae=128, k=4))
    label = LabelScore("a", 1.0, [], [], len(words), 0, 0.0, 0.0, 0, True)  # no split latents: every word is tested
    style = PromptStyle(FIRST_LETTER_TEMPLATE, 2)
    out = ig_absorption(
        decoder,
        sae,
        hook,
        words,
        label,
        torch.randn(64),
        style,
        random.Random(0),
        labelled_vocabulary(bpe_tokenizer),
        steps=3,
    )
    assert out["tested"] == len(words) and out["absorbed"] == len(out["cases"]) <= len(words)
    assert out["absorption_rate"] == (1.0 if out["absorbed"] else 0.0)  # no split true positives
    with pytest.raises(AbsorptionError, match="needs a decoder"):
        ig_absorption(minilm, sae, hook, words, label, torch.randn(384), style, random.Random(0), words)
    with pytest.raises(AbsorptionError, match="' S' is 2 tokens"):
        ig_absorption(
            decoder,
            sae,
            hook,
            words,
            dataclasses.replace(label, label="s"),
            torch.randn(64),
            style,
            random.Random(0),
            words,
        )


# ---------------------------------------------------------------------------------- config and the CLI


def test_cli_writes_results_for_every_sae_of_a_run(decoder_dir, tmp_path):
    run = tmp_path / "run"
    for k in (2, 8):
        cfg = SAEConfig(d_in=64, d_sae=128, k=k, hook_name="blocks.1.hook_resid_post")
        SAE.from_config(cfg).save(run / "saes" / "blocks.1.hook_resid_post" / f"topk-k{k}")
    config = tmp_path / "absorption.yaml"
    config.write_text(f"run: {run}\nmodel: {decoder_dir}\nicl_examples: 2\nsettings:\n  probe_epochs: 3\n  max_k: 2\n")
    out = CliRunner().invoke(cli, ["absorption", str(config), "--quiet", "--set", "device=cpu"])
    assert out.exit_code == 0, out.output
    for k in (2, 8):
        result = AbsorptionResult.load(result_path(run, "blocks.1.hook_resid_post", f"topk-k{k}"))
        assert result.l0 == k and result.d_sae == 128 and result.task == "first_letter"
        assert result.config["icl_examples"] == 2 and f"topk-k{k}: mean absorption fraction" in out.output
    ig = CliRunner().invoke(
        cli,
        [
            "absorption",
            str(config),
            "-q",
            "--set",
            "device=cpu",
            "--set",
            "saes=[" + str(run / "saes" / "blocks.1.hook_resid_post" / "topk-k2") + "]",
            "--set",
            "integrated_gradients=true",
            "--set",
            "settings.min_probe_f1=0",
            "--set",
            "ig_words=2",
            "--set",
            "ig_steps=2",
        ],
    )
    assert ig.exit_code == 0, ig.output
    labels = AbsorptionResult.load(result_path(run, "blocks.1.hook_resid_post", "topk-k2")).labels
    with_ig = {lab.label: lab.ig for lab in labels if lab.scored}
    assert with_ig and all(v is not None for v in with_ig.values())
    assert "is 2 tokens" in with_ig["s"]["error"] and with_ig["a"]["tested"] <= 2  # " S" is two tokens here, " A" one
    bad = CliRunner().invoke(cli, ["absorption", str(config), "--set", "template=no placeholder"])
    assert bad.exit_code == 2 and "needs a {word} placeholder" in bad.output


def test_config_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="no run directory"):
        build(AbsorptionConfig, {"run": str(tmp_path / "nope")}, "config")
    with pytest.raises(ConfigError, match="no SAE folder"):
        build(AbsorptionConfig, {"run": str(tmp_path), "saes": [str(tmp_path / "x")]}, "config")
    with pytest.raises(ConfigError, match="no label table"):
        build(AbsorptionConfig, {"run": str(tmp_path), "labels": "nope.csv"}, "config")
    with pytest.raises(AbsorptionError, match="no SAEs under"):
        run_absorption(build(AbsorptionConfig, {"run": str(tmp_path), "device": "cpu"}, "config"), progress=False)
