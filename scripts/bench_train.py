"""Time one full top-k SAE training step: saelab vs SAELens vs sparsify.

A step is forward, loss with AuxK, backward, optimiser, decoder renormalisation (where
the library does it) and dead-latent bookkeeping, on the same in-memory activations.
Each scenario runs the implementations round-robin (so background load hits all of
them alike) and reports medians. "half dead" marks every other latent dead before each
step so AuxK runs every step; "1 in 20 dead" is the regime where saelab's AuxK switches to
dense products over the dead latents. All use fused torch Adam, so the optimiser is not what
differs.

The Matryoshka rows (Bussmann et al. 2025; prefixes d_sae/16, d_sae/4, d_sae, AuxK per prefix band on both sides:
SAELens's `use_matryoshka_aux_loss`) time saelab's Matryoshka TopK step against its plain TopK step of the same
width (goal: at most 1.25x), and saelab's Matryoshka BatchTopK against SAELens's `MatryoshkaBatchTopKTrainingSAE`
on the same batches (goal: saelab at least 5x faster).

The transcoder rows (`--transcoders-only` runs them alone) time saelab's TopK transcoder step (`d_in -> d_out`, the
SAE rows' shapes, `d_out = d_in`, to targets a fixed linear map of the inputs) against saelab's SAE step of the same
shape (goal: at most 1.1x) and against sparsify's `SparseCoder(transcode=True)` step (goal: saelab at least 2x
faster), and saelab's BatchTopK crosscoder step over two sources of `d_in` against its SAE step over the two
concatenated (`2 * d_in`; the same products, so the crosscoder's overhead is its bookkeeping), all round-robin in
one run.

    python scripts/bench_train.py [--json out.json] [--matryoshka-only | --transcoders-only]
"""

import importlib.util
import sys
from collections.abc import Callable
from typing import Any

import torch
from _bench import (  # scripts/ is on the path when run as a script
    load_note,
    parser,
    step_figures,
    time_round_robin,
    write_json,
)

from saelab.dictionaries import SAE, CrossCoder, CrossCoderConfig, SAEConfig, train_step
from saelab.dictionaries import crosscoder as crosscoders
from saelab.toys.synthetic import make_synthetic

LR = 2e-4


def saelab_step(
    x: torch.Tensor, d_sae: int, k: int, dead: torch.Tensor, y: torch.Tensor | None = None, **options: object
) -> Callable[[], None]:
    """saelab's `train_step` (to targets `y`: a transcoder's); `options` are further `SAEConfig` fields (`arch`,
    `matryoshka_prefixes`)."""
    shape = {"d_in": x.shape[1], "d_sae": d_sae, "k": k} | ({} if y is None else {"d_out": y.shape[1]})
    sae = SAE.from_config(SAEConfig.model_validate(shape | options))
    sae.init_from_sample(x, y)
    opt = torch.optim.Adam(sae.parameters(), lr=LR, fused=True)

    def step() -> None:
        sae.tokens_since_fired.masked_fill_(dead, sae.cfg.dead_tokens)
        train_step(sae, opt, x, y)

    return step


def crosscoder_step(x: torch.Tensor, d_sae: int, k: int, dead: torch.Tensor) -> Callable[[], None]:
    """saelab's crosscoder `train_step` (BatchTopK) on sources `x` `[rows, S, d_in]`."""
    cfg = CrossCoderConfig(sources=[f"s{i}" for i in range(x.shape[1])], d_in=x.shape[2], d_sae=d_sae, k=k)
    cc = CrossCoder(cfg)
    cc.init_from_sample(x)
    opt = torch.optim.Adam(cc.parameters(), lr=LR, fused=True)

    def step() -> None:
        cc.tokens_since_fired.masked_fill_(dead, cfg.dead_tokens)
        crosscoders.train_step(cc, opt, x)

    return step


def saelens_step(x: torch.Tensor, d_sae: int, k: int, dead: torch.Tensor) -> Callable[[], None]:
    """SAELens's SAETrainer._train_step for a TopKTrainingSAE."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

    return saelens_loop(TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k)), x, dead)


def saelens_matryoshka_step(x: torch.Tensor, prefixes: list[int], k: int, dead: torch.Tensor) -> Callable[[], None]:
    """SAELens's SAETrainer._train_step for a MatryoshkaBatchTopKTrainingSAE (AuxK per prefix band)."""
    from sae_lens import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig

    cfg = MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=x.shape[1], d_sae=prefixes[-1], k=k, matryoshka_widths=list(prefixes), use_matryoshka_aux_loss=True
    )
    return saelens_loop(MatryoshkaBatchTopKTrainingSAE(cfg), x, dead)


