"""Probes: SAEBench's one-vs-rest logistic probes, binary F1, and k-sparse probing of the SAE latents."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from saelab.absorption.config import AbsorptionSettings, ProbeSchedule


def train_probe(
    x: Tensor, y: Tensor, schedule: ProbeSchedule = ProbeSchedule(), *, progress: bool = False
) -> nn.Linear:
    """One-vs-rest logistic probes [n_classes] on `x` [n, d] for multi-hot `y` [n, n_classes] (SAEBench
    `train_multi_probe`): BCE with pos_weight = negatives / positives per class, Adam with weight decay, the
    learning rate decaying exponentially from `lr` to `end_lr` over the epochs, shuffled batches; `l1` adds
    SAEBench's sparse-probe penalty l1 * mean over classes of sum |w| (`train_sparse_multi_probe`); every number
    comes from `schedule`."""
    with single_thread():
        g = torch.Generator().manual_seed(schedule.seed)
        torch.manual_seed(schedule.seed)
        y = y.float()
        probe = nn.Linear(x.shape[1], y.shape[1]).to(x.device)
        positives = y.sum(0)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=((len(y) - positives) / positives).to(x.device))
        opt = torch.optim.Adam(probe.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
        sched = torch.optim.lr_scheduler.ExponentialLR(
            opt, gamma=math.exp(math.log(schedule.end_lr / schedule.lr) / schedule.epochs)
        )
        for _ in tqdm(range(schedule.epochs), desc="probe epochs", disable=not progress):
            for rows in torch.randperm(len(x), generator=g).split(schedule.batch_size):
                loss = loss_fn(probe(x[rows]), y[rows].to(x.device))
                if schedule.l1:
                    loss = loss + schedule.l1 * probe.weight.abs().sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            sched.step()
        return probe.eval()


@contextmanager
def single_thread() -> Iterator[None]:
    """One CPU thread inside: a probe step multiplies small matrices, too small to share between threads,
    and spinning worker threads slow them down many times over on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def f1(y: np.ndarray, pred: np.ndarray) -> float:
    """Binary F1 of boolean predictions (0 when there are no positives predicted or present)."""
    tp = float((y & pred).sum())
    return 2 * tp / float(y.sum() + pred.sum()) if y.sum() + pred.sum() else 0.0


@dataclass
class KSparse:
    """A label's k-sparse probes, one per k = 1..max_k."""

    latents: list[list[int]]
    """The latents of each k's probe (the top k by the L1 probe's weight)."""
    f1: list[float]
    """Each k's F1 on the test words."""
    scores: list[np.ndarray]
    """Each k's scores of the test words (positive: the label)."""

    def split(self, jump: float) -> list[int]:
        """The split latents: k grows while F1 rises by more than `jump` (SAEBench `add_feature_splits_to_metrics_df`)."""
        best, chosen = -100.0, []
        for feats, score in zip(self.latents, self.f1):
            if score <= best + jump:
                break
            best, chosen = score, feats
        return chosen


def k_sparse_probing(
    codes_train: Tensor,
    y_train: np.ndarray,
    codes_test: Tensor,
    *,
    y_test: np.ndarray,
    n_classes: int,
    s: AbsorptionSettings,
    progress: bool = False,
) -> list[KSparse]:
    """SAEBench `train_k_sparse_probes` + `build_metrics_df`: an L1-penalised one-vs-rest probe on the latents
    ranks them per class by signed weight (topk, not |w|: only latents that predict the label); for each k a
    balanced sklearn logistic regression (max_iter 500) on the top k latents, scored by F1 of score > 0."""
    from sklearn.linear_model import LogisticRegression

    onehot = torch.nn.functional.one_hot(torch.from_numpy(y_train), n_classes)
    l1_probe = train_probe(codes_train, onehot, s.l1_schedule, progress=progress)
    weights = l1_probe.weight.detach().cpu()
    train_np, test_np = codes_train.cpu().numpy(), codes_test.cpu().numpy()
    out = []
    for c in tqdm(range(n_classes), desc="k-sparse probes", disable=not progress):
        ks = KSparse([], [], [])
        for k in range(1, min(s.max_k, weights.shape[1]) + 1):
            feats = weights[c].topk(k).indices.tolist()
            target = (y_train == c).astype(np.int64)
            if target.min() == target.max():  # one class only: sklearn cannot fit
                score = np.full(len(y_test), 1.0 if target[0] else -1.0)
            else:
                lr = LogisticRegression(max_iter=500, class_weight="balanced").fit(train_np[:, feats], target)
                score = test_np[:, feats] @ lr.coef_[0] + lr.intercept_[0]
            ks.latents.append(feats)
            ks.f1.append(f1(y_test == c, score > 0))
            ks.scores.append(score)
        out.append(ks)
    return out
