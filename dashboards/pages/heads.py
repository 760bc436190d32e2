"""The heads page (`/heads`, `/heads?hook=H&sae=VARIANT`): the Q-, K- and V-composition scores of every pair of the
run's model's heads as heatmaps and a table of the top pairs with their channels (what `saelab heads RUN` wrote,
`saelab.heads.run`), and the per-head census of the run's dictionaries on `attn.hook_z` (how many latents have most
of their direct feature attribution on each head, `saelab.heads.census`; one dictionary's when the URL names it).
For a store of several models, `?model=ALIAS` picks the model's composition scores."""

from __future__ import annotations

from typing import Any

import numpy as np

from saelab.dashboards import components as c
from saelab.dashboards import params as p
from saelab.dashboards.components import Element, element
from saelab.dashboards.data import cached_result, sae_info
from saelab.heads import MODES, Channels, CompositionScores, HeadCensus
from saelab.heads.config import head_circuits
from saelab.heads.discrete import HeadCircuit
from saelab.heads.run import attention_saes, census, result_names
from saelab.plots import composition_figure
from saelab.run import RunDir

TITLE = "Heads"
NAV = True
TOP_PAIRS = 10
"""Rows of the top-pairs table."""


@c.guarded
def layout(run: str, params: p.Params) -> Any:
    """The composition card and the census cards."""
    alias = p.name(params.get("model"), "model alias") if params.get("model") else None
    hook, variant = params.get("hook"), params.get("sae")
    if hook or variant:
        chosen = [(p.name(hook, "hook point") or "", p.name(variant, "SAE variant") or "")]
    else:
        chosen = attention_saes(run)
    censuses = [_census_card(run, hook, variant, census(run, hook, variant)) for hook, variant in chosen]
    if not censuses:
        censuses = [
            c.card_element(
                "Latents by head",
                element("Div", "The run has no dictionaries on blocks.L.attn.hook_z.", className="muted"),
                id="census",
            )
        ]
    circuits = [_circuit_card(path) for path in head_circuits(run)]
    return element(
        "Div", [element("H2", "Attention heads"), _composition_card(run, alias), *circuits, *censuses], id="heads-page"
    )


def _circuit_card(path: Any) -> Element:
    """One head circuit (`saelab heads CONFIG`): each head's discrete-code score and patching drop, the runtimes
    and the agreement of the two."""
    found = cached_result(HeadCircuit.load, path)
    order = sorted(range(len(found.heads)), key=lambda i: -found.scores[i])
    rows = [
        element(
            "Tr",
            [
                element("Td", found.heads[i]),
                element("Td", f"{found.scores[i]:g}", className="num"),
                element("Td", f"{found.p_values[i]:.3f}" if found.p_values else "", className="num"),
                element("Td", f"{found.effects[i]:.3f}", className="num"),
                element("Td", "yes" if found.heads[i] in found.circuit else ""),
            ],
        )
        for i in order
    ]
    names = [
        ("head", None),
        ("positive-only codes", "num"),
        ("p vs chance", "num"),
        ("patching drop", "num"),
        ("in circuit", None),
    ]
    head_row = element("Tr", [element("Th", name, className=cls) for name, cls in names])
    summary = (
        f"{found.n_prompts} positive and {found.n_prompts} negative prompts. Discrete codes (O'Neill & Bui 2024) "
        f"{found.discrete_seconds:.2f} s, activation patching {found.patching_seconds:.2f} s; agreement Pearson "
        f"{found.pearson:.3f}, Spearman {found.spearman:.3f}. p vs chance: how often swapping the labels of "
        "positive/negative pairs scores a head as high (a large p: its codes follow the prompts, not the task)."
    )
    return c.card_element(
        f"Head circuit: {path.stem} ({found.model})",
        element("Div", summary, className="muted"),
        element("Table", [element("Thead", head_row), element("Tbody", rows)], className="tbl"),
        **c.data(testid="head-circuit"),
    )