def saelens_loop(sae: Any, x: torch.Tensor, dead: torch.Tensor) -> Callable[[], None]:
    """One SAELens training step of `sae` (a `TrainingSAE`) on `x`, with the trainer's dead-latent bookkeeping."""
    from sae_lens.saes.sae import TrainStepInput

    d_sae = sae.cfg.d_sae
    opt = torch.optim.Adam(sae.parameters(), lr=LR, fused=True)
    since_fired = torch.zeros(d_sae)
    act_freq = torch.zeros(d_sae)

    def step() -> None:
        out = sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)
        )
        with torch.no_grad():
            firing = out.feature_acts.bool().float()
            since_fired.add_(1)
            since_fired[firing.sum(-2).bool()] = 0
            act_freq.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()

    return step


def sparsify_step(
    x: torch.Tensor, d_sae: int, k: int, dead: torch.Tensor, y: torch.Tensor | None = None
) -> Callable[[], None]:
    """sparsify's Trainer inner loop for one SparseCoder (fvu + auxk_alpha * auxk); to targets `y`: a transcoder's
    (`transcode=True`, whose decoder sparsify neither projects nor normalises)."""
    from sparsify import SparseCoder, SparseCoderConfig  # pyright: ignore[reportMissingImports]  # the [bench] extra

    transcode = y is not None
    sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=d_sae, k=k, transcode=transcode))
    opt = torch.optim.Adam(sae.parameters(), lr=LR, fused=True)
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    did_fire = torch.zeros(d_sae, dtype=torch.bool)

    def step() -> None:
        out = sae(x, y, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        did_fire[out.latent_indices.flatten()] = True
        if not transcode:
            sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        if not transcode:
            sae.set_decoder_norm_to_unit_norm()
        since_fired.add_(x.shape[0])
        since_fired[did_fire] = 0
        did_fire.zero_()

    return step


def transcoder_rows(x: torch.Tensor, d_sae: int, k: int, *, warmup: int, repeats: int) -> dict[str, dict[str, float]]:
    """The transcoder and crosscoder rows (see the module docstring), timed round-robin (`warmup` calls, then the
    median of `repeats`), printed and returned by scenario."""
    d = x.shape[1]
    y = x @ (torch.randn(d, d, generator=torch.Generator().manual_seed(1)) / d**0.5)
    sources = torch.stack([x, y], dim=1)  # two sources of width d, row-aligned
    results: dict[str, dict[str, float]] = {}
    for scenario, every in (("no dead", 0), ("1 in 20 dead", 20)):
        dead = torch.zeros(d_sae, dtype=torch.bool)
        if every:
            dead[::every] = True
        steps = {
            "sae": saelab_step(x, d_sae, k, dead),
            "transcoder": saelab_step(x, d_sae, k, dead, y),
            "sparsify_transcoder": sparsify_step(x, d_sae, k, dead, y),
            "crosscoder_2src": crosscoder_step(sources, d_sae, k, dead),
            "sae_concat_2src": saelab_step(sources.flatten(1), d_sae, k, dead, arch="batchtopk"),
        }
        sec = time_round_robin(steps, warmup, repeats)
        res = {f"{name}_ms": 1e3 * t for name, t in sec.items()}
        res |= {
            "transcoder_over_sae": sec["transcoder"] / sec["sae"],
            "speedup_vs_sparsify_transcoder": sec["sparsify_transcoder"] / sec["transcoder"],
            "crosscoder_over_concat_sae": sec["crosscoder_2src"] / sec["sae_concat_2src"],
        }
        results[f"transcoder, {scenario}"] = res
        print(f"\n[transcoder {d} -> {d}, crosscoder 2 x {d}; {scenario}]")
        for name in steps:
            print(f"  {name:20s} {res[f'{name}_ms']:8.1f} ms/step")
        print(
            f"  transcoder / SAE: {res['transcoder_over_sae']:.2f}x (goal <= 1.1); saelab transcoder "
            f"{res['speedup_vs_sparsify_transcoder']:.2f}x faster than sparsify's (goal >= 2); crosscoder / SAE on "
            f"the concatenation: {res['crosscoder_over_concat_sae']:.2f}x"
        )
    return results


def matmul_only(x: torch.Tensor, d_sae: int) -> Callable[[], None]:
    """The encoder's dense forward product alone, as saelab issues it."""
    sae = SAE.from_config(SAEConfig(d_in=x.shape[1], d_sae=d_sae))
    out = torch.empty(x.shape[0], d_sae)

    @torch.no_grad()
    def step() -> None:
        torch.addmm(sae.b_enc, x - sae.b_dec, sae.W_enc, out=out)

    return step


def main() -> None:
    cli = parser(__doc__, d_in=384, d_sae=6144, k=32, batch=4096, threads=2, warmup=2, repeats=7)
    only = cli.add_mutually_exclusive_group()
    only.add_argument("--matryoshka-only", action="store_true", help="time the Matryoshka rows alone")
    only.add_argument("--transcoders-only", action="store_true", help="time the transcoder and crosscoder rows alone")
    args = cli.parse_args()
    for anchor in ("sae_lens", "sparsify"):  # the libraries the ratios are measured against
        if importlib.util.find_spec(anchor) is None:
            sys.exit(f"{anchor} is not installed: the anchors are in the [bench] extra, pip install -e '.[bench]'")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = make_synthetic(n_features=4 * args.d_sae, d=args.d_in, mean_active=2 * args.k, n_pairs=256)
    x = data.sample(args.batch, torch.Generator().manual_seed(0))
    print(
        f"d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch} float32 threads={args.threads}; "
        f"{load_note()}"
    )

    results: dict[str, dict[str, float]] = {}
    some = args.matryoshka_only or args.transcoders_only
    plain = () if some else (("no dead", 0), ("half dead", 2), ("1 in 20 dead", 20))
    for scenario, every in plain:
        dead = torch.zeros(args.d_sae, dtype=torch.bool)
        if every:
            dead[::every] = True
        steps = {
            "saelab": saelab_step(x, args.d_sae, args.k, dead),
            "sae_lens": saelens_step(x, args.d_sae, args.k, dead),
            "sparsify": sparsify_step(x, args.d_sae, args.k, dead),
            "matmul": matmul_only(x, args.d_sae),
        }
        sec = time_round_robin(steps, args.warmup, args.repeats)
        res = step_figures(sec, args.batch)
        results[scenario] = res
        print(f"\n[{scenario}]")
        for name in ("saelab", "sae_lens", "sparsify"):
            print(f"  {name:9s} {res[f'{name}_ms']:8.1f} ms/step {res[f'{name}_tokens_per_s']:10.0f} tokens/s")
        print(f"  {'matmul':9s} {res['matmul_ms']:8.1f} ms (encoder forward matmul alone)")
        print(
            f"  saelab speed-up: {res['speedup_vs_sae_lens']:.2f}x vs SAELens, "
            f"{res['speedup_vs_sparsify']:.2f}x vs sparsify; step / matmul = {res['saelab_step_over_matmul']:.2f}"
        )

    prefixes = [args.d_sae // 16, args.d_sae // 4, args.d_sae]
    for scenario, every in () if args.transcoders_only else (("no dead", 0), ("1 in 20 dead", 20)):
        dead = torch.zeros(args.d_sae, dtype=torch.bool)
        if every:
            dead[::every] = True
        steps = {
            "topk": saelab_step(x, args.d_sae, args.k, dead),
            "matryoshka_topk": saelab_step(x, args.d_sae, args.k, dead, matryoshka_prefixes=prefixes),
            "matryoshka_batchtopk": saelab_step(
                x, args.d_sae, args.k, dead, arch="batchtopk", matryoshka_prefixes=prefixes
            ),
            "sae_lens_matryoshka": saelens_matryoshka_step(x, prefixes, args.k, dead),
        }
        sec = time_round_robin(steps, args.warmup, args.repeats)
        res = {f"{name}_ms": 1e3 * t for name, t in sec.items()}
        res |= {
            "matryoshka_over_topk": sec["matryoshka_topk"] / sec["topk"],
            "speedup_vs_sae_lens_matryoshka": sec["sae_lens_matryoshka"] / sec["matryoshka_batchtopk"],
        }
        results[f"matryoshka, {scenario}"] = res
        print(f"\n[Matryoshka {prefixes}, {scenario}]")
        for name in steps:
            print(f"  {name:22s} {res[f'{name}_ms']:8.1f} ms/step")
        print(
            f"  Matryoshka TopK / TopK: {res['matryoshka_over_topk']:.2f}x (goal <= 1.25); saelab Matryoshka BatchTopK "
            f"{res['speedup_vs_sae_lens_matryoshka']:.2f}x faster than SAELens's (goal >= 5)"
        )

    if not args.matryoshka_only:
        results |= transcoder_rows(x, args.d_sae, args.k, warmup=args.warmup, repeats=args.repeats)
    write_json(args.json, args, results)


if __name__ == "__main__":
    main()
