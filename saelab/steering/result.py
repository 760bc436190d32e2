"""`SteeringResult`: what `run_steering` computed, written to and read back from the run's steering JSON file."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np

from saelab.errors import SteeringError
from saelab.resultfile import JsonResult


@dataclass
class SteeringResult(JsonResult):
    """One steering run: a latent steered at a sweep of coefficients, on a decoder's prompts (`kind`
    "generation") or an encoder's search queries (`kind` "search")."""

    what: ClassVar[str] = "steering result"
    command: ClassVar[str] = "saelab steer CONFIG.yaml"
    error: ClassVar[type[Exception]] = SteeringError

    config: dict[str, Any]
    """The `SteerConfig` it was made with (as JSON)."""
    hook: str
    """The hook point steered (`embedding` for an SAE of sentence embeddings)."""
    kind: Literal["generation", "search"]
    """"generation" for a decoder's continuations, "search" for an encoder's semantic search."""
    scale: float
    """The unit of the coefficients, in activation units (the latent's typical max activation by default)."""
    scale_source: str
    """Where `scale` came from: "config", "analysis" or "measured" (with a note when the latent never fired)."""
    rows: list[dict[str, Any]]
    """One per coefficient: `coefficient`, `value` (times `scale`) and, for generation, `mean` and `prompts` (see
    `sweep`); for search, `queries` (per query: `query`, `before`, `after`, `entered`, `left`, and the latent's
    mean activation on the neighbours before and after, `latent_act_before` and `latent_act_after`)."""
    unsteered: list[str] = field(default_factory=list)
    """Generation: each prompt's unsteered continuation (empty for search)."""
    documents: dict[str, str] = field(default_factory=dict)
    """Search: the text of every document among the neighbours, by its index (empty for generation)."""

    def to_json(self) -> dict[str, Any]:
        """The result as written to its file: the keys of its kind only, in the file's order."""
        data: dict[str, Any] = {
            "config": self.config,
            "hook": self.hook,
            "kind": self.kind,
            "scale": self.scale,
            "scale_source": self.scale_source,
        }
        if self.kind == "generation":
            return data | {"unsteered": self.unsteered, "rows": self.rows}
        return data | {"rows": self.rows, "documents": self.documents}

    def summary(self) -> str:
        """A few lines for the terminal: one per coefficient."""
        cfg = self.config
        lines = [
            f"steering latent {cfg['latent']} of {self.hook} ({cfg['mode']}, scope {cfg['scope']}), "
            f"scale {self.scale:.4g} ({self.scale_source})"
        ]
        for row in self.rows:
            if self.kind == "generation":
                m = row["mean"]
                extra = (
                    f", latent act {m['latent_act']:.3g}, on the text {m['latent_act_text']:.3g}"
                    if "latent_act" in m
                    else ""
                )
                lines.append(
                    f"coefficient {row['coefficient']:g}: KL {m['kl']:.4g}, perplexity {m['perplexity']:.4g}{extra}"
                    f" | {row['prompts'][0]['text']!r}"
                )
            else:
                before = np.mean([q["latent_act_before"] for q in row["queries"]])
                after = np.mean([q["latent_act_after"] for q in row["queries"]])
                moved = np.mean([len(q["entered"]) for q in row["queries"]])
                lines.append(
                    f"coefficient {row['coefficient']:g}: {moved:.1f} new neighbours per query; latent's mean "
                    f"activation on the neighbours {before:.3g} -> {after:.3g}"
                )
        return "\n".join(lines)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SteeringResult:
        """The result from its parsed JSON."""
        if data.get("kind") not in ("generation", "search"):
            raise ValueError(f"kind {data.get('kind')!r} is neither 'generation' nor 'search'")
        return SteeringResult(**data)


def summary(result: SteeringResult | dict[str, Any]) -> str:
    """`SteeringResult.summary` of `result` (also of the plain dict `run_steering` used to return)."""
    return (result if isinstance(result, SteeringResult) else SteeringResult.from_json(dict(result))).summary()
