"""Feature analysis in one streaming pass: statistics, examples, histograms, logit effects, neighbours.

The pass encodes every stored row once and keeps the sparse code (row, latent, value) of each nonzero
activation. Every panel is then computed exactly from that code, without reading the activations
again: top examples, examples from true quantile bins of the nonzero activations (sampled uniformly
within each bin by random priorities, i.e. reservoir sampling), histograms, co-occurrence.

Layout: `<run>/analysis/<hook>/<variant>.zarr`, one array per panel, shaped `[d_sae, ...]` and chunked
by feature so the app reads one feature at a time; `<run>/analysis/vocab.json` maps token ids to text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from saelab.config import StrictModel
from saelab.errors import StoreError
from saelab.models import Model, is_encoder, load_model, resolve_device
from saelab.sae import SAE
from saelab.store import ActivationStore, prefetch
from saelab.topk import topk_rows

FEATURE_CHUNK = 64


class AnalysisConfig(StrictModel):
    """How much of each panel to keep."""

    n_top: int = 20
    window: int = 10
    quantile_bins: int = 10
    quantile_examples: int = 5
    hist_bins: int = 30
    n_logits: int = 10
    n_neighbours: int = 10
    cooc_min_density: float = 1e-3
    cooc_max_latents: int = 2048
    batch_size: int = 4096
    max_tokens: int | None = None
    seed: int = 0
    device: str = "auto"


# ------------------------------------------------------------------------------------ the pass


def sparse_codes(
    store: ActivationStore,
    sae: SAE,
    hook: str,
    n_rows: int,
    batch_size: int,
    device: torch.device,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode rows [0, n_rows) once; return (row, latent, value) of every nonzero, sorted by (row, latent)."""

    def read() -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, n_rows, batch_size):
            yield start, store.activations(hook, slice(start, min(start + batch_size, n_rows)))

    rows, feats, vals = [], [], []
    with (
        torch.no_grad(),
        tqdm(total=n_rows, unit="tok", unit_scale=True, disable=not progress, desc=f"encode {hook}") as bar,
    ):
        for start, x in prefetch(read(), 2):
            r, c, v = encode_sparse(sae, x.to(device))
            rows.append((r + start).cpu().numpy())
            feats.append(c.to(torch.int32).cpu().numpy())
            vals.append(v.float().cpu().numpy())
            bar.update(len(x))
    return np.concatenate(rows), np.concatenate(feats), np.concatenate(vals)


def encode_sparse(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, latent, value) of the nonzero latents of `x`, sorted by (row, latent).

    TopK SAEs are encoded straight from the top-k of the pre-activations, never densely."""
    if sae.cfg.arch == "topk":
        vals, idx = topk_rows(sae.pre_acts(sae.prepare_input(x)), sae.cfg.k)
        idx, order = idx.sort(dim=1)
        vals = vals.gather(1, order).relu() / sae.input_scale
        rows = torch.arange(len(x), device=x.device)[:, None].expand_as(idx)
        keep = vals > 0
        return rows[keep], idx[keep], vals[keep]
    f = sae.encode(x)
    r, c = f.nonzero(as_tuple=True)  # row-major, so (row, latent) pairs come out sorted
    return r, c, f[r, c]


def _argsort_pairs(major: np.ndarray, minor: np.ndarray) -> np.ndarray:
    """Order by (major, minor) for non-negative ints `major` < 2^31 and non-negative float32 or
    uint32 `minor`: one int64 sort (the bits of non-negative floats sort like the floats)."""
    bits = minor.view(np.uint32) if minor.dtype == np.float32 else minor.astype(np.uint32)
    return np.argsort((major.astype(np.int64) << 32) | bits.astype(np.int64), kind="stable")


def _segments(sorted_keys: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of each key 0..n-1 in a sorted key array."""
    return np.searchsorted(sorted_keys, np.arange(n)), np.searchsorted(sorted_keys, np.arange(n), side="right")


def _gather(values: np.ndarray, idx: np.ndarray, valid: np.ndarray, fill: float | int) -> np.ndarray:
    out = np.full(idx.shape, fill, dtype=values.dtype)
    out[valid] = values[idx[valid]]
    return out


