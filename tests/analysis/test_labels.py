"""Contrastive labels and their embedding-detection score, on known answers: a latent planted to fire on one token
gets that token as its top label and a high AUROC; a random latent's AUROC is near 0.5."""

from itertools import islice

import numpy as np
import pytest

from saelab.analysis import FeatureStore, analyze
from saelab.analysis.config import AnalysisConfig
from saelab.analysis.features import vocab_strings
from saelab.analysis.labels import (
    auroc,
    background_counts,
    context_windows,
    contrastive_labels,
    detection_aurocs,
    join_pieces,
    label_query,
    label_text,
    search_labels,
)
from saelab.errors import ConfigError
from saelab.models import tokenizer_of
from saelab.text import embedded_documents

WINDOW, N_TOP = 10, 20


@pytest.fixture(scope="module")
def corpus(minilm):
    """The first 400 docstrings of the embedded corpus in MiniLM's tokens (64 a document), one context each."""
    tokenizer = tokenizer_of(minilm, ConfigError)
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"][:64] for d in islice(embedded_documents(), 400)]
    tokens = np.concatenate(ids)
    context = np.concatenate([[i] * len(x) for i, x in enumerate(ids)])
    return tokenizer, vocab_strings(tokenizer), tokens, context


def windows(tokens: np.ndarray, context: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return context_windows(tokens, context, rows, window=WINDOW)


def test_planted_token_latent_is_labelled_by_its_token_and_detected(minilm, corpus):
    tokenizer, vocab, tokens, context = corpus
    rng = np.random.default_rng(0)
    planted = tokenizer.convert_tokens_to_ids("file")
    fires = rng.choice(np.flatnonzero(tokens == planted), N_TOP, replace=False)
    randoms = [rng.choice(len(tokens), N_TOP, replace=False) for _ in range(4)]
    top = np.stack([windows(tokens, context, rows) for rows in [fires, *randoms]])
    labels = contrastive_labels(top, background_counts(tokens, context))
    assert labels.tokens[0, 0].tolist() == [planted, -1]
    assert labels.scores[0, 0] > 2 * np.nanmax(labels.scores[1:, 0])
    assert "'file'" in label_text(labels.tokens[0], vocab)
    negatives = [join_pieces(w[w >= 0].tolist(), vocab) for w in windows(tokens, context, rng.choice(len(tokens), 40))]
    positives = [[join_pieces(w[w >= 0].tolist(), vocab) for w in group] for group in top]
    scores = detection_aurocs(minilm, [label_query(t, vocab) for t in labels.tokens], positives, negatives)
    print(f"\nplanted AUROC {scores[0]:.3f}, random latents {np.round(scores[1:], 3)}")
    assert scores[0] >= 0.9
    assert abs(scores[1:].mean() - 0.5) < 0.15


def test_log_odds_follow_monroe_et_al():
    """One latent, one token seen 10 times of 10 against a background where it is 1 of 1000 unigrams: the z-score
    is the paper's formula with the informative prior."""
    background = (np.array([1, 2]), np.array([1, 999]))
    top = np.full((1, 10, 3), -1)
    top[0, :, 1] = 1
    labels = contrastive_labels(top, background, n_labels=2, prior=100.0)
    a = 100 * 1.5 / 1001
    delta = np.log((10 + a) / (10 + 100 - 10 - a)) - np.log((1 + a) / (1000 + 100 - 1 - a))
    assert labels.scores[0, 0] == pytest.approx(delta / np.sqrt(1 / (10 + a) + 1 / (1 + a)), rel=1e-5)
    assert labels.tokens[0, 0].tolist() == [1, -1] and np.isnan(labels.scores[0, 1])


def test_label_search_matches_whole_words_best_score_first():
    """Latent 0: 'absolute value' 3.0; latent 1: 'value' 5.0 and 'x' 1.0; latent 2: 'values' (a WordPiece
    continuation: not the word 'value'); latent 3: no label."""
    vocab = ["[PAD]", "absolute", "value", "x", "##s"]
    tokens = np.full((4, 2, 2), -1)
    scores = np.full((4, 2), np.nan)
    tokens[0, 0], scores[0, 0] = [1, 2], 3.0
    tokens[1, 0], scores[1, 0], tokens[1, 1], scores[1, 1] = [2, -1], 5.0, [3, -1], 1.0
    tokens[2, 0], scores[2, 0] = [2, 4], 9.0
    assert search_labels(tokens, scores, vocab, "value") == [1, 0]
    assert search_labels(tokens, scores, vocab, "  Absolute   VALUE ") == [0]
    assert search_labels(tokens, scores, vocab, "values") == [2]
    assert search_labels(tokens, scores, vocab, "val") == [] and search_labels(tokens, scores, vocab, "x") == [1]
    with pytest.raises(ConfigError, match="empty"):
        search_labels(tokens, scores, vocab, " ")


def test_bad_input():
    with pytest.raises(ConfigError, match="2 window"):
        contrastive_labels(np.zeros((2, 3)), (np.array([1]), np.array([1])))
    with pytest.raises(ConfigError, match="no rows"):
        background_counts(np.array([], int), np.array([], int))
    with pytest.raises(ConfigError, match="positive and one negative"):
        auroc(np.array([]), np.array([1.0]))


def test_analysis_pass_stores_labels_shown_and_searchable(run):
    (path,) = analyze(run, AnalysisConfig(n_top=8, window=3, n_labels=2), progress=False)
    fs = FeatureStore.open(path)
    busiest = max(range(fs.n_features), key=lambda i: fs.feature(i)["count"])
    f = fs.feature(busiest)
    assert f["label_tokens"].shape == (2, 2) and np.isfinite(f["label_scores"][0])
    token = int(f["label_tokens"][0, 0])
    assert fs.search_token(token)[0] in {i for i in range(fs.n_features) if token in fs.feature(i)["label_tokens"]}


def test_feature_page_and_prompt_chips_show_the_label(run):
    import json

    from saelab.dashboards.data import feature_store, sae_info
    from saelab.dashboards.pages.feature import feature_page
    from saelab.dashboards.pages.prompt import _labelled_chips, _labels

    analyze(run, AnalysisConfig(n_top=8, window=3), progress=False)
    info = sae_info(
        str(run), "blocks.0.hook_mlp_out", next(p.name for p in (run / "saes/blocks.0.hook_mlp_out").iterdir())
    )
    fs = feature_store(str(run), info)
    busiest = max(range(fs.n_features), key=lambda i: fs.feature(i)["count"])
    f = fs.feature(busiest)
    label = label_text(f["label_tokens"], fs.vocab, scores=f["label_scores"])
    page = json.dumps(feature_page(str(run), info.hook, info.variant, str(busiest)), default=str)
    assert "feature-label" in page and json.dumps(label)[1:-1] in page
    labels, unlabelled = _labels(fs)
    assert unlabelled is None
    chips = json.dumps(_labelled_chips(info, labels, [(busiest, 1.0)]).to_plotly_json(), default=str)
    assert json.dumps(label_text(f["label_tokens"][:1], fs.vocab))[1:-1] in chips
