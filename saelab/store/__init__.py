"""The activation store: sharded Zarr v3, one `[n_tokens, d]` array per hook point plus token metadata.

Layout of a store (a local path or an fsspec URL such as `memory://` or `s3://`):

    zarr.json                    group attributes: `saelab` (config, hooks, rows_complete, checksums, stats, ...)
    activations/<hook name>      [n_tokens, d] float16 / float32 / bfloat16 (stored as uint16 bits)
    tokens, doc_id, position, context    [n_tokens] aligned row for row

Writers commit a shard at a time and then advance `rows_complete`, together with a checksum of every array's shard;
readers never look past it, and check each shard against its checksum the first time they read it.
"""

from __future__ import annotations

from saelab.store.checksums import DamagedShard, StoreCheck
from saelab.store.layout import (
    META_ARRAYS,
    STORAGE_DTYPE,
    TORCH_DTYPE,
    check_new_store,
    from_storage,
    node_array,
    open_group,
    saelab_meta,
    split_array,
    to_storage,
    zarr_group,
)
from saelab.store.prefetch import prefetch
from saelab.store.reader import ActivationStore
from saelab.store.writer import StoreWriter

__all__ = [
    "META_ARRAYS",
    "STORAGE_DTYPE",
    "TORCH_DTYPE",
    "ActivationStore",
    "DamagedShard",
    "StoreCheck",
    "StoreWriter",
    "check_new_store",
    "from_storage",
    "node_array",
    "open_group",
    "prefetch",
    "saelab_meta",
    "split_array",
    "to_storage",
    "zarr_group",
]
