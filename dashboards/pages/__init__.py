"""The app's pages, one module each: `overview` (/), `feature`, `search`, `prompt`, `circuits`, `steering`,
`absorption`. Each has `TITLE`, `NAV` (whether the nav links to it) and `layout(run, params)`, the page a URL asks
for; those with callbacks have `register(app, run)`. `saelab.dashboards.app.PAGES` maps paths to them.

This package replaces the module `saelab.dashboards.pages`; the names that module had are re-exported here for
this release.
"""

from __future__ import annotations

from typing import Any

from saelab.dashboards.components import guarded, sae_options
from saelab.dashboards.components import sae_dropdown as _sae_dropdown
from saelab.dashboards.data import chosen_sae
from saelab.dashboards.pages import overview
from saelab.dashboards.pages.feature import feature_page
from saelab.dashboards.pages.prompt import layout as prompt_page
from saelab.dashboards.pages.prompt import prompt_results
from saelab.dashboards.pages.search import layout as search_page
from saelab.dashboards.pages.search import token_results
from saelab.dashboards.params import Params


def overview_page(run: str) -> Any:
    """The run page, `overview.layout(run, {})`."""
    return overview.layout(run, {})


__all__ = [
    "Params",
    "_sae_dropdown",
    "chosen_sae",
    "feature_page",
    "guarded",
    "overview_page",
    "prompt_page",
    "prompt_results",
    "sae_options",
    "search_page",
    "token_results",
]