def _composition_card(run: str, alias: str | None) -> Element:
    """The heatmaps and the top pairs, or how to compute them."""
    names = result_names(alias)
    path, channels_path = (RunDir(run).heads(n) for n in names)
    if not path.is_file():
        missing = f"No composition scores yet: run `saelab heads {run}`" + (f" --model {alias}" if alias else "") + "."
        return c.card_element("Composition", element("Div", missing, className="muted"), id="composition")
    scores = cached_result(CompositionScores.load, path)
    channels = cached_result(Channels.load, channels_path).channels if channels_path.is_file() else []
    by_pair = {(ch.mode, ch.writer, ch.reader): ch for ch in channels}
    rows = []
    for pair in scores.top_pairs(TOP_PAIRS):
        found = by_pair.get((pair.mode, pair.writer, pair.reader))
        shares = [f"{found.share(1, 1):.0%}", f"{found.share(4, 4):.0%}"] if found else ["", ""]
        cells = [pair.mode, pair.writer.label, pair.reader.label, f"{pair.score:.3f}", *shares]
        rows.append(element("Tr", [element("Td", v, className="num" if i > 2 else None) for i, v in enumerate(cells)]))
    head = element(
        "Tr",
        [
            element("Th", name, className="num" if i > 2 else None)
            for i, name in enumerate(["mode", "writer", "reader", "score", "top-1 channel", "top-4 x 4 channel"])
        ],
    )
    table = element("Table", [element("Thead", head), element("Tbody", rows)], className="tbl", id="top-pairs")
    graphs = [
        element(
            "Graph",
            namespace=c.DCC,
            figure=composition_figure(scores, mode),
            config={"displayModeBar": False},
            id=f"composition-{mode}",
        )
        for mode in MODES
    ]
    note = (
        "Composition scores ||W_OV R|| / (||W_OV|| ||R||) of each writer head (rows) into each later reader (columns); "
        "the channel columns give the share of the pair's composition carried by the top singular directions."
    )
    return c.card_element(
        f"Composition ({scores.model})",
        element("Div", note, className="muted"),
        element("Div", graphs, style={"display": "grid", "gridTemplateColumns": "1fr 1fr 1fr", "gap": "8px"}),
        element("H4", "Top pairs"),
        table,
        id="composition",
    )


SHOWN_LATENTS = 8
"""Latents of each head linked from the census."""


def _census_card(run: str, hook: str, variant: str, found: HeadCensus) -> Element:
    """One dictionary's latents by head, with links to the first `SHOWN_LATENTS` latents of each."""
    info = sae_info(run, hook, variant)
    live = sum(found.counts) + found.mixed
    groups = [*((h.label, n, h.head) for h, n in zip(found.heads, found.counts)), ("mixed", found.mixed, -1)]
    rows = []
    for label, n, head in groups:
        latents = np.flatnonzero(found.head_of == head) if head >= 0 else _mixed(found)
        links = [c.link_element(info, i) for i in latents[:SHOWN_LATENTS].tolist()]
        rows.append(
            element(
                "Tr",
                [
                    element("Td", label),
                    element("Td", f"{n:,}", className="num"),
                    element("Td", f"{n / live:.0%}" if live else "", className="num"),
                    element("Td", element("Span", links, className="chips")),
                ],
            )
        )
    names = [("head", None), ("latents", "num"), ("of live", "num"), ("first latents", None)]
    head_row = element("Tr", [element("Th", name, className=cls) for name, cls in names])
    note = (
        f"Latents with more than {found.threshold:.0%} of their direct feature attribution (summed over their top "
        f"examples) on one head; mixed: no such head. {found.dead:,} dead latents are not counted."
    )
    return c.card_element(
        f"Latents by head: {hook}/{variant}",
        element("Div", note, className="muted"),
        element("Table", [element("Thead", head_row), element("Tbody", rows)], className="tbl"),
        **c.data(testid="census"),
    )


def _mixed(found: HeadCensus) -> np.ndarray:
    """The latents of no head that fired (the census's `mixed`)."""
    return np.flatnonzero((found.head_of < 0) & ~found.dead_latents)
