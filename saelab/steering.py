"""Steering: edit a model's activations along SAE latents at any hook point, and measure what changes.

An `Intervention` acts on one hook point with one SAE. Its modes, for activations `h` and the latent's
decoder row `v` (`u = v / |v|`), with `c = coefficient * scale`:

- `add`: `h + c v` (or `h + c * code @ W_dec` for a whole sparse code, e.g. one found by `optimise_code`);
- `clamp`: the latent set to `c` with the SAE's error kept, `h - dec(f) + dec(f')` (`f = enc(h)`);
- `orthogonal`: `h` with its component on `u` set to `c |v|` (0: directional ablation);
- `cap`: the component on `u` capped at `c |v|` from above;
- `ablate`: the listed latents set to 0 with the error kept, `h - dec(f) + dec(f')`.

`scale` is the latent's typical max activation (`typical_max_act`: the feature analysis's `max_act`, else
measured), so coefficients read "times its usual strongest firing". `scope` picks the positions edited:
`prompt`, `generated` (positions at or after the prompt's length), `all`, or a list of positions. Hooks
track absolute positions, so generation with TransformerLens's KV cache (`use_past_kv_cache=True`, where a
pass sees only the newest position) is steered exactly as generation without it.

Decoders: `generate`, `compare` (steered and unsteered side by side) and `sweep` over coefficients (the
target latent's activation, KL from the unsteered next-token distribution, the unsteered model's perplexity
on the steered text). Encoders: `embed` (mean-pooled output, as sentence-transformers' all-MiniLM-L6-v2),
`search` over a corpus before and after steering the query. Both: `optimise_code`, a sparse code found by
gradient descent toward target examples, to be injected with mode `add`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor
from tqdm.auto import tqdm

from saelab.config import StrictModel, TextConfig
from saelab.errors import SteeringError
from saelab.models import Model, device_of, flatten_heads, forward_to, is_encoder, resolve_hooks
from saelab.resultfile import write_json
from saelab.sae import SAE
from saelab.text import SpecialTokens

Mode = Literal["add", "clamp", "orthogonal", "cap", "ablate"]
Scope = Union[Literal["prompt", "generated", "all"], list[int]]
MODES: tuple[str, ...] = ("add", "clamp", "orthogonal", "cap", "ablate")
STEERING_DIR = "steering"
EMBEDDING = "embedding"  # the hook name of an encoder's pooled sentence embedding (for SAEs trained on embeddings)


# ---------------------------------------------------------------------------------------- interventions


@dataclass
class Intervention:
    """An edit at `hook` along latents of `sae` (see the module docstring for the modes).

    `latents`: one latent for add, clamp, orthogonal and cap; any number for ablate. `code` ([d_sae]) replaces
    the latent for `add`: the decoded code is added. Coefficient times `scale` is in activation units."""

    hook: str
    sae: SAE
    latents: list[int] = field(default_factory=list)
    mode: Mode = "add"
    coefficient: float = 0.0
    scale: float = 1.0
    scope: Scope = "all"
    code: Tensor | None = None

    @property
    def value(self) -> float:
        """The coefficient in activation units."""
        return self.coefficient * self.scale

    def edit(self, h: Tensor, mask: Tensor) -> Tensor:
        """`h` [batch, pos, d_in] edited at the positions where `mask` [pos] is set."""
        W = self.sae.W_dec.to(h.dtype)
        if self.mode == "add":
            v = self.code.to(h) @ W if self.code is not None else W[self.latents[0]]
            out = h + self.value * v
        elif self.mode in ("clamp", "ablate"):
            f = self.sae.encode(h)
            g = f.clone()
            g[..., self.latents] = self.value if self.mode == "clamp" else 0.0
            out = h - self.sae.decode(f) + self.sae.decode(g)
        else:
            v = W[self.latents[0]]
            u = v / v.norm()
            along = h @ u
            target = self.value * v.norm()
            shift = target - along if self.mode == "orthogonal" else (target - along).clamp_max(0)
            out = h + shift[..., None] * u
        return torch.where(mask[None, :, None], out, h)

    def positions(self, pos: Tensor, prompt_length: float) -> Tensor:
        """Which of the absolute positions `pos` are in scope."""
        if self.scope == "all":
            return torch.ones_like(pos, dtype=torch.bool)
        if self.scope == "prompt":
            return pos < prompt_length
        if self.scope == "generated":
            return pos >= prompt_length
        return torch.isin(pos, torch.tensor(self.scope, device=pos.device))


def check_interventions(model: Model, interventions: Sequence[Intervention], embedding: bool = False) -> None:
    """Refuse interventions that cannot apply to `model`, naming the fix. `embedding`: they act on an encoder's
    sentence embedding (hook `EMBEDDING`) rather than at its hook points."""
    if embedding and not is_encoder(model):
        raise SteeringError(f"hook {EMBEDDING!r} is an encoder's sentence embedding; this model is a decoder")
    names = sorted({iv.hook for iv in interventions})
    if not embedding and EMBEDDING in names:
        raise SteeringError(
            f"hook {EMBEDDING!r} is the pooled sentence embedding, not a hook point: steer it with embed or search"
        )
    widths = {EMBEDDING: model.cfg.d_model} if embedding else {p.name: p.d for p in resolve_hooks(model, names)}
    for iv in interventions:
        cfg = iv.sae.cfg
        if cfg.d_in != widths[iv.hook]:
            raise SteeringError(
                f"the SAE reads d_in={cfg.d_in}, but {iv.hook} has width {widths[iv.hook]}; "
                f"give an SAE trained on this model's {iv.hook}"
            )
        if iv.mode not in MODES:
            raise SteeringError(f"unknown steering mode {iv.mode!r}; use one of {', '.join(MODES)}")
        bad = [i for i in iv.latents if not 0 <= i < cfg.d_sae]
        if bad:
            raise SteeringError(f"latent {bad[0]} does not exist: the SAE has latents 0 to {cfg.d_sae - 1}")
        if iv.code is not None:
            if iv.mode != "add" or iv.code.shape != (cfg.d_sae,):
                raise SteeringError(
                    f"a code is added (mode add) and has shape [{cfg.d_sae}]; got mode {iv.mode!r} "
                    f"and shape {list(iv.code.shape)}"
                )
        elif iv.mode != "ablate" and len(iv.latents) != 1:
            raise SteeringError(
                f"mode {iv.mode!r} steers exactly one latent (got {len(iv.latents)}); "
                "give one, or use mode ablate for several"
            )
        if not math.isfinite(iv.value):
            raise SteeringError(f"coefficient {iv.coefficient} x scale {iv.scale} is not a finite number")
        if iv.scope == "generated" and is_encoder(model):
            raise SteeringError("an encoder generates no tokens; use scope all (or prompt) to steer it")
        if not isinstance(iv.scope, list) and iv.scope not in ("prompt", "generated", "all"):
            raise SteeringError(f"unknown scope {iv.scope!r}; use prompt, generated, all, or a list of positions")


class _Positions:
    """Absolute positions of the activations a hook point sees, across the passes of one generation.

    A pass over one position after an earlier pass continues it (KV-cached generation feeds only the newest
    token); a pass over several positions starts at position 0 (a prompt, or uncached generation)."""

    def __init__(self) -> None:
        self.seen = 0

    def next(self, n: int, device: torch.device) -> Tensor:
        start = self.seen if n == 1 and self.seen > 0 else 0
        self.seen = start + n
        return torch.arange(start, start + n, device=device)


@contextmanager
def steer(
    model: Model,
    interventions: Sequence[Intervention],
    prompt_length: float = math.inf,
    read: Callable[[str, Tensor, Tensor], None] | None = None,
) -> Iterator[None]:
    """Run `model` with the interventions inside the block. Positions before `prompt_length` are the prompt.

    `read(hook, h, positions)` sees every steered hook point's activation after the edits. Use a new block per
    generation or forward pass: positions are counted from the block's start."""
    check_interventions(model, interventions)
    by_hook: dict[str, list[Intervention]] = {}
    for iv in interventions:
        by_hook.setdefault(iv.hook, []).append(iv)

    def make(hook_name: str, ivs: list[Intervention]) -> Callable[..., Tensor]:
        tracker = _Positions()

        def hook(act: Tensor, hook: Any) -> Tensor:
            h = flatten_heads(act).float()
            pos = tracker.next(h.shape[1], h.device)
            for iv in ivs:
                mask = iv.positions(pos, prompt_length)
                if bool(mask.any()):
                    h = iv.edit(h, mask)
            if read is not None:
                read(hook_name, h, pos)
            return h.to(act.dtype).reshape(act.shape)

        return hook

    with model.hooks(fwd_hooks=[(h, make(h, ivs)) for h, ivs in by_hook.items()]):
        yield


