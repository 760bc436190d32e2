"""Sparse feature circuits (Marks et al. 2024) over any run's SAEs.

Nodes are the latents of each SAE at each position, plus one error node (`x - dec(enc(x))`) per hook
point and position; splicing `dec(f) + err` in place of `x` leaves the model's output unchanged. A
metric is a scalar function of the output for each example (a target token's logit, a logit
difference, a target's loss; for encoders the cosine similarity of the pooled output embedding to a
reference text's).

- Node effects estimate `m(node at baseline) - m(clean)`: attribution patching (`atp`,
  `delta * grad`, one backward pass) or integrated gradients (`ig`, the gradient averaged along the
  straight line from clean to baseline, one hook point at a time). The baseline is a patch input
  (`patch`), zero (`zero`) or the mean over the examples (`mean`). `exact_patching` patches nodes
  one at a time, for checking.
- Edges join nodes of consecutive SAE hook points: `grad_d . (d d / d u) . delta_u`, the Jacobian of
  the downstream node with respect to the upstream one through the model between them (direct paths:
  no other SAE hook point lies between), at the clean input (`atp`) or averaged along the same line
  as the node effects (`ig`).
- Faithfulness of the top-n nodes: `(m(C) - m(empty)) / (m(M) - m(empty))`, every node outside C
  mean-ablated; completeness ablates C itself.

A model with a known circuit comes with it: `train_induction_model` / `induction_run` and the
`induction_task` for which its circuit is a previous-token latent feeding an induction latent.

Effects live in "node tensors" `[..., pos, d_sae + 1]` per hook point, the last column being the
error node; aggregated over positions they keep a position axis of length 1.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import torch
from pydantic import Field, model_validator
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer, HookedTransformerConfig

from saelab.config import StrictModel
from saelab.errors import CircuitError
from saelab.models import (
    HOOK_KINDS,
    Model,
    device_of,
    flatten_heads,
    forward_to,
    is_encoder,
    load_model,
    resolve_hooks,
    save_model,
)
from saelab.resultfile import read_json, write_json
from saelab.sae import SAE
from saelab.text import SpecialTokens

Metric = Callable[[Tensor], Tensor]
Method = Literal["atp", "ig"]
Baseline = Literal["patch", "zero", "mean"]
Aggregation = Literal["none", "sum"]
NodeKey = tuple[str, int, int]  # (hook, position (0 when aggregated), index (d_sae: the error node))
CIRCUITS_DIR = "circuits"


# ------------------------------------------------------------------------------ the induction task

ALPHABET = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"  # token i is ALPHABET[i]
BOS = "<s>"


def induction_tokenizer(folder: str | Path) -> Any:
    """A character tokenizer over `ALPHABET` (ids 0..63) with BOS `<s>` (id 64), saved to and loaded from `folder`."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(ALPHABET)} | {BOS: len(ALPHABET)}, unk_token=BOS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token=BOS, unk_token=BOS
    ).save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def repeated_tokens(n: int, length: int, seed: int = 0, vocab: int = len(ALPHABET)) -> Tensor:
    """`n` sequences BOS + R + R of random tokens R [n, 2 * length + 1]."""
    r = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    return torch.cat([torch.full((n, 1), vocab), r, r], 1)


def _copy_batch(n: int, n_ctx: int, max_length: int, vocab: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random tokens after BOS in which a random segment (3..max_length long) is copied to a random later
    place; returns tokens and the mask of next-token targets that only induction can predict."""
    toks = torch.randint(0, vocab, (n, n_ctx), generator=g)
    toks[:, 0] = vocab
    length = torch.randint(3, max_length + 1, (n,), generator=g)
    first = 1 + (torch.rand(n, generator=g) * (n_ctx - 2 * length)).long()
    second = first + length + (torch.rand(n, generator=g) * (n_ctx - 2 * length - first + 1)).long()
    pos = torch.arange(n_ctx)
    inside = (pos >= second[:, None]) & (pos < (second + length)[:, None])
    toks = toks.gather(1, torch.where(inside, pos - (second - first)[:, None], pos))
    return toks, inside[:, 1:] & (pos[None, 1:] > second[:, None])


def induction_accuracy(model: HookedTransformer, length: int, n: int = 512, seed: int = 1) -> float:
    """Next-token accuracy on the repeated half of fresh BOS + R + R sequences (positions that can be predicted)."""
    toks = repeated_tokens(n, length, seed).to(model.cfg.device)
    with torch.no_grad():
        pred = model(toks)[:, length + 1 : 2 * length].argmax(-1)
    return float((pred == toks[:, length + 2 :]).float().mean())


def train_induction_model(
    folder: str | Path,
    length: int = 10,
    steps: int = 2000,
    target_accuracy: float = 0.98,
    seed: int = 0,
    progress: bool = True,
) -> HookedTransformer:
    """Train a two-layer attention-only decoder that does induction, save it to `folder`, and return it.

    It learns on random tokens with one segment copied to a random offset (so no positional shortcut
    works), and stops once fresh BOS + R + R sequences (R of `length` tokens) get `target_accuracy` on
    their repeated half (checked every 100 steps). One head per layer, rotary positions and no LayerNorm make
    it learn the textbook circuit within a few hundred steps: a previous-token head in layer 0 whose output
    the induction head in layer 1 reads as keys (K-composition).
    """
    folder = Path(folder)
    vocab = len(ALPHABET)
    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=2,
        attn_only=True,
        d_model=64,
        n_heads=1,
        d_head=32,
        n_ctx=2 * length + 4,
        d_vocab=vocab + 1,
        normalization_type=None,
        positional_embedding_type="rotary",
        seed=seed,
        model_name="induction-2l",
    )
    model = HookedTransformer(cfg, tokenizer=induction_tokenizer(folder / "tokenizer"), move_to_device=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    accuracy = 0.0
    bar = tqdm(range(steps), desc="train induction model", disable=not progress)
    for step in bar:
        toks, mask = _copy_batch(64, cfg.n_ctx, length, vocab, g)
        logp = model(toks)[:, :-1].log_softmax(-1).gather(-1, toks[:, 1:, None])[..., 0]
        loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % 100 == 0:
            accuracy = induction_accuracy(model, length)
            bar.set_postfix(loss=f"{loss.item():.3f}", accuracy=f"{accuracy:.3f}")
            if accuracy >= target_accuracy:
                break
    bar.close()
    if accuracy < target_accuracy:
        raise CircuitError(
            f"the induction model reached accuracy {accuracy:.3f} < {target_accuracy} in {steps} steps; give more steps"
        )
    save_model(model.eval(), folder)
    return model


def induction_texts(n: int, length: int, seed: int = 0) -> list[str]:
    """`n` documents R + R (R random characters of `ALPHABET`), for harvesting the induction model's activations."""
    return ["".join(ALPHABET[t] for t in row[1:]) for row in repeated_tokens(n, length, seed).tolist()]


INDUCTION_HOOKS = ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]


