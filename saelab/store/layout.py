"""What a store is on disk: its dtypes, its `saelab` attribute, opening it, and the check before creating one."""

from __future__ import annotations

import posixpath
from typing import Any, Literal

import fsspec
import numpy as np
import torch
import zarr

from saelab.errors import OverwriteError, StoreError

META_ARRAYS = {"tokens": "int32", "doc_id": "int64", "position": "int32", "context": "int64"}
STORAGE_DTYPE = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}
TORCH_DTYPE = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def split_array(name: str) -> tuple[str, str]:
    """The model alias and the model's own hook point of a store's array `name`: `("tuned", "blocks.3.hook_mlp_out")`
    for `tuned/blocks.3.hook_mlp_out` (several models harvested together), `("", name)` for a store of one model."""
    alias, _, hook = name.rpartition("/")
    return alias, hook


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Cast activations to the store's dtype as a numpy array (bfloat16 as its uint16 bits)."""
    x = x.to(TORCH_DTYPE[dtype])
    if dtype == "bfloat16":
        return x.view(torch.int16).cpu().numpy().view(np.uint16)
    return x.cpu().numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of `to_storage`: a torch tensor in the stored dtype."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


def zarr_group(path: str, mode: Literal["r", "r+", "w"]) -> zarr.Group:
    """`zarr.open_group` of the store at `path`, a local path or an fsspec URL: the one way saelab opens stores.
    A `file://` URL makes its folders as it writes (fsspec's local filesystem does not by default; a local path and
    `memory://` do), so `file://` behaves like the object stores it stands in for."""
    local_url = str(path).startswith(("file://", "local://"))
    return zarr.open_group(
        store=path, mode=mode, zarr_format=3, storage_options={"auto_mkdir": True} if local_url else None
    )


def open_group(path: str, mode: Literal["r", "r+"]) -> zarr.Group:
    """The Zarr v3 group of the store at `path`; `StoreError` when there is none, or it does not parse."""
    try:
        return zarr_group(path, mode)
    except FileNotFoundError:
        raise StoreError(
            f"no activation store at {path!r}; run `saelab harvest` or `saelab import` to make one"
        ) from None
    except ValueError as err:  # zarr.json that does not parse or is not Zarr v3 metadata
        raise StoreError(f"{path!r} is not a readable Zarr v3 store ({err}); harvest or import it again") from None


def saelab_meta(group: zarr.Group, path: str) -> dict[str, Any]:
    """The `saelab` attribute of a store's group; `StoreError` when the group is not a saelab store."""
    meta = group.attrs.get("saelab")
    if not isinstance(meta, dict):
        raise StoreError(f"{path!r} is a Zarr group but not a saelab activation store (no `saelab` attribute)")
    return dict(meta)


def node_array(group: zarr.Group, name: str) -> zarr.Array:
    """The array `name` of a store's group; `StoreError` when that node is not an array (a damaged store)."""
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{name!r} in store {group.store} is not an array; the store is damaged, make it again")
    return node


def check_new_store(path: str, *, overwrite: bool = False) -> None:
    """Refuse to create a store at `path` (local or fsspec URL) when that would delete anything saelab did not
    write, or replace an existing store without `overwrite`; a path that is absent or an empty folder is fine."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        return
    if fs.isfile(root):
        raise OverwriteError(f"{path} is a file, not an activation store; nothing was written. Choose another path")
    held = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False))
    if not held:
        return
    try:
        meta = saelab_meta(zarr_group(path, "r"), path)
    except (OSError, ValueError):  # no Zarr group there, or one that saelab did not write
        shown = ", ".join(held[:5]) + (f", ... ({len(held)} entries)" if len(held) > 5 else "")
        raise OverwriteError(
            f"{path} is not empty and is not a saelab activation store (it holds {shown}); nothing was written. "
            "Choose a new or empty folder for the store"
        ) from None
    if not overwrite:
        raise OverwriteError(
            f"{path} already holds an activation store ({meta.get('rows_complete', 0)} rows of "
            f"{', '.join(meta.get('hooks', {}))}); nothing was written. Pass --overwrite (`overwrite=True`) to "
            "replace it, or choose another path"
        )
