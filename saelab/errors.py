"""Every error saelab raises for bad input, all under `SaelabError`: each message names the problem and the fix.

The CLI prints any `SaelabError` as one line without a traceback (exit 2), and the app renders it as an error
box. Subclasses also derive from the builtin they refine (`ValueError`, `FileNotFoundError`), so code that
catches those keeps working.
"""

from __future__ import annotations


class SaelabError(Exception):
    """Base class: the CLI prints these without a traceback, the app shows them in an error box."""


class ConfigError(SaelabError, ValueError):
    """A config file or override is malformed or invalid."""


class MissingError(SaelabError, FileNotFoundError):
    """A file or folder that a command reads does not exist."""


class OverwriteError(SaelabError, FileExistsError):
    """Writing here would delete or replace data that saelab did not write, or that `--overwrite` did not allow."""


class RunError(SaelabError, ValueError):
    """A run directory, or a result inside it, is missing, unreadable or not what the request names."""


class FeatureIndexError(RunError, IndexError):
    """A feature (latent) index that the dictionary does not have."""


class ModelError(SaelabError, ValueError):
    """A model spec that names no loadable model, or a model that cannot do what is asked of it."""


class HookError(SaelabError, ValueError):
    """A hook point name does not exist on the model."""


class TextSourceError(SaelabError, ValueError):
    """A text source is missing, unreadable or empty."""


class SAELoadError(SaelabError, ValueError):
    """A folder that does not hold a readable saelab or SAELens SAE."""


class StoreError(SaelabError, ValueError):
    """An activation store is missing, incomplete, or made with another config."""


class ImportArraysError(SaelabError, ValueError):
    """Arrays given to `saelab import` that cannot become a store (wrong dtype, shape, non-finite values)."""


class TrainError(SaelabError, ValueError):
    """Training cannot start or resume as asked (e.g. a checkpoint made for other SAEs)."""


class CircuitError(SaelabError, ValueError):
    """A circuit request that cannot be computed: SAEs that don't fit the model, a task of the wrong shape."""


class AbsorptionError(SaelabError, ValueError):
    """An absorption request that cannot be computed (labels, templates, answer tokens)."""


class SteeringError(SaelabError, ValueError):
    """A steering request that cannot be carried out (latent out of range, text too long, bad coefficient)."""


class RequestError(SaelabError, ValueError):
    """A request to the app whose parameters are of the wrong type or out of range."""


class DistributedError(SaelabError, RuntimeError):
    """A run on several ranks that cannot go on as asked (ranks that disagree, a resume with another rank count)."""


class HeadsError(SaelabError, ValueError):
    """An attention-head analysis that cannot be computed: a dictionary on a hook that is not `attn.hook_z`, a head
    out of range, a composition mode that does not exist."""