def induction_run(
    out: str | Path,
    length: int = 10,
    documents: int = 2000,
    sae_tokens: int = 600_000,
    seed: int = 0,
    progress: bool = True,
    target_accuracy: float = 0.98,
) -> Path:
    """A run directory with a known circuit: the induction model (`out/model`, trained to `target_accuracy`), its
    `attn.hook_z` activations on `documents` texts R + R, a TopK SAE per layer (k=2, 128 latents) and their feature
    analysis."""
    from saelab.analysis import AnalysisConfig, analyze
    from saelab.config import HarvestConfig
    from saelab.harvest import harvest
    from saelab.train import TrainConfig, train

    out = Path(out).resolve()
    train_induction_model(out / "model", length, target_accuracy=target_accuracy, seed=seed, progress=progress)
    text = out / "induction.txt"
    text.write_text("\n".join(induction_texts(documents, length, seed)) + "\n")
    harvest(
        HarvestConfig(
            model=str(out / "model"),
            hooks=INDUCTION_HOOKS,
            out=str(out / "activations.zarr"),
            text={"source": "files", "path": str(text), "txt_sample_by": "line"},
            context_length=2 * length + 2,
            batch_size=128,
            drop_special_tokens=False,
            dtype="float32",
            shard_rows=8192,
            chunk_rows=1024,
        ),
        progress=progress,
    )
    train(
        TrainConfig(
            store=str(out / "activations.zarr"),
            run=str(out),
            tokens=sae_tokens,
            batch_size=512,
            eval_rows=4096,
            warmup_steps=10,
            grid={"k": [2], "expansion": [4]},
            seed=seed,
        ),
        progress=progress,
    )
    analyze(out, AnalysisConfig(), progress=progress)
    return out


# ------------------------------------------------------------------------------------ tasks and metrics


@dataclass
class Task:
    """What a circuit explains: clean `tokens` [batch, pos], an optional `patch` input of the same shape,
    and a `metric` mapping the model's output to one number per example.

    The metric receives the examples tiled along the batch (row r is example r % batch), as effects are
    computed for many interventions in one pass. `labels` name the positions of the first example."""

    tokens: Tensor
    metric: Metric
    patch: Tensor | None = None
    labels: list[str] = field(default_factory=list)


def token_metric(
    kind: Literal["logit", "logit_diff", "loss"], position: Tensor, target: Tensor, distractor: Tensor | None = None
) -> Metric:
    """A decoder metric at `position` [batch]: the `target` token's logit, its logit minus the `distractor`'s,
    or its cross-entropy loss."""
    if kind == "logit_diff" and distractor is None:
        raise CircuitError("metric logit_diff needs a distractor token for every example")

    def metric(logits: Tensor) -> Tensor:
        reps = len(logits) // len(position)
        rows = logits[torch.arange(len(logits), device=logits.device), position.repeat(reps)].float()
        pick = rows.gather(-1, target.repeat(reps)[:, None])[:, 0]
        if kind == "logit":
            return pick
        if kind == "loss":
            return rows.logsumexp(-1) - pick
        return pick - rows.gather(-1, distractor.repeat(reps)[:, None])[:, 0]

    return metric


def similarity_metric(reference: Tensor) -> Metric:
    """An encoder metric: cosine similarity of the mean-pooled output embeddings to `reference` [batch, d_model]."""

    def metric(hidden: Tensor) -> Tensor:
        reps = len(hidden) // len(reference)
        return torch.cosine_similarity(hidden.float().mean(1), reference.repeat(reps, 1), dim=-1)

    return metric


