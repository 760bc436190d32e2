"""`optimise_code`: a sparse code found by gradient descent toward target examples, to inject with mode `add`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab.dictionaries import SAE
from saelab.errors import SteeringError
from saelab.models import Model, is_encoder
from saelab.steering.generation import prompt_tokens
from saelab.steering.interventions import EMBEDDING, Intervention, steer
from saelab.steering.search import edit_embedding, embed


def optimise_code(
    model: Model,
    sae: SAE,
    hook: str,
    *,
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
        plain = embed(model, [query or ""])
    else:
        batch = [prompt_tokens(model, t) for t in targets]
    losses = []
    try:
        for _ in tqdm(range(steps), desc="optimise code", disable=not progress):
            iv = Intervention(hook, sae, [], "add", 1.0, code=z)
            if hook == EMBEDDING:
                loss = 1 - edit_embedding(plain, [iv])[0] @ goal
            elif encoder:
                loss = 1 - embed(model, [query or ""], [iv], grad=True)[0] @ goal
            else:
                each = [_steered_loss(model, tokens, iv) for tokens in batch]
                loss = sum(each[1:], start=each[0]) / len(batch)
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
