"""`AnalysisConfig`: which run to analyse and how much of each feature panel to keep."""

from __future__ import annotations

from pydantic import Field

from saelab.config import StrictModel


class AnalysisConfig(StrictModel):
    """How much of each panel to keep, and (for `saelab analyze CONFIG.yaml`) which run to analyse.

    `run` is optional: the library call `analyze(run_dir, cfg)` names the run itself, and `saelab analyze
    RUN_DIR` fills it in from the command line; a YAML config (`configs/analyze_minilm.yaml`) sets it.
    """

    run: str | None = None
    """The run directory (holding the activation store and `saes/`); `None` when the caller names it."""
    n_top: int = Field(default=20, gt=0)
    """Top examples kept per latent."""
    window: int = Field(default=10, ge=0)
    """Context tokens shown on each side of an example's own token."""
    quantile_bins: int = Field(default=10, gt=0)
    """Quantile bins of each latent's nonzero activations."""
    quantile_examples: int = Field(default=5, gt=0)
    """Examples sampled from inside each quantile bin."""
    n_labels: int = Field(default=3, gt=0)
    """N-grams kept in each latent's contrastive label (`saelab.analysis.labels`)."""
    hist_bins: int = Field(default=30, gt=0)
    """Bins of the activation histogram."""
    n_logits: int = Field(default=10, gt=0)
    """Tokens kept at each end of the logit effects."""
    n_neighbours: int = Field(default=10, gt=0)
    """Decoder-cosine and co-occurrence neighbours kept per latent."""
    cooc_min_density: float = Field(default=1e-3, ge=0, le=1)
    """Latents firing on fewer than this fraction of rows get no co-occurrence neighbours."""
    cooc_max_latents: int = Field(default=2048, gt=0)
    """At most this many (the most frequent) latents take part in co-occurrence."""
    dfa: bool = True
    """Direct feature attribution of each latent's top examples to the heads and source tokens (`dfa_heads`,
    `dfa_sources`), for dictionaries on `blocks.L.attn.hook_z` whose model the store records; it runs the model up to
    that layer once per context holding a top example (at most `d_sae x n_top` contexts: for large dictionaries of
    large models, about the cost of harvesting that many contexts)."""
    batch_size: int = Field(default=4096, gt=0)
    """Rows encoded per batch."""
    max_tokens: int | None = Field(default=None, gt=0)
    """Analyse only the first rows of the store (`None`: all of them)."""
    seed: int = Field(default=0, ge=0)
    """Seed of the quantile-bin sampling."""
    device: str = "auto"
    """`auto` (CUDA when present), `cpu`, `cuda`, ..."""