def induction_task(
    model: Model,
    n: int = 8,
    length: int = 10,
    position: int | None = None,
    seed: int = 0,
    metric: Literal["logit", "loss"] = "logit",
) -> Task:
    """`n` sequences BOS + R + R (R: `length` random tokens); the metric reads `position` in the second R
    (default its middle), where the next token is predictable only by induction. The patch input replaces the
    first R by other random tokens, so the earlier occurrence of the current token is gone."""
    if 2 * length + 1 > model.cfg.n_ctx:
        raise CircuitError(
            f"induction length {length} needs {2 * length + 1} positions; the model has {model.cfg.n_ctx}"
        )
    vocab = model.cfg.d_vocab - 1
    position = length + length // 2 if position is None else position
    if not length + 1 <= position < 2 * length:
        raise CircuitError(
            f"induction position {position} is outside the repeated half; use {length + 1}..{2 * length - 1}"
        )
    tokens = repeated_tokens(n, length, seed, vocab)
    patch = tokens.clone()
    patch[:, 1 : length + 1] = repeated_tokens(n, length, seed + 1_000_003, vocab)[:, 1 : length + 1]
    device = device_of(model)
    pos = torch.full((n,), position, device=device)
    task_metric = token_metric(metric, pos, tokens[:, position + 1].to(device))
    return Task(tokens.to(device), task_metric, patch.to(device), _labels(model, tokens[0]))


def _labels(model: Model, tokens: Tensor) -> list[str]:
    if model.tokenizer is None:
        return [str(t) for t in tokens.tolist()]
    return [model.tokenizer.decode([t]) for t in tokens.tolist()]


def _single_token(model: Model, text: str, what: str) -> int:
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise CircuitError(f"{what} {text!r} is {len(ids)} tokens {ids}; give text that is exactly one token")
    return ids[0]


class Prompt(StrictModel):
    """One example: `clean` text, an optional `patch` text of the same token length, and what the metric reads:
    decoders score `target` (and `distractor`, for logit_diff) as the next token at `position` (default: last);
    encoders compare the output embedding with that of the `target` text."""

    clean: str
    patch: str | None = None
    target: str | None = None
    distractor: str | None = None
    position: int = -1


def prompt_task(
    model: Model, prompts: list[Prompt], metric: Literal["logit", "logit_diff", "loss", "similarity"]
) -> Task:
    """A task from prompts; every prompt (and patch) must have the same number of tokens."""
    if not prompts:
        raise CircuitError("no prompts: give at least one")
    encoder = is_encoder(model)
    if (metric == "similarity") != encoder:
        raise CircuitError(
            f"metric {metric!r} does not suit this {'encoder' if encoder else 'decoder'}; use "
            f"{'similarity' if encoder else 'logit, logit_diff or loss'}"
        )
    special = SpecialTokens.for_tokenizer(model.tokenizer, encoder)

    def encode(text: str) -> list[int]:
        return special.frame(model.tokenizer(text, add_special_tokens=False)["input_ids"])

    clean = [encode(p.clean) for p in prompts]
    has_patch = [p.patch is not None for p in prompts]
    if any(has_patch) and not all(has_patch):
        raise CircuitError("give a patch text for every prompt or for none")
    patch = [encode(p.patch) for p in prompts] if all(has_patch) else None
    lengths = {len(t) for t in clean + (patch or [])}
    if len(lengths) != 1:
        raise CircuitError(
            f"prompts (and patches) tokenize to different lengths {sorted(lengths)}; circuits compare "
            "positions across examples, so make them the same length"
        )
    device = device_of(model)
    tokens = torch.tensor(clean, device=device)
    patch_t = torch.tensor(patch, device=device) if patch else None
    if any(p.target is None for p in prompts):
        raise CircuitError(f"metric {metric!r} needs a target for every prompt")
    if encoder:
        with torch.no_grad():
            ref = torch.stack(
                [_output(model, torch.tensor([encode(p.target)], device=device), {})[0].mean(0) for p in prompts]
            )
        return Task(tokens, similarity_metric(ref), patch_t, _labels(model, tokens[0]))
    position = torch.tensor([p.position % tokens.shape[1] for p in prompts], device=device)
    target = torch.tensor([_single_token(model, p.target, "target") for p in prompts], device=device)
    distractor = None
    if metric == "logit_diff":
        if any(p.distractor is None for p in prompts):
            raise CircuitError("metric logit_diff needs a distractor for every prompt")
        distractor = torch.tensor([_single_token(model, p.distractor, "distractor") for p in prompts], device=device)
    return Task(tokens, token_metric(metric, position, target, distractor), patch_t, _labels(model, tokens[0]))


# ------------------------------------------------------------------------------ spliced forward passes


