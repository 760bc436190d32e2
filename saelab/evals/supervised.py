"""Supervised feature dictionaries (Makelov, Lange & Nanda 2024, "Towards Principled Evaluations of Sparse Autoencoders
for Interpretability and Control", arXiv 2405.08366) and the scoring of an SAE against one on the paper's three axes.

A task names, for each example, the value of each of its attributes (IOI's `IO`, `S` and `Pos`; here any labels).
The supervised dictionary of an activation site holds, per attribute `i` and value `v`, the mean-centred conditional
mean `u_{i,v} = E[a | attr_i = v] - E[a]`, and reconstructs an example with values `v_1..v_m` as
`a_hat = E[a] + sum_i u_{i, v_i}`. It follows the paper's code (github.com/amakelov/sae, `circuit_utils.py`,
`get_mean_codes`: the centred activations averaged over the examples of each value, the mean kept as the `bias` code).

The axes, each as the reference computes it:

- approximation (`approximation`): the task metric, the logit of each example's answer minus a contrast (a second
  token, or the mean logit), with the site's activation replaced. Sufficiency patches the reconstruction `a_hat`:
  `|LD(a_hat) - LD(E[a])| / |LD(a) - LD(E[a])|`, the logit difference recovered over mean ablation
  (`get_logitdiff_loss` in the reference's notebooks); necessity patches `a - a_hat + E[a]`, the activation with the
  reconstruction's information taken out and the mean put back: `(LD(a) - LD(a - a_hat + E[a])) / (LD(a) - LD(E[a]))`,
  1 when removing it costs as much as mean ablation, 0 when it costs nothing;
- control (`edit_supervised`, `edit_sae`, `control`): move one attribute to another value and read the model. The
  supervised edit is the reference's `arithmetic` edit `a - u_{i,v} + u_{i,v'}` (`get_edited_act`); the SAE's is the
  reference's optimised edit (`sae_interventions.py`, `get_edit_using_sae_opt`, `diff_to_use='activation'`): given the
  activation of the counterfactual input `a'`, greedily pick the `n_exchange` latents whose change
  `(f_j(a') - f_j(a)) d_j` brings the running sum closest to `a' - a`, and add those changes to `a`. An edit scores
  its accuracy (the model's prediction after the edit is the counterfactual input's answer) and how far it moves the
  logit difference `logit(answer') - logit(answer)` from the base activation's value toward the counterfactual
  activation's (1: as far as running the counterfactual input).
- interpretability (`latent_f1`): each latent's firing (`f > 0`) against each value's examples, precision
  `|fires & has v| / |fires|`, recall `|fires & has v| / |has v|` and their F1 (`sae_interp.py`,
  `get_feature_scores`), and the best latent of each value.

Where the model is affine in the site's activation after it (the planted toy's readout; the attention-only induction
model, whose head output reaches the logits through `W_O` and the unembedding alone), `LD(a - a_hat + E[a]) =
LD(a) - LD(a_hat) + LD(E[a])`, so necessity equals sufficiency (while `LD(a_hat)` lies between the two); they part
where nonlinear layers (LayerNorm, MLPs, later attention) read the site.

Where it differs: the paper picks attributes per activation site and sometimes joint attributes (`(io, io_pos)`); here
each attribute is one label column (give a joint attribute as its own column of combined values). The reference also
offers least-squares codes (`get_mse_codes`) and F1-guided SAE edits (`get_edit_using_f1_scores`); these are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from saelab.dictionaries import SAE
from saelab.errors import ConfigError

Readout = Callable[[Tensor, Tensor], Tensor]
"""The model read at the site: `readout(acts, rows)` gives the output logits `[m, vocab]` of examples `rows` `[m]`
with the site's activation replaced by `acts` `[m, d]`."""
EDIT_BLOCK = 256
"""Examples edited at a time by `edit_sae` (its search holds `[block, d_sae, d]`)."""


@dataclass
class AttributeLabels:
    """Each example's value of each attribute, as indices into the attribute's values."""

    names: list[str]
    """The attributes, in column order."""
    values: list[list[Any]]
    """Each attribute's values, sorted; an example's index `j` in column `i` stands for `values[i][j]`."""
    index: Tensor
    """`[n, n_attributes]` long: each example's value index per attribute."""

    @property
    def n(self) -> int:
        """The number of examples."""
        return self.index.shape[0]

    def column(self, attribute: str) -> int:
        """The column of `attribute`."""
        if attribute not in self.names:
            raise ConfigError(f"no attribute {attribute!r}; the labels have {', '.join(self.names)}")
        return self.names.index(attribute)

    def subset(self, rows: Tensor) -> AttributeLabels:
        """The labels of examples `rows`."""
        return AttributeLabels(self.names, self.values, self.index[rows])


