"""Head circuits from discrete codes (O'Neill & Bui 2024, "Sparse Autoencoders Enable Scalable and Reliable Circuit
Identification in Language Models"), against per-head activation patching, both timed.

It follows the paper's code (github.com/charlieoneill11/sae-circuits: `data/data_utils.py` `prompt_to_resid_stream`,
`src/sae.py`, `src/train.py`, `src/node.py` `unique_to_positives_and_negatives`, the settings of
`experiments/main_results.py`): every head's output written into the residual stream (`hook_z @ W_O`, TransformerLens's
`stack_head_results`), averaged over the positions of a prompt (or taken at its last), for positive prompts (the
model can do the task) and negative ones (the same tokens but one, so it cannot); one ReLU SAE with unit-norm
encoder and decoder directions and a tied input bias, shared by all heads (each head's vector is one example), trained
full-batch with an L1 penalty on a few prompts' heads; each head output's code is the SAE's most active latent (the
argmax: the paper's discretisation); and a head's score is how many codes it takes on positive prompts and never on
negative ones (optionally over all the codes it takes). Heads with at least `threshold` of the top score are the
circuit. The unit norms are kept by normalising the weights in the forward pass, where the reference projects the
gradient and renormalises.

Beyond the paper, each head's score gets a p-value against chance (`chance_p_values`): a permutation test that swaps
the labels of positive/negative pairs. A head takes positive-only codes by chance when its codes follow the prompt
(which names, which tokens) more than the task; a small p-value says its codes follow the contrast.

The baseline patches each head's `hook_z` from the negative prompt into the positive one (all heads in one batched
pass) and records how much the task metric drops; `head_circuit` reports both rankings, their runtimes and their
agreement (Pearson and Spearman correlation of the scores with the drops).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from saelab.absorption.probes import single_thread
from saelab.circuits.agreement import agreement
from saelab.circuits.tasks import MetricName, Prompt, Task, prompt_task
from saelab.errors import HeadsError
from saelab.heads.composition import Head
from saelab.models import tokenizer_of
from saelab.resultfile import JsonResult, read_json
from saelab.text import SpecialTokens


@dataclass
class DiscreteConfig:
    """How `discrete_scores` trains its SAE and reads the codes (defaults: the paper's `main_results.py`)."""

    n_codes: int = 200
    """Latents of the SAE: the number of codes a head output can take."""
    steps: int = 500
    """Full-batch Adam steps."""
    lr: float = 1e-3
    """Adam's learning rate."""
    l1: float = 0.02
    """Weight of the L1 penalty on the latents (the paper's 0.02 for IOI and greater-than)."""
    train_prompts: int = 10
    """Prompts, drawn at random from the positive and negative ones together, whose head outputs train the SAE."""
    position: Literal["mean", "last"] = "mean"
    """Which head output of a prompt is coded: the mean over its positions or the last position's."""
    normalise: bool = False
    """Score a head by its positive-only codes over all the codes it takes, not by their count."""
    threshold: float = 0.5
    """Heads scoring at least this fraction of the top score make the circuit."""
    seed: int = 0
    """Seeds the SAE's initialisation and the draw of its training prompts (and of `permutations`)."""
    permutations: int = 1000
    """Label swaps of the permutation test (`chance_p_values`) that gives each head's score a p-value against
    chance; 0 skips it."""

    def __post_init__(self) -> None:
        if self.n_codes < 2 or self.steps < 1 or self.train_prompts < 1 or self.permutations < 0:
            raise HeadsError(
                f"n_codes must be >= 2, steps and train_prompts >= 1 and permutations >= 0 (got {self.n_codes}, "
                f"{self.steps}, {self.train_prompts}, {self.permutations})"
            )
        if not 0 < self.threshold <= 1:
            raise HeadsError(f"threshold is a fraction of the top score in (0, 1], not {self.threshold}")


def check_lengths(positive: Tensor, negative: Tensor) -> None:
    """`HeadsError` unless the positive and negative prompts are token ids of one shape `[n, pos]`."""
    if positive.ndim != 2 or negative.ndim != 2:
        raise HeadsError(
            f"give prompts as token ids [n, pos], not shapes {list(positive.shape)}, {list(negative.shape)}"
        )
    if positive.shape[1] != negative.shape[1]:
        raise HeadsError(
            f"positive prompts are {positive.shape[1]} tokens long and negative ones {negative.shape[1]}; the codes "
            "and the patching compare heads position by position, so make every negative prompt the same length as "
            "its positive one (the same template with the one token that breaks the task changed)"
        )
    if positive.shape[0] != negative.shape[0]:
        raise HeadsError(
            f"{positive.shape[0]} positive prompts but {negative.shape[0]} negative ones; give one negative prompt "
            "for each positive one"
        )


def head_outputs(model: HookedTransformer, tokens: Tensor, position: Literal["mean", "last"] = "mean") -> Tensor:
    """Every head's output written into the residual stream, `hook_z @ W_O`, averaged over the positions of each
    prompt or at its last one: `[n, n_layers * n_heads, d_model]`, layer-major, on the CPU (where the small SAE
    trains)."""
    hooks = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=hooks)
        per_layer = []
        for layer, hook in enumerate(hooks):
            z = cache[hook]  # [n, pos, head, d_head]
            z = z.mean(1) if position == "mean" else z[:, -1]
            per_layer.append(torch.einsum("nhd,hdm->nhm", z, model.blocks[layer].attn.W_O))
    return torch.cat(per_layer, 1).float().cpu()


