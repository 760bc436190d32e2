"""Matryoshka prefixes for the TopK family (Bussmann et al. 2025, "Learning Multi-Level Features with Matryoshka
SAEs"; Nabeshima's sampled prefixes): which prefix widths a step trains, and the prefix reconstructions, computed
from the step's own top-k entries.

A Matryoshka SAE is a TopK or BatchTopK SAE (`SAEConfig.matryoshka_prefixes` or `matryoshka_sample`): the latents
are chosen once over the whole dictionary, as in the reference code (`GlobalBatchTopKMatryoshkaSAE.forward` in
github:bartbussmann/matryoshka_sae, `MatryoshkaBatchTopKTrainingSAE._iterable_decode` in SAELens), and the
reconstruction of prefix `w` is `b_dec` plus the decode of the chosen entries with latent `< w`. The entries are
regrouped into one band per latent range `[w_{i-1}, w_i)`, each decoded once by the sparse kernels (one group of
bags per band), so a Matryoshka step decodes exactly the entries a TopK step does; every prefix's squared error comes
from one running residual over the band decodes (`kernels.nested_sse`), and the dead latents of every band train
their AuxK in one dense pass (`kernels.dense_topk_decodes`) or in the sparse kernels' call. Nothing here imports the
SAE classes: `base` validates configs with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from saelab.ops import kernels
from saelab.ops.kernels import Entries

PARETO_POWER = 0.5
"""Nabeshima's `pareto_power`: sampled prefix widths `w` in `[1, d_sae)` have `P(width <= w) ~ (w / d_sae) ** 0.5`,
so short prefixes are drawn more often (`sample_prefixes` in github:noanabeshima/matryoshka-saes, `sae.py`)."""


def resolve_prefixes(prefixes: Sequence[int | float] | None, d_sae: int) -> list[int] | None:
    """Prefix widths as given in a config, checked against `d_sae`: whole numbers are widths; a list of floats in
    `(0, 1]` are fractions of `d_sae` (so one sweep's list fits every expansion), rounded to widths. `ValueError`
    (pydantic turns it into the config error) naming the fix unless they increase strictly and end at `d_sae`."""
    if prefixes is None:
        return None
    fix = f"give increasing widths ending at d_sae={d_sae} (e.g. [{max(d_sae // 8, 1)}, {d_sae}]) or fractions of it"
    if not prefixes:
        raise ValueError(f"matryoshka_prefixes is empty; {fix} (e.g. [0.125, 1.0]), or leave it out for no prefixes")
    if all(isinstance(p, float) for p in prefixes):
        if not all(0 < p <= 1 for p in prefixes):
            raise ValueError(f"matryoshka_prefixes {list(prefixes)}: fractions of d_sae must lie in (0, 1]; {fix}")
        widths = [max(1, round(p * d_sae)) for p in prefixes]
    elif all(isinstance(p, int) and not isinstance(p, bool) for p in prefixes):
        widths = [int(p) for p in prefixes]
    else:
        raise ValueError(f"matryoshka_prefixes {list(prefixes)} mixes widths and fractions; {fix}")
    if any(b <= a for a, b in zip(widths, widths[1:], strict=False)) or widths[0] < 1:
        raise ValueError(f"matryoshka_prefixes {widths} must be positive and strictly increasing; {fix}")
    if widths[-1] != d_sae:
        raise ValueError(f"matryoshka_prefixes {widths} must end at the whole dictionary; {fix}")
    return widths


def sample_prefixes(d_sae: int, n: int, draw: int) -> list[int]:
    """`n` prefix widths for one step, Nabeshima's way: `n - 1` distinct widths in `[1, d_sae)` drawn without
    replacement with `P(w) ~ (w / d_sae) ** 0.5 - ((w - 1) / d_sae) ** 0.5`, sorted, then `d_sae`. The draw is a
    function of `draw` (the SAE's step counter) alone, so every rank of a split batch and a resumed run draw the
    same widths; his minimum prefix length is 1, as here."""
    n_inner = min(n, d_sae) - 1
    if n_inner <= 0:
        return [d_sae]
    edges = (torch.arange(d_sae, dtype=torch.float64) / d_sae) ** PARETO_POWER
    weights = edges[1:] - edges[:-1]  # widths 1 .. d_sae - 1
    g = torch.Generator().manual_seed(draw)
    inner = torch.multinomial(weights, n_inner, replacement=False, generator=g) + 1
    return sorted(inner.tolist()) + [d_sae]


def band_entries(entries: Entries, inner: Sequence[int], n_rows: int) -> tuple[Entries, list[int]]:
    """The main entries of a step regrouped for `kernels.sparse_autoencode`: band `j` holds the entries whose latent
    lies in `[inner[j-1], inner[j])` (the last band: `[inner[-1], d_sae)`), in bags `[j * n_rows, (j + 1) * n_rows)`,
    rows still sorted inside each band; returns them and each band's entry count (its group size). The counts are
    read on the host: one device sync per step on a GPU."""
    done = kernels.band_sort(entries, inner, n_rows)  # the CPU's one pass
    if done is not None:
        return done
    bounds = [0, *inner, None]
    # one pass per band keeps each band's entries in row order (a stable sort of all of them is ~5x slower on CPU)
    picks = [
        ((entries.cols >= a) & (entries.cols < b) if b else entries.cols >= a).nonzero().squeeze(1)
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]
    order = torch.cat(picks)
    bags = entries.rows[order] + torch.cat([torch.full_like(pick, j * n_rows) for j, pick in enumerate(picks)])
    return Entries(entries.vals[order], entries.cols[order], bags), [len(pick) for pick in picks]


def dense_band_decodes(acts: Tensor, W_dec: Tensor, inner: Sequence[int]) -> list[Tensor]:
    """Band decodes of dense activations `[batch, d_sae]`: `acts[:, a:b] @ W_dec[a:b]` per latent range (the dense
    step's form of `band_entries`)."""
    bounds = [0, *inner, W_dec.shape[0]]
    return [acts[:, a:b] @ W_dec[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
