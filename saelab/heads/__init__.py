"""Attention-head analyses: composition between heads from their weights (`composition`: Elhage et al. 2021's Q-, K-
and V-composition scores and Merullo et al. 2024's SVD channels) and direct feature attribution of SAE latents on
`attn.hook_z` to heads and source positions (`dfa`: Kissane et al. 2024)."""

from __future__ import annotations

from saelab.heads.census import HeadCensus, census_of, head_census
from saelab.heads.composition import (
    MODES,
    Channel,
    Channels,
    CompositionScores,
    Head,
    HeadPair,
    Mode,
    channel,
    composition_scores,
    mode_scores,
    top_channels,
)
from saelab.heads.dfa import (
    Attribution,
    ExampleAttribution,
    attention_layer,
    attribution_at,
    direct_feature_attribution,
    encoder_map,
)

__all__ = [
    "MODES",
    "Attribution",
    "ExampleAttribution",
    "Channel",
    "Channels",
    "CompositionScores",
    "Head",
    "HeadCensus",
    "HeadPair",
    "Mode",
    "attention_layer",
    "attribution_at",
    "census_of",
    "channel",
    "composition_scores",
    "direct_feature_attribution",
    "encoder_map",
    "head_census",
    "mode_scores",
    "top_channels",
]