def _unit(w: Tensor) -> Tensor:
    return torch.nn.functional.normalize(w, dim=-1)


def train_codes(x: Tensor, config: DiscreteConfig) -> Tensor:
    """The paper's SAE over the head outputs `x` [n, heads, d] (trained on `config.train_prompts` of the n prompts,
    all heads) and every head output's code, its most active latent: `[n, heads]`."""
    g = torch.Generator().manual_seed(config.seed)
    d, m = x.shape[-1], config.n_codes
    w_enc = torch.randn(m, d, generator=g).requires_grad_()
    bound = 1 / d**0.5
    b_enc = (torch.rand(m, generator=g) * 2 * bound - bound).requires_grad_()
    w_dec = torch.randn(d, m, generator=g).requires_grad_()
    bias = torch.zeros(d, requires_grad=True)  # tied pre-encoder / post-decoder bias, zero (no geometric median)
    train = x[torch.randperm(len(x), generator=g)[: config.train_prompts]]

    def encode(v: Tensor) -> Tensor:
        return torch.relu((v - bias) @ _unit(w_enc).T + b_enc)

    opt = torch.optim.Adam([w_enc, b_enc, w_dec, bias], lr=config.lr)
    with single_thread():  # tiny products: a second thread only waits
        for _ in range(config.steps):
            acts = encode(train)
            recon = acts @ _unit(w_dec).T + bias
            l1 = acts.flatten(0, 1).norm(p=1, dim=-1).mean()
            loss = torch.nn.functional.mse_loss(recon, train) + config.l1 * l1
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return encode(x).argmax(-1)


def _presence(codes: Tensor, n_codes: int) -> Tensor:
    """Whether each head takes each code: `codes [..., n, heads]` -> `[..., heads, n_codes]` booleans."""
    taken = torch.zeros(*codes.shape[:-2], codes.shape[-1], n_codes, dtype=torch.bool)
    return taken.scatter_(-1, codes.transpose(-1, -2), True)


def positive_only(codes: Tensor, n_positive: int, *, normalise: bool = False) -> Tensor:
    """Each head's count of codes taken on the positive prompts (the first `n_positive` rows of `codes`
    `[..., n, heads]`) and never on the negative ones, or that count over all the codes it takes (`normalise`): the
    paper's `unique_to_positives_and_negatives`, `[..., heads]`."""
    n_codes = int(codes.max()) + 1
    positive = _presence(codes[..., :n_positive, :], n_codes)
    negative = _presence(codes[..., n_positive:, :], n_codes)
    only = (positive & ~negative).sum(-1).float()
    return only / (positive | negative).sum(-1) if normalise else only


