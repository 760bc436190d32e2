"""The families page (`/families?hook=H&sae=VARIANT`): the feature families `saelab eval --only families` found for
one SAE (`saelab.evals.families`): each parent latent, how often it fires, and its children, each linked to its
feature page with its containment (the share of the child's rows where the parent fires too)."""

from __future__ import annotations

from typing import Any

from dash import dcc, html

from saelab.dashboards import components as c
from saelab.dashboards import params as p
from saelab.dashboards.data import families_keys, load_families
from saelab.evals.families import FamiliesResult

TITLE = "Families"
NAV = True
MAX_FAMILIES = 300  # families listed (the largest first)


def _link(result: FamiliesResult, index: int, label: str | None = None) -> dcc.Link:
    return dcc.Link(label or f"#{index}", href=c.page_url("feature", hook=result.hook, sae=result.variant, id=index))


def family_table(result: FamiliesResult) -> html.Table:
    """One row per family, largest first: parent, its count, its children with their containment, all below it."""
    head = html.Tr([html.Th(h) for h in ("parent", "fires on", "children (containment)", "below it")])
    rows = [head]
    for family in result.families[:MAX_FAMILIES]:
        links = {link.child: link for link in result.children_of(family.parent)}
        children = [
            html.Span([_link(result, i), f" {links[i].containment:.2f}"], className="chip") for i in family.children
        ]
        rows.append(
            html.Tr(
                [
                    html.Td(_link(result, family.parent)),
                    html.Td(f"{result.counts[family.parent]:,}", className="num"),
                    html.Td(html.Span(children, className="chips")),
                    html.Td(str(len(family.descendants)), className="num"),
                ]
            )
        )
    return html.Table(rows, className="tbl", id="families-table")


@c.guarded
def layout(run: str, params: p.Params) -> Any:
    """The SAE's feature families, largest first, and links to the other SAEs' families."""
    result = load_families(run, p.name(params.get("hook"), "hook point"), p.name(params.get("sae"), "SAE variant"))
    picker = html.Div(
        [
            "Results: ",
            *[
                html.Span(dcc.Link(f"{h}/{v}", href=c.page_url("families", hook=h, sae=v)), className="chip")
                for h, v in families_keys(run)
            ],
        ],
        className="chips",
    )
    config = result.config
    sizes = result.sizes()
    stats = html.Div(
        [
            c.stat("families", f"{sizes.families:,}"),
            c.stat("latents in a family", f"{sizes.members:,} of {sizes.live:,} live"),
            c.stat("children per family", f"median {sizes.median_children:g}"),
            c.stat("largest family", f"{sizes.largest:,} below its parent"),
        ],
        className="stats",
        style={"marginTop": "10px"},
        id="families-headline",
    )
    forest = html.Div(
        f"The forest these families are read from: {len(result.links):,} parent->child links over "
        f"{result.rows:,} rows and {len(result.counts):,} latents (it links nearly every live latent to "
        "another, so the families, not the links, are the finding).",
        className="muted",
    )
    explain = html.Div(
        "A child's firing lies inside its parent's: the parent fires on at least "
        f"{config.get('min_containment', 0.1):g} of the child's rows (containment), at least "
        f"{config.get('min_lift', 2):g} times as often as chance would give, along the maximum spanning forest of "
        "those pairs, directed from the denser latent to the sparser (O'Neill et al. 2024). A family is a parent "
        f"with at least {config.get('min_children', 2)} children.",
        className="muted",
    )
    shown = "" if len(result.families) <= MAX_FAMILIES else f" (the largest {MAX_FAMILIES})"
    return html.Div(
        [
            html.H2(f"Feature families: {result.hook}/{result.variant}"),
            c.card(None, picker, stats, forest),
            c.card(f"Families{shown}", explain, family_table(result)),
        ],
        id="families-page",
    )
