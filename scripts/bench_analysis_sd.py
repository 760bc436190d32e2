"""The sae-dashboard side of scripts/bench_analysis.py: its feature-centric panels for chosen features, timed.

It runs in its own venv, as sae-dashboard needs transformer-lens 2.x (`make bench-analysis` builds it), and
rebuilds the model from the config and weights that `saelab.save_model` wrote:

    python scripts/bench_analysis_sd.py --model DIR --sae DIR --tokens tokens.npy --hook HOOK \
        --features 3,17,42 --out result.json
"""

from __future__ import annotations

import json
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from _bench import parser  # scripts/ is on the path when run as a script

# sae-dashboard is installed only in this script's own venv (`make bench-analysis`), not in the one pyright reads
from sae_dashboard.components_config import (  # pyright: ignore[reportMissingImports]
    ActsHistogramConfig,
    FeatureTablesConfig,
    LogitsHistogramConfig,
    LogitsTableConfig,
    SequencesConfig,
)
from sae_dashboard.layout import Column, SaeVisLayoutConfig  # pyright: ignore[reportMissingImports]
from sae_dashboard.sae_vis_data import SaeVisConfig  # pyright: ignore[reportMissingImports]
from sae_dashboard.sae_vis_runner import SaeVisRunner  # pyright: ignore[reportMissingImports]
from sae_lens import SAE, HookedSAETransformer
from safetensors.torch import load_file
from transformer_lens import HookedTransformerConfig


def load_model(folder: Path) -> HookedSAETransformer:
    """The HookedTransformer that `saelab.save_model` saved: its config fields and its weights (not its buffers)."""
    raw = json.loads((folder / "saelab_model.json").read_text())
    fields = HookedTransformerConfig.__dataclass_fields__.keys()
    cfg = HookedTransformerConfig(**{k: v for k, v in raw.items() if k in fields and k not in ("device", "n_params")})
    model = HookedSAETransformer(cfg)
    weights = {
        k: v
        for k, v in load_file(str(folder / "model.safetensors")).items()
        if not k.endswith(("attn.mask", "attn.IGNORE"))
    }
    missing = [
        k
        for k in model.load_state_dict(weights, strict=False).missing_keys
        if not k.endswith(("attn.mask", "attn.IGNORE"))
    ]
    if missing:
        raise SystemExit(f"{folder}: weights missing for {missing}")
    return model.eval()


def main() -> None:
    options = parser(
        __doc__,
        json_option=False,
        window=10,
        n_top=20,
        quantile_bins=10,
        quantile_examples=5,
        hist_bins=30,
        n_logits=10,
        n_neighbours=10,
        threads=2,
    )
    options.add_argument("--model", type=Path, required=True, help="folder written by saelab.save_model")
    options.add_argument("--sae", type=Path, required=True, help="SAE folder in SAELens layout")
    options.add_argument("--tokens", type=Path, required=True, help=".npy of token ids [n_contexts, context_length]")
    options.add_argument("--hook", required=True)
    options.add_argument("--features", required=True, help="comma-separated latent ids")
    options.add_argument(
        "--out", type=Path, required=True, help="JSON with the timings and per-feature max and density"
    )
    args = options.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model(args.model)
    sae = SAE.load_from_disk(str(args.sae), device="cpu")
    # SaeVisRunner calls fold_W_dec_norm, which sae-lens 6 refuses for TopK SAEs; saelab's decoder rows have
    # unit norm, so the fold would change nothing
    if not torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.cfg.d_sae), atol=1e-4):
        raise SystemExit(f"{args.sae}: decoder rows must have unit norm")
    sae.fold_W_dec_norm = lambda: None
    tokens = torch.from_numpy(np.load(args.tokens)).long()
    features = [int(f) for f in args.features.split(",")]
    layer = int(args.hook.split(".")[1])
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens[:1], names_filter=args.hook, stop_at_layer=layer + 1)
    first_context = cache[args.hook][0].float().numpy()  # to check that both tools see the same activations

    # the default feature-centric layout, with saelab's panel sizes
    layout = SaeVisLayoutConfig(
        columns=[
            Column(FeatureTablesConfig(n_rows=args.n_neighbours)),
            Column(
                ActsHistogramConfig(n_bins=args.hist_bins),
                LogitsTableConfig(n_rows=args.n_logits),
                LogitsHistogramConfig(n_bins=args.hist_bins),
            ),
            Column(
                SequencesConfig(
                    buffer=(args.window, args.window),
                    top_acts_group_size=args.n_top,
                    n_quantiles=args.quantile_bins,
                    quantile_group_size=args.quantile_examples,
                    stack_mode="stack-none",
                )
            ),
        ],
        height=750,
    )
    cfg = SaeVisConfig(
        hook_point=args.hook,
        features=features,
        feature_centric_layout=layout,
        device="cpu",
        dtype="float32",
        verbose=True,
    )
    start = time.perf_counter()
    data = SaeVisRunner(cfg).run(encoder=sae, model=model, tokens=tokens)
    run_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        data.save_json(Path(tmp) / "sae_vis_data.json")
        save_s = time.perf_counter() - start

    result = {
        "run_s": run_s,
        "save_json_s": save_s,
        "features": features,
        "tokens": int(tokens.numel()),
        "max": data.feature_stats.max,
        "density": data.feature_stats.frac_nonzero,
        "first_context_acts": first_context.tolist(),
        "threads": args.threads,
        "versions": {name: version(name) for name in ("sae-dashboard", "sae-lens", "transformer-lens", "torch")},
    }
    args.out.write_text(json.dumps(result))
    print(
        f"sae-dashboard: {len(features)} features over {tokens.numel():,} tokens in {run_s:.1f} s (+ {save_s:.1f} s JSON)"
    )


if __name__ == "__main__":
    main()
