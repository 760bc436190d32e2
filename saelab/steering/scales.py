"""A latent's typical max activation, the unit of steering coefficients: from the feature analysis, else measured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from saelab.analysis import FeatureStore
from saelab.dictionaries import SAE
from saelab.errors import SteeringError
from saelab.run import RunDir, array_folder
from saelab.store import ActivationStore

MEASURE_ROWS = 16384  # rows of the run's activations a scale is measured on


def typical_max_act(
    sae: SAE, latent: int, max_act: np.ndarray | None = None, *, acts: Tensor | None = None
) -> tuple[float, str]:
    """The latent's typical max activation and where it came from: the analysis's `max_act` [d_sae] when given,
    else measured on `acts` [n, d_in]. A latent that never fired gets the median over latents that did."""
    if max_act is not None:
        values, source = max_act, "analysis"
    elif acts is not None:
        values, source = _measured_max_act(sae, acts), "measured"
    else:
        raise SteeringError("give the feature analysis's max_act or activations to measure the latent's scale on")
    if not 0 <= latent < len(values):
        raise SteeringError(f"latent {latent} does not exist: the SAE has latents 0 to {len(values) - 1}")
    if not np.isfinite(values).all():
        fix = "rerun `saelab analyze`" if source == "analysis" else "measure on finite activations"
        raise SteeringError(
            f"the latents' {source} max activations are not all finite, so give no steering scale; {fix}"
        )
    if values[latent] > 0:
        return float(values[latent]), source
    live = values[values > 0]
    if not len(live):
        raise SteeringError("no latent of this SAE fired on the activations given; measure on other text")
    return float(np.median(live)), f"{source}: median of live latents (latent {latent} never fired)"


@torch.no_grad()
def _measured_max_act(sae: SAE, acts: Tensor) -> np.ndarray:
    """Every latent's max activation [d_sae] over `acts` [n, d_in], encoded in chunks."""
    chunks = [sae.encode(chunk.float()).amax(0).cpu().numpy() for chunk in acts.split(4096)]
    return np.concatenate(chunks).reshape(-1, sae.cfg.d_sae).max(0)


def run_scale(
    run: str | Path,
    sae_path: str | Path,
    sae: SAE,
    *,
    latent: int,
    hook: str,
    embeddings: Tensor | None = None,
) -> tuple[float, str]:
    """`typical_max_act` for a run's SAE: the run's feature analysis when it has one, else measured on (up to
    `MEASURE_ROWS` rows of) the run's activations at `hook` (the store's array: `<alias>/<hook>` for one model of
    several, whose SAEs are under `array_folder`'s folder), or on `embeddings` for an SAE of sentence embeddings."""
    run_dir = RunDir(run)
    analysis = run_dir.analysis(array_folder(hook), Path(sae_path).name)
    if analysis.is_dir():
        return typical_max_act(sae, latent, FeatureStore.open(analysis).column("max_act"))
    if run_dir.store.is_dir():
        store = ActivationStore.open(str(run_dir.store))
        if hook in store.hooks:
            rows = slice(0, min(store.n_tokens, MEASURE_ROWS))
            return typical_max_act(sae, latent, acts=store.activations(hook, rows))
    if embeddings is not None:
        return typical_max_act(sae, latent, acts=embeddings)
    raise SteeringError(
        f"cannot tell latent {latent}'s typical activation: {run} has neither a feature analysis of "
        f"this SAE nor activations at {hook}; set `scale` in the config"
    )
