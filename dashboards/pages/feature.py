"""The feature page (`/feature?hook=H&sae=VARIANT&id=N`): everything the analysis knows about one latent (stats,
examples across the activation range, histogram, logit effects, decoder neighbours, co-occurring latents, its feature
family (parents and children, where `saelab eval --only families` has run) with the hedging and absorption evidence
for the latent (where `saelab eval` and `saelab absorption` have run), and the same latent in the run's other
SAEs over the hook point). A latent of a dictionary on `attn.hook_z` also shows the direct feature attribution of
its top examples to the heads and to the source tokens. A crosscoder's latent also shows its decoder norm in each
source, its relative norm (two sources) and its class where `saelab diff` has classified the crosscoder's latents,
and its logit effects per source.

The page is built of `components.element`s, the JSON form Dash sends, never of Dash component objects: with ~700
pieces a page, that is most of the server's time per page saved (`scripts/bench_app.py` measures it)."""

from __future__ import annotations

from typing import Any

import numpy as np

from saelab.analysis.labels import label_text
from saelab.dashboards import components as c
from saelab.dashboards.components import Element, element
from saelab.dashboards.data import (
    SaeInfo,
    absorption_of,
    check_model,
    families_of,
    feature_store,
    hedging_of,
    model_diff_of,
    sae_info,
    same_latent,
    valid_ids,
)
from saelab.dashboards.examples import ContextTokens, context_tokens, examples
from saelab.dashboards.params import Params, feature_id, name
from saelab.heads import Head, attention_layer
from saelab.heads.dfa import HOOK_Z
from saelab.plots import dfa_heads_figure
from saelab.store import split_array

TITLE = "Feature"
NAV = False  # reached from the other pages' links, not from the nav


def layout(run: str, params: Params) -> Any:
    """The latent the URL names."""
    return feature_page(run, params.get("hook"), params.get("sae"), params.get("id"))


@c.guarded
def feature_page(run: str, hook: str | None, variant: str | None, raw_id: str | None) -> Any:
    """Everything the analysis knows about one latent (an `Element`); reads only that latent's slices of the
    analysis."""
    info = sae_info(run, name(hook, "hook point"), name(variant, "SAE variant"))
    check_model(run, info)
    fs = feature_store(run, info)
    index = feature_id(raw_id, fs.n_features)
    f = fs.feature(index)
    tokens, scale = context_tokens(fs), float(f["max_act"])
    centre = f["top_tokens"].shape[-1] // 2  # contexts are ±window around the example's own token
    nav = element(
        "Span",
        [
            c.link_element(info, index - 1, "← previous") if index > 0 else None,
            c.link_element(info, index + 1, "next →") if index + 1 < fs.n_features else None,
        ],
        className="pager",
    )
    header = c.card_element(
        None,
        nav,
        element("H2", f"Feature #{index}", style={"margin": "0 0 2px"}),
        element("Div", f"{_reads(info)} · {info.variant} · {fs.n_features:,} latents", className="muted"),
        _label_element(fs.vocab, f),
        element(
            "Div",
            [
                c.stat_element("fires on", f"{f['count']:,} tokens"),
                c.stat_element("density", f"{f['density']:.3%}"),
                c.stat_element("mean act", c.fmt(f["mean_act"])),
                c.stat_element("max act", c.fmt(f["max_act"])),
            ],
            className="stats",
            style={"marginTop": "10px"},
        ),
    )
    if f["count"] == 0:
        dead = (
            f"Feature {index} never fired on the {int(fs.attrs.get('n_tokens', 0)):,} analysed tokens: it is dead, "
            "so there is nothing to show."
        )
        return element("Div", [header, c.error_box(dead)])
    edges = f["quantile_edges"].tolist()
    bins = [
        element(
            "Div",
            [
                element("H4", f"{edges[b]:.3g} – {edges[b + 1]:.3g}"),
                examples(
                    tokens,
                    f["quantile_acts"][b],
                    f["quantile_tokens"][b],
                    token_acts=f["quantile_token_acts"][b],
                    centre=centre,
                    scale=scale,
                    testid=f"quantile-{b}",
                ),
            ],
            className="bin",
        )
        for b in reversed(range(len(f["quantile_acts"])))
    ]
    top = examples(
        tokens,
        f["top_acts"],
        f["top_tokens"],
        token_acts=f["top_token_acts"],
        centre=centre,
        scale=scale,
        testid="top-examples",
    )
    left = [
        c.card_element("Top activations", top),
        *_dfa_card(info, fs.attrs, f, tokens, centre),
        c.card_element("Examples across the activation range", *bins),
    ]
    right = [
        *([_sources_card(run, info, index, f)] if "decoder_norms" in f else []),
        c.card_element("Activation histogram", c.histogram(f["hist_counts"], f["hist_edges"])),
        _logit_card(fs.attrs.get("logit_kind", "unembedding"), fs.vocab, f, info.reads),
        c.card_element("Decoder neighbours", c.chips(info, valid_ids(f["neighbour_ids"], f["neighbour_cos"]), "cos")),
        c.card_element("Same latent in the other SAEs", _same_latent(run, info, index), id="same-latent"),
        c.card_element("Co-occurring latents", _cooc(info, f)),
        c.card_element("Feature family", _family(run, info, index), _evidence(run, info, index), id="family"),
    ]
    grid = element("Div", [element("Div", left), element("Div", right)], className="grid")
    return element("Div", [header, grid], id="feature-page")


