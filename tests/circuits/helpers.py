"""Constants and helpers shared by the circuits tests, over the induction run (the `induction_run` fixture)."""

from __future__ import annotations

from pathlib import Path

from saelab.run import RunDir
from saelab.toys.induction import INDUCTION_HOOKS

L0, L1 = INDUCTION_HOOKS
LENGTH = 10
POS = 15  # the metric reads the middle of the repeated half: its token first occurred at POS - LENGTH ...
SOURCE = (
    POS - LENGTH + 1
)  # ... so induction attends to the position after that, whose previous token is the current one


def sae_folder(run: Path, hook: str) -> Path:
    """The folder of the run's one SAE at `hook`."""
    (entry,) = [s for s in RunDir(run).saes() if s.hook == hook]
    return entry.path
