"""SAELens-format checkpoints: `cfg.json` + `sae_weights.safetensors`, written so SAELens loads them and read
from what saelab or SAELens wrote."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from saelab.dictionaries.base import SAE, SAEConfig
from saelab.dictionaries.transcoder import FROM_SAELENS_TRANSCODER, saelens_transcoder_arch
from saelab.errors import MissingError, SAELoadError
from saelab.run import SAE_CONFIG, SAE_WEIGHTS

# cfg.json layout version that SAELens reads without legacy conversion.
SAELENS_FORMAT_VERSION = "6.0.0"
# saelab arch -> SAELens inference architecture (BatchTopK is saved as JumpReLU, as SAELens does).
SAELENS_ARCH = {
    "topk": "topk",
    "batchtopk": "jumprelu",
    "jumprelu": "jumprelu",
    "relu": "standard",
    "icfl": "icfl",  # no SAELens class encodes by pursuit: SAELens refuses it by name rather than encode it wrongly
}
# SAELens architecture -> the saelab arch that reads it.
FROM_SAELENS_ARCH = {"topk": "topk", "standard": "relu", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}
# State-dict entries that only training needs: never in a saved SAE's weights.
TRAINING_STATE = {"input_scale", "target_scale", "tokens_since_fired", "prefix_draws", "icfl_step"}


def training_architecture(cfg: SAEConfig) -> tuple[str, dict[str, Any]]:
    """The metadata's `training_architecture` and its details, as SAELens writes them: a Matryoshka BatchTopK SAE is
    `matryoshka_batchtopk` with its `matryoshka_widths` (SAELens's name; a TopK one, which SAELens lacks, is
    `matryoshka_topk`), so a reader knows each prefix; sampled prefixes have no fixed widths to record."""
    details: dict[str, Any] = {"k": cfg.k}
    if not (cfg.matryoshka_prefixes or cfg.matryoshka_sample):
        return cfg.arch, details
    if cfg.matryoshka_prefixes:
        details["matryoshka_widths"] = list(cfg.matryoshka_prefixes)
    return f"matryoshka_{cfg.arch}", details


def saelens_cfg(cfg: SAEConfig) -> dict[str, Any]:
    """The `cfg.json` of an SAE with config `cfg`, in SAELens 6 layout; the full saelab config rides in its
    metadata."""
    topk = {"k": cfg.k, "rescale_acts_by_decoder_norm": False} if cfg.arch == "topk" else {}
    training, details = training_architecture(cfg)
    transcoder = {} if cfg.d_out is None else {"d_out": cfg.d_out}
    return topk | {
        "architecture": SAELENS_ARCH[cfg.arch] if cfg.d_out is None else saelens_transcoder_arch(cfg.arch, cfg.skip),
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        **transcoder,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.d_out is None,  # SAELens's transcoders refuse it
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "model_name": cfg.model_name,
            "hook_name": cfg.hook_name,
            **({} if cfg.d_out is None else {"hook_name_out": cfg.hook_name_out}),
            "context_size": cfg.context_size,
            "dataset_path": cfg.dataset,
            "training_architecture": training,
            "training_architecture_details": details,
            "saelab_config": cfg.model_dump(),
        },
    }


@torch.no_grad()
def save_sae(sae: SAE, path: str | Path) -> None:
    """Write `sae` to the folder `path` as `cfg.json` and `sae_weights.safetensors`, its input scale folded into
    the saved weights (the live SAE is unchanged)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ratio = sae.input_scale / sae.output_scale  # a transcoder's scales fold as `SAE.fold_input_scale` says
    tensors = {name: t * ratio for name, t in sae._input_tensors().items()} | {"W_dec": sae.W_dec}
    tensors |= {name: t / sae.output_scale for name, t in sae._scaled_tensors().items()}
    tensors = {name: sae._export_tensor(name, t).detach().contiguous().cpu() for name, t in tensors.items()}
    save_file(tensors, path / SAE_WEIGHTS)
    (path / SAE_CONFIG).write_text(json.dumps(saelens_cfg(sae.cfg), indent=2))


