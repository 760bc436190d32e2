"""Time saelab's CPU top-k kernel against torch.topk on the same pre-activations.

Two selections of a TopK training step at the bench_train shape: the main top-k over every
latent, and the AuxK top-k over the dead half (every other column). Calls alternate, so
background load hits both alike; medians are reported.

    python scripts/bench_topk.py [--json out.json]
"""

import torch
from _bench import load_note, parser, time_round_robin, write_json  # scripts/ is on the path when run as a script

from saelab.ops.topk import topk_rows


def main() -> None:
    args = parser(__doc__, rows=4096, d_in=384, d_sae=6144, k=32, k_aux=192, threads=2, repeats=9).parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, args.d_in, generator=g)
    W_enc = torch.randn(args.d_in, args.d_sae, generator=g) / args.d_in**0.5
    pre = x @ W_enc  # the encoder pre-activations of a fresh SAE
    dead = torch.arange(0, args.d_sae, 2)
    print(f"rows={args.rows} d_sae={args.d_sae} k={args.k} k_aux={args.k_aux} threads={args.threads}; {load_note()}")

    results = {}
    for case, k, cols in (("main", args.k, None), ("auxk", args.k_aux, dead)):
        # Default arguments bind this iteration's k and columns (the calls run inside this iteration anyway).
        torch_fn = (
            (lambda k=k: pre.topk(k, dim=-1, sorted=False))
            if cols is None
            else (lambda k=k, cols=cols: pre[:, cols].topk(k, dim=-1, sorted=False))
        )
        ours = lambda k=k, cols=cols: topk_rows(pre, k, cols)
        sec = time_round_robin({"saelab": ours, "torch": torch_fn}, 2, args.repeats)
        ms = {name: 1e3 * s for name, s in sec.items()}
        speedup = ms["torch"] / ms["saelab"]
        results[case] = {"saelab_ms": ms["saelab"], "torch_ms": ms["torch"], "speedup": speedup}
        print(
            f"  {case:5s} top-{k:<4d} saelab {ms['saelab']:6.1f} ms  torch.topk {ms['torch']:6.1f} ms  -> {speedup:.2f}x"
        )
    write_json(args.json, args, results)


if __name__ == "__main__":
    main()