def attribute_labels(labels: Mapping[str, Sequence[Any] | np.ndarray | Tensor]) -> AttributeLabels:
    """Labels from a table attribute -> one value per example (strings, numbers, any sortable values).

    Every attribute must label every example, and take at least two values (an attribute with one value has no
    conditional mean apart from the mean, and nothing to edit it to)."""
    if not labels:
        raise ConfigError("no attributes given; give a table attribute -> one value per example")
    names, values, columns = [], [], []
    lengths = {name: len(col) for name, col in labels.items()}
    if len(set(lengths.values())) > 1:
        raise ConfigError(
            f"the attributes label different numbers of examples ({lengths}); give one value per example for each"
        )
    for name, col in labels.items():
        arr = col.cpu().numpy() if isinstance(col, Tensor) else np.asarray(col)
        if arr.ndim != 1:
            raise ConfigError(f"attribute {name!r} has shape {arr.shape}; give one value per example (a flat list)")
        uniq, inverse = np.unique(arr, return_inverse=True)
        if len(uniq) < 2:
            raise ConfigError(
                f"attribute {name!r} takes the single value {uniq.tolist()} on all {len(arr)} examples; a supervised "
                "dictionary needs at least two values per attribute: drop it, or give examples that vary it"
            )
        names.append(str(name))
        values.append(uniq.tolist())
        columns.append(torch.as_tensor(inverse, dtype=torch.long))
    return AttributeLabels(names, values, torch.stack(columns, 1))


@dataclass
class SupervisedDictionary:
    """The supervised feature dictionary of one activation site (the paper's mean codes)."""

    mean: Tensor
    """`[d]`: `E[a]`, the reference's `bias` code."""
    names: list[str]
    """The attributes."""
    values: list[list[Any]]
    """Each attribute's values."""
    vectors: list[Tensor]
    """Per attribute, `[n_values, d]`: `u_{i,v} = E[a | attr_i = v] - E[a]`."""
    counts: list[Tensor] = field(default_factory=list)
    """Per attribute, `[n_values]`: the examples each value's mean was taken over."""

    def reconstruct(self, index: Tensor) -> Tensor:
        """`a_hat = E[a] + sum_i u_{i, v_i}` `[n, d]` for value indices `index` `[n, n_attributes]`."""
        out = self.mean.expand(index.shape[0], -1).clone()
        for i, u in enumerate(self.vectors):
            out += u[index[:, i]]
        return out

    def edit(self, x: Tensor, index: Tensor, *, attribute: str, to: Tensor) -> Tensor:
        """The paper's arithmetic edit of activations `x` `[n, d]` whose values are `index`: attribute `attribute`
        from each example's value to `to` `[n]` (value indices), `x - u_{i,v} + u_{i,v'}`."""
        i = self._column(attribute)
        u = self.vectors[i]
        return x - u[index[:, i]] + u[to]

    def _column(self, attribute: str) -> int:
        if attribute not in self.names:
            raise ConfigError(f"no attribute {attribute!r}; the dictionary has {', '.join(self.names)}")
        return self.names.index(attribute)


def supervised_dictionary(x: Tensor, labels: AttributeLabels) -> SupervisedDictionary:
    """The supervised dictionary of activations `x` `[n, d]` under `labels` (the reference's `get_mean_codes`). A
    value no example has gets a zero vector (and count 0)."""
    if x.ndim != 2 or x.shape[0] != labels.n:
        raise ConfigError(
            f"the activations have shape {tuple(x.shape)} but the labels describe {labels.n} examples; give "
            "activations [n_examples, d] in the labels' order"
        )
    x = x.float()
    mean = x.mean(0)
    centred = x - mean
    vectors, counts = [], []
    for i, values in enumerate(labels.values):
        col = labels.index[:, i]
        count = torch.bincount(col, minlength=len(values))
        sums = torch.zeros(len(values), x.shape[1]).index_add_(0, col, centred)
        vectors.append(sums / count.clamp_min(1)[:, None])
        counts.append(count)
    return SupervisedDictionary(mean, labels.names, labels.values, vectors, counts)