# ---------------------------------------------------------------------------------------------- scales


def typical_max_act(
    sae: SAE, latent: int, max_act: np.ndarray | None = None, acts: Tensor | None = None
) -> tuple[float, str]:
    """The latent's typical max activation and where it came from: the analysis's `max_act` [d_sae] when given,
    else measured on `acts` [n, d_in]. A latent that never fired gets the median over latents that did."""
    if max_act is None:
        if acts is None:
            raise SteeringError("give the feature analysis's max_act or activations to measure the latent's scale on")
        with torch.no_grad():
            max_act = (
                np.concatenate([sae.encode(chunk.float()).amax(0).cpu().numpy() for chunk in acts.split(4096)])
                .reshape(-1, sae.cfg.d_sae)
                .max(0)
            )
        source = "measured"
    else:
        source = "analysis"
    if not 0 <= latent < len(max_act):
        raise SteeringError(f"latent {latent} does not exist: the SAE has latents 0 to {len(max_act) - 1}")
    if max_act[latent] > 0:
        return float(max_act[latent]), source
    live = max_act[max_act > 0]
    if not len(live):
        raise SteeringError("no latent of this SAE fired on the activations given; measure on other text")
    return float(np.median(live)), f"{source}: median of live latents (latent {latent} never fired)"


# ------------------------------------------------------------------------------------------------ decoders


