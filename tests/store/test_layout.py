"""What a store is on disk: opening one, and the checks before creating one."""

import pytest

from saelab.errors import StoreError
from saelab.store import ActivationStore


def test_opening_a_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore.open(str(tmp_path / "nope.zarr"))