@dataclass
class SupervisedTask:
    """Examples of a task at one activation site: their activations, attribute labels, answers and the model."""

    x: Tensor
    """`[n, d]`: each example's activation at the site."""
    labels: AttributeLabels
    """Each example's attribute values."""
    answer: Tensor
    """`[n]` long: the token the model answers on each example."""
    readout: Readout
    """The model's logits with the site patched (`Readout`)."""
    contrast: Tensor | None = None
    """`[n]` long: the token the logit difference is against (None: the mean logit over the vocabulary)."""

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if (
            self.labels.n != n
            or self.answer.shape != (n,)
            or (self.contrast is not None and self.contrast.shape != (n,))
        ):
            raise ConfigError(
                f"the task has {n} activations, {self.labels.n} labelled examples and {tuple(self.answer.shape)} "
                "answers; give one label row and one answer per activation"
            )

    def logit_diff(self, acts: Tensor, rows: Tensor) -> Tensor:
        """`[m]`: the logit difference of examples `rows` with their activation replaced by `acts`."""
        with torch.no_grad():
            logits = self.readout(acts, rows).float()
        top = logits.gather(1, self.answer[rows, None])[:, 0]
        if self.contrast is None:
            return top - logits.mean(1)
        return top - logits.gather(1, self.contrast[rows, None])[:, 0]

    def subset(self, rows: Tensor) -> SupervisedTask:
        """The task on examples `rows` alone (the readout is wrapped to see the original rows)."""
        readout = self.readout

        def sub_readout(acts: Tensor, sub: Tensor) -> Tensor:
            return readout(acts, rows[sub])

        contrast = None if self.contrast is None else self.contrast[rows]
        return SupervisedTask(self.x[rows], self.labels.subset(rows), self.answer[rows], sub_readout, contrast)


class Approximation(NamedTuple):
    """How much of the task metric a reconstruction keeps (sufficiency) and carries (necessity)."""

    sufficiency: float
    """`|LD(a_hat) - LD(E[a])| / |LD(a) - LD(E[a])|` (mean logit differences): 1 keeps all of it, 0 none."""
    necessity: float
    """`(LD(a) - LD(a - a_hat + E[a])) / (LD(a) - LD(E[a]))`: 1 when taking the reconstruction out costs as much as
    mean ablation."""
    clean: float
    """The mean logit difference on the activations as they are."""
    mean_ablated: float
    """With every activation replaced by `E[a]`."""
    reconstructed: float
    """With the reconstructions patched in."""
    removed: float
    """With `a - a_hat + E[a]` patched in."""


def approximation(task: SupervisedTask, recon: Tensor, *, mean: Tensor | None = None) -> Approximation:
    """Sufficiency and necessity of reconstructions `recon` `[n, d]` of `task.x` (the mean, by default the task's
    activations' mean, is what mean ablation patches in)."""
    if recon.shape != task.x.shape:
        raise ConfigError(f"reconstructions of shape {tuple(recon.shape)} for activations {tuple(task.x.shape)}")
    x = task.x.float()
    mu = x.mean(0) if mean is None else mean.float()
    rows = torch.arange(len(x))
    clean = float(task.logit_diff(x, rows).mean())
    ablated = float(task.logit_diff(mu.expand_as(x), rows).mean())
    kept = float(task.logit_diff(recon.float(), rows).mean())
    removed = float(task.logit_diff(x - recon.float() + mu, rows).mean())
    span = clean - ablated
    if abs(span) < 1e-9:
        raise ConfigError(
            "mean ablation leaves the task metric where it is (clean and mean-ablated logit differences are equal), so "
            "the site carries nothing the metric reads; choose a site the model uses"
        )
    return Approximation(abs(kept - ablated) / abs(span), (clean - removed) / span, clean, ablated, kept, removed)


class Counterfactuals(NamedTuple):
    """Edits of one attribute: base examples, the value each moves to, and the counterfactual inputs' activations and
    answers (the input with that attribute changed, run through the model)."""

    attribute: str
    """The attribute edited."""
    rows: Tensor
    """`[m]` long: the base examples (rows of the task)."""
    to: Tensor
    """`[m]` long: the value index each moves to."""
    x: Tensor
    """`[m, d]`: the site's activation on each counterfactual input (what an SAE edit aims at)."""
    answer: Tensor
    """`[m]` long: the model's answer on each counterfactual input (what a successful edit makes it answer)."""