def prompt_tokens(model: Model, prompt: str) -> Tensor:
    """`prompt` as model input [1, n], framed as the harvest frames contexts: BOS + its tokens for decoders,
    [CLS] + its tokens + [SEP] for encoders."""
    if not prompt.strip():
        raise SteeringError("the prompt is empty: give some text to continue")
    special = SpecialTokens.for_tokenizer(model.tokenizer, is_encoder(model))
    ids = special.frame(model.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    return torch.tensor([ids], device=device_of(model))


def _decoder_only(model: Model) -> None:
    if is_encoder(model):
        raise SteeringError("this is an encoder: it generates no text; steer its embeddings with `search`")


@torch.no_grad()
def generate(
    model: Model,
    prompt: str | Tensor,
    interventions: Sequence[Intervention] = (),
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
    use_past_kv_cache: bool = True,
) -> Tensor:
    """The prompt's tokens [1, n] followed by `max_new_tokens` generated with the interventions (greedy at
    temperature 0, else sampled with `seed`)."""
    _decoder_only(model)
    tokens = prompt_tokens(model, prompt) if isinstance(prompt, str) else prompt
    if tokens.shape[1] + max_new_tokens > model.cfg.n_ctx:
        raise SteeringError(
            f"{tokens.shape[1]} prompt tokens + {max_new_tokens} new ones exceed the model's context "
            f"of {model.cfg.n_ctx}; shorten the prompt or generate fewer tokens"
        )
    torch.manual_seed(seed)
    with steer(model, interventions, tokens.shape[1]):
        return model.generate(
            tokens,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=max(temperature, 1e-6),
            use_past_kv_cache=use_past_kv_cache,
            stop_at_eos=False,
            verbose=False,
            return_type="tokens",
        )


def continuation(model: Model, tokens: Tensor, prompt_length: int) -> str:
    """The generated part of `tokens` [1, n] as text, up to the first end-of-text token."""
    ids = tokens[0, prompt_length:].tolist()
    eos = model.tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return model.tokenizer.decode(ids)


@dataclass
class Comparison:
    """A prompt continued without and with steering."""

    prompt: str
    unsteered: str
    steered: str


def compare(
    model: Model,
    prompt: str,
    interventions: Sequence[Intervention],
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
) -> Comparison:
    """Steered and unsteered continuations of `prompt`, from the same seed."""
    n = prompt_tokens(model, prompt).shape[1]
    texts = [
        continuation(model, generate(model, prompt, ivs, max_new_tokens, temperature, seed), n)
        for ivs in ((), interventions)
    ]
    return Comparison(prompt, *texts)


def hook_acts(model: Model, tokens: Tensor, hook: str, mask: Tensor | None = None) -> Tensor:
    """The unsteered activations [batch, pos, d] at `hook` (flattened over heads; the pass stops there)."""
    resolve_hooks(model, [hook])
    with torch.no_grad():
        return forward_to(model, tokens, hook, mask).float()


@torch.no_grad()
def steered_metrics(model: Model, tokens: Tensor, prompt_length: int, intervention: Intervention) -> dict[str, float]:
    """For a steered text `tokens` [1, n] whose first `prompt_length` tokens are the prompt, with the model run
    on it steered and unsteered: `kl`, the mean KL(unsteered || steered) of the next-token distributions that
    chose the generated tokens; `perplexity`, the unsteered model's on the generated tokens; for a latent's
    intervention, its mean activation over the generated tokens at its hook after the edit (`latent_act`) and
    when the unsteered model reads the text (`latent_act_text`)."""
    if tokens.shape[1] <= prompt_length:
        raise SteeringError("the text has no generated tokens to measure; generate at least one")
    edited: list[Tensor] = []
    with steer(model, [intervention], prompt_length, read=lambda hook, h, pos: edited.append(h)):
        steered = model(tokens, return_type="logits")[0].float().log_softmax(-1)
    unsteered = model(tokens, return_type="logits")[0].float().log_softmax(-1)
    rows = slice(prompt_length - 1, tokens.shape[1] - 1)
    p, q = unsteered[rows], steered[rows]
    kl = (p.exp() * (p - q)).sum(-1).mean()
    nll = -p.gather(-1, tokens[0, prompt_length:, None]).mean()
    out = {"kl": float(kl), "perplexity": float(nll.exp())}
    if intervention.latents:
        latent, sae = intervention.latents[0], intervention.sae
        natural = hook_acts(model, tokens, intervention.hook)
        out |= {
            "latent_act": float(sae.encode(edited[0][0, prompt_length:])[:, latent].mean()),
            "latent_act_text": float(sae.encode(natural[0, prompt_length:])[:, latent].mean()),
        }
    return out


def sweep(
    model: Model,
    intervention: Intervention,
    coefficients: Sequence[float],
    prompts: Sequence[str],
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """For each coefficient, each prompt steered by `intervention` at that coefficient: its continuation and
    `steered_metrics` (mean over prompts in `mean`)."""
    _decoder_only(model)
    if not prompts:
        raise SteeringError("no prompts: give at least one prompt to continue")
    rows = []
    with tqdm(total=len(coefficients) * len(prompts), desc="steering sweep", disable=not progress) as bar:
        for c in coefficients:
            iv = replace(intervention, coefficient=float(c))
            per_prompt = []
            for i, prompt in enumerate(prompts):
                n = prompt_tokens(model, prompt).shape[1]
                tokens = generate(model, prompt, [iv], max_new_tokens, temperature, seed + i)
                per_prompt.append(
                    {"prompt": prompt, "text": continuation(model, tokens, n)} | steered_metrics(model, tokens, n, iv)
                )
                bar.update()
            keys = [k for k in per_prompt[0] if k not in ("prompt", "text")]
            rows.append(
                {
                    "coefficient": float(c),
                    "value": iv.value,
                    "mean": {k: float(np.mean([r[k] for r in per_prompt])) for k in keys},
                    "prompts": per_prompt,
                }
            )
    return rows


# ------------------------------------------------------------------------------------------------ encoders


def _encode_texts(model: Model, texts: Sequence[str], max_length: int) -> list[list[int]]:
    special = SpecialTokens.for_tokenizer(model.tokenizer, is_encoder(model))
    room = min(max_length, model.cfg.n_ctx) - len(special.prefix) - len(special.suffix)
    ids = model.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [special.frame(t[:room]) for t in ids]


def _padded(
    model: Model, texts: Sequence[str], batch_size: int, max_length: int
) -> Iterator[tuple[list[int], Tensor, Tensor]]:
    """Batches of texts of similar length: their indices, tokens [batch, pos] and attention mask (1: a real token)."""
    ids = _encode_texts(model, texts, max_length)
    device = device_of(model)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(ids[i]) for i in idx)
        tokens = torch.tensor([ids[i] + [0] * (width - len(ids[i])) for i in idx], device=device)
        mask = torch.tensor([[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in idx], device=device)
        yield idx, tokens, mask


def _pool(hidden: Tensor, mask: Tensor) -> Tensor:
    m = mask[..., None].to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


def embed(
    model: Model,
    texts: Sequence[str],
    interventions: Sequence[Intervention] = (),
    batch_size: int = 64,
    max_length: int = 256,
    grad: bool = False,
    progress: bool = False,
) -> Tensor:
    """Sentence embeddings [len(texts), d_model]: the last layer's output mean-pooled over each text's tokens
    ([CLS] and [SEP] included) and L2-normalised, as sentence-transformers computes all-MiniLM-L6-v2's.

    Interventions at hook points act inside the model; those at `EMBEDDING` act on the (normalised) sentence
    embedding itself, which is normalised again after the edit. `grad` keeps the graph (for `optimise_code`)."""
    if not is_encoder(model):
        raise SteeringError("sentence embeddings come from an encoder (e.g. minilm); this model is a decoder")
    inside = [iv for iv in interventions if iv.hook != EMBEDDING]
    outside = [iv for iv in interventions if iv.hook == EMBEDDING]
    check_interventions(model, outside, embedding=True)
    order, rows = [], []
    with torch.set_grad_enabled(grad):
        for idx, tokens, mask in tqdm(
            list(_padded(model, texts, batch_size, max_length)), desc="embed", disable=not progress
        ):
            with steer(model, inside):
                last = forward_to(model, tokens, f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", mask)
                e = torch.nn.functional.normalize(_pool(last.float(), mask), dim=-1)
            rows.append(edit_embedding(e, outside))
            order += idx
        return torch.cat(rows)[torch.tensor(order, device=rows[0].device).argsort()]


def edit_embedding(e: Tensor, interventions: Sequence[Intervention]) -> Tensor:
    """Sentence embeddings [n, d] edited by interventions at `EMBEDDING`, normalised again."""
    for iv in interventions:
        e = torch.nn.functional.normalize(iv.edit(e[:, None], e.new_ones(1, dtype=torch.bool))[:, 0], dim=-1)
    return e


@torch.no_grad()
def doc_latent_acts(
    model: Model, sae: SAE, hook: str, texts: Sequence[str], batch_size: int = 64, max_length: int = 256
) -> Tensor:
    """Every latent's activation on each text [len(texts), d_sae]: on its sentence embedding for `EMBEDDING`, else
    the mean over its tokens at `hook` (unsteered)."""
    if hook == EMBEDDING:
        return sae.encode(embed(model, texts, batch_size=batch_size, max_length=max_length)).cpu()
    out = torch.zeros(len(texts), sae.cfg.d_sae)
    for idx, tokens, mask in _padded(model, texts, batch_size, max_length):
        out[idx] = _pool(sae.encode(hook_acts(model, tokens, hook, mask)), mask).cpu()
    return out


@dataclass
class SearchResult:
    """A query's nearest documents (index into the corpus, cosine similarity), best first, without and with
    steering the query's embedding."""

    query: str
    before: list[tuple[int, float]]
    after: list[tuple[int, float]]

    @property
    def entered(self) -> list[int]:
        """Documents among the neighbours after steering that were not before."""
        was = {i for i, _ in self.before}
        return [i for i, _ in self.after if i not in was]

    @property
    def left(self) -> list[int]:
        """Documents that steering removed from the neighbours."""
        now = {i for i, _ in self.after}
        return [i for i, _ in self.before if i not in now]


@torch.no_grad()
def search(
    model: Model, query: str, corpus: Tensor, interventions: Sequence[Intervention], k: int = 10
) -> SearchResult:
    """The `k` documents of `corpus` (their `embed`dings [n, d]) nearest to `query`, before and after steering
    the query's embedding with the interventions (the corpus stays unsteered)."""
    if not query.strip():
        raise SteeringError("the query is empty: type some text to search for")
    if not 1 <= k <= len(corpus):
        raise SteeringError(f"k={k} neighbours asked of a corpus of {len(corpus)} documents; use 1 to {len(corpus)}")
    plain = embed(model, [query])
    if all(iv.hook == EMBEDDING for iv in interventions):
        check_interventions(model, interventions, embedding=True)
        steered = edit_embedding(plain, interventions)
    else:
        steered = embed(model, [query], interventions)
    found = []
    for e in (plain, steered):
        top = (corpus.float() @ e[0]).topk(k)
        found.append([(int(i), float(s)) for i, s in zip(top.indices, top.values)])
    return SearchResult(query, *found)


# ---------------------------------------------------------------------------------------- optimised codes


def optimise_code(
    model: Model,
    sae: SAE,
    hook: str,
    targets: Sequence[str],
    query: str | None = None,
    steps: int = 60,
    lr: float = 0.05,
    l1: float = 1e-3,
    keep: int | None = None,
    progress: bool = False,
) -> tuple[Tensor, list[float]]:
    """A sparse code z >= 0 ([d_sae]) whose decoded vector `z @ W_dec`, added at every position of `hook`, steers
    the model toward the target examples: projected Adam (z kept >= 0) on the loss below plus `l1 * |z|_1`, from
    z = 0, then cut to its `keep` largest entries (default: the SAE's k). Returns the code and each step's loss.

    Encoders: `1 - cos(embed(query steered), mean target embedding)`. Decoders: the mean next-token loss of the
    target texts with the code added (the query is unused). Inject the code with
    `Intervention(hook, sae, mode="add", code=z, coefficient=1)`."""
    if not targets:
        raise SteeringError("no target examples: give at least one text to steer toward")
    encoder = is_encoder(model)
    if encoder and not (query or "").strip():
        raise SteeringError("an encoder's code is optimised for a query: give the query text to steer")
    z = torch.zeros(sae.cfg.d_sae, device=sae.W_dec.device, requires_grad=True)
    opt = torch.optim.Adam([z], lr=lr)
    frozen = [p for p in model.parameters() if p.requires_grad] + [p for p in sae.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    if encoder:
        goal = torch.nn.functional.normalize(embed(model, targets).mean(0), dim=-1)
        plain = embed(model, [query])
    else:
        batch = [prompt_tokens(model, t) for t in targets]
    losses = []
    try:
        for _ in tqdm(range(steps), desc="optimise code", disable=not progress):
            iv = Intervention(hook, sae, [], "add", 1.0, code=z)
            if hook == EMBEDDING:
                loss = 1 - edit_embedding(plain, [iv])[0] @ goal
            elif encoder:
                loss = 1 - embed(model, [query], [iv], grad=True)[0] @ goal
            else:
                loss = sum(_steered_loss(model, tokens, iv) for tokens in batch) / len(batch)
            opt.zero_grad()
            (loss + l1 * z.sum()).backward()
            opt.step()
            with torch.no_grad():
                z.clamp_(min=0)
            losses.append(float(loss.detach()))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        cut = z.topk(min(keep or sae.cfg.k, sae.cfg.d_sae)).indices
        code = torch.zeros_like(z)
        code[cut] = z[cut]
    return code, losses


def _steered_loss(model: Model, tokens: Tensor, intervention: Intervention) -> Tensor:
    with steer(model, [intervention]):
        return model(tokens, return_type="loss")


# ------------------------------------------------------------------------------------------------ configs


class SteerConfig(StrictModel):
    """What `saelab steer` runs: one latent of the SAE in folder `sae` steered in the run's model (or `model`) at
    each of `coefficients` (in units of `scale`, default the latent's typical max activation), written to
    `<run>/steering/<name>.json`. Decoders continue `prompts`; encoders search the first `corpus_documents`
    documents of `corpus` for each of `queries`."""

    name: str = Field("steer", pattern=r"^[\w.-]+$")
    run: str
    model: str | None = None
    sae: str
    latent: int = Field(ge=0)
    mode: Mode = "add"
    coefficients: list[float] = [0.0, 1.0, 2.0, 4.0]
    scope: Scope = "all"
    scale: float | None = Field(None, gt=0)
    prompts: list[str] = []
    max_new_tokens: int = Field(20, ge=1)
    temperature: float = Field(0.0, ge=0)
    seed: int = 0
    queries: list[str] = []
    corpus: TextConfig = TextConfig()
    corpus_documents: int = Field(500, ge=1)
    k: int = Field(10, ge=1)
    device: str = "auto"

    @model_validator(mode="after")
    def _check(self) -> SteerConfig:
        if not Path(self.run).is_dir():
            raise ValueError(f"no run directory {self.run!r}; give the folder that holds activations.zarr and saes/")
        if not (Path(self.sae) / "cfg.json").is_file():
            raise ValueError(f"no SAE in {self.sae!r}; give a folder with cfg.json and sae_weights.safetensors")
        if not self.coefficients:
            raise ValueError("give at least one coefficient, e.g. coefficients: [0, 2, 4]")
        return self


def sae_hook(path: str | Path, sae: SAE) -> str:
    """The hook point an SAE reads: its config's `hook_name`, else its folder's parent (RUN/saes/<hook>/<variant>)."""
    return sae.cfg.hook_name or Path(path).resolve().parent.name


def run_scale(
    run: str | Path, sae_path: str | Path, sae: SAE, latent: int, hook: str, embeddings: Tensor | None = None
) -> tuple[float, str]:
    """`typical_max_act` for a run's SAE: the run's feature analysis when it has one, else measured on (up to 16k
    rows of) the run's activations at `hook`, or on `embeddings` for an SAE of sentence embeddings."""
    analysis = Path(run) / "analysis" / hook / f"{Path(sae_path).name}.zarr"
    if analysis.is_dir():
        from saelab.analysis import FeatureStore

        return typical_max_act(sae, latent, FeatureStore.open(analysis).group["max_act"][:])
    store_path = Path(run) / "activations.zarr"
    if store_path.is_dir():
        from saelab.store import ActivationStore

        store = ActivationStore.open(str(store_path))
        if hook in store.hooks:
            return typical_max_act(sae, latent, acts=store.activations(hook, slice(0, min(store.n_tokens, 16384))))
    if embeddings is not None:
        return typical_max_act(sae, latent, acts=embeddings)
    raise SteeringError(
        f"cannot tell latent {latent}'s typical activation: {run} has neither a feature analysis of "
        f"this SAE nor activations at {hook}; set `scale` in the config"
    )


def run_steering(cfg: SteerConfig, progress: bool = True) -> tuple[dict[str, Any], Path]:
    """Load the model and SAE, steer at every coefficient, write `<run>/steering/<name>.json`; return it and its path."""
    from saelab.models import load_model
    from saelab.store import ActivationStore
    from saelab.text import iter_documents

    spec = cfg.model
    if spec is None:
        store_path = Path(cfg.run) / "activations.zarr"
        spec = ActivationStore.open(str(store_path)).config.get("model") if store_path.is_dir() else None
        if not spec:
            raise SteeringError(f"{cfg.run} does not record its model (no harvested activations.zarr); set `model`")
    model = load_model(spec, device=cfg.device)
    device = device_of(model)
    sae = SAE.load(cfg.sae, device=device).eval()
    hook = sae_hook(cfg.sae, sae)
    if not 0 <= cfg.latent < sae.cfg.d_sae:
        raise SteeringError(f"latent {cfg.latent} does not exist: the SAE has latents 0 to {sae.cfg.d_sae - 1}")
    result: dict[str, Any] = {"config": cfg.model_dump(mode="json"), "hook": hook}
    if is_encoder(model):
        if not cfg.queries:
            raise SteeringError("this model is an encoder: give `queries` to search the corpus with")
        docs = list(itertools.islice(iter_documents(cfg.corpus), cfg.corpus_documents))
        if len(docs) < cfg.k:
            raise SteeringError(f"the corpus has {len(docs)} documents, fewer than k={cfg.k}; give more or lower k")
        corpus = embed(model, docs, progress=progress)
        scale, source = (
            (cfg.scale, "config") if cfg.scale else run_scale(cfg.run, cfg.sae, sae, cfg.latent, hook, corpus)
        )
        fires = doc_latent_acts(model, sae, hook, docs)[:, cfg.latent]
        rows = []
        for c in tqdm(cfg.coefficients, desc="steered search", disable=not progress):
            iv = Intervention(hook, sae, [cfg.latent], cfg.mode, c, scale, cfg.scope)
            found = [search(model, q, corpus, [iv], cfg.k) for q in cfg.queries]
            rows.append(
                {
                    "coefficient": c,
                    "value": iv.value,
                    "queries": [
                        {
                            "query": r.query,
                            "before": r.before,
                            "after": r.after,
                            "entered": r.entered,
                            "left": r.left,
                            "latent_act_before": float(fires[[i for i, _ in r.before]].mean()),
                            "latent_act_after": float(fires[[i for i, _ in r.after]].mean()),
                        }
                        for r in found
                    ],
                }
            )
        result |= {
            "kind": "search",
            "scale": scale,
            "scale_source": source,
            "rows": rows,
            "documents": {str(i): docs[i] for row in rows for q in row["queries"] for i, _ in q["before"] + q["after"]},
        }
    else:
        if not cfg.prompts:
            raise SteeringError("this model is a decoder: give `prompts` to continue")
        scale, source = (cfg.scale, "config") if cfg.scale else run_scale(cfg.run, cfg.sae, sae, cfg.latent, hook)
        iv = Intervention(hook, sae, [cfg.latent], cfg.mode, 0.0, scale, cfg.scope)
        unsteered = [
            continuation(
                model,
                generate(model, p, (), cfg.max_new_tokens, cfg.temperature, cfg.seed + i),
                prompt_tokens(model, p).shape[1],
            )
            for i, p in enumerate(cfg.prompts)
        ]
        rows = sweep(model, iv, cfg.coefficients, cfg.prompts, cfg.max_new_tokens, cfg.temperature, cfg.seed, progress)
        result |= {"kind": "generation", "scale": scale, "scale_source": source, "unsteered": unsteered, "rows": rows}
    return result, write_json(Path(cfg.run) / STEERING_DIR / f"{cfg.name}.json", result)


def summary(result: dict[str, Any]) -> str:
    """A few lines for the terminal: one per coefficient."""
    cfg = result["config"]
    lines = [
        f"steering latent {cfg['latent']} of {result['hook']} ({cfg['mode']}, scope {cfg['scope']}), "
        f"scale {result['scale']:.4g} ({result['scale_source']})"
    ]
    for row in result["rows"]:
        if result["kind"] == "generation":
            m = row["mean"]
            extra = (
                f", latent act {m['latent_act']:.3g}, on the text {m['latent_act_text']:.3g}"
                if "latent_act" in m
                else ""
            )
            lines.append(
                f"coefficient {row['coefficient']:g}: KL {m['kl']:.4g}, perplexity {m['perplexity']:.4g}{extra}"
                f" | {row['prompts'][0]['text']!r}"
            )
        else:
            before = np.mean([q["latent_act_before"] for q in row["queries"]])
            after = np.mean([q["latent_act_after"] for q in row["queries"]])
            moved = np.mean([len(q["entered"]) for q in row["queries"]])
            lines.append(
                f"coefficient {row['coefficient']:g}: {moved:.1f} new neighbours per query; latent's mean "
                f"activation on the neighbours {before:.3g} -> {after:.3g}"
            )
    return "\n".join(lines)
