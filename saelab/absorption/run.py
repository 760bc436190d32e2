"""`run_absorption`: what `saelab absorption` does. Check the inputs, load the model and the SAEs, train the probe
once per hook point, score every SAE there, and write each result into the run (`RunDir.absorption`)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from saelab.absorption.config import AbsorptionConfig
from saelab.absorption.data import ProbeData, probe_data
from saelab.absorption.ig import ig_absorption
from saelab.absorption.prompts import PromptStyle
from saelab.absorption.scoring import AbsorptionResult, absorption_result
from saelab.absorption.vocab import Word, labelled_vocabulary, load_label_table
from saelab.dictionaries import SAE
from saelab.errors import AbsorptionError, MissingError
from saelab.models import Model, device_of, load_model, tokenizer_of
from saelab.run import RunDir, array_folder, saved_kind
from saelab.store import split_array


class SavedResult(NamedTuple):
    """One SAE's absorption, as `run_absorption` wrote it."""

    result: AbsorptionResult
    """The result."""
    path: Path
    """The file it was written to."""


def result_path(run: str | Path, hook: str, variant: str) -> Path:
    """The absorption result file of SAE `hook`/`variant` in `run`: `RunDir(run).absorption(hook, variant)`, which
    new code calls directly (this stays for the app and older callers)."""
    return RunDir(run).absorption(hook, variant)


def _sae_folders(cfg: AbsorptionConfig) -> list[Path]:
    """The SAE folders to measure, checked to exist: `cfg.saes`, or every SAE of the run (not its crosscoders, which
    read several hook points or models at once)."""
    if cfg.saes:
        missing = [p for p in cfg.saes if not Path(p).is_dir()]
        if missing:
            raise MissingError(f"no SAE folder {missing}; give folders with cfg.json and sae_weights.safetensors")
        return [Path(p) for p in cfg.saes]
    run = RunDir(cfg.run)
    folders = [entry.path for entry in run.saes() if saved_kind(entry.path) != "crosscoder"]
    if not folders:
        raise AbsorptionError(f"no SAEs under {run.saes_dir}; train some (`saelab train`) or list `saes:`")
    return folders


def _check_inputs(cfg: AbsorptionConfig) -> list[Path]:
    """Every folder and file `cfg` names exists (`MissingError` naming it and the fix); the SAE folders."""
    if not Path(cfg.run).is_dir():
        raise MissingError(
            f"no run directory {cfg.run!r}; give the run folder that holds the SAEs (the results are written into it)"
        )
    if cfg.labels is not None and not Path(cfg.labels).is_file():
        raise MissingError(f"no label table {cfg.labels!r}; give a .json or .csv/.tsv file of token,class")
    return _sae_folders(cfg)


def _load_sae(path: Path, device: torch.device) -> SAE:
    sae = SAE.load(path, device=device).eval()
    if not sae.cfg.hook_name:
        raise AbsorptionError(
            f"the SAE at {path} does not say which hook point it reads (hook_name); set it in cfg.json"
        )
    return sae


def run_absorption(cfg: AbsorptionConfig, progress: bool = True) -> list[SavedResult]:
    """Load the model and SAEs; for each hook point train the probe once, then score every SAE there. SAEs of one
    model of a multi-model store (`<alias>/<hook>`) are probed at the model's own hook point, in `model` (give that
    alias's spec), and written under `array_folder`'s folder."""
    folders = _check_inputs(cfg)
    run = RunDir(cfg.run).prepare()
    model = load_model(cfg.model, device=cfg.device)
    device = device_of(model)
    saes = [(p, _load_sae(p, device)) for p in folders]
    aliases = sorted({split_array(sae.cfg.hook_name)[0] for _, sae in saes})
    if len(aliases) > 1:
        raise AbsorptionError(
            f"the SAEs read the activations of several models of the run's store ({', '.join(aliases)}), and "
            f"absorption probes one, `model` ({cfg.model}); list the `saes` of one model and set `model` to its spec"
        )
    table = load_label_table(cfg.labels) if cfg.labels else None
    style = PromptStyle.for_model(model, cfg.template, cfg.icl_examples)
    task = "first_letter" if table is None else Path(str(cfg.labels)).stem
    vocab = labelled_vocabulary(tokenizer_of(model, AbsorptionError), table) if cfg.integrated_gradients else []
    out = []
    for array in sorted({sae.cfg.hook_name for _, sae in saes}):
        hook = split_array(array)[1]  # an SAE of one model of a store of several reads `<alias>/<hook>`
        data = probe_data(
            model,
            hook,
            table,
            style=style,
            max_words=cfg.max_words,
            train_fraction=cfg.train_fraction,
            batch_size=cfg.batch_size,
            s=cfg.settings,
            progress=progress,
        )
        for path, sae in [(p, sae) for p, sae in saes if sae.cfg.hook_name == array]:
            result = absorption_result(
                sae,
                data,
                hook,
                variant=path.name,
                s=cfg.settings,
                sae_path=run.relative(path),
                model=cfg.model,
                task=task,
                progress=progress,
            )
            result.config = cfg.model_dump(mode="json")
            if cfg.integrated_gradients:
                _add_ig(model, sae, data=data, result=result, style=style, cfg=cfg, vocab=vocab)
            out.append(SavedResult(result, result.save(run.absorption(array_folder(array), path.name))))
    return out


def _add_ig(
    model: Model,
    sae: SAE,
    *,
    data: ProbeData,
    result: AbsorptionResult,
    style: PromptStyle,
    cfg: AbsorptionConfig,
    vocab: list[Word],
) -> None:
    """The integrated-gradients variant for every scored label of `result`, on up to `ig_words` true positives."""
    scores = data.scores()
    rng = random.Random(cfg.settings.seed)
    for c, label in enumerate(result.labels):
        if not label.scored:
            continue
        tp = np.nonzero((data.test_y == c) & (scores[:, c] > 0))[0][: cfg.ig_words]
        words = [Word(data.test_tokens[i], data.test_words[i], label.label) for i in tp]
        try:
            label.ig = dict(
                ig_absorption(
                    model,
                    sae,
                    result.hook,
                    words=words,
                    label=label,
                    direction=data.probe.weight[c].detach().cpu(),
                    style=style,
                    rng=rng,
                    examples=vocab,
                    steps=cfg.ig_steps,
                )
            )
        except AbsorptionError as err:  # e.g. an answer letter that is two tokens: say so for this label only
            label.ig = {"error": str(err)}
