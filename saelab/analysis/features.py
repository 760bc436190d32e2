"""`FeatureStore`: one SAE's feature analysis on disk (a Zarr group, one array per panel, chunked by feature).

The app and the notebooks read one feature at a time; the run's `RunDir.vocab` maps the run model's token ids to
their display text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from saelab.errors import FeatureIndexError, StoreError
from saelab.run import RunDir

FEATURE_CHUNK = 64


def write_feature_store(out: str | Path, arrays: dict[str, np.ndarray], attrs: dict[str, Any]) -> FeatureStore:
    """Write the panels `arrays` (each `[d_sae, ...]`) and `attrs` as a feature analysis at `out`; open it."""
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


class FeatureStore:
    """Read access to one SAE's analysis: one feature at a time."""

    def __init__(self, group: zarr.Group, path: str):
        attrs = group.attrs["saelab_analysis"]
        if not isinstance(attrs, dict):
            raise StoreError(f"{path} is not a saelab feature analysis; run `saelab analyze` on the run directory")
        self.group, self.path = group, path
        self.attrs: dict[str, Any] = dict(attrs)
        self._vocab: list[str] | None = None

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        """The analysis at `path`; `StoreError` when there is none."""
        try:
            return cls(zarr.open_group(store=str(path), mode="r", zarr_format=3), str(path))
        except (FileNotFoundError, KeyError):
            raise StoreError(f"no feature analysis at {path}; run `saelab analyze` on the run directory") from None

    @property
    def n_features(self) -> int:
        """The number of latents of the SAE."""
        return int(self.attrs["d_sae"])

    @property
    def vocab(self) -> list[str]:
        """Token display strings (the run's `RunDir.vocab`), or an empty list."""
        if self._vocab is None:
            path = RunDir(
                Path(self.path).parent.parent.parent
            ).vocab  # the store is RunDir(run).analysis(hook, variant)
            vocab: list[str] = json.loads(path.read_text()) if path.exists() else []
            self._vocab = vocab
        return self._vocab

    def feature(self, i: int) -> dict[str, Any]:
        """Every panel of feature `i`; `FeatureIndexError` (a `RunError` and an `IndexError`) when the SAE has no such feature."""
        if not 0 <= i < self.n_features:
            raise FeatureIndexError(f"feature {i} does not exist: this SAE has features 0..{self.n_features - 1}")
        out: dict[str, Any] = {}
        for name, arr in self.group.arrays():
            if name != "top_token_ids":
                v = np.asarray(arr[i])
                out[name] = v.item() if v.ndim == 0 else v
        return out

    def column(self, name: str) -> np.ndarray:
        """Panel `name` of every latent, `[d_sae, ...]` (e.g. `max_act`, `density`); `StoreError` if there is none."""
        array = self.group.get(name)
        if not isinstance(array, zarr.Array):
            raise StoreError(f"the feature analysis {self.path} has no panel {name!r}; run `saelab analyze` again")
        return np.asarray(array[:])

    def search_token(self, token_id: int) -> list[int]:
        """Latents whose top examples or top logit effects contain the token, most matches first."""
        hits = (self.column("top_token_ids") == token_id).sum(1)
        if "logit_top_ids" in self.group:
            hits = hits + (self.column("logit_top_ids") == token_id).sum(1)
        found = np.flatnonzero(hits)
        return found[np.argsort(-hits[found], kind="stable")].tolist()
