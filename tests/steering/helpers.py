"""Helpers shared by the steering tests: the hook point and prompt they use, an SAE fitted on activations, logits
under interventions, and a `saelab steer` config over a run made for it."""

from __future__ import annotations

from pathlib import Path

import torch

from saelab import steering as st
from saelab.dictionaries import SAE, SAEConfig, train_step
from saelab.run import RunDir

HOOK = "blocks.0.hook_resid_post"
PROMPT = "Return the absolute value of a number"


def fitted_sae(acts: torch.Tensor, d_sae: int, k: int, steps: int = 0, hook: str = HOOK, seed: int = 0) -> SAE:
    """A TopK SAE initialised on `acts` [n, d] (b_dec, scale) and trained for `steps` full-batch steps."""
    torch.manual_seed(seed)
    sae = SAE.from_config(
        SAEConfig(d_in=acts.shape[-1], d_sae=d_sae, k=k, hook_name=hook, sparse_density=0.0, dead_tokens=10 * len(acts))
    )
    sae.init_from_sample(acts)
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(steps):
        train_step(sae, opt, acts)
    sae.fold_input_scale()
    return sae.eval().requires_grad_(False)


def logits(model, tokens, ivs=(), prompt_length=float("inf")):
    with torch.no_grad(), st.steer(model, ivs, prompt_length):
        return model(tokens, return_type="logits")[0]


def steer_config(folder: Path, sae: SAE, hook: str, body: str) -> tuple[Path, RunDir]:
    """A steering config `folder/steer.yaml` over the run `folder/run`, which holds `sae` (variant `topk-test` of
    `hook`): its `run` and `sae` keys, then `body` (YAML lines). Returns the config's path and the run."""
    run = RunDir(folder / "run")
    path = run.sae(hook, "topk-test")
    sae.save(path)
    config = folder / "steer.yaml"
    config.write_text(f"run: {run.root}\nsae: {path}\n{body}")
    return config, run