DFA_EXAMPLES = 5
"""Top examples whose source tokens the DFA card highlights."""


def _dfa_card(info: SaeInfo, attrs: dict[str, Any], f: dict[str, Any], tokens: ContextTokens, centre: int) -> list:
    """The latent's direct feature attribution (`saelab.analysis.dfa`), for a dictionary on `attn.hook_z`: each head's
    term at the top example and on average over the top examples, and the top examples' source tokens shaded by
    their term (orange adds to the latent, blue takes away). No card for other dictionaries; the reason, for one on
    `attn.hook_z` whose analysis has no DFA panels."""
    if "dfa_heads" not in f:
        reason = attrs.get("dfa_status")
        if not HOOK_Z.fullmatch(split_array(info.array)[1]):
            return []
        why = f"Not computed: {reason}." if reason else "Not computed: run `saelab analyze` again to add it."
        return [c.card_element("Direct feature attribution", element("Div", why, className="muted"), id="dfa")]
    layer = attention_layer(split_array(info.array)[1])
    heads, sources, real = f["dfa_heads"], f["dfa_sources"], f["top_rows"] >= 0
    labels = [Head(layer, h).label for h in range(heads.shape[1])]
    mean = heads[real].mean(0) if real.any() else np.zeros(heads.shape[1], np.float32)
    shown = slice(0, DFA_EXAMPLES)
    scale = float(np.abs(sources[shown]).max()) or 1.0
    highlighted = examples(
        tokens,
        f["top_acts"][shown],
        f["top_tokens"][shown],
        token_acts=sources[shown],
        centre=centre,
        scale=scale,
        testid="dfa-sources",
        label="attribution",
    )
    note = (
        "Each head's term in the latent's pre-activation at the example's token (outlined), and each source token's "
        "term at it, summed over the heads (orange adds, blue takes away)."
    )
    return [
        c.card_element(
            "Direct feature attribution",
            element("Div", note, className="muted"),
            element(
                "Graph",
                namespace=c.DCC,
                figure=dfa_heads_figure(labels, heads[0], mean),
                config={"displayModeBar": False},
                id="dfa-heads",
            ),
            highlighted,
            id="dfa",
        )
    ]


def _reads(info: SaeInfo) -> str:
    """What the dictionary reads: its folder's hook point, a crosscoder's sources."""
    return " + ".join(info.reads) if info.kind == "crosscoder" else info.array


def _sources_card(run: str, info: SaeInfo, index: int, f: dict[str, Any]) -> Element:
    """A crosscoder latent's decoder norm in each source, its relative norm, and its class by `saelab diff`."""
    stats = []
    if "relative_norm" in f:
        stats.append(c.stat_element(f"relative norm ({info.reads[1]})", f"{f['relative_norm']:.3f}"))
    diff = model_diff_of(run, info)
    if diff is not None and index < len(diff.scaling_class):
        by_norm = diff.norm_class[index]
        stats.append(c.stat_element("model diff", f"{diff.scaling_class[index]} ({by_norm} by norm)"))
    elif info.reads and len(info.reads) == 2:
        stats.append(
            c.stat_element("model diff", f"not classified: run `saelab diff RUN --sae {info.hook}/{info.variant}`")
        )
    return c.card_element(
        "Decoder norm per source",
        element("Div", stats, className="stats", id="source-stats"),
        c.decoder_norm_bars(list(info.reads), f["decoder_norms"]),
        id="sources",
    )


def _logit_card(kind: str, vocab: list[str], f: dict[str, Any], sources: tuple[str, ...]) -> Element:
    """The latent's logit effects (a crosscoder's: through each source's model, one pair of tables per source)."""
    if "logit_top_ids" not in f:
        missing = "Not computed: the run's store records no model to take them from."
        return c.card_element("Logit effects", element("Div", missing, className="muted"), id="logit-effects")
    if kind == "unembedding":
        title, high, low = "Logit effects (decoder direction · unembedding)", "promoted", "suppressed"
    else:
        title, high, low = "Token embeddings by cosine with the decoder direction", "closest", "most opposite"
    panels = ("logit_top_ids", "logit_top_vals", "logit_bottom_ids", "logit_bottom_vals")
    per_source = f["logit_top_ids"].ndim == 2  # a crosscoder's `[S, n]`
    parts = []
    for s in range(len(f["logit_top_ids"]) if per_source else 1):
        top_ids, top_vals, bottom_ids, bottom_vals = (f[name][s] if per_source else f[name] for name in panels)
        top = c.token_value_table(vocab, valid_ids(top_ids, top_vals), high)
        bottom = c.token_value_table(vocab, valid_ids(bottom_ids, bottom_vals), low)
        style = {"display": "grid", "gridTemplateColumns": "1fr 1fr", "gap": "12px"}
        if per_source:
            parts.append(element("H4", sources[s] if s < len(sources) else f"source {s}"))
        parts.append(element("Div", [top, bottom], style=style))
    return c.card_element(title, *parts, id="logit-effects")


