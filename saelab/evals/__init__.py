"""Evaluations of trained dictionaries: `matching` (cross-dictionary matching of latents by decoder cosine: nearest,
Hungarian 1:1, 1:n splits), `sparse_probing` (k-sparse probes on the latents against the raw dimensions) and
`hedging` (Chanin et al.'s hedging rate, per latent and per SAE), `families` (O'Neill et al.'s co-occurrence hierarchy:
parent -> child links and feature families), `intervals` (t-intervals across seeds, grouped by config), `table`
(the run's dictionaries x evals, as the app's Evals page shows them), `synth_bench` (the versioned synthetic suite of
`saelab bench-synth`), `endpoint` (an optional OpenAI-compatible LLM explainer and detection scorer) and `supervised`
(Makelov et al.'s supervised feature dictionaries, and an SAE scored against one on approximation, control and
interpretability)."""

from __future__ import annotations

from saelab.evals.endpoint import Endpoint, EndpointError, detect, explain
from saelab.evals.families import (
    CoOccurrence,
    Families,
    FamiliesResult,
    Family,
    FamilyThresholds,
    Link,
    cooccurrence,
    feature_families,
)
from saelab.evals.hedging import Hedging, HedgingPair, extended_copy, hedging, train_hedging_pair
from saelab.evals.intervals import ConfigGroup, Interval, group_by_config, t_interval, write_by_config
from saelab.evals.matching import (
    BestMatches,
    Nearest,
    OneToOne,
    Splits,
    best_matches,
    directions,
    load_decoder,
    nearest,
    one_to_one,
    splits,
)
from saelab.evals.sparse_probing import (
    KProbe,
    LabelProbes,
    ProbingTask,
    SparseProbingConfig,
    SparseProbingResult,
    TaskProbes,
    code_literal_task,
    package_task,
    sparse_probing,
    token_label_task,
)
from saelab.evals.supervised import (
    Approximation,
    AttributeLabels,
    Control,
    Counterfactuals,
    LatentF1,
    SupervisedDictionary,
    SupervisedEval,
    SupervisedTask,
    attribute_labels,
    evaluate_supervised,
    supervised_dictionary,
)
from saelab.evals.synth_bench import SUITE, SUITE_VERSION, BenchSetting, SynthBench, SynthScores, bench_synth, score_sae

__all__ = [
    "CoOccurrence",
    "ConfigGroup",
    "Families",
    "FamiliesResult",
    "Family",
    "FamilyThresholds",
    "Interval",
    "Link",
    "cooccurrence",
    "feature_families",
    "group_by_config",
    "t_interval",
    "write_by_config",
    "SUITE",
    "SUITE_VERSION",
    "BenchSetting",
    "Endpoint",
    "EndpointError",
    "SynthBench",
    "SynthScores",
    "bench_synth",
    "detect",
    "explain",
    "score_sae",
    "BestMatches",
    "Hedging",
    "HedgingPair",
    "extended_copy",
    "hedging",
    "train_hedging_pair",
    "KProbe",
    "LabelProbes",
    "ProbingTask",
    "SparseProbingConfig",
    "SparseProbingResult",
    "TaskProbes",
    "code_literal_task",
    "package_task",
    "sparse_probing",
    "token_label_task",
    "Nearest",
    "OneToOne",
    "Splits",
    "best_matches",
    "directions",
    "load_decoder",
    "nearest",
    "one_to_one",
    "splits",
    "Approximation",
    "AttributeLabels",
    "Control",
    "Counterfactuals",
    "LatentF1",
    "SupervisedDictionary",
    "SupervisedEval",
    "SupervisedTask",
    "attribute_labels",
    "evaluate_supervised",
    "supervised_dictionary",
]
