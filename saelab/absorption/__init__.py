"""Feature absorption ("A is for Absorption", Chanin et al. 2024), measured the way SAEBench measures it.

An SAE latent that seems to track a concept (words starting with S) can fail to fire on some tokens that have
the concept, because a more specific latent (the token "short") has absorbed the concept's direction into its
own decoder row. The first-letter task finds such cases:

1. Vocabulary: every alphabetic token (`alpha_tokens`, SAEBench `vocab.get_alpha_tokens`), split 80/20 by
   token into train and test (`split_vocabulary`, SAEBench `probing.create_dataset_probe_training`).
2. Prompts: decoders read the word token's residual in an in-context prompt of up to 10 examples
   "{word} has the first letter: X" (`icl_prompt`, SAEBench `prompting.create_icl_prompt`); encoders read it
   in the bare template, no examples (see `PromptStyle`).
3. Ground truth: a 26-way one-vs-rest logistic probe on the residuals (`train_probe`, SAEBench
   `probing.train_multi_probe`: BCE with pos_weight = neg/pos, Adam at 1e-2 decaying exponentially to 1e-5
   over 50 epochs, batch 64, weight decay 1e-4).
4. Feature splitting (`k_sparse_probing`, SAEBench `k_sparse_probing.train_k_sparse_probes` and
   `add_feature_splits_to_metrics_df`): an L1 probe on the SAE latents ranks latents by signed weight; for
   k = 1..10 a logistic probe on the top k; k grows while test F1 rises by more than 0.03. The accepted
   latents are the label's "split" (main) latents.
5. For every probe true positive (`absorption_scores`, SAEBench
   `FeatureAbsorptionCalculator.calculate_absorption`): p the unit probe direction, c_i the cosine of
   decoder row i with p, pi_i = a_i c_i (a_i with the decoder row's norm folded in, as SAEBench folds
   W_dec norms). Absorbers: latents outside the split with c_i >= 0.1 and pi_i > 0, the top 3 by pi_i.
   The absorption fraction and full absorption follow SAEBench exactly (thresholds in `AbsorptionSettings`).
6. Per label: mean absorption fraction and full-absorption rate over its true positives; the SAE's score
   is their mean over labels whose probe has test F1 > 0.6 (SAEBench `main._aggregate_results_df`,
   `min_GT_probe_f1`; SAEBench reports nothing with fewer than 20 such labels, `enough_labels` says so).

`ig_absorption` is the paper's own variant for decoders: integrated-gradients attribution of each latent at the
word token to the logit of the answer letter; a false negative is absorption when the top latent by |effect|
hurts the answer when ablated, clearly dominates the next one, and is aligned with the probe.

Any token-level labels work in place of first letters (`labels=` a function or a table token -> class), and
`saelab.toys.planted` gives synthetic activations with a known hierarchy for checking the metric.

Modules: `vocab` (words and labels), `prompts` (prompts and word activations), `config` (`AbsorptionSettings`,
`AbsorptionConfig`), `probes` (probes, k-sparse probing, F1), `data` (`ProbeData`, `probe_data`, `fit_probe`),
`scoring` (`Case`, `LabelScore`, `AbsorptionResult`, `measure_absorption`), `ig` (integrated gradients), `run`
(`run_absorption`). Every name is re-exported here, as when this was one module. The planted-absorption toy
(`Planted`, `planted_absorption`, `planted_probe_data`) lives in `saelab.toys.planted` and is re-exported lazily
(module `__getattr__`), so the analysis never imports the toys.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from saelab.absorption.config import AbsorptionConfig, AbsorptionSettings, ProbeSchedule
from saelab.absorption.data import ProbeData, fit_probe, probe_data
from saelab.absorption.ig import IgAbsorption, ig_absorption
from saelab.absorption.probes import KSparse, f1, k_sparse_probing, single_thread, train_probe
from saelab.absorption.prompts import (
    FIRST_LETTER_TEMPLATE,
    EncodedPrompts,
    PromptStyle,
    answer_text,
    encode_prompts,
    icl_prompt,
    style_prompts,
    word_activations,
)
from saelab.absorption.run import SavedResult, result_path, run_absorption
from saelab.absorption.scoring import (
    EPS,
    AbsorptionResult,
    Case,
    LabelScore,
    absorption_result,
    absorption_scores,
    decoder_cosines,
    measure_absorption,
)
from saelab.absorption.vocab import (
    LETTERS,
    Labeler,
    Word,
    alpha_tokens,
    first_letter,
    labelled_vocabulary,
    load_label_table,
    split_vocabulary,
)
from saelab.errors import AbsorptionError
from saelab.models import tokenizer_of

if TYPE_CHECKING:
    from saelab.toys.planted import Planted, planted_absorption, planted_probe_data

_TOYS = ("Planted", "planted_absorption", "planted_probe_data")


def __getattr__(name: str) -> Any:
    """`Planted`, `planted_absorption` and `planted_probe_data` from `saelab.toys.planted`, on first use."""
    if name in _TOYS:
        from saelab.toys import planted

        return getattr(planted, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ProbeSchedule",
    "style_prompts",
    "EPS",
    "FIRST_LETTER_TEMPLATE",
    "LETTERS",
    "AbsorptionConfig",
    "AbsorptionError",
    "AbsorptionResult",
    "AbsorptionSettings",
    "Case",
    "EncodedPrompts",
    "IgAbsorption",
    "KSparse",
    "LabelScore",
    "Labeler",
    "Planted",
    "ProbeData",
    "PromptStyle",
    "SavedResult",
    "Word",
    "absorption_result",
    "absorption_scores",
    "alpha_tokens",
    "answer_text",
    "decoder_cosines",
    "encode_prompts",
    "f1",
    "first_letter",
    "fit_probe",
    "icl_prompt",
    "ig_absorption",
    "k_sparse_probing",
    "labelled_vocabulary",
    "load_label_table",
    "measure_absorption",
    "planted_absorption",
    "planted_probe_data",
    "probe_data",
    "result_path",
    "run_absorption",
    "single_thread",
    "split_vocabulary",
    "tokenizer_of",
    "train_probe",
    "word_activations",
]