def chance_p_values(
    codes: Tensor, n_positive: int, *, permutations: int = 1000, normalise: bool = False, seed: int = 0
) -> Tensor:
    """For each head, how often its `positive_only` score is matched by chance: a permutation test of the null
    hypothesis that a head's code on a positive prompt and on its negative are exchangeable. Each permutation swaps
    the labels of every (positive, negative) pair with probability 1/2 (the rows of `codes` `[2 n, heads]` are the
    positive prompts, then their negatives in the same order); the p-value is `(1 + #{permuted score >= score}) /
    (1 + permutations)`, `[heads]`. This test is saelab's, not the paper's: a head whose positive-only codes are
    no more than chance takes many codes, but not because of the task."""
    if codes.shape[0] != 2 * n_positive:
        raise HeadsError(f"codes of {n_positive} positive prompts need {2 * n_positive} rows, not {codes.shape[0]}")
    score = positive_only(codes, n_positive, normalise=normalise)
    pairs = codes.view(2, n_positive, codes.shape[1])
    g = torch.Generator().manual_seed(seed)
    reached = torch.zeros_like(score)
    for start in range(0, permutations, 100):  # chunks bound the memory at [100, 2 n, heads] codes
        swap = torch.rand(min(100, permutations - start), n_positive, 1, generator=g) < 0.5
        positive = torch.where(swap, pairs[1], pairs[0])
        negative = torch.where(swap, pairs[0], pairs[1])
        permuted = positive_only(torch.cat([positive, negative], 1), n_positive, normalise=normalise)
        reached += (permuted >= score).sum(0)
    return (1 + reached) / (1 + permutations)


class DiscreteScores(NamedTuple):
    """The discrete-code score of every head and its p-value against chance, both `[n_layers * n_heads]`."""

    scores: Tensor
    """Positive-only codes of each head (`positive_only`)."""
    p_values: Tensor
    """`chance_p_values` of the scores (empty when `DiscreteConfig.permutations` is 0)."""


def discrete_scores(
    model: HookedTransformer, positive: Tensor, negative: Tensor, config: DiscreteConfig | None = None
) -> DiscreteScores:
    """The discrete-code score of every head (layer-major) from positive and negative prompts of the same length
    (`HeadsError` naming both lengths otherwise), with their p-values against chance."""
    config = config or DiscreteConfig()
    check_lengths(positive, negative)
    x = head_outputs(model, torch.cat([positive, negative]).to(model.cfg.device), config.position)
    with torch.random.fork_rng():
        codes = train_codes(x, config)
    scores = positive_only(codes, len(positive), normalise=config.normalise)
    p_values = (
        chance_p_values(
            codes, len(positive), permutations=config.permutations, normalise=config.normalise, seed=config.seed
        )
        if config.permutations
        else torch.zeros(0)
    )
    return DiscreteScores(scores, p_values)


def patching_effects(model: HookedTransformer, task: Task) -> Tensor:
    """How much the task metric drops, averaged over its examples, when one head's `hook_z` is patched from the
    negative prompt (`task.patch`) into the positive one (`task.tokens`), for every head `[n_layers * n_heads]`
    (layer-major), in one batched pass."""
    if task.patch is None:
        raise HeadsError("activation patching needs negative prompts: give the task a patch input")
    check_lengths(task.tokens, task.patch)
    n, n_heads = len(task.tokens), model.cfg.n_heads
    heads = model.cfg.n_layers * n_heads
    hooks = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        clean = task.metric(model(task.tokens)).float()
        _, cache = model.run_with_cache(task.patch, names_filter=hooks)

        def patch(z: Tensor, hook: Any) -> Tensor:
            layer = int(hook.name.split(".")[1])
            for head in range(n_heads):
                block = slice((layer * n_heads + head) * n, (layer * n_heads + head + 1) * n)
                z[block, :, head] = cache[hook.name][:, :, head]
            return z

        patched = model.run_with_hooks(task.tokens.repeat(heads, 1), fwd_hooks=[(h, patch) for h in hooks])
        drops = clean.repeat(heads) - task.metric(patched).float()
    return drops.reshape(heads, n).mean(1).cpu()


