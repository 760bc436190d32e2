"""One offline model diff at chosen settings, and how many latents it finds exclusive to the fine-tuned copy.

Fine-tunes MiniLM's layer-3 MLP on asyncio's docstrings (`saelab.toys.finetune`, topic objective; a copy made with
the same settings is reused), harvests `blocks.3.hook_mlp_out` of both models over the same tokens, trains a
BatchTopK crosscoder on the pair and classifies its latents (`saelab diff`'s `diff_run`). Prints, and appends as
one JSON line to `--log`: the number of latents exclusive to the tuned copy by relative decoder norm
`|d_B| / (|d_A| + |d_B|) >= 0.9`, by Minder et al.'s `Delta_norm = ((|d_B| - |d_A|) / max(|d_A|, |d_B|) + 1) / 2
>= 0.9` (the `dec_norm_diff > 0.9` of their dictionary_learning fork's `training.py`), and after latent
scaling; and for the ten most tuned-leaning latents their relative norm, the cosine of their tuned decoder with
the planted direction `v`, how much more often they fire on asyncio's rows, and the lengths of their tuned decoder's
part along `v` and off it over their base decoder's.

    python scripts/diff_exclusive_sweep.py --margin 12 --preserve 100 --log scripts/diff_exclusive_log.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import saelab
import saelab.toys.finetune as ft
from saelab.dictionaries.crosscoder import CrossCoder
from saelab.evals.diff_run import diff_run, doc_firing_rates
from saelab.store import ActivationStore
from saelab.train import TrainConfig, train

HOOK = "blocks.3.hook_mlp_out"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="/tmp/diffx", help="where the copies and runs go")
    topic = ft.DEFAULTS["topic"]
    p.add_argument("--steps", type=int, default=topic.steps)
    p.add_argument("--lr", type=float, default=topic.lr)
    p.add_argument("--preserve", type=float, default=topic.preserve)
    p.add_argument("--margin", type=float, default=ft.TOPIC_MARGIN)
    p.add_argument("--neurons", type=int, default=topic.neurons, help="dedicated MLP neurons (0: the whole MLP)")
    p.add_argument("--tokens", type=int, default=120_000, help="tokens harvested per model")
    p.add_argument("--train-tokens", type=int, default=600_000)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--tag", default="", help="a name for the run, in the log")
    p.add_argument("--log", default="scripts/diff_exclusive_log.jsonl")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    tune = {"steps": args.steps, "lr": args.lr, "preserve": args.preserve, "margin": args.margin, "gain": ft.TOPIC_GAIN}
    tune |= {"neurons": args.neurons} if args.neurons else {}  # the log's runs without it trained the whole MLP
    root = Path(args.root)
    copy = root / ("ft-" + hashlib.sha1(json.dumps(tune, sort_keys=True).encode()).hexdigest()[:10])
    if not (copy / ft.RECORD).is_file():
        ft.finetune_minilm(
            copy, steps=args.steps, lr=args.lr, preserve=args.preserve, margin=args.margin, neurons=args.neurons
        )
    t_ft = time.time() - t0
    v = ft.planted_direction(copy)
    assert v is not None
    setting = tune | {
        "tokens": args.tokens,
        "train_tokens": args.train_tokens,
        "k": args.k,
        "expansion": args.expansion,
    }
    harvested = root / (
        "store-" + hashlib.sha1(json.dumps(tune | {"tokens": args.tokens}, sort_keys=True).encode()).hexdigest()[:10]
    )
    if not (harvested / "done").is_file():
        shutil.rmtree(harvested, ignore_errors=True)
        saelab.harvest(
            saelab.HarvestConfig.model_validate(
                {
                    "models": {"base": "minilm", "tuned": str(copy)},
                    "hooks": [HOOK],
                    "out": str(harvested / "store"),
                    "max_tokens": args.tokens,
                    "context_length": 128,
                    "drop_special_tokens": True,
                }
            ),
            progress=False,
        )
        (harvested / "done").touch()
    store = ActivationStore.open(str(harvested / "store"))
    run = root / ("run-" + hashlib.sha1(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10])
    docs = ft.package_doc_ids("asyncio")
    marked = torch.from_numpy(np.isin(store.doc_ids(), docs))
    base_x = store.activations(f"base/{HOOK}").float()
    change = store.activations(f"tuned/{HOOK}").float() - base_x
    rms = base_x.pow(2).sum(-1).mean().sqrt()
    along = change @ v / rms
    moved = {
        "on_share": float(change[marked].pow(2).sum() / base_x[marked].pow(2).sum()),
        "off_share": float(change[~marked].pow(2).sum() / base_x[~marked].pow(2).sum()),
        "on_along_v_mean": float(along[marked].mean()),
        "on_frac_gt_half": float((along[marked] > 0.5).float().mean()),
        "off_frac_gt_half": float((along[~marked] > 0.5).float().mean()),
        "off_frac_lt_minus_half": float((along[~marked] < -0.5).float().mean()),
    }
    sources = [f"base/{HOOK}", f"tuned/{HOOK}"]
    (row,) = train(
        TrainConfig.model_validate(
            {
                "run": str(run),
                "store": str(harvested / "store"),
                "crosscoders": [{"sources": sources, "arch": "batchtopk"}],
                "grid": {"k": [args.k], "expansion": [args.expansion]},
                "tokens": args.train_tokens,
                "batch_size": 1024,
                "eval_rows": 8192,
            }
        ),
        progress=False,
    )
    diff, _ = diff_run(run, row.path.parent.name, row.path.name, tuned_on="asyncio")
    cc = CrossCoder.load(row.path)
    on, off = doc_firing_rates(cc, store, docs=docs)
    norms = cc.decoder_norms().detach()
    rel = norms[:, 1] / norms.sum(1)
    delta_norm = ((norms[:, 1] - norms[:, 0]) / norms.max(1).values + 1) / 2
    cos_v = torch.nn.functional.cosine_similarity(cc.W_dec[:, 1].detach(), v[None], dim=1)
    alive = (on + off) > 0
    tuned_dec = cc.W_dec[:, 1].detach()  # the tuned decoder's part along v and off it, against the base decoder
    along_v, base_norm = tuned_dec @ v, cc.W_dec[:, 0].detach().norm(dim=1).clamp_min(1e-12)

    def latents(mask: torch.Tensor) -> list[dict[str, float]]:
        rows = [
            {
                "latent": j,
                "rel": round(float(rel[j]), 3),
                "cos_v": round(float(cos_v[j]), 3),
                "on": round(float(on[j]), 4),
                "off": round(float(off[j]), 5),
                "enrich": round(float(on[j] / off[j].clamp_min(1e-9)), 1),
                "v_part_over_base": round(float(along_v[j].abs() / base_norm[j]), 2),
                "off_v_over_base": round(float((tuned_dec[j] - along_v[j] * v).norm() / base_norm[j]), 2),
            }
            for j in mask.nonzero().flatten().tolist()
        ]
        return sorted(rows, key=lambda r: -r["rel"])

    top = torch.zeros_like(alive)
    top[torch.where(alive, rel, torch.zeros_like(rel)).argsort(descending=True)[:10]] = True
    result = {
        "tag": args.tag,
        "setting": setting,
        "moved": moved,
        "fvu_per_source": (row.reconstruction or {}).get("fvu_per_source"),
        "b_only_rel_0.9": int(((rel >= 0.9) & alive).sum()),
        "b_only_delta_norm_0.9": int(((delta_norm >= 0.9) & alive).sum()),
        "counts_scaled": diff.counts(),
        "counts_by_norm": diff.counts(scaled=False),
        "enrichment": diff.enrichment,
        "exclusive_rel_0.9": latents((rel >= 0.9) & alive),
        "top10": latents(top),
        "seconds": {"finetune": round(t_ft), "total": round(time.time() - t0)},
    }
    print(json.dumps(result, indent=1))
    with open(args.log, "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