def _cooc(info: SaeInfo, f: dict[str, Any]) -> Element:
    pairs = valid_ids(f["cooc_ids"], f["cooc_jaccard"])
    if not pairs:
        return element("Div", "This latent fires too rarely for co-occurrence statistics.", className="muted")
    return c.chips(info, pairs, "J")


def _family(run: str, info: SaeInfo, index: int) -> Element:
    """The latent's parents and children in the SAE's feature families (`saelab.evals.families`), each linked with
    its containment (the share of the child's rows where the parent fires too)."""
    found = families_of(run, info)
    if found is None:
        return element(
            "Div",
            f"Not computed: run `saelab eval RUN --only families --sae {info.hook}/{info.variant}`.",
            className="muted",
        )
    parents = [(link.parent, link.containment) for link in found.parents_of(index)]
    children = [(link.child, link.containment) for link in found.children_of(index)]
    family = c.page_url("families", hook=info.hook, sae=info.variant)
    return element(
        "Div",
        [
            element("H4", "parent"),
            c.chips(info, parents, "contains") if parents else element("Div", "none (a root)", className="muted"),
            element("H4", f"children ({len(children)})"),
            c.chips(info, children, "in") if children else element("Div", "none", className="muted"),
            element("Link", "all families of this SAE", namespace=c.DCC, href=family),
        ],
        id="family-links",
    )


def _evidence(run: str, info: SaeInfo, index: int) -> Element:
    """The latent's hedging rate (and its decoder's cosine to the control's) and the absorption labels it splits or
    absorbs, from the run's results for the SAE; what has not been computed is left out."""
    lines = []
    hedge = hedging_of(run, info)
    if hedge is not None and index < len(hedge.per_latent):
        lines.append(
            f"hedging rate {hedge.per_latent[index]:.3f} (the SAE's {hedge.rate:.3f}; decoder cosine to the control "
            f"{hedge.cosine[index]:.2f})"
        )
    absorbed = absorption_of(run, info)
    if absorbed is not None:
        splits = [lab.label for lab in absorbed.labels if index in lab.split_latents]
        absorbs = [
            lab.label
            for lab in absorbed.labels
            if any(int(a[0]) == index for case in lab.cases for a in (case.absorbers or []))
        ]
        if splits:
            lines.append(f"absorption: the split latent of {', '.join(map(repr, splits))}")
        if absorbs:
            lines.append(f"absorption: absorbs cases of {', '.join(map(repr, absorbs))}")
        if not splits and not absorbs:
            lines.append(f"absorption: no part in the {len(absorbed.labels)} labels of {absorbed.task!r}")
    return element("Div", [element("Div", line) for line in lines], className="muted", id="latent-evidence")


def _same_latent(run: str, info: SaeInfo, index: int) -> Element:
    """The latent's nearest latent (decoder cosine) in each other SAE of the run over its hook point, linked."""
    matches = same_latent(run, info, index)
    if not matches:
        return element("Div", f"No other SAE of this run reads {info.hook} (from the same model).", className="muted")
    body = [
        element(
            "Tr",
            [
                element("Td", c.link_element(m.sae, m.index, f"{m.sae.variant} #{m.index}")),
                element("Td", f"{m.cosine:.2f}", className="num"),
            ],
        )
        for m in matches
    ]
    head = element("Tr", [element("Th", "SAE · latent"), element("Th", "cos", className="num")])
    return element("Table", [element("Thead", head), element("Tbody", body)], className="tbl")


def _label_element(vocab: list[str], f: dict[str, Any]) -> Element | None:
    """The latent's contrastive label (its distinctive n-grams with their log-odds z-scores); None for an analysis
    written before labels."""
    if "label_tokens" not in f:
        return None
    text = label_text(f["label_tokens"], vocab, scores=f["label_scores"]) or "none (never fired)"
    return element(
        "Div",
        [element("B", "label: "), text],
        title="distinctive tokens and bigrams of the top contexts against the analysed text: log-odds with an "
        "informative Dirichlet prior (Monroe et al. 2008), z-scored",
        className="muted",
        id="feature-label",
    )
