"""Time and peak memory of an attribution graph (`saelab.circuits.attribution_graph.attribute`) against prompt length.

A small random decoder (2 layers, d_model 64, 4 heads, LayerNorm, rotary positions, a 2,048-token context) with a
random TopK transcoder (k=8, 512 latents) per MLP, graphs of prompts of 256, 512, 1024 and 2048 tokens with at most
`--max-feature-nodes` latents visited. Each length runs in a fresh subprocess so that its peak resident memory
(`ru_maxrss`) is its own; `peak_mb` is that peak, `growth_mb` the peak minus the memory before the graph (the model and
the transcoders loaded), `estimate_mb` the estimate the memory budget is checked against.

    python scripts/bench_attribution_graph.py [--json out.json]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch
from _bench import load_note, parser, write_json  # scripts/ is on the path when run as a script

LENGTHS = (256, 512, 1024, 2048)


def one(n_pos: int, max_feature_nodes: int, batch_size: int, threads: int) -> dict[str, float]:
    """One graph of `n_pos` tokens in this process: its seconds, peak and growth of resident memory, estimate."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saelab.circuits.attribution_graph import GraphConfig, attribute, estimate_memory_mb, graph_scores
    from saelab.dictionaries import SAE, SAEConfig

    torch.set_num_threads(threads)
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=64, n_heads=4, d_head=16, d_mlp=256, d_vocab=512, n_ctx=2048, act_fn="gelu",
        normalization_type="LN", positional_embedding_type="rotary", seed=0,
    )  # fmt: skip
    model = HookedTransformer(cfg, move_to_device=False).eval()
    tcs = []
    for layer in range(cfg.n_layers):
        sae_cfg = SAEConfig(
            arch="topk", k=8, d_in=64, d_sae=512, d_out=64, hook_name=f"blocks.{layer}.hook_mlp_in",
            hook_name_out=f"blocks.{layer}.hook_mlp_out", dtype="float32",
        )  # fmt: skip
        torch.manual_seed(layer)
        tcs.append(SAE.from_config(sae_cfg).eval())
    tokens = torch.randint(0, cfg.d_vocab, (n_pos,), generator=torch.Generator().manual_seed(0))
    graph_cfg = GraphConfig(max_feature_nodes=max_feature_nodes, batch_size=batch_size)
    for tc in tcs:  # compile the TopK kernel before timing
        tc.encode(torch.randn(4, 64))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    graph = attribute(model, tcs, tokens, graph_cfg)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scores = graph_scores(graph)
    n_active = n_pos * 8 * cfg.n_layers
    return {
        "n_pos": n_pos,
        "seconds": seconds,
        "peak_mb": peak,
        "growth_mb": peak - before,
        "estimate_mb": estimate_memory_mb(model, n_pos, n_active, graph_cfg),
        "n_features": graph.n_features,
        "kept_nodes": int(graph.node_mask.sum()),
        "kept_edges": int(graph.edge_mask.sum()),
        "replacement": scores.replacement,
    }


def main() -> None:
    p = parser(__doc__, max_feature_nodes=256, batch_size=64, threads=2)
    p.add_argument("--one", type=int, help=argparse_help())
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.max_feature_nodes, args.batch_size, args.threads)))
        return
    print(
        f"max_feature_nodes={args.max_feature_nodes} batch_size={args.batch_size} threads={args.threads}; {load_note()}"
    )
    print(f"{'n_pos':>6} {'seconds':>8} {'peak MB':>8} {'growth MB':>9} {'estimate MB':>11} {'kept nodes':>10}")
    results = []
    for n in LENGTHS:
        cmd = [sys.executable, __file__, "--one", str(n), "--max-feature-nodes", str(args.max_feature_nodes)]
        cmd += ["--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        results.append(row)
        print(
            f"{n:>6} {row['seconds']:>8.2f} {row['peak_mb']:>8.0f} {row['growth_mb']:>9.0f} {row['estimate_mb']:>11.0f} "
            f"{row['kept_nodes']:>10}"
        )
    write_json(args.json, args, {"lengths": results})


def argparse_help() -> str:
    """What `--one` does (internal)."""
    return "internal: run one graph of this many tokens and print its figures as JSON"


if __name__ == "__main__":
    main()