class Control(NamedTuple):
    """How well edits of one attribute move the model to the counterfactual answer."""

    attribute: str
    """The attribute edited."""
    accuracy: float
    """The share of edits after which the model's prediction is the counterfactual answer."""
    moved: float
    """`(LD(edited) - LD(a)) / (LD(a') - LD(a))` on means, `LD = logit(answer') - logit(answer)`: 1 moves the logits
    as far as the counterfactual input does, 0 not at all."""
    edit_norm: float
    """The mean norm of the edit `|edited - a|`, against `target_norm`."""
    target_norm: float
    """The mean norm of `|a' - a|`."""
    n: int
    """The number of edits."""


def control(task: SupervisedTask, cf: Counterfactuals, edited: Tensor) -> Control:
    """Score edited activations `edited` `[m, d]` of `cf`'s base examples (see the module's docstring)."""
    rows = cf.rows
    x = task.x[rows].float()
    with torch.no_grad():
        out = {name: task.readout(a, rows).float() for name, a in (("edit", edited), ("base", x), ("cf", cf.x.float()))}

    def toward(logits: Tensor) -> Tensor:
        return logits.gather(1, cf.answer[:, None])[:, 0] - logits.gather(1, task.answer[rows, None])[:, 0]

    base, target, got = toward(out["base"]).mean(), toward(out["cf"]).mean(), toward(out["edit"]).mean()
    moved = float((got - base) / (target - base)) if abs(float(target - base)) > 1e-9 else float("nan")
    return Control(
        cf.attribute,
        float((out["edit"].argmax(1) == cf.answer).float().mean()),
        moved,
        float((edited - x).norm(dim=1).mean()),
        float((cf.x.float() - x).norm(dim=1).mean()),
        len(rows),
    )


def edit_supervised(task: SupervisedTask, dictionary: SupervisedDictionary, cf: Counterfactuals) -> Tensor:
    """The supervised dictionary's edits of `cf` (the reference's `arithmetic` edit)."""
    return dictionary.edit(task.x[cf.rows].float(), task.labels.index[cf.rows], attribute=cf.attribute, to=cf.to)


def edit_sae(sae: SAE, x: Tensor, x_cf: Tensor, *, n_exchange: int) -> Tensor:
    """The reference's optimised SAE edit of activations `x` `[m, d]` toward `x_cf` `[m, d]`: `n_exchange` greedy
    steps, each taking the latent `j` (not yet taken) whose change `(f_j(x_cf) - f_j(x)) W_dec[j]` brings the sum of
    the changes taken closest to `x_cf - x`; returns `x` plus that sum."""
    if sae.cfg.d_out is not None:
        raise ConfigError("an SAE edit rewrites the activation it reads; give an SAE, not a transcoder")
    if n_exchange < 1:
        raise ConfigError(f"n_exchange {n_exchange} must be at least 1 latent")
    out = []
    with torch.no_grad():
        w_dec = sae.W_dec.float()
        for start in range(0, len(x), EDIT_BLOCK):
            a, b = x[start : start + EDIT_BLOCK].float(), x_cf[start : start + EDIT_BLOCK].float()
            diffs = (sae.encode(b) - sae.encode(a)).float()[:, :, None] * w_dec  # [m, d_sae, d]
            target = b - a
            total = torch.zeros_like(a)
            taken = torch.zeros(diffs.shape[:2], dtype=torch.bool)
            idx = torch.arange(len(a))
            for _ in range(min(n_exchange, sae.cfg.d_sae)):
                scores = (total[:, None] + diffs - target[:, None]).norm(dim=-1).masked_fill(taken, float("inf"))
                best = scores.argmin(1)
                total += diffs[idx, best]
                taken[idx, best] = True
            out.append(a + total)
    return torch.cat(out)


class LatentF1(NamedTuple):
    """The latents that best pick out each value of one attribute."""

    attribute: str
    """The attribute."""
    values: list[Any]
    """Its values."""
    latent: list[int]
    """The best latent (largest F1) of each value."""
    precision: list[float]
    """Its precision on each value."""
    recall: list[float]
    """Its recall."""
    f1: list[float]
    """Its F1."""

    @property
    def mean_f1(self) -> float:
        """The mean over values of the best latent's F1."""
        return float(np.mean(self.f1))


