"""Drivers: every panel of one SAE over a store (`analyze_sae`), and of every SAE of a run (`analyze`).

Both run under `torchrun` too (`torchrun --nproc-per-node N -m saelab analyze RUN`): each rank encodes a contiguous
share of the rows (the expensive part), rank 0 gathers the sparse codes, computes every panel from them as one rank
does, and writes the analysis, which is therefore the same, array for array, whatever the number of ranks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from transformer_lens import HookedTransformer

from saelab.analysis.codes import _Codes, contexts, gather_code, rank_rows, sparse_codes
from saelab.analysis.config import AnalysisConfig
from saelab.analysis.dfa import dfa_panels
from saelab.analysis.features import FeatureStore, vocab_strings, write_feature_store
from saelab.analysis.labels import background_counts, contrastive_labels
from saelab.analysis.panels import decoder_neighbours, logit_effects, residual_directions
from saelab.dictionaries import SAE, CrossCoder, load_dictionary
from saelab.distributed import broadcast_object, init, local_device, wait_for_main
from saelab.errors import ConfigError, MissingError, RunError, StoreError
from saelab.heads.dfa import HOOK_Z
from saelab.models import Model, load_model
from saelab.run import SAE_WEIGHTS, RunDir, absolute_path
from saelab.store import ActivationStore, split_array


def analyze_sae(
    store: ActivationStore,
    sae: SAE | CrossCoder,
    hook: str,
    *,
    out: str | Path,
    cfg: AnalysisConfig = AnalysisConfig(),
    model: Model | Mapping[str, Model | None] | None = None,
    run: RunDir | None = None,
    progress: bool = True,
) -> FeatureStore:
    """Compute every panel for every latent of `sae` over `store` and write them to `out`.

    `hook` is the store's array an SAE reads (`<alias>/<hook>` in a store of several models); a crosscoder reads its
    sources (`CrossCoder.inputs`, stacked `[rows, S, d]`), and its analysis adds each latent's decoder norm in every
    source (`decoder_norms [d_sae, S]`, and with two sources `relative_norm`, `|d_B| / (|d_A| + |d_B|)`).

    The logit effects need the `model` (or array -> model: a crosscoder's sources each through its own, a
    crosscoder's logit panels `[d_sae, S, n]`); without it (or one of a crosscoder's sources' models) they are left
    out (`logit_kind` is `none`). `run` is the run that `out` belongs to: the store's path is recorded relative to it
    (`RunDir.relative`), so the run can move (without `run`: absolute). Under `torchrun` every rank encodes its share
    of the rows and rank 0 writes `out` (the `model` is needed there only); every rank returns the analysis once it
    is written."""
    _write_panels(store, sae, hook, out=out, cfg=cfg, model=model, run=run, progress=progress)
    wait_for_main()  # rank 0 has written `out`
    return FeatureStore.open(out)


def _write_panels(
    store: ActivationStore,
    sae: SAE | CrossCoder,
    hook: str,
    *,
    out: str | Path,
    cfg: AnalysisConfig,
    model: Model | Mapping[str, Model | None] | None,
    run: RunDir | None,
    progress: bool,
) -> None:
    """`analyze_sae` but its wait: rank 0 writes the analysis at `out` once every rank's code is in; the other
    ranks return as soon as they have sent theirs (on to the next SAE of `analyze`)."""
    here = init()
    d_sae = sae.cfg.d_sae
    n_rows = min(store.n_tokens, cfg.max_tokens or store.n_tokens)
    if n_rows == 0:
        raise StoreError(f"the store {store.path} holds no rows to analyse; harvest or import activations first")
    device = local_device(cfg.device)
    sae = sae.to(device).eval()
    mine = rank_rows(n_rows, cfg.batch_size, here)
    began = time.perf_counter()
    reads = sae.inputs if isinstance(sae, CrossCoder) else [hook]
    code = sparse_codes(
        store,
        sae,
        reads if isinstance(sae, CrossCoder) else hook,
        start=mine.start,
        n_rows=mine.stop,
        batch_size=cfg.batch_size,
        device=device,
        progress=progress and here.main,
    )
    encoded = time.perf_counter()
    code = gather_code(code)
    if not here.main:
        return
    if progress and here.many:
        print(
            f"{hook}: rows encoded on {here.world} ranks in {encoded - began:.1f} s (rank 0), "
            f"{len(code.values):,} codes gathered in {time.perf_counter() - encoded:.1f} s",
            flush=True,
        )
    codes = _Codes(*code, d_sae=d_sae)
    tokens, ctx = store.tokens(slice(0, n_rows)), store.contexts(slice(0, n_rows))

    count = codes.count
    sums = np.bincount(codes.feats, weights=codes.vals, minlength=d_sae)
    max_act = np.where(count > 0, codes.vals[codes.by_feat[np.maximum(codes.end - 1, 0)]], 0).astype(np.float32)
    top_rows, top_acts = codes.top(cfg.n_top)
    quantiles = codes.quantile_samples(cfg.quantile_bins, cfg.quantile_examples, cfg.seed)
    top_tok, top_tok_acts = contexts(codes, tokens, ctx, rows=top_rows, window=cfg.window)
    q_tok, q_tok_acts = contexts(codes, tokens, ctx, rows=quantiles.rows, window=cfg.window)
    labels = contrastive_labels(top_tok, background_counts(tokens, ctx), n_labels=cfg.n_labels)
    hist, hist_edges = codes.histograms(cfg.hist_bins, max_act)
    nb_ids, nb_cos = decoder_neighbours(sae, cfg.n_neighbours)
    co_ids, co_jac = codes.cooccurrence(n_rows, cfg.cooc_min_density, cfg.cooc_max_latents, cfg.n_neighbours)
    arrays: dict[str, np.ndarray] = {
        "count": count.astype(np.int64),
        "density": count / n_rows,
        "mean_act": (sums / np.maximum(count, 1)).astype(np.float32),
        "max_act": max_act,
        "top_rows": top_rows,
        "top_acts": top_acts,
        "top_tokens": top_tok,
        "top_token_acts": top_tok_acts,
        "label_tokens": labels.tokens,
        "label_scores": labels.scores,
        "quantile_edges": quantiles.edges,
        "quantile_rows": quantiles.rows,
        "quantile_acts": quantiles.acts,
        "quantile_tokens": q_tok,
        "quantile_token_acts": q_tok_acts,
        "hist_counts": hist,
        "hist_edges": hist_edges,
        "neighbour_ids": nb_ids,
        "neighbour_cos": nb_cos,
        "cooc_ids": co_ids,
        "cooc_jaccard": co_jac,
    }
    if isinstance(sae, CrossCoder):
        norms = sae.decoder_norms().float().cpu().numpy()
        arrays["decoder_norms"] = norms
        if sae.cfg.n_sources == 2:
            arrays["relative_norm"] = (norms[:, 1] / np.maximum(norms.sum(1), 1e-12)).astype(np.float32)
    models = {a: model.get(a) if isinstance(model, Mapping) else model for a in reads}
    own = models.get(hook)
    dfa = _dfa_problem(sae, own, hook, cfg)
    if dfa is None and isinstance(sae, SAE) and isinstance(own, HookedTransformer):
        panels = dfa_panels(store, sae, own, hook=split_array(hook)[1], top_rows=top_rows, window=cfg.window)
        arrays |= {"dfa_heads": panels.heads, "dfa_sources": panels.sources}
    logit_kind = "none"
    if all(m is not None for m in models.values()):
        effects = [
            logit_effects(m, residual_directions(m, sae, split_array(a)[1], source=s), cfg.n_logits)
            for s, (a, m) in enumerate(models.items())
            if m is not None
        ]
        logit_kind = effects[0].kind
        stacked = [np.stack(panel, axis=1) for panel in zip(*(e[1:] for e in effects))]
        panels = stacked if isinstance(sae, CrossCoder) else [p[:, 0] for p in stacked]
        names = ("logit_top_ids", "logit_top_vals", "logit_bottom_ids", "logit_bottom_vals")
        arrays |= dict(zip(names, panels))
    attrs = {
        "hook": hook,
        "reads": reads,
        "kind": "crosscoder" if isinstance(sae, CrossCoder) else "sae",
        "variant": Path(str(out)).name.removesuffix(".zarr"),
        "store": absolute_path(store.path) if run is None else run.relative(store.path),
        "model": store.model,
        "n_tokens": n_rows,
        "d_sae": d_sae,
        "logit_kind": logit_kind,
        "dfa_status": dfa or "computed",
        **cfg.model_dump(mode="json", exclude={"run"}),  # where the run is, is where the analysis is
    }
    write_feature_store(out, arrays, attrs)


def _dfa_problem(sae: SAE | CrossCoder, model: Model | None, hook: str, cfg: AnalysisConfig) -> str | None:
    """Why the DFA panels (`saelab.analysis.dfa`) are not computed for `sae` on the array `hook`, or None when they
    are; the analysis records it (`dfa_status`) and the feature page shows it."""
    if isinstance(sae, CrossCoder) or not HOOK_Z.fullmatch(split_array(hook)[1]):
        return "not an attention dictionary: DFA needs one on `blocks.L.attn.hook_z`"
    if not cfg.dfa:
        return "turned off (`dfa: false` in the analysis config)"
    if model is None:
        return "the run's store records no model to run"
    if not isinstance(model, HookedTransformer):
        return (
            f"the model is a {type(model).__name__}; DFA reads the attention of a TransformerLens HookedTransformer "
            "(a pretrained name or a saved saelab model)"
        )
    return None


def _array(store: ActivationStore, folder: str, sae: SAE | CrossCoder) -> str:
    """The store's array that the dictionary saved under `RUN/saes/<folder>/` reads: the folder's own name where the
    store has it (a store of one model), else the array its config names (`hook_name`: an SAE of `<alias>/<hook>`,
    saved under `<alias>__<hook>`; a crosscoder's first source); `RunError` naming the fix when the store has
    neither."""
    if folder in store.hooks:
        return folder
    named = sae.cfg.sources[0] if isinstance(sae, CrossCoder) else sae.cfg.hook_name
    if named in store.hooks:
        return named
    raise RunError(
        f"the dictionary under {folder}/ reads {named or folder!r}, which the run's store {store.path} does not hold "
        f"(it has {store.hooks}); analyse it on the store it was trained on, or move it out of the run"
    )


class _Models:
    """The models of a run's store for the logit effects, each loaded once, when first asked for."""

    def __init__(self, store: ActivationStore, *, device: str) -> None:
        self.store, self.device = store, device
        self._loaded: dict[str, Model] = {}

    def get(self, array: str) -> Model | None:
        """The model whose activations the store's array `array` holds (`ActivationStore.spec_of`); None when the
        store records none (an import)."""
        return self._load(self.store.spec_of(array))

    def tokenizer(self) -> Any:
        """The tokenizer of the store's models (models harvested together share theirs); None without a model."""
        model = self._load(next(iter(self.store.model_specs.values()), self.store.model_spec))
        return None if model is None else model.tokenizer

    def _load(self, spec: str | None) -> Model | None:
        if not spec:
            return None
        if spec not in self._loaded:
            self._loaded[spec] = load_model(spec, device=self.device)
        return self._loaded[spec]


def _run_of(run_dir: str | Path | None, cfg: AnalysisConfig) -> RunDir:
    """The run to analyse: `run_dir`, or the config's `run`; `ConfigError` when neither or two different ones."""
    if run_dir is None and cfg.run is None:
        raise ConfigError("no run directory to analyse: pass `run_dir`, or set `run` in the analysis config")
    if run_dir is not None and cfg.run is not None and Path(run_dir) != Path(cfg.run):
        raise ConfigError(f"two runs named: `run_dir` {run_dir} and the config's `run` {cfg.run}; name one")
    run = RunDir(run_dir if run_dir is not None else str(cfg.run))
    if not run.root.is_dir():
        raise MissingError(
            f"no run directory {run.root}; give the folder that holds {run.store.name} and {run.saes_dir.name}/"
        )
    return run


def analyze(
    run_dir: str | Path | None = None,
    cfg: AnalysisConfig = AnalysisConfig(),
    *,
    progress: bool = True,
    skip_existing: bool = False,
) -> list[Path]:
    """Analyse every dictionary of a run (SAEs, transcoders, crosscoders) on the run's activation store; return the
    analysis stores. A dictionary of an array `<alias>/<hook>` of a store of several models (saved under
    `<alias>__<hook>`) reads that array, and its logit effects go through that alias's model; a crosscoder reads all
    its sources, each through its own model.

    The run is `run_dir`, or else `cfg.run` (a YAML config names it there); naming two different ones is a
    `ConfigError`. With `skip_existing`, an SAE whose analysis is newer than its weights is not analysed again.

    Under `torchrun` every rank encodes a share of every SAE's rows and rank 0 writes the vocabulary and the
    analyses (rank 0 decides which are due); every rank returns once all are written."""
    here = init()
    run = _run_of(run_dir, cfg)
    store = ActivationStore.open(str(run.store))
    saes = run.saes()
    if not saes:
        raise RunError(
            f"the run {run.root} has no trained SAEs (none under {run.saes_dir}); train some with `saelab train` and "
            f"`run: {run.root}` in its config first"
        )
    models = _Models(store, device=str(local_device(cfg.device))) if here.main else None
    written, due = [run.analysis(entry.hook, entry.variant) for entry in saes], []
    if here.main:
        run.analysis_dir.mkdir(exist_ok=True)
        tokenizer = models.tokenizer() if models is not None else None
        if tokenizer is not None:
            run.vocab.write_text(json.dumps(vocab_strings(tokenizer)))
        for entry, out in zip(saes, written):
            meta, weights = out / "zarr.json", entry.path / SAE_WEIGHTS
            due.append(not (skip_existing and meta.exists() and meta.stat().st_mtime >= weights.stat().st_mtime))
    for entry, out, todo in zip(saes, written, broadcast_object(due)):
        if todo:
            sae = load_dictionary(entry.path)
            if isinstance(sae, SAE) and sae.signed_codes:  # every panel here ranks non-negative activations
                raise RunError(
                    f"{entry.path} is a {sae.cfg.arch} dictionary, whose codes are signed, and the feature analysis "
                    f"reads non-negative activations only; analyse the run's other SAEs (move this one out of "
                    f"{run.saes_dir}) or compare it with `saelab.dictionaries.icfl.selectivity`"
                )
            array = _array(store, entry.hook, sae)
            reads = sae.inputs if isinstance(sae, CrossCoder) else [array]
            by_array = {a: models.get(a) for a in reads} if models is not None else None
            _write_panels(store, sae, array, out=out, cfg=cfg, model=by_array, run=run, progress=progress)
    wait_for_main()  # rank 0 has written every analysis
    return written