def _output(model: Model, tokens: Tensor, edits: dict[str, Callable[[Tensor], Tensor]]) -> Tensor:
    """The model's output with `edits[hook](x) -> x'` applied (x flattened over heads): logits for decoders,
    the last layer's residual stream (output embeddings) for encoders."""

    def wrap(edit: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
        def hook(act: Tensor, hook: Any) -> Tensor:
            return edit(flatten_heads(act).float()).to(act.dtype).reshape(act.shape)

        return hook

    with model.hooks(fwd_hooks=[(h, wrap(e)) for h, e in edits.items()]):
        if not is_encoder(model):
            return model(tokens, return_type="logits")
        return forward_to(model, tokens, f"blocks.{model.cfg.n_layers - 1}.hook_resid_post")


@dataclass
class Nodes:
    """The nodes of one hook point: latents `f` [..., pos, d_sae] and the error `err` [..., pos, d_in]."""

    f: Tensor
    err: Tensor

    def __sub__(self, other: Nodes) -> Nodes:
        return Nodes(self.f - other.f, self.err - other.err)

    def lerp(self, delta: Nodes, alpha: float) -> Nodes:
        """The point `alpha` of the way along `delta`."""
        return Nodes(self.f + alpha * delta.f, self.err + alpha * delta.err)

    def dot(self, other: Nodes) -> Tensor:
        """Per-node products: latents elementwise, the error summed over its dimensions -> [..., pos, d_sae + 1]."""
        return torch.cat([self.f * other.f, (self.err * other.err).sum(-1, keepdim=True)], -1)

    def tile(self, reps: int) -> Nodes:
        return Nodes(self.f.repeat(reps, *[1] * (self.f.ndim - 1)), self.err.repeat(reps, *[1] * (self.err.ndim - 1)))


def _encode(sae: SAE, x: Tensor) -> Nodes:
    f = sae.encode(x)
    return Nodes(f, x - sae.decode(f))


def _hook_order(model: Model, hooks: list[str]) -> list[str]:
    """Hook points in the order the forward pass reaches them."""
    points = resolve_hooks(model, hooks)
    return [p.name for p in sorted(points, key=lambda p: (p.layer, HOOK_KINDS.index(p.kind)))]


def _check_saes(model: Model, saes: dict[str, SAE]) -> list[str]:
    if not saes:
        raise CircuitError("no SAEs: give at least one {hook point: SAE}")
    order = _hook_order(model, list(saes))
    for point in resolve_hooks(model, order):
        if saes[point.name].cfg.d_in != point.d:
            raise CircuitError(
                f"the SAE for {point.name} reads d_in={saes[point.name].cfg.d_in}, but that hook point "
                f"has width {point.d}; give an SAE trained on this model's {point.name}"
            )
    return order


@torch.no_grad()
def clean_states(model: Model, saes: dict[str, SAE], tokens: Tensor) -> dict[str, Nodes]:
    """Latents and errors of every SAE on `tokens` (each hook point computed from the unmodified model)."""
    states: dict[str, Nodes] = {}

    def record(hook: str) -> Callable[[Tensor], Tensor]:
        def edit(x: Tensor) -> Tensor:
            states[hook] = _encode(saes[hook], x)
            return x

        return edit

    _output(model, tokens, {h: record(h) for h in saes})
    return states


def baseline_states(
    model: Model, saes: dict[str, SAE], task: Task, baseline: Baseline, clean: dict[str, Nodes]
) -> dict[str, Nodes]:
    """Node values at the baseline: on the patch input, zero, or the clean mean over examples (per position)."""
    if baseline == "patch":
        if task.patch is None:
            raise CircuitError(
                "baseline 'patch' needs a patch input (e.g. a patch text per prompt); or use baseline 'mean' or 'zero'"
            )
        if task.patch.shape != task.tokens.shape:
            raise CircuitError(
                f"patch input has shape {tuple(task.patch.shape)}, clean {tuple(task.tokens.shape)}; they must match"
            )
        return clean_states(model, saes, task.patch)
    if baseline == "zero":
        return {h: Nodes(torch.zeros_like(s.f), torch.zeros_like(s.err)) for h, s in clean.items()}
    return {h: _mean(s).tile(len(s.f)) for h, s in clean.items()}


def _mean(s: Nodes) -> Nodes:
    return Nodes(s.f.mean(0, keepdim=True), s.err.mean(0, keepdim=True))


def _set_nodes(sae: SAE, value: Nodes) -> Callable[[Tensor], Tensor]:
    """An edit that replaces the hook point's activation by `dec(f) + err` of the given nodes."""
    return lambda x: sae.decode(value.f) + value.err


def _with_grad(nodes: Nodes) -> Nodes:
    return Nodes(nodes.f.detach().requires_grad_(), nodes.err.detach().requires_grad_())


def _metric_total(model: Model, task: Task, edits: dict[str, Callable[[Tensor], Tensor]], reps: int = 1) -> Tensor:
    tokens = task.tokens.repeat(reps, 1)
    return task.metric(_output(model, tokens, edits))


# ------------------------------------------------------------------------------------------ node effects


@dataclass
class NodeEffects:
    """Per hook point: `effects` [batch, pos, d_sae + 1] (last column: the error node), the metric's gradient
    with respect to the nodes, their change from clean to baseline, and their clean values."""

    effects: dict[str, Tensor]
    grads: dict[str, Nodes]
    deltas: dict[str, Nodes]
    clean: dict[str, Nodes]


def node_effects(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    method: Method = "ig",
    ig_steps: int = 10,
    baseline: Baseline = "patch",
    progress: bool = True,
) -> NodeEffects:
    """Effect of moving each node from its clean value to the baseline, on each example's metric.

    `atp`: one backward pass, `effect = delta * grad` at the clean point (downstream SAEs respond to their
    inputs). `ig`: for one hook point at a time, the gradient averaged over `ig_steps` points (midpoints)
    on the line from clean to baseline; the other hook points run unmodified."""
    order = _check_saes(model, saes)
    clean = clean_states(model, saes, task.tokens)
    deltas = {h: s - clean[h] for h, s in baseline_states(model, saes, task, baseline, clean).items()}
    grads = (
        _atp_grads(model, saes, task, clean)
        if method == "atp"
        else _ig_grads(model, saes, task, clean, deltas, ig_steps, order, progress)
    )
    effects = {h: deltas[h].dot(grads[h]) for h in order}
    return NodeEffects(effects, grads, deltas, clean)


def _atp_grads(model: Model, saes: dict[str, SAE], task: Task, clean: dict[str, Nodes]) -> dict[str, Nodes]:
    leaves = {h: _with_grad(s) for h, s in clean.items()}

    def transparent(hook: str) -> Callable[[Tensor], Tensor]:
        # value x, gradient to x (upstream nodes see downstream SAEs respond), and to this hook's nodes
        def edit(x: Tensor) -> Tensor:
            y = saes[hook].decode(leaves[hook].f) + leaves[hook].err
            return x + (y - y.detach())

        return edit

    metric = _metric_total(model, task, {h: transparent(h) for h in saes})
    values = [t for n in leaves.values() for t in (n.f, n.err)]
    g = torch.autograd.grad(metric.sum(), values, allow_unused=True)
    g = [torch.zeros_like(v) if gi is None else gi for v, gi in zip(values, g)]
    return {h: Nodes(g[2 * i], g[2 * i + 1]) for i, h in enumerate(leaves)}


def _ig_grads(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    clean: dict[str, Nodes],
    deltas: dict[str, Nodes],
    steps: int,
    order: list[str],
    progress: bool,
) -> dict[str, Nodes]:
    if steps < 1:
        raise CircuitError(f"ig_steps must be at least 1 (got {steps})")
    grads = {}
    with tqdm(total=len(order) * steps, desc="integrated gradients", disable=not progress) as bar:
        for hook in order:
            total = Nodes(torch.zeros_like(clean[hook].f), torch.zeros_like(clean[hook].err))
            for i in range(steps):
                alpha = (i + 0.5) / steps
                point = _with_grad(clean[hook].lerp(deltas[hook], alpha))
                metric = _metric_total(model, task, {hook: _set_nodes(saes[hook], point)})
                gf, ge = torch.autograd.grad(metric.sum(), [point.f, point.err])
                total = Nodes(total.f + gf / steps, total.err + ge / steps)
                bar.update()
            grads[hook] = total
    return grads


def aggregate(effects: Tensor, aggregation: Aggregation) -> Tensor:
    """Mean over examples [batch, pos, n] -> [pos, n]; with `sum`, summed over positions too -> [1, n]."""
    mean = effects.mean(0)
    return mean.sum(0, keepdim=True) if aggregation == "sum" else mean


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


CHUNK_ELEMENTS = 2**27  # node values held for one pass over replicas of the examples (0.5 GB in float32)


def _fit(chunk: int, task: Task, saes: dict[str, SAE]) -> int:
    """At most `chunk` replicas of the examples per pass; fewer where their node values would exceed CHUNK_ELEMENTS."""
    per_replica = task.tokens.numel() * max(s.cfg.d_sae + s.cfg.d_in for s in saes.values())
    return max(1, min(chunk, CHUNK_ELEMENTS // per_replica))


def _masks(nodes: list[tuple[int, int]], shape: tuple[int, int], device: torch.device) -> Tensor:
    """One-hot [len(nodes), pos, d_sae + 1] masks of (position, index) nodes."""
    mask = torch.zeros(len(nodes), *shape, dtype=torch.bool, device=device)
    if nodes:
        idx = torch.tensor(nodes, device=device)
        mask[torch.arange(len(nodes), device=device), idx[:, 0], idx[:, 1]] = True
    return mask


def _where(mask: Tensor, new: Nodes, old: Nodes, reps: int, batch: int) -> Nodes:
    """Node values for `reps` replicas of the examples: from `new` where mask[k] ([pos, d_sae + 1], or
    [1, d_sae + 1] for every position) is set, else from `old`. Values are per replica ([reps * batch, ...]),
    per example ([batch, ...]) or shared ([1, ...])."""

    def split(t: Tensor) -> Tensor:
        return t.view(reps, batch, *t.shape[1:]) if t.shape[0] == reps * batch else t[None]

    mask = mask[:, None]
    f = torch.where(mask[..., :-1], split(new.f), split(old.f))
    err = torch.where(mask[..., -1:], split(new.err), split(old.err))
    return Nodes(f.flatten(0, 1), err.flatten(0, 1))


@torch.no_grad()
def exact_patching(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    baseline: Baseline = "patch",
    aggregation: Aggregation = "none",
    chunk: int = 64,
    progress: bool = True,
) -> dict[str, Tensor]:
    """Exact effects `mean_examples(m(node at baseline) - m(clean))`, one node at a time (for checking).

    Only nodes that the baseline moves are run (the others have no effect); returns per hook point
    [pos, d_sae + 1], or [1, d_sae + 1] with `sum` (the latent patched at every position at once)."""
    order = _check_saes(model, saes)
    clean = clean_states(model, saes, task.tokens)
    base = baseline_states(model, saes, task, baseline, clean)
    m_clean = task.metric(_output(model, task.tokens, {}))
    out = {}
    for hook in order:
        moved = torch.cat(
            [(clean[hook].f != base[hook].f), (clean[hook].err != base[hook].err).any(-1, keepdim=True)], -1
        )
        moved = moved.any(0)
        if aggregation == "sum":
            moved = moved.any(0, keepdim=True)
        nodes = moved.nonzero().tolist()
        effects = torch.zeros(moved.shape, device=moved.device)
        for group in tqdm(
            list(_chunks(nodes, _fit(chunk, task, saes))), desc=f"exact patching {hook}", disable=not progress
        ):
            mask = _masks(group, tuple(moved.shape), moved.device)
            values = _where(mask, base[hook], clean[hook], len(group), len(task.tokens))
            m = _metric_total(model, task, {hook: _set_nodes(saes[hook], values)}, reps=len(group))
            delta = (m.view(len(group), -1) - m_clean).mean(1)
            idx = torch.tensor(group, device=moved.device)
            effects[idx[:, 0], idx[:, 1]] = delta
        out[hook] = effects
    return out


# ------------------------------------------------------------------------------------------------- edges


def edge_effects(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    effects: NodeEffects,
    up: str,
    down: str,
    up_nodes: list[tuple[int, int]],
    down_nodes: list[tuple[int, int]],
    aggregation: Aggregation = "none",
    steps: int = 1,
    chunk: int = 32,
) -> Tensor:
    """Edge weights [len(down_nodes), len(up_nodes)] from nodes (position, index) at hook `up` to nodes at the
    next SAE hook `down`: mean over examples of `grad_d . (d d / d u) . delta_u`, with `grad_d` the metric's
    gradient from `effects`.

    The Jacobian is taken with `up`'s nodes as inputs and `down`'s nodes as outputs, so only paths that avoid
    other SAE hook points count (give consecutive hook points). With `steps` 1 it is taken at the clean input;
    with more, averaged over that many points on the line from clean to baseline of `up`'s nodes (as
    integrated gradients are), which sees through saturated attention. With `sum` aggregation a node is a
    latent at every position (position 0 in the lists)."""
    clean, delta, grad = effects.clean[up], effects.deltas[up], effects.grads[down]
    shape = tuple(aggregate(effects.effects[down], aggregation).shape)
    up_idx = torch.tensor(up_nodes, device=task.tokens.device).reshape(-1, 2)
    alphas = [0.0] if steps == 1 else [(i + 0.5) / steps for i in range(steps)]
    rows = []
    for group in _chunks(down_nodes, _fit(chunk, task, saes)):
        reps = len(group)
        mask = _masks(group, shape, task.tokens.device)[:, None]
        weights = torch.zeros(reps, *aggregate(effects.effects[up], aggregation).shape, device=mask.device)
        for alpha in alphas:
            leaves = _with_grad(clean.lerp(delta, alpha).tile(reps))
            read: list[Tensor] = []

            def read_down(x: Tensor) -> Tensor:
                nodes = _encode(saes[down], x)
                f = nodes.f.view(reps, -1, *nodes.f.shape[1:]) * grad.f
                err = (nodes.err.view(reps, -1, *nodes.err.shape[1:]) * grad.err).sum(-1, keepdim=True)
                read.append((torch.cat([f, err], -1) * mask).sum())
                return x

            _output(model, task.tokens.repeat(reps, 1), {up: _set_nodes(saes[up], leaves), down: read_down})
            gf, ge = torch.autograd.grad(read[0], [leaves.f, leaves.err])
            contrib = Nodes(gf.view(reps, -1, *gf.shape[1:]), ge.view(reps, -1, *ge.shape[1:])).dot(delta).mean(1)
            weights += (contrib.sum(1, keepdim=True) if aggregation == "sum" else contrib) / len(alphas)
        rows.append(weights[:, up_idx[:, 0], up_idx[:, 1]])
    return torch.cat(rows) if rows else torch.zeros(0, len(up_nodes), device=task.tokens.device)


# -------------------------------------------------------------------------------------------- faithfulness


@torch.no_grad()
def faithfulness_curve(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    ranking: list[NodeKey],
    sizes: list[int],
    aggregation: Aggregation = "none",
    chunk: int = 16,
) -> dict[str, Any]:
    """Faithfulness and completeness of the first n nodes of `ranking`, for each n in `sizes`.

    Every node outside the circuit C is set to its mean over the examples (per position) while C's nodes run
    normally: faithfulness = (m(C) - m(empty)) / (m(M) - m(empty)), with M the whole model and `empty` every
    node ablated. Completeness ablates C's own nodes and keeps the rest: (m(M without C) - m(empty)) / (...).
    Returns lists `n`, `faithfulness`, `completeness` and the numbers `metric_full`, `metric_empty` (means over
    the examples)."""
    hooks = _check_saes(model, saes)
    clean = clean_states(model, saes, task.tokens)
    means = {h: _mean(s) for h, s in clean.items()}
    batch = len(task.tokens)
    shapes = {h: (1 if aggregation == "sum" else s.f.shape[1], s.f.shape[2] + 1) for h, s in clean.items()}
    m_full = float(task.metric(_output(model, task.tokens, {})).mean())

    def keep_first(n: int) -> dict[str, Tensor]:
        keep = {h: torch.zeros(shapes[h], dtype=torch.bool, device=task.tokens.device) for h in hooks}
        for hook, p, i in ranking[:n]:
            keep[hook][p, i] = True
        return keep

    def run(keeps: list[dict[str, Tensor]]) -> list[float]:
        values: list[float] = []
        for group in _chunks(keeps, _fit(chunk, task, saes)):
            masks = {h: torch.stack([k[h] for k in group]) for h in hooks}

            def ablate(hook: str) -> Callable[[Tensor], Tensor]:
                def edit(x: Tensor) -> Tensor:
                    nodes = _where(masks[hook], _encode(saes[hook], x), means[hook], len(group), batch)
                    return saes[hook].decode(nodes.f) + nodes.err

                return edit

            m = _metric_total(model, task, {h: ablate(h) for h in hooks}, len(group))
            values += m.view(len(group), -1).mean(1).tolist()
        return values

    kept = [keep_first(n) for n in sizes]
    m_empty, *m_circuit = run([keep_first(0)] + kept)
    m_without = run([{h: ~k[h] for h in hooks} for k in kept])
    scale = m_full - m_empty
    if abs(scale) < 1e-6 * max(1.0, abs(m_full)):
        raise CircuitError(
            "mean-ablating every node leaves the metric unchanged, so faithfulness is undefined; "
            "choose a metric that these hook points matter for"
        )
    return {
        "n": list(sizes),
        "faithfulness": [(m - m_empty) / scale for m in m_circuit],
        "completeness": [(m - m_empty) / scale for m in m_without],
        "metric_full": m_full,
        "metric_empty": m_empty,
    }


# ------------------------------------------------------------------------------------------------ circuits


@dataclass
class Node:
    """A latent (`latent` its index) or an error node (`latent` "err") of the SAE at `hook`, at `position`
    (None when aggregated over positions), with its effect on the metric (mean over examples)."""

    hook: str
    latent: int | Literal["err"]
    position: int | None
    effect: float

    @property
    def key(self) -> str:
        where = "" if self.position is None else f"@{self.position}"
        return f"{self.hook}/{self.latent}{where}"


@dataclass
class Edge:
    """An edge from node `src` to node `dst` (their keys) at the next SAE hook point, with its weight."""

    src: str
    dst: str
    weight: float


@dataclass
class Circuit:
    """A sparse feature circuit: its `nodes` (strongest first) and `edges`; the SAE `hooks` in model order and
    each one's SAE folder (`saes`); `labels`, the first example's token at each position; `curves`
    (faithfulness and completeness by node count, see `faithfulness_curve`); `metric`, its mean over the
    examples for the whole model (`clean`), everything mean-ablated (`empty`) and the patch input (`patch`);
    `config`, the CircuitConfig it was made with (when made by `run_circuit`)."""

    name: str
    hooks: list[str]
    saes: dict[str, str]
    labels: list[str]
    nodes: list[Node]
    edges: list[Edge]
    curves: dict[str, Any]
    metric: dict[str, float]
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """A few lines for the terminal: size, metric values, the faithfulness curve."""
        metric = ", ".join(f"{k} {v:.4g}" for k, v in self.metric.items())
        curve = ", ".join(f"{n}: {f:.2f}" for n, f in zip(self.curves["n"], self.curves["faithfulness"]))
        return (
            f"circuit {self.name}: {len(self.nodes)} nodes, {len(self.edges)} edges over {', '.join(self.hooks)}\n"
            f"metric: {metric}\nfaithfulness by node count: {curve}"
        )

    def save(self, path: str | Path) -> Path:
        """Write the circuit as JSON."""
        return write_json(path, asdict(self))

    @staticmethod
    def load(path: str | Path) -> Circuit:
        """Read a circuit written by `save`."""
        return read_json(path, _circuit, CircuitError, "circuit", "saelab circuit CONFIG.yaml")


def _circuit(data: dict) -> Circuit:
    return Circuit(
        **(data | {"nodes": [Node(**n) for n in data["nodes"]], "edges": [Edge(**e) for e in data["edges"]]})
    )


def _default_sizes(n_nodes: int) -> list[int]:
    sizes = [2**i for i in range(int(math.log2(max(n_nodes, 1))) + 1)]
    return sorted({0, *sizes, n_nodes})


def find_circuit(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    method: Method = "ig",
    ig_steps: int = 10,
    baseline: Baseline = "patch",
    aggregation: Aggregation = "none",
    node_threshold: float = 0.05,
    edge_threshold: float = 0.02,
    max_nodes: int = 100,
    curve_sizes: list[int] | None = None,
    name: str = "circuit",
    sae_paths: dict[str, str] | None = None,
    progress: bool = True,
) -> Circuit:
    """Node effects, the nodes with |effect| >= `node_threshold` (at most `max_nodes`), the edges between them
    with |weight| >= `edge_threshold`, and faithfulness/completeness curves over nodes ranked by |effect|."""
    order = _check_saes(model, saes)
    effects = node_effects(model, saes, task, method, ig_steps, baseline, progress)
    agg = {h: aggregate(effects.effects[h], aggregation) for h in order}
    ranking, strength = _ranking(agg, order)
    circuit = ranking[: min(max_nodes, int((strength >= node_threshold).sum()))]

    def node(key: NodeKey) -> Node:
        hook, p, i = key
        latent = "err" if i == saes[hook].cfg.d_sae else i
        return Node(hook, latent, None if aggregation == "sum" else p, float(agg[hook][p, i]))

    edges = []
    for up, down in tqdm(list(zip(order, order[1:])), desc="edges", disable=not progress):
        ups = [(p, i) for h, p, i in circuit if h == up]
        downs = [(p, i) for h, p, i in circuit if h == down]
        if not ups or not downs:
            continue
        weights = edge_effects(
            model, saes, task, effects, up, down, ups, downs, aggregation, ig_steps if method == "ig" else 1
        )
        for d, u in (weights.abs() >= edge_threshold).nonzero().tolist():
            edges.append(Edge(node((up, *ups[u])).key, node((down, *downs[d])).key, float(weights[d, u])))
    sizes = curve_sizes if curve_sizes is not None else _default_sizes(len(ranking))
    curves = faithfulness_curve(model, saes, task, ranking, sizes, aggregation)
    metric = {"clean": curves.pop("metric_full"), "empty": curves.pop("metric_empty")}
    if task.patch is not None:
        with torch.no_grad():
            metric["patch"] = float(task.metric(_output(model, task.patch, {})).mean())
    paths = sae_paths or {}
    return Circuit(
        name,
        order,
        {h: paths.get(h, "") for h in order},
        task.labels,
        [node(k) for k in circuit],
        edges,
        curves,
        metric,
    )


def _ranking(agg: dict[str, Tensor], order: list[str]) -> tuple[list[NodeKey], Tensor]:
    """The nodes with a nonzero effect by |effect| descending, and their |effect|s."""
    values = torch.cat([agg[h].abs().flatten() for h in order])
    ranked = values.argsort(descending=True, stable=True)
    ranked = ranked[values[ranked] > 0]
    ends = torch.tensor([agg[h].numel() for h in order], device=values.device).cumsum(0)
    hooks = torch.bucketize(ranked, ends, right=True)
    local = ranked - torch.cat([ends.new_zeros(1), ends])[hooks]
    widths = torch.tensor([agg[h].shape[1] for h in order], device=values.device)[hooks]
    keys = [(order[h], p, i) for h, p, i in zip(hooks.tolist(), (local // widths).tolist(), (local % widths).tolist())]
    return keys, values[ranked]


# ---------------------------------------------------------------------------------------------- configs


class InductionData(StrictModel):
    """The builtin induction task (`induction_task`): `examples` sequences BOS + R + R, read at `position`."""

    task: Literal["induction"] = "induction"
    examples: int = Field(8, ge=2)
    length: int = Field(10, ge=2)
    position: int | None = None
    seed: int = 0


class PromptData(StrictModel):
    """Prompts given inline (`prompts`) or as a JSON-lines file of the same fields (`file`)."""

    task: Literal["prompts"] = "prompts"
    prompts: list[Prompt] = []
    file: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PromptData:
        if bool(self.prompts) == bool(self.file):
            raise ValueError("give either `prompts` (a list) or `file` (a .jsonl of prompts), not both or neither")
        if self.file and not Path(self.file).is_file():
            raise ValueError(f"no prompts file {self.file!r}; give an existing .jsonl file")
        return self

    def load(self) -> list[Prompt]:
        if not self.file:
            return self.prompts
        prompts = []
        for number, line in enumerate(Path(self.file).read_text().splitlines(), 1):
            try:
                prompts += [Prompt(**json.loads(line))] if line.strip() else []
            except (ValueError, TypeError) as err:
                raise CircuitError(
                    f"{self.file} line {number} is not a prompt ({err}); each line must be a JSON "
                    "object with clean, and optionally patch, target, distractor, position"
                ) from None
        return prompts


class CircuitConfig(StrictModel):
    """What `saelab circuit` computes: a circuit of `saes` ({hook point: SAE folder}) in `model` for a task,
    written to `<out>/circuits/<name>.json`."""

    name: str = Field("circuit", pattern=r"^[\w.-]+$")
    out: str
    model: str
    saes: dict[str, str]
    data: Union[InductionData, PromptData] = Field(discriminator="task")
    metric: Literal["logit", "logit_diff", "loss", "similarity"] = "logit"
    method: Method = "ig"
    ig_steps: int = Field(10, ge=1)
    baseline: Baseline = "patch"
    aggregation: Aggregation = "none"
    node_threshold: float = Field(0.05, ge=0)
    edge_threshold: float = Field(0.02, ge=0)
    max_nodes: int = Field(100, ge=1)
    curve_sizes: list[int] | None = None
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> CircuitConfig:
        if not self.saes:
            raise ValueError(
                "give at least one SAE: saes: {blocks.0.attn.hook_z: RUN/saes/blocks.0.attn.hook_z/VARIANT}"
            )
        missing = [p for p in self.saes.values() if not Path(p).is_dir()]
        if missing:
            raise ValueError(f"no SAE folder {missing}; give folders with cfg.json and sae_weights.safetensors")
        if isinstance(self.data, InductionData) and self.metric not in ("logit", "loss"):
            raise ValueError(f"the induction task scores a target token: use metric logit or loss, not {self.metric!r}")
        return self


def run_circuit(cfg: CircuitConfig, progress: bool = True) -> tuple[Circuit, Path]:
    """Load the model and SAEs, find the circuit, write it to `<out>/circuits/<name>.json`."""
    model = load_model(cfg.model, device=cfg.device)
    device = device_of(model)
    saes = {h: SAE.load(p, device=device).eval() for h, p in cfg.saes.items()}
    if isinstance(cfg.data, InductionData):
        task = induction_task(model, cfg.data.examples, cfg.data.length, cfg.data.position, cfg.data.seed, cfg.metric)
    else:
        task = prompt_task(model, cfg.data.load(), cfg.metric)
    circuit = find_circuit(
        model,
        saes,
        task,
        cfg.method,
        cfg.ig_steps,
        cfg.baseline,
        cfg.aggregation,
        cfg.node_threshold,
        cfg.edge_threshold,
        cfg.max_nodes,
        cfg.curve_sizes,
        cfg.name,
        {h: str(Path(p).resolve()) for h, p in cfg.saes.items()},
        progress,
    )
    circuit.config = cfg.model_dump(mode="json")
    return circuit, circuit.save(Path(cfg.out) / CIRCUITS_DIR / f"{cfg.name}.json")
