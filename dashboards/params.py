"""The parameters of app requests, checked: URL query values and the values callbacks receive.

A browser sends strings, numbers, lists or `None` wherever a script decides to, so every value a page or a
callback reads goes through one of these first. Each returns the value in the type the page uses, or raises
`RequestError` saying what was given and what a valid one looks like; the app shows that in an error box.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, TypeVar

from saelab.errors import RequestError

# |coefficient| a steering request may ask for, in units of the latent's typical max activation: the library's own
# limit, which every `saelab.steering.Intervention` takes, so the app refuses exactly what the library would.
from saelab.steering import MAX_COEFFICIENT as MAX_COEFFICIENT

Params = dict[str, str]
S = TypeVar("S", bound=str)
MAX_TEXT = 20_000  # characters of a prompt, query or search text: far beyond any model's context
MAX_BODY = 1 << 20
"""Bytes of a request body (1 MiB; `app.create_app` sets it as Flask's `MAX_CONTENT_LENGTH`, larger bodies get
HTTP 413). The largest body the app's pages send, a page URL holding a `MAX_TEXT`-character text of 3-byte UTF-8
characters, percent-encoded, is 180 kB."""
MAX_DIGITS = 15  # digits of an integer parameter (a latent index, a count)
INTEGER = re.compile(r"[+-]?[0-9]+")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def text(value: Any, what: str, *, max_chars: int = MAX_TEXT) -> str:
    """Free text (a prompt, a query, a search): `None` is empty text."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RequestError(f"The {what} must be text, not {type(value).__name__} {_shown(value)}.")
    if len(value) > max_chars:
        raise RequestError(f"The {what} is {len(value):,} characters long; give at most {max_chars:,}.")
    return value


def name(value: Any, what: str) -> str | None:
    """A name (a hook point, an SAE variant, a circuit): `None` or empty when not given. Whether it names something
    that exists, and whether it is a plain name, is for `saelab.run.RunDir` to say."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise RequestError(f"The {what} must be a name, not {type(value).__name__} {_shown(value)}.")
    return value


def integer(value: Any, what: str, *, low: int, high: int) -> int:
    """An integer from `low` to `high` (inclusive), given as an int or as decimal digits."""
    if isinstance(value, str) and INTEGER.fullmatch(value.strip()) and len(value.strip()) <= MAX_DIGITS:
        number = int(value.strip())
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        raise RequestError(f"The {what} {_shown(value)} is not a whole number; give one from {low} to {high}.")
    if not low <= number <= high:
        raise RequestError(f"The {what} {number} is out of range; give one from {low} to {high}.")
    return number


def feature_id(value: Any, n_features: int) -> int:
    """A latent index, or `RequestError` saying what a valid one looks like."""
    raw = value.strip() if isinstance(value, str) else value
    if not (isinstance(raw, str) and INTEGER.fullmatch(raw) and len(raw) <= MAX_DIGITS):
        raise RequestError(f"Feature id {_shown(raw)} is not a number; give an integer from 0 to {n_features - 1}.")
    index = int(raw)
    if not 0 <= index < n_features:
        raise RequestError(
            f"Feature {index} does not exist: this SAE has {n_features} latents (0 to {n_features - 1})."
        )
    return index


def number(value: Any, what: str, *, default: float, low: float = -math.inf, high: float = math.inf) -> float:
    """A finite number from `low` to `high`, given as a number or as text; `default` when empty or `None`."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RequestError(f"The {what} {_shown(value)} is not a number; give one such as 4 or -2.5.")
    try:
        result = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        raise RequestError(f"The {what} {_shown(value)} is not a number; give one such as 4 or -2.5.") from None
    if not math.isfinite(result):
        raise RequestError(f"The {what} {_shown(value)} is not a finite number; give one such as 4 or -2.5.")
    if not low <= result <= high:
        raise RequestError(f"The {what} {result:g} is out of range; give one from {low:g} to {high:g}.")
    return result


def choice(value: Any, what: str, options: Sequence[S], *, default: S, listing: str) -> S:
    """One of `options`; `default` when empty or `None`. `listing` heads the options in the message ("Modes")."""
    if value is None or value == "":
        return default
    for option in options:
        if isinstance(value, str) and value == option:
            return option
    raise RequestError(f"There is no {what} {_shown(value)}. {listing}: {', '.join(options)}.")


def sae_choice(value: Any) -> Params:
    """The query parameters (`hook`, `sae`) of an SAE dropdown's value `hook|variant`."""
    hook, _, variant = text(value, "SAE choice", max_chars=1_000).partition("|")
    return {"hook": hook, "sae": variant}


def clicks(*counts: Any) -> bool:
    """Whether a callback fired for a click or Enter (a positive count) rather than for its form appearing."""
    return any(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in counts)
