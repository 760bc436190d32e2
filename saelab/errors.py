"""The errors saelab raises for bad input: each message names the problem and the fix."""


class SaelabError(Exception):
    """Base class: the CLI prints these without a traceback."""


class ConfigError(SaelabError, ValueError):
    """A config file or override is malformed or invalid."""


class HookError(SaelabError, ValueError):
    """A hook point name does not exist on the model."""


class TextSourceError(SaelabError, ValueError):
    """A text source is missing, unreadable or empty."""


class SAELoadError(SaelabError, ValueError):
    """A folder that does not hold a readable saelab or SAELens SAE."""


class StoreError(SaelabError, ValueError):
    """An activation store is missing, incomplete, or made with another config."""
