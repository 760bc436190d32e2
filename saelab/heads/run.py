"""`saelab heads RUN`: the composition scores and the channels of the top pairs of the run's model, written into the
run (`RunDir.heads`), and the per-head census (`census`) of the run's dictionaries on `attn.hook_z`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformer_lens import HookedTransformer

from saelab.errors import HeadsError
from saelab.heads.census import HeadCensus, census_of
from saelab.heads.composition import Channels, CompositionScores, composition_scores, top_channels
from saelab.heads.dfa import HOOK_Z
from saelab.models import load_model
from saelab.run import RunDir
from saelab.store import ActivationStore

COMPOSITION = "composition"
"""`RunDir.heads` name of the composition scores (`composition__<alias>` for one model of a store of several)."""
CHANNELS = "channels"
"""`RunDir.heads` name of the channels of the top pairs (`channels__<alias>` likewise)."""


def result_names(alias: str | None = None) -> tuple[str, str]:
    """The `RunDir.heads` names of the composition scores and the channels of the model `alias` (None: the store's
    one model)."""
    return (COMPOSITION, CHANNELS) if alias is None else (f"{COMPOSITION}__{alias}", f"{CHANNELS}__{alias}")


@dataclass
class HeadsWritten:
    """What `composition_run` computed and where it wrote it."""

    scores: CompositionScores
    channels: Channels
    scores_path: Path
    channels_path: Path


def composition_run(run_dir: str | Path, *, alias: str | None = None, top: int = 10) -> HeadsWritten:
    """Composition scores of every pair of heads of the model that made the run's store (`alias`'s, in a store of
    several models) and the channels of the `top` pairs, written to `RunDir.heads` (`result_names`)."""
    run = RunDir(run_dir)
    store = ActivationStore.open(str(run.store))
    if alias is None:
        spec = store.model_spec
        if spec is None and store.model_specs:
            raise HeadsError(
                f"the run's store holds several models ({', '.join(sorted(store.model_specs))}); name one with "
                "`--model ALIAS`"
            )
    elif alias not in store.model_specs:
        raise HeadsError(f"the run's store has no model {alias!r}; it has {sorted(store.model_specs) or 'one model'}")
    else:
        spec = store.model_specs[alias]
    if not spec:
        raise HeadsError(
            f"the run's store {store.path} records no model (it was imported); composition scores read a model's "
            "weights, so harvest the run with its model"
        )
    model = load_model(spec, device="cpu")
    if not isinstance(model, HookedTransformer):
        raise HeadsError(
            f"the run's model {spec!r} loads as a {type(model).__name__}; composition scores read the weights of a "
            "TransformerLens HookedTransformer (a pretrained name or a saved saelab model)"
        )
    scores = composition_scores(model)
    channels = top_channels(model, scores, top)
    names = result_names(alias)
    return HeadsWritten(scores, channels, scores.save(run.heads(names[0])), channels.save(run.heads(names[1])))


def model_hook(folder: str) -> str:
    """The model's hook point of the dictionaries under `RUN/saes/<folder>/` (`<alias>__<hook>`: `<hook>`)."""
    return folder.rsplit("__", 1)[-1]


def attention_saes(run_dir: str | Path) -> list[tuple[str, str]]:
    """(hook, variant) of the run's dictionaries on `blocks.L.attn.hook_z` (of any model of the store)."""
    return [(e.hook, e.variant) for e in RunDir(run_dir).saes() if HOOK_Z.fullmatch(model_hook(e.hook))]


def census(run_dir: str | Path, hook: str, variant: str, *, threshold: float = 0.5) -> HeadCensus:
    """The per-head census (`saelab.heads.census`) of the run's dictionary `hook`/`variant` from its feature analysis;
    `HeadsError` naming the fix for a dictionary that is not on `attn.hook_z` or has no analysis."""
    from saelab.analysis import FeatureStore  # saelab.analysis imports saelab.heads: at call time

    run = RunDir(run_dir)
    if not HOOK_Z.fullmatch(model_hook(hook)):
        others = ", ".join(f"{h}/{v}" for h, v in attention_saes(run_dir)) or "none"
        raise HeadsError(
            f"{hook}/{variant} reads {hook}, not attention heads: direct feature attribution and the head census "
            f"need a dictionary on `blocks.L.attn.hook_z` (train one there: harvest that hook point). This run's "
            f"dictionaries on attn.hook_z: {others}"
        )
    path = run.analysis(hook, variant)
    if not path.is_dir():
        raise HeadsError(f"{hook}/{variant} has no feature analysis (no {path}); run `saelab analyze {run.root}`")
    return census_of(FeatureStore.open(path), threshold=threshold)