def latent_f1(codes: Tensor, labels: AttributeLabels) -> list[LatentF1]:
    """Per attribute, the best latent of each value by the F1 of its firing pattern (`codes > 0`, `[n, d_sae]`)
    against the value's examples (the reference's `get_feature_scores`; a latent that never fires scores 0)."""
    if codes.shape[0] != labels.n:
        raise ConfigError(f"codes for {codes.shape[0]} examples, labels for {labels.n}; give one row per example")
    fires = (codes > 0).float()
    support = fires.sum(0)  # [d_sae]
    out = []
    for i, values in enumerate(labels.values):
        mask = torch.nn.functional.one_hot(labels.index[:, i], len(values)).float()  # [n, n_values]
        both = fires.T @ mask  # [d_sae, n_values]
        precision = both / support.clamp_min(1)[:, None]
        recall = both / mask.sum(0).clamp_min(1)[None]
        f1 = torch.where(both > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), torch.zeros(()))
        best = f1.argmax(0)
        cols = torch.arange(len(values))
        out.append(
            LatentF1(
                labels.names[i],
                values,
                best.tolist(),
                precision[best, cols].tolist(),
                recall[best, cols].tolist(),
                f1[best, cols].tolist(),
            )
        )
    return out


@dataclass
class SupervisedEval:
    """A supervised dictionary and an SAE scored on the paper's three axes over one task."""

    supervised_approximation: Approximation
    """The supervised dictionary's sufficiency and necessity."""
    sae_approximation: Approximation
    """The SAE's, with its reconstruction `sae(x)`."""
    supervised_control: list[Control]
    """Per edited attribute, the supervised edits."""
    sae_control: list[Control]
    """Per edited attribute, the SAE's optimised edits of `n_exchange` latents."""
    interpretability: list[LatentF1]
    """Per attribute, the SAE latents that best pick out each value."""
    n_exchange: int
    """The latents each SAE edit changes."""

    def summary(self) -> str:
        """A few lines: both dictionaries on each axis."""
        s, a = self.supervised_approximation, self.sae_approximation
        lines = [
            f"approximation: sufficiency {s.sufficiency:.3f} supervised / {a.sufficiency:.3f} SAE, "
            f"necessity {s.necessity:.3f} / {a.necessity:.3f}"
        ]
        for sup, sae in zip(self.supervised_control, self.sae_control, strict=True):
            lines.append(
                f"control of {sup.attribute} ({sup.n} edits): accuracy {sup.accuracy:.3f} supervised / "
                f"{sae.accuracy:.3f} SAE ({self.n_exchange} latents), moved {sup.moved:.3f} / {sae.moved:.3f}"
            )
        lines += [f"interpretability of {f.attribute}: best-latent F1 {f.mean_f1:.3f}" for f in self.interpretability]
        return "\n".join(lines)


def evaluate_supervised(
    task: SupervisedTask,
    sae: SAE,
    counterfactuals: Sequence[Counterfactuals],
    *,
    dictionary: SupervisedDictionary | None = None,
    n_exchange: int = 2,
) -> SupervisedEval:
    """Score `sae` and the supervised dictionary (`dictionary`, by default fitted on `task` itself; fit it on other
    examples of the task to score held-out ones) on approximation, control by the `counterfactuals`' edits, and
    interpretability."""
    sup = dictionary if dictionary is not None else supervised_dictionary(task.x, task.labels)
    if sup.names != task.labels.names:
        raise ConfigError(
            f"the dictionary has attributes {sup.names}, the task {task.labels.names}; give matching ones"
        )
    x = task.x.float()
    with torch.no_grad():
        codes = sae.encode(x)
        recon = sae.decode(codes)
    return SupervisedEval(
        approximation(task, sup.reconstruct(task.labels.index), mean=sup.mean),
        approximation(task, recon, mean=sup.mean),
        [control(task, cf, edit_supervised(task, sup, cf)) for cf in counterfactuals],
        [control(task, cf, edit_sae(sae, x[cf.rows], cf.x, n_exchange=n_exchange)) for cf in counterfactuals],
        latent_f1(codes, task.labels),
        n_exchange,
    )
