"""saelab's sparse probing next to SAEBench's own code (`sae_bench.evals.sparse_probing.probe_training`), on one
SAE of a run and the same documents: the package task (`saelab.evals.package_task`) over the store's first
`--max-rows` rows, each document's activations and codes mean-pooled (as both do), one balanced train/test split per
label. saelab's `k_sparse_probes` and SAEBench's `train_probe_on_activations(select_top_k=k)` (sklearn's
`LogisticRegression`, C=1) then fit the same arrays, for the SAE's latents and for the raw dimensions.

SAEBench runs in its own venv (it pins numpy < 2 and pulls sae-lens 6 and transformers 5), built by

    python3 -m venv /work/sbvenv && /work/sbvenv/bin/pip install torch==2.13.0 sae-bench==0.6.0
    /work/sbvenv/bin/pip uninstall -y torchvision   # its wheel does not load with the CPU build of torch 2.13

and `scripts/bench_evals_saebench_sb.py` is its side. Core metrics: SAEBench's `evals.core.main` computes them
inside `get_sparsity_and_variance_metrics(sae, model, activation_store, ...)`, which draws token batches from a
sae-lens `ActivationsStore` (a Hugging Face dataset) and runs `model.run_with_cache` on a `HookedRootModule`; no
function of it takes activations, so offline on MiniLM it cannot run, and this script prints saelab's alone.

    python scripts/bench_evals_saebench.py /tmp/qs --hook blocks.2.hook_resid_post --json out.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _bench import load_note, parser, write_json  # scripts/ is on the path when run as a script

from saelab.dictionaries import SAE
from saelab.evals.sparse_probing import K_VALUES, k_sparse_probes, package_task
from saelab.run import SAE_METRICS, RunDir
from saelab.store import ActivationStore

SB_SIDE = Path(__file__).with_name("bench_evals_saebench_sb.py")


def pooled(x: torch.Tensor, docs: np.ndarray, units: np.ndarray, encode) -> tuple[torch.Tensor, torch.Tensor]:
    """Each unit's (document's) mean activation and mean code, `[units, d]` and `[units, d_sae]`."""
    where = torch.from_numpy(np.searchsorted(units, docs))
    keep = torch.from_numpy(np.isin(docs, units))
    counts = torch.zeros(len(units)).index_add_(0, where[keep], torch.ones(int(keep.sum())))[:, None]
    raw, codes = None, None
    with torch.no_grad():
        for start in range(0, len(x), 4096):
            block, w, k = x[start : start + 4096], where[start : start + 4096], keep[start : start + 4096]
            c = encode(block)
            raw = (raw if raw is not None else torch.zeros(len(units), x.shape[1])).index_add_(0, w[k], block[k])
            codes = (codes if codes is not None else torch.zeros(len(units), c.shape[1])).index_add_(0, w[k], c[k])
    assert raw is not None and codes is not None
    return raw / counts, codes / counts


def main() -> None:
    cli = parser(__doc__, max_rows=65_536, seed=0)
    cli.add_argument("run", help="a run directory with a store of the embedded corpus and trained SAEs")
    cli.add_argument("--hook", required=True, help="the SAE's hook point")
    cli.add_argument("--variant", help="the SAE's variant (default: the hook's first)")
    cli.add_argument("--saebench-python", default="/work/sbvenv/bin/python", help="the python of SAEBench's venv")
    args = cli.parse_args()
    run = RunDir(args.run)
    variant = args.variant or next(e.variant for e in run.saes() if e.hook == args.hook)
    entry = run.find_sae(args.hook, variant)
    store = ActivationStore.open(str(run.store))
    part = slice(0, min(args.max_rows, store.n_tokens))
    x, docs = store.activations(args.hook, part).float(), store.doc_ids(part)
    task = package_task(docs)
    sae = SAE.load(entry.path).eval()
    raw, codes = pooled(x, docs, task.units, sae.encode)
    rng = np.random.default_rng(args.seed)
    data: dict[str, dict[str, dict[str, dict[str, torch.Tensor]]]] = {"raw": {}, "latents": {}}
    ours: dict[str, dict[str, list[float]]] = {"raw": {}, "latents": {}}
    for label, marks in task.labels.items():
        pos = rng.permutation(np.flatnonzero(marks))
        neg = rng.permutation(np.flatnonzero(~marks))[: len(pos)]
        cut = int(0.8 * len(pos))
        train = np.concatenate([pos[:cut], neg[:cut]])
        test = np.concatenate([pos[cut:], neg[cut:]])
        y_train, y_test = marks[train], marks[test]
        for kind, feats in (("raw", raw), ("latents", codes)):
            probes = k_sparse_probes(feats[train], y_train, feats[test], test_y=y_test)
            ours[kind][label] = [p.accuracy for p in probes]
            data[kind][label] = {
                "train": {"pos": feats[pos[:cut]], "neg": feats[neg[:cut]]},
                "test": {"pos": feats[pos[cut:]], "neg": feats[neg[cut:]]},
            }
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"data": data, "k_values": list(K_VALUES)}, f"{tmp}/acts.pt")
        subprocess.run([args.saebench_python, str(SB_SIDE), f"{tmp}/acts.pt", f"{tmp}/out.json"], check=True)
        theirs = json.loads(Path(f"{tmp}/out.json").read_text())
    metrics = json.loads((entry.path / SAE_METRICS).read_text())
    print(f"{args.hook}/{variant}: package task, {len(task.units)} documents, {load_note()}")
    print("mean test accuracy over labels:  " + "  ".join(f"k={k:<5}" for k in K_VALUES))
    results: dict[str, object] = {"labels": list(task.labels), "documents": len(task.units)}
    for kind in ("latents", "raw"):
        for who, table in (("saelab", ours[kind]), ("SAEBench", theirs["accuracy"][kind])):
            means = np.mean([table[label] for label in task.labels], axis=0)
            results[f"{who}_{kind}"] = {"mean": means.tolist(), "per_label": table}
            print(f"{who:>8} {kind:<8}                " + "  ".join(f"{m:.3f}  " for m in means))
    print(
        f"core metrics (saelab's metrics.json): FVU {metrics['fvu']:.4f}, L0 {metrics['l0']:.1f}; SAEBench's core "
        "eval cannot run offline (it reads a Hugging Face dataset through a model; see this script's docstring)"
    )
    results |= {"saelab_core": metrics, "saebench_versions": theirs["versions"]}
    write_json(args.json, args, results)
    sys.exit(0)


if __name__ == "__main__":
    main()