def load_sae(path: str | Path, device: torch.device | str | None = None) -> SAE:
    """The SAE saved in the folder `path` by saelab or SAELens, on `device` (default: the CPU).

    `MissingError` if the folder lacks `cfg.json` or `sae_weights.safetensors`; `SAELoadError` naming what is
    wrong if they cannot be read as an SAE."""
    path = Path(path)
    if not (path / SAE_CONFIG).is_file() or not (path / SAE_WEIGHTS).is_file():
        raise MissingError(
            f"{path} needs {SAE_CONFIG} and {SAE_WEIGHTS} (SAELens layout); give a folder that saelab or SAELens wrote"
        )
    try:
        raw = json.loads((path / SAE_CONFIG).read_text())
        cfg, tensors = _from_saelens(raw, load_file(path / SAE_WEIGHTS))
    except (ValueError, KeyError, TypeError, SafetensorError) as err:
        raise SAELoadError(
            f"cannot load the SAE at {path} ({type(err).__name__}: {err}); give a folder that saelab or SAELens wrote"
        ) from None
    sae = SAE.from_config(cfg)
    missing = set(sae.state_dict()) - TRAINING_STATE - set(tensors)
    unexpected = set(tensors) - set(sae.state_dict())
    if missing or unexpected:
        raise SAELoadError(
            f"{path / SAE_WEIGHTS}: missing {sorted(missing)}, unexpected {sorted(unexpected)}; "
            "give a folder that saelab or SAELens wrote"
        )
    dtype = sae.W_enc.dtype
    sae.load_state_dict({name: t.to(dtype) for name, t in tensors.items()}, strict=False)
    return sae.to(device) if device is not None else sae


def _config_from_saelens(raw: dict[str, Any]) -> SAEConfig:
    """The saelab config of a SAELens (or saelab) `cfg.json`."""
    meta = raw.get("metadata") or {}
    if "saelab_config" in meta:
        return SAEConfig(**meta["saelab_config"])
    for field, ok in (("normalize_activations", "none"), ("reshape_activations", "none")):
        if raw.get(field, ok) != ok:
            raise ValueError(
                f"{field}={raw[field]!r} is not supported; fold it into the weights in SAELens first "
                f"(e.g. fold_activation_norm_scaling_factor) or flatten inputs yourself"
            )
    arch, skip = FROM_SAELENS_TRANSCODER.get(str(raw.get("architecture")), (None, False))
    out = {"d_out": raw.get("d_out"), "skip": skip, "hook_name_out": meta.get("hook_name_out") or ""}
    transcoder = {} if arch is None else out
    arch = arch or FROM_SAELENS_ARCH.get(raw.get("architecture", "standard"))
    if arch is None:
        raise ValueError(
            f"SAELens architecture {raw['architecture']!r} is not supported; saelab reads "
            f"topk, batchtopk, jumprelu, standard and {', '.join(FROM_SAELENS_TRANSCODER)}"
        )
    details = meta.get("training_architecture_details") or {}
    training = meta.get("training_architecture")
    if arch == "jumprelu" and training in ("batchtopk", "matryoshka_batchtopk"):
        arch = "batchtopk"
    k = raw.get("k", details.get("k", 32))
    prefixes = details.get("matryoshka_widths") if str(training).startswith("matryoshka_") else None
    return SAEConfig.model_validate(
        {
            "arch": arch,
            "d_in": raw["d_in"],
            "d_sae": raw["d_sae"],
            "k": int(k),
            "matryoshka_prefixes": prefixes or None,
            "dtype": str(raw.get("dtype", "float32")).removeprefix("torch."),
            "model_name": meta.get("model_name") or "",
            "hook_name": meta.get("hook_name") or "",
            "context_size": meta.get("context_size"),
            "dataset": meta.get("dataset_path") or "",
        }
        | transcoder
    )


def _from_saelens(raw: dict[str, Any], tensors: dict[str, Tensor]) -> tuple[SAEConfig, dict[str, Tensor]]:
    """saelab config and state-dict tensors from a SAELens (or saelab) cfg.json + weights."""
    cfg = _config_from_saelens(raw)
    tensors = dict(tensors)
    W_enc, W_dec = tensors["W_enc"], tensors["W_dec"]
    if not raw.get("apply_b_dec_to_input", True) and cfg.d_out is None:  # a transcoder subtracts nothing
        tensors["b_enc"] = tensors["b_enc"] + tensors["b_dec"] @ W_enc
    if raw.get("rescale_acts_by_decoder_norm", False):
        norms = W_dec.norm(dim=1).clamp_min(1e-8)
        tensors |= {"W_enc": W_enc * norms, "b_enc": tensors["b_enc"] * norms, "W_dec": W_dec / norms[:, None]}
    if "log_threshold" in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if cfg.arch == "batchtopk":
        threshold = tensors.pop("topk_threshold", None)
        if threshold is None:
            threshold = tensors.pop("threshold")
            if not torch.all(threshold == threshold[0]):
                raise ValueError("BatchTopK checkpoint has per-latent thresholds; load it as arch 'jumprelu'")
            threshold = threshold[0]
        tensors["threshold"] = threshold.reshape(())
    return cfg, tensors