class _Codes:
    """The sparse code of a store, indexed for per-latent and per-(row, latent) lookups."""

    def __init__(self, rows: np.ndarray, feats: np.ndarray, vals: np.ndarray, d_sae: int):
        self.rows, self.feats, self.vals, self.d_sae = rows, feats, vals, d_sae
        self.keys = rows * d_sae + feats  # sorted, as the pass emits (row, latent) in order
        if len(vals) and vals.min() < 0:
            raise ValueError("sparse codes must be non-negative")
        # per latent, ascending activation; sorting the reversed arrays puts tied activations in
        # descending row order, so that reading from the end (largest first) favours earlier rows
        self.by_feat = len(vals) - 1 - _argsort_pairs(feats[::-1], vals[::-1])
        self.start, self.end = _segments(feats[self.by_feat], d_sae)
        self.count = self.end - self.start

    def act_at(self, rows: np.ndarray, feats: np.ndarray) -> np.ndarray:
        """Activation of latent `feats` at store row `rows` (0 where it did not fire; rows < 0 give 0)."""
        q = rows.astype(np.int64) * self.d_sae + feats
        pos = np.minimum(np.searchsorted(self.keys, q), len(self.keys) - 1)
        hit = (self.keys[pos] == q) & (rows >= 0)
        return np.where(hit, self.vals[pos], 0).astype(np.float32)

    def top(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, acts) of each latent's n largest activations, largest first; -1 / 0 padded."""
        idx = self.end[:, None] - 1 - np.arange(n)[None]
        valid = idx >= self.start[:, None]
        idx = self.by_feat[np.where(valid, idx, 0)]
        return _gather(self.rows, idx, valid, -1), _gather(self.vals, idx, valid, 0)

    def quantile_samples(self, bins: int, per_bin: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Edges of each latent's quantile bins [d_sae, bins+1], and (rows, acts) [d_sae, bins, per_bin]
        sampled uniformly without replacement inside each bin (smallest random priorities)."""
        order = self.by_feat
        f = self.feats[order]
        rank = np.arange(len(order)) - self.start[f]
        bin_of = rank * bins // self.count[f]
        group = f.astype(np.int64) * bins + bin_of
        priority = np.random.default_rng(seed).integers(0, 2**32, len(order), dtype=np.uint32)
        pick = _argsort_pairs(group, priority)
        g_start, g_end = _segments(group[pick], self.d_sae * bins)
        idx = g_start[:, None] + np.arange(per_bin)[None]
        valid = idx < g_end[:, None]
        chosen = order[pick[np.where(valid, idx, 0)]]
        rows = _gather(self.rows, chosen, valid, -1).reshape(self.d_sae, bins, per_bin)
        acts = _gather(self.vals, chosen, valid, 0).reshape(self.d_sae, bins, per_bin)
        q = np.minimum(
            self.start[:, None] + self.count[:, None] * np.arange(bins + 1)[None] // bins, self.end[:, None] - 1
        )
        has = self.count[:, None] > 0
        edges = np.where(has, self.vals[order[np.maximum(q, 0)]], 0).astype(np.float32)
        return edges, rows, acts

    def histograms(self, n_bins: int, max_act: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of each latent's nonzero activations over [0, max]: counts [d_sae, n_bins], edges."""
        scale = np.where(max_act > 0, max_act, 1)[self.feats]
        b = np.minimum((self.vals / scale * n_bins).astype(np.int64), n_bins - 1)
        counts = np.bincount(self.feats.astype(np.int64) * n_bins + b, minlength=self.d_sae * n_bins)
        edges = max_act[:, None] * np.linspace(0, 1, n_bins + 1, dtype=np.float32)[None]
        return counts.reshape(self.d_sae, n_bins), edges.astype(np.float32)

    @staticmethod
    def _pair_counts(rows: np.ndarray, cols: np.ndarray, m: int, chunk: int = 16384) -> np.ndarray:
        """[m, m] counts of rows where both columns fire, from (row, col) entries sorted by row."""
        first = np.r_[0, np.flatnonzero(np.diff(rows)) + 1]
        length = np.diff(np.r_[first, len(rows)])
        padded = np.full((len(first), int(length.max())), -1, dtype=np.int64)
        padded[np.repeat(np.arange(len(first)), length), np.arange(len(rows)) - np.repeat(first, length)] = cols
        ia, ib = np.triu_indices(padded.shape[1], 1)
        counts = np.zeros(m * m, dtype=np.int64)
        for s in range(0, len(padded), chunk):
            a, b = padded[s : s + chunk, ia], padded[s : s + chunk, ib]
            ok = (a >= 0) & (b >= 0)
            counts += np.bincount(a[ok] * m + b[ok], minlength=m * m)
        counts = counts.reshape(m, m)
        return counts + counts.T

    def cooccurrence(self, n_rows: int, min_density: float, max_latents: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Jaccard neighbours among latents firing on at least `min_density` of rows; -1 for the others."""
        ids = np.full((self.d_sae, n), -1, dtype=np.int32)
        jac = np.zeros((self.d_sae, n), dtype=np.float32)
        frequent = np.flatnonzero(self.count >= max(1, min_density * n_rows))
        frequent = frequent[np.argsort(-self.count[frequent], kind="stable")][:max_latents]
        if len(frequent) < 2:
            return ids, jac
        m = len(frequent)
        col = np.full(self.d_sae, -1)
        col[frequent] = np.arange(m)
        keep = col[self.feats] >= 0
        r, c = self.rows[keep], col[self.feats[keep]]
        both = torch.from_numpy(self._pair_counts(r, c, m).astype(np.float32))
        counts = torch.from_numpy(self.count[frequent].astype(np.float32))
        jaccard = both / (counts[:, None] + counts[None] - both)
        jaccard.fill_diagonal_(-1)
        k = min(n, len(frequent) - 1)
        vals, idx = jaccard.topk(k, dim=1)
        ids[frequent, :k] = frequent[idx.numpy()]
        jac[frequent, :k] = vals.numpy()
        return ids, jac


def contexts(
    codes: _Codes, tokens: np.ndarray, ctx: np.ndarray, rows: np.ndarray, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and this latent's activations at rows-window..rows+window inside each row's own context.

    `rows` is [d_sae, ...]; results are [d_sae, ..., 2*window+1] with -1 / 0 outside the context.
    """
    offsets = np.arange(-window, window + 1)
    around = rows[..., None] + offsets
    feats = np.broadcast_to(np.arange(codes.d_sae).reshape((-1,) + (1,) * (rows.ndim)), around.shape)
    inside = (rows[..., None] >= 0) & (around >= 0) & (around < len(tokens))
    safe = np.where(inside, around, 0)
    inside &= ctx[safe] == ctx[np.maximum(rows, 0)][..., None]
    tok = np.where(inside, tokens[safe], -1).astype(np.int32)
    acts = codes.act_at(np.where(inside, around, -1), feats)
    return tok, acts


# ------------------------------------------------------------------------- dictionary panels


def residual_directions(model: Model, sae: SAE, hook: str) -> torch.Tensor:
    """Decoder rows as residual-stream directions (`attn.hook_z` rows go through W_O)."""
    w = sae.W_dec.detach().float().cpu()
    if hook.endswith("attn.hook_z"):
        layer = int(hook.split(".")[1])
        W_O = model.blocks[layer].attn.W_O.detach().float().cpu()  # [n_heads, d_head, d_model]
        w = w.view(-1, *W_O.shape[:2]).flatten(1) @ W_O.flatten(0, 1)
    return w


def logit_effects(
    model: Model, dirs: torch.Tensor, n: int, block: int = 1024
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top and bottom tokens of each direction: through the final norm and unembedding for decoders,
    by cosine with the token embeddings for encoders (whose MLM head may be untrained)."""
    if is_encoder(model):
        kind = "embedding_cosine"
        W = model.W_E.detach().float().cpu()
        W = (W / W.norm(dim=1, keepdim=True).clamp_min(1e-8)).T
        dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-8)
    else:
        kind = "unembedding"
        W = model.W_U.detach().float().cpu()
        ln = getattr(model, "ln_final", None)
        if getattr(model.cfg, "normalization_type", None) in ("LN", "LNPre"):
            dirs = dirs - dirs.mean(1, keepdim=True)  # LayerNorm removes the mean, then scales by w
        if ln is not None and hasattr(ln, "w"):
            dirs = dirs * ln.w.detach().float().cpu()
    out = [[], [], [], []]
    for i in range(0, len(dirs), block):
        e = dirs[i : i + block] @ W
        tv, ti = e.topk(n, dim=1)
        bv, bi = e.topk(n, dim=1, largest=False)
        for lst, t in zip(out, (ti, tv, bi, bv)):
            lst.append(t.numpy())
    top_i, top_v, bot_i, bot_v = (np.concatenate(x) for x in out)
    return kind, top_i.astype(np.int32), top_v.astype(np.float32), bot_i.astype(np.int32), bot_v.astype(np.float32)


def decoder_neighbours(sae: SAE, n: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Nearest latents by decoder cosine over the whole dictionary (excluding the latent itself)."""
    w = sae.W_dec.detach().float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)
    ids, cos = [], []
    for i in range(0, len(w), block):
        c = w[i : i + block] @ w.T
        c[torch.arange(len(c)), torch.arange(i, i + len(c))] = -2
        v, j = c.topk(min(n, len(w) - 1), dim=1)
        ids.append(j.cpu().numpy().astype(np.int32))
        cos.append(v.cpu().numpy())
    return np.concatenate(ids), np.concatenate(cos)


# ---------------------------------------------------------------------------------- driver


def analyze_sae(
    store: ActivationStore,
    sae: SAE,
    hook: str,
    out: str | Path,
    cfg: AnalysisConfig = AnalysisConfig(),
    model: Model | None = None,
    progress: bool = True,
) -> FeatureStore:
    """Compute every panel for every latent of `sae` over `store` and write them to `out`."""
    d_sae = sae.cfg.d_sae
    n_rows = min(store.n_tokens, cfg.max_tokens or store.n_tokens)
    device = resolve_device(cfg.device)
    sae = sae.to(device).eval()
    codes = _Codes(*sparse_codes(store, sae, hook, n_rows, cfg.batch_size, device, progress), d_sae)
    tokens, ctx = store.tokens(slice(0, n_rows)), store.contexts(slice(0, n_rows))

    count = codes.count
    sums = np.bincount(codes.feats, weights=codes.vals, minlength=d_sae)
    max_act = np.where(count > 0, codes.vals[codes.by_feat[np.maximum(codes.end - 1, 0)]], 0).astype(np.float32)
    top_rows, top_acts = codes.top(cfg.n_top)
    edges, q_rows, q_acts = codes.quantile_samples(cfg.quantile_bins, cfg.quantile_examples, cfg.seed)
    top_tok, top_tok_acts = contexts(codes, tokens, ctx, top_rows, cfg.window)
    q_tok, q_tok_acts = contexts(codes, tokens, ctx, q_rows, cfg.window)
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
        "quantile_edges": edges,
        "quantile_rows": q_rows,
        "quantile_acts": q_acts,
        "quantile_tokens": q_tok,
        "quantile_token_acts": q_tok_acts,
        "hist_counts": hist,
        "hist_edges": hist_edges,
        "neighbour_ids": nb_ids,
        "neighbour_cos": nb_cos,
        "cooc_ids": co_ids,
        "cooc_jaccard": co_jac,
    }
    logit_kind = "none"
    if model is not None:
        logit_kind, *logits = logit_effects(model, residual_directions(model, sae, hook), cfg.n_logits)
        arrays |= dict(zip(["logit_top_ids", "logit_top_vals", "logit_bottom_ids", "logit_bottom_vals"], logits))
    attrs = {
        "hook": hook,
        "variant": Path(str(out)).name.removesuffix(".zarr"),
        "store": store.path,
        "model": store.model,
        "n_tokens": n_rows,
        "d_sae": d_sae,
        "logit_kind": logit_kind,
        **cfg.model_dump(mode="json"),
    }
    return write_feature_store(out, arrays, attrs)


def write_feature_store(out: str | Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> FeatureStore:
    group = zarr.open_group(store=str(out), mode="w", zarr_format=3)
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        group.create_array(name, data=a, chunks=(FEATURE_CHUNK, *a.shape[1:]))
    # a column of every example's own token, in one chunk, for token search
    if "top_tokens" in arrays:
        mid = arrays["top_tokens"][:, :, arrays["top_tokens"].shape[2] // 2]
        group.create_array("top_token_ids", data=np.ascontiguousarray(mid), chunks=mid.shape)
    group.attrs["saelab_analysis"] = attrs
    return FeatureStore.open(out)


def vocab_strings(tokenizer: Any) -> list[str]:
    """Display text of every token id."""
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def analyze(
    run_dir: str | Path, cfg: AnalysisConfig = AnalysisConfig(), progress: bool = True, skip_existing: bool = False
) -> list[Path]:
    """Analyse every SAE under `<run>/saes` on `<run>/activations.zarr`; return the analysis stores.

    With `skip_existing`, an SAE whose analysis is newer than its weights is not analysed again."""
    run = Path(run_dir)
    store = ActivationStore.open(str(run / "activations.zarr"))
    folders = sorted(p.parent for p in (run / "saes").glob("*/*/sae_weights.safetensors"))
    if not folders:
        raise StoreError(f"no trained SAEs under {run / 'saes'}; run `saelab train` first")
    spec = store.config.get("model")
    model = (
        load_model(spec, device=cfg.device)
        if spec and "text" in store.config and store.config["text"].get("source") != "imported"
        else None
    )
    (run / "analysis").mkdir(exist_ok=True)
    if model is not None:
        (run / "analysis" / "vocab.json").write_text(json.dumps(vocab_strings(model.tokenizer)))
    written = []
    for folder in folders:
        sae = SAE.load(folder)
        hook = folder.parent.name
        out = run / "analysis" / hook / f"{folder.name}.zarr"
        weights = folder / "sae_weights.safetensors"
        if not (
            skip_existing
            and (out / "zarr.json").exists()
            and (out / "zarr.json").stat().st_mtime >= weights.stat().st_mtime
        ):
            analyze_sae(store, sae, hook, out, cfg, model, progress)
        written.append(out)
    return written


class FeatureStore:
    """Read access to one SAE's analysis: one feature at a time."""

    def __init__(self, group: zarr.Group, path: str):
        self.group, self.path = group, path
        self.attrs: dict[str, Any] = dict(group.attrs["saelab_analysis"])
        self._vocab: list[str] | None = None

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        try:
            return cls(zarr.open_group(store=str(path), mode="r", zarr_format=3), str(path))
        except (FileNotFoundError, KeyError):
            raise StoreError(f"no feature analysis at {path}; run `saelab analyze` on the run directory") from None

    @property
    def n_features(self) -> int:
        return int(self.attrs["d_sae"])

    @property
    def vocab(self) -> list[str]:
        """Token display strings (from `<run>/analysis/vocab.json`), or an empty list."""
        if self._vocab is None:
            path = Path(self.path).parent.parent / "vocab.json"
            self._vocab = json.loads(path.read_text()) if path.exists() else []
        return self._vocab

    def feature(self, i: int) -> dict[str, Any]:
        """Every panel of feature `i`."""
        if not 0 <= i < self.n_features:
            raise IndexError(f"feature {i} does not exist: this SAE has features 0..{self.n_features - 1}")
        out: dict[str, Any] = {}
        for name, arr in self.group.arrays():
            if name != "top_token_ids":
                v = arr[i]
                out[name] = v.item() if np.ndim(v) == 0 else v
        return out

    def search_token(self, token_id: int) -> list[int]:
        """Latents whose top examples or top logit effects contain the token, most matches first."""
        hits = (self.group["top_token_ids"][:] == token_id).sum(1)
        if "logit_top_ids" in self.group:
            hits = hits + (self.group["logit_top_ids"][:] == token_id).sum(1)
        found = np.flatnonzero(hits)
        return found[np.argsort(-hits[found], kind="stable")].tolist()
