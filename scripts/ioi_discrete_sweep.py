"""Precision and recall of the discrete-code method (`saelab.heads.discrete.head_circuit`) on the IOI toy's named
heads (L0H0, L1H0), over model seeds and, for each, prompt/SAE seeds, with both methods' times and the p-values of
the named heads' scores against chance (`chance_p_values`).

    python scripts/ioi_discrete_sweep.py --models 3 --seeds 2 -n 32 [--cache DIR] [--json PATH]

Each model is trained with `train_ioi_model(seed=model_seed)` (into `--cache` and reused from there when given); each
run draws `n` prompts from seed `100 + model_seed * 10 + seed` and seeds the SAE with `seed`, at `DiscreteConfig`'s
defaults unless `--last` or `--normalise` is given."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from _bench import parser, write_json
from transformer_lens import HookedTransformer

from saelab.circuits.tasks import Task, token_metric
from saelab.heads.discrete import DiscreteConfig, head_circuit
from saelab.models import load_model
from saelab.toys.ioi import N_CTX, ioi_prompts, train_ioi_model

NAMED = {"L0H0", "L1H0"}


def ioi_task(n: int, seed: int) -> Task:
    """`n` positive IOI prompts, their negatives and the logit difference of the IO over the subject at the end."""
    p = ioi_prompts(n, seed)
    metric = token_metric("logit_diff", torch.full((n,), N_CTX - 1), p.io, distractor=p.subject)
    return Task(p.positive, metric, p.negative)


def main() -> None:
    """Print one row per (model seed, seed) and the means."""
    args = parser(__doc__, models=3, seeds=2, n=32)
    args.add_argument("--cache", help="folder for the trained models (a temporary one by default)")
    args.add_argument("--last", action="store_true", help="code the last position, not the mean")
    args.add_argument("--normalise", action="store_true", help="normalised scores")
    opts = args.parse_args()
    torch.set_num_threads(1)
    cache = Path(opts.cache or tempfile.mkdtemp())
    rows: list[dict[str, Any]] = []
    found_rates: list[tuple[float, float]] = []
    print("model seed  prompt/SAE seed  circuit              precision  recall  discrete s  patching s  p L0H0  p L1H0")
    for model_seed in range(opts.models):
        folder = cache / f"ioi{model_seed}"
        if (folder / "config.json").exists():
            loaded = load_model(str(folder), device="cpu")
            assert isinstance(loaded, HookedTransformer), type(loaded)
            model = loaded
        else:
            model = train_ioi_model(folder, seed=model_seed, progress=False)
        for seed in range(opts.seeds):
            config = DiscreteConfig(seed=seed, position="last" if opts.last else "mean", normalise=opts.normalise)
            found = head_circuit(model, ioi_task(opts.n, 100 + model_seed * 10 + seed), config)
            hits = len(NAMED & set(found.circuit))
            precision, recall = hits / max(len(found.circuit), 1), hits / len(NAMED)
            chance = dict(zip(found.heads, found.p_values))
            found_rates.append((precision, recall))
            rows.append(
                {"model_seed": model_seed, "seed": seed, "precision": precision, "recall": recall}
                | {k: getattr(found, k) for k in ("circuit", "heads", "scores", "p_values", "effects")}
                | {k: getattr(found, k) for k in ("discrete_seconds", "patching_seconds")}
            )
            print(
                f"{model_seed:10d}  {seed:15d}  {','.join(found.circuit):19s}  {precision:9.2f}  {recall:6.2f}  "
                f"{found.discrete_seconds:10.2f}  {found.patching_seconds:10.2f}  {chance['L0H0']:6.3f}  "
                f"{chance['L1H0']:6.3f}",
                flush=True,
            )
    met = sum(p >= 0.8 and r >= 0.8 for p, r in found_rates)
    print(
        f"mean precision {sum(p for p, _ in found_rates) / len(rows):.2f}, "
        f"mean recall {sum(r for _, r in found_rates) / len(rows):.2f}, "
        f"both >= 0.8 in {met}/{len(rows)} runs"
    )
    write_json(opts.json, opts, {"runs": rows, "runs_meeting_0.8": met})


if __name__ == "__main__":
    main()
