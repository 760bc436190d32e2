"""Moved: the steering page is `saelab.dashboards.pages.steering`. This module re-exports its names for this
release."""

from __future__ import annotations

from saelab.dashboards.pages.steering import (
    CORPUS_DOCUMENTS,
    MAX_NEW_TOKENS,
    SCOPES,
    generation_results,
    register,
    search_results,
)
from saelab.dashboards.pages.steering import layout as steering_page

__all__ = [
    "CORPUS_DOCUMENTS",
    "MAX_NEW_TOKENS",
    "SCOPES",
    "generation_results",
    "register",
    "search_results",
    "steering_page",
]
