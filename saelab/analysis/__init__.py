"""Feature analysis in one streaming pass: statistics, examples, histograms, logit effects, neighbours.

The pass (`codes`) encodes every stored row once and keeps the sparse code (row, latent, value) of each
nonzero activation; every panel is computed exactly from that code, without reading the activations again.
The dictionary panels (`panels`) come from the weights alone; for a dictionary on `attn.hook_z`, `dfa` runs the
model on the top examples' contexts for their direct feature attribution to the heads and source tokens. `run` drives both for one SAE or for every SAE
of a run, and `features` writes and reads the result: `RunDir.analysis(hook, variant)`, one array per
panel, shaped `[d_sae, ...]` and chunked by feature so the app reads one feature at a time.
"""

from __future__ import annotations

from saelab.analysis.codes import QuantileSamples, SparseBatch, SparseCode, contexts, encode_sparse, sparse_codes
from saelab.analysis.config import AnalysisConfig
from saelab.analysis.features import FEATURE_CHUNK, FeatureStore, vocab_strings, write_feature_store
from saelab.analysis.labels import Labels, contrastive_labels, detection_aurocs, label_text
from saelab.analysis.panels import LogitEffects, decoder_neighbours, logit_effects, residual_directions
from saelab.analysis.run import analyze, analyze_sae

__all__ = [
    "FEATURE_CHUNK",
    "AnalysisConfig",
    "FeatureStore",
    "Labels",
    "contrastive_labels",
    "detection_aurocs",
    "label_text",
    "LogitEffects",
    "QuantileSamples",
    "SparseBatch",
    "SparseCode",
    "analyze",
    "analyze_sae",
    "contexts",
    "decoder_neighbours",
    "encode_sparse",
    "logit_effects",
    "residual_directions",
    "sparse_codes",
    "vocab_strings",
    "write_feature_store",
]