@dataclass
class HeadCircuit(JsonResult):
    """The heads of a task's circuit by discrete codes (`head_circuit`), next to activation patching."""

    what: ClassVar[str] = "head circuit"
    command: ClassVar[str] = "saelab heads CONFIG"
    error: ClassVar[type[Exception]] = HeadsError

    model: str
    """The model's `cfg.model_name`."""
    heads: list[str]
    """Every head's label (`L{layer}H{head}`), layer-major: the order of the scores."""
    scores: list[float]
    """The discrete-code score of each head (positive-only codes)."""
    effects: list[float]
    """The drop in the task metric when each head is patched from the negative prompts."""
    circuit: list[str]
    """The heads whose score is at least `threshold` of the top one, best first."""
    discrete_seconds: float
    """Wall time of the discrete-code method (head outputs, SAE, codes, scores)."""
    patching_seconds: float
    """Wall time of the patching baseline."""
    pearson: float
    """Pearson correlation of the scores with the patching drops (nan when either is constant)."""
    spearman: float
    """Spearman rank correlation of the same (nan when either is constant)."""
    n_prompts: int
    """Positive prompts (and as many negative ones)."""
    p_values: list[float] = field(default_factory=list)
    """Each head's p-value against chance (`chance_p_values`): how often swapping positive and negative labels
    scores as high (empty when not computed, or in a result from before saelab measured it)."""
    config: dict[str, Any] = field(default_factory=dict)
    """The `DiscreteConfig` (and, from `saelab heads CONFIG`, the whole config) that made it."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeadCircuit:
        """The result from its parsed JSON."""
        return cls(**data)

    @classmethod
    def load(cls, path: Any) -> HeadCircuit:
        """Read one written by `save`."""
        return read_json(path, cls.from_json, cls.error, what=cls.what, command=cls.command)

    def ranking(self) -> list[str]:
        """The heads by discrete-code score, best first (ties in head order)."""
        return [self.heads[i] for i in sorted(range(len(self.heads)), key=lambda i: -self.scores[i])]

    def patching_ranking(self) -> list[str]:
        """The heads by patching drop, largest first."""
        return [self.heads[i] for i in sorted(range(len(self.heads)), key=lambda i: -self.effects[i])]


def head_circuit(model: HookedTransformer, task: Task, config: DiscreteConfig | None = None) -> HeadCircuit:
    """The discrete-code scores of every head on the task's positive (`task.tokens`) and negative (`task.patch`)
    prompts and the patching drops of the same heads, each timed, with their agreement."""
    config = config or DiscreteConfig()
    if task.patch is None:
        raise HeadsError("the discrete-code method needs negative prompts: give every prompt a `patch` text")
    start = time.perf_counter()
    scores, p_values = discrete_scores(model, task.tokens, task.patch, config)
    discrete_seconds = time.perf_counter() - start
    start = time.perf_counter()
    effects = patching_effects(model, task)
    patching_seconds = time.perf_counter() - start
    labels = [Head(layer, h).label for layer in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    top = float(scores.max())
    chosen = sorted(
        (i for i in range(len(labels)) if top > 0 and scores[i] >= config.threshold * top), key=lambda i: -scores[i]
    )
    constant = bool(scores.std() == 0 or effects.std() == 0)  # then no correlation is defined
    pearson, spearman = (float("nan"), float("nan")) if constant else agreement(scores, effects)
    return HeadCircuit(
        model=model.cfg.model_name,
        heads=labels,
        scores=scores.tolist(),
        effects=effects.tolist(),
        circuit=[labels[i] for i in chosen],
        discrete_seconds=discrete_seconds,
        patching_seconds=patching_seconds,
        pearson=pearson,
        spearman=spearman,
        n_prompts=len(task.tokens),
        p_values=p_values.tolist(),
        config=asdict(config),
    )


def contrast_task(model: HookedTransformer, prompts: list[Prompt], metric: MetricName = "logit_diff") -> Task:
    """A task of positive prompts (`clean`) and their negatives (`patch`); `HeadsError` naming the prompt and both
    lengths when a negative prompt tokenizes to another length than its positive one."""
    tokenizer = tokenizer_of(model, HeadsError)
    special = SpecialTokens.for_tokenizer(tokenizer, False)
    for i, p in enumerate(prompts):
        if p.patch is None:
            raise HeadsError(f"prompt {i} ({p.clean!r}) has no negative prompt; give it a `patch` text")
        lengths = [len(special.frame(tokenizer(t, add_special_tokens=False)["input_ids"])) for t in (p.clean, p.patch)]
        if lengths[0] != lengths[1]:
            raise HeadsError(
                f"prompt {i}: the positive prompt {p.clean!r} tokenizes to {lengths[0]} tokens and its negative "
                f"{p.patch!r} to {lengths[1]}; make the negative prompt the same length (the same template with the "
                "one token that breaks the task changed)"
            )
    return prompt_task(model, prompts, metric)
