"""Evaluations of trained dictionaries: `matching` (cross-dictionary matching of latents by decoder cosine: nearest,
Hungarian 1:1, 1:n splits)."""

from __future__ import annotations

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

__all__ = [
    "BestMatches",
    "Nearest",
    "OneToOne",
    "Splits",
    "best_matches",
    "directions",
    "load_decoder",
    "nearest",
    "one_to_one",
    "splits",
]
