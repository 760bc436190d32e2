"""Steering: edit a model's activations along SAE latents at any hook point, and measure what changes.

An `Intervention` acts on one hook point with one SAE. Its modes, for activations `h` and the latent's
decoder row `v` (`u = v / |v|`), with `c = coefficient * scale`:

- `add`: `h + c v` (or `h + c * code @ W_dec` for a whole sparse code, e.g. one found by `optimise_code`);
- `clamp`: the latent set to `c` with the SAE's error kept, `h - dec(f) + dec(f')` (`f = enc(h)`);
- `orthogonal`: `h` with its component on `u` set to `c |v|` (0: directional ablation);
- `cap`: the component on `u` capped at `c |v|` from above;
- `ablate`: the listed latents set to 0 with the error kept, `h - dec(f) + dec(f')`.

`scale` is the latent's typical max activation (`typical_max_act`: the feature analysis's `max_act`, else
measured), so coefficients read "times its usual strongest firing". `scope` picks the positions edited:
`prompt`, `generated` (positions at or after the prompt's length), `all`, or a list of positions. Hooks
track absolute positions, so generation with TransformerLens's KV cache (`use_past_kv_cache=True`, where a
pass sees only the newest position) is steered exactly as generation without it. `add` at coefficient 0 is
skipped, so it reproduces the unsteered model exactly.

Limits, refused with a `SteeringError` that names them: |coefficient| at most `MAX_COEFFICIENT` (1e4 times the
latent's typical max activation; larger edits change no output and overflow float32) and |coefficient x scale| at
most `MAX_VALUE`, checked where an `Intervention` is built (`check_coefficient`); a prompt plus `max_new_tokens`
within the model's context (`new_token_budget`: the library refuses, it never clamps); and any steered activation,
metric or embedding that comes out non-finite is an error, never a number in a result.

Decoders: `generate`, `compare` (steered and unsteered side by side) and `sweep` over coefficients (`SweepRow`s
of `SteeredMetrics`: the target latent's activation, KL from the unsteered next-token distribution, the unsteered
model's perplexity on the steered text). Encoders: `embed` (mean-pooled output, as sentence-transformers' all-MiniLM-L6-v2),
`search` over a corpus before and after steering the query. Both: `optimise_code`, a sparse code found by
gradient descent toward target examples, to be injected with mode `add`. `saelab steer` runs a `SteerConfig`
through `run_steering`, which writes a `SteeringResult`.

Modules: `interventions` (`Intervention`, the modes, `steer`), `scales` (typical max activations),
`generation` (decoders), `search` (encoders), `optimise` (`optimise_code`), `config` (`SteerConfig`),
`result` (`SteeringResult`), `run` (`run_steering`).
"""

from __future__ import annotations

from saelab.errors import SteeringError
from saelab.steering.config import SteerConfig
from saelab.steering.generation import (
    Comparison,
    SteeredMetrics,
    SteeredPrompt,
    SweepRow,
    compare,
    continuation,
    generate,
    hook_acts,
    new_token_budget,
    prompt_tokens,
    steered_metrics,
    sweep,
)
from saelab.steering.interventions import (
    EMBEDDING,
    MAX_COEFFICIENT,
    MAX_VALUE,
    MODES,
    Intervention,
    Mode,
    Scope,
    check_coefficient,
    check_interventions,
    steer,
)
from saelab.steering.optimise import _steered_loss, optimise_code
from saelab.steering.result import SteeringResult, summary
from saelab.steering.run import run_steering, sae_hook
from saelab.steering.scales import run_scale, typical_max_act
from saelab.steering.search import SearchResult, doc_latent_acts, edit_embedding, embed, search

__all__ = [
    "EMBEDDING",
    "MAX_COEFFICIENT",
    "MAX_VALUE",
    "MODES",
    "Comparison",
    "Intervention",
    "Mode",
    "Scope",
    "SearchResult",
    "SteerConfig",
    "SteeredMetrics",
    "SteeredPrompt",
    "SteeringError",
    "SteeringResult",
    "SweepRow",
    "_steered_loss",
    "check_coefficient",
    "check_interventions",
    "compare",
    "continuation",
    "doc_latent_acts",
    "edit_embedding",
    "embed",
    "generate",
    "hook_acts",
    "new_token_budget",
    "optimise_code",
    "prompt_tokens",
    "run_scale",
    "run_steering",
    "sae_hook",
    "search",
    "steer",
    "steered_metrics",
    "summary",
    "sweep",
    "typical_max_act",
]
