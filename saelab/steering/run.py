"""`run_steering`: what `saelab steer` does with a `SteerConfig`. Loads the model and the SAE, steers at every
coefficient (a decoder's continuations, or an encoder's semantic search) and writes a `SteeringResult` into the
run."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from saelab.dictionaries import SAE
from saelab.errors import MissingError, SteeringError
from saelab.models import Model, device_of, is_encoder, load_model
from saelab.run import SAE_CONFIG, SAE_WEIGHTS, RunDir
from saelab.steering.config import SteerConfig
from saelab.steering.generation import continuation, generate, prompt_tokens, sweep
from saelab.steering.interventions import Intervention
from saelab.steering.result import SteeringResult
from saelab.steering.scales import run_scale
from saelab.steering.search import doc_latent_acts, embed, search
from saelab.store import ActivationStore, split_array
from saelab.text import iter_documents


def sae_hook(path: str | Path, sae: SAE) -> str:
    """The store's array an SAE reads: its config's `hook_name` (`<alias>/<hook>` for one model of a store of
    several), else its folder's parent (RUN/saes/<hook>/<variant>)."""
    return sae.cfg.hook_name or Path(path).resolve().parent.name


def steered_hook(sae: SAE, reads: str) -> str:
    """The model's hook point steering along `sae`'s latents edits: where its decoder writes. An SAE's is the one it
    reads (`reads`, the model's own hook point); a transcoder's its MLP's output (`hook_name_out` without a store's
    `<alias>/`, else `reads` with `hook_mlp_in` -> `hook_mlp_out`)."""
    if sae.cfg.d_out is None:
        return reads
    return split_array(sae.cfg.hook_name_out)[1] or reads.replace("hook_mlp_in", "hook_mlp_out")


def run_steering(cfg: SteerConfig, progress: bool = True) -> tuple[SteeringResult, Path]:
    """Load the model and SAE, steer at every coefficient, write the run's steering result `cfg.name`; return the
    result and its path."""
    run = RunDir(cfg.run)
    if not run.root.is_dir():
        raise MissingError(
            f"no run directory {cfg.run!r}; give the run folder that holds the harvested activations and the SAEs"
        )
    if not (Path(cfg.sae) / SAE_CONFIG).is_file():
        raise MissingError(f"no SAE in {cfg.sae!r}; give a folder with {SAE_CONFIG} and {SAE_WEIGHTS}")
    sae = SAE.load(cfg.sae).eval()
    array = sae_hook(cfg.sae, sae)
    spec = cfg.model
    if spec is None:  # the model that made the SAE's array (in a store of several models, its alias's)
        spec = ActivationStore.open(str(run.store)).spec_of(array) if run.store.is_dir() else None
        if not spec:
            raise SteeringError(
                f"{cfg.run} does not record its model (no activation store at {run.store}, or an imported one); "
                "set `model`"
            )
    model = load_model(spec, device=cfg.device)
    sae = sae.to(device_of(model))
    if not 0 <= cfg.latent < sae.cfg.d_sae:
        raise SteeringError(f"latent {cfg.latent} does not exist: the SAE has latents 0 to {sae.cfg.d_sae - 1}")
    steered = (
        _search(cfg, model, sae, array, progress)
        if is_encoder(model)
        else _generation(cfg, model, sae, array, progress)
    )  # `array`: where the SAE reads (its analysis, its scale); the edit goes where it writes (`steered_hook`)
    return steered, steered.save(run.steering(cfg.name))


def _scale(cfg: SteerConfig, sae: SAE, array: str, **measure_on: Any) -> tuple[float, str]:
    if cfg.scale:
        return cfg.scale, "config"
    return run_scale(cfg.run, cfg.sae, sae, latent=cfg.latent, hook=array, **measure_on)


def _search(cfg: SteerConfig, model: Model, sae: SAE, array: str, progress: bool) -> SteeringResult:
    hook = split_array(array)[1]
    if not cfg.queries:
        raise SteeringError("this model is an encoder: give `queries` to search the corpus with")
    docs = list(itertools.islice(iter_documents(cfg.corpus), cfg.corpus_documents))
    if len(docs) < cfg.k:
        raise SteeringError(f"the corpus has {len(docs)} documents, fewer than k={cfg.k}; give more or lower k")
    corpus = embed(model, docs, progress=progress)
    scale, source = _scale(cfg, sae, array, embeddings=corpus)
    edited = steered_hook(sae, hook)
    steered = [Intervention(edited, sae, [cfg.latent], cfg.mode, c, scale, cfg.scope) for c in cfg.coefficients]
    fires = doc_latent_acts(model, sae, hook, texts=docs)[:, cfg.latent]
    rows = []
    for iv in tqdm(steered, desc="steered search", disable=not progress):
        found = [search(model, q, corpus, [iv], k=cfg.k) for q in cfg.queries]
        rows.append(
            {
                "coefficient": iv.coefficient,
                "value": iv.value,
                "queries": [
                    {
                        "query": r.query,
                        "before": r.before,
                        "after": r.after,
                        "entered": r.entered,
                        "left": r.left,
                        "latent_act_before": float(fires[[i for i, _ in r.before]].mean()),
                        "latent_act_after": float(fires[[i for i, _ in r.after]].mean()),
                    }
                    for r in found
                ],
            }
        )
    shown = {str(i): docs[i] for row in rows for q in row["queries"] for i, _ in q["before"] + q["after"]}
    return SteeringResult(cfg.model_dump(mode="json"), edited, "search", scale, source, rows, documents=shown)


def _generation(cfg: SteerConfig, model: Model, sae: SAE, array: str, progress: bool) -> SteeringResult:
    if not cfg.prompts:
        raise SteeringError("this model is a decoder: give `prompts` to continue")
    scale, source = _scale(cfg, sae, array)
    iv = Intervention(steered_hook(sae, split_array(array)[1]), sae, [cfg.latent], cfg.mode, 0.0, scale, cfg.scope)
    options = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature}
    rows = sweep(model, iv, cfg.coefficients, cfg.prompts, seed=cfg.seed, progress=progress, **options)  # checks first
    unsteered = [
        continuation(model, generate(model, p, (), seed=cfg.seed + i, **options), prompt_tokens(model, p).shape[1])
        for i, p in enumerate(cfg.prompts)
    ]
    return SteeringResult(
        cfg.model_dump(mode="json"),
        iv.hook,
        "generation",
        scale,
        source,
        [r.as_json() for r in rows],
        unsteered=unsteered,
    )
