"""Group nodes: latents merged by the attention head they read (direct feature attribution onto heads,
`saelab.heads.dfa`) or by feature family (`saelab.evals.families`), and positions merged by the role the task
gives them (`Task.roles`: "current token", "after earlier occurrence", ...) or over the whole sequence.

Token-specific latents do not carry over to fresh examples: the latents that explain eight sequences are mostly
silent on the next sixty-four. A group of all the latents that one head writes at one position role does carry
over, so a circuit of groups can be checked on held-out examples. A group's effect is the sum of its nodes'
effects (for integrated gradients this is the group's own attribution along the same path, by IG's completeness),
and keeping or ablating a group keeps or ablates every node in it. Nodes that never fire on the clean examples
(a latent that is zero at that position in every example) are not circuit nodes: their clean value is their mean,
so ablating them changes nothing, and a patch baseline that moves them only measures the patch input. This follows
the per-head grouping of Kissane et al. (2024) (`hook_z` latents attributed to the head with most of their direct
feature attribution, as SAEDashboard's `DFACalculator` computes it) and Marks et al.'s sparse feature circuits
(`saelab.circuits`) for the effects and the mean ablation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from transformer_lens import HookedTransformer

from saelab.circuits.nodes import NodeEffects
from saelab.circuits.splice import Nodes, check_saes
from saelab.circuits.spread import Spread, check_held_out, default_sizes, spread_curve
from saelab.circuits.tasks import Task
from saelab.dictionaries import SAE
from saelab.errors import CircuitError
from saelab.evals.families import Families
from saelab.heads.dfa import HOOK_Z, direct_feature_attribution
from saelab.models import Model

LatentGroups = Literal["node", "head", "family"]
PositionGroups = Literal["position", "role", "all"]
ERR = "err"
"""The group of a hook point's error node (always a group of its own)."""


def fires(clean: dict[str, Nodes]) -> dict[str, Tensor]:
    """Per hook point `[pos, d_sae + 1]`: whether the node is nonzero on some clean example (error nodes: always,
    when the dictionary misses anything there)."""
    return {h: torch.cat([(s.f != 0).any(0), (s.err != 0).any(-1, keepdim=True).any(0)], -1) for h, s in clean.items()}


class Membership(NamedTuple):
    """Which nodes of one hook point fall in which group."""

    latents: Tensor
    """`[latent groups, d_sae + 1]` one-hot rows: the nodes of each latent group."""
    positions: Tensor
    """`[position groups, pos]` one-hot rows: the positions of each position group."""


@dataclass
class Grouping:
    """How the nodes of each hook point merge into group nodes: one latent group x one position group."""

    name: str
    """Its name, e.g. `head x role`."""
    latents: dict[str, list[str]]
    """Per hook point the group of each latent and, last, of the error node (`ERR`)."""
    positions: list[str]
    """The group of each position."""

    def names(self, hook: str) -> list[str]:
        """The latent groups of `hook`, in order of first appearance."""
        return list(dict.fromkeys(self.latents[hook]))

    def position_names(self) -> list[str]:
        """The position groups, in order of first appearance."""
        return list(dict.fromkeys(self.positions))

    def membership(self, hook: str, device: torch.device) -> Membership:
        """The one-hot membership matrices of `hook`'s nodes."""
        latents, positions = self.names(hook), self.position_names()
        lat = torch.tensor([latents.index(g) for g in self.latents[hook]], device=device)
        pos = torch.tensor([positions.index(g) for g in self.positions], device=device)
        return Membership(
            torch.nn.functional.one_hot(lat, len(latents)).T.float(),
            torch.nn.functional.one_hot(pos, len(positions)).T.float(),
        )


def _head_labels(model: Model, sae: SAE, hook: str, tokens: Tensor) -> list[str]:
    """`LxHy` for each latent: the head carrying most of its direct feature attribution where it fires on
    `tokens` (everywhere, for a latent that never fires)."""
    match = HOOK_Z.fullmatch(hook)
    assert match is not None
    if not isinstance(model, HookedTransformer):
        raise CircuitError(
            f"grouping latents by head reads attention patterns, which this {type(model).__name__} does not expose "
            "through TransformerLens hooks; load the model as a HookedTransformer, or group latents by 'node' or "
            "'family'"
        )
    attribution = direct_feature_attribution(model, sae, tokens, hook=hook)
    size = attribution.per_head.abs()  # [batch, pos, heads, latents]
    firing = (attribution.acts > 0)[:, :, None].float()
    score = (size * firing).sum((0, 1))
    score = torch.where((score > 0).any(0, keepdim=True), score, size.sum((0, 1)))
    return [f"L{match.group(1)}H{h}" for h in score.argmax(0).tolist()]


def _family_labels(sae: SAE, families: Families) -> list[str]:
    labels = [str(i) for i in range(sae.cfg.d_sae)]
    taken: set[int] = set()
    for family in families.families:  # largest first: a latent stays in the largest family that holds it
        for latent in [family.parent, *family.descendants]:
            if latent not in taken:
                labels[latent] = f"family {family.parent}"
                taken.add(latent)
    return labels


def grouping(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    *,
    latents: LatentGroups = "head",
    positions: PositionGroups = "position",
    families: dict[str, Families] | None = None,
) -> Grouping:
    """Group the nodes of `saes` on `task`: latents one by one (`node`), by the head their direct feature attribution
    on `task`'s clean examples falls on (`head`; dictionaries not on an `attn.hook_z` keep their latents one by one),
    or by the feature family holding them (`family`, from `families[hook]`; latents in no family stay alone); and
    positions one by one (`position`), by `task.roles` (`role`), or all together (`all`)."""
    order = check_saes(model, saes)
    n_pos = task.tokens.shape[1]
    if positions == "role":
        if len(task.roles) != n_pos:
            raise CircuitError(
                f"the task gives {len(task.roles)} position roles for {n_pos} positions; group positions by role only "
                "for a task that names every position's role (Task.roles, e.g. induction_task), or use 'position'"
            )
        position_labels = list(task.roles)
    else:
        position_labels = [str(p) for p in range(n_pos)] if positions == "position" else ["all"] * n_pos
    labels: dict[str, list[str]] = {}
    for hook in order:
        sae = saes[hook]
        if latents == "head" and HOOK_Z.fullmatch(hook):
            names = _head_labels(model, sae, hook, task.tokens)
        elif latents == "family":
            if families is None or hook not in families:
                raise CircuitError(
                    f"grouping by family needs the feature families of {hook}; pass families={{hook: "
                    "feature_families(...)}} (saelab.evals.families) for every hook point"
                )
            names = _family_labels(sae, families[hook])
        else:
            names = [str(i) for i in range(sae.cfg.d_sae)]
        labels[hook] = [*names, ERR]
    return Grouping(f"{latents} x {positions}", labels, position_labels)


@dataclass
class GroupNode:
    """A group of nodes of one hook point: one latent group at one position group."""

    hook: str
    """The hook point."""
    group: str
    """The latent group (`LxHy`, `family N`, a latent's index, or `err`)."""
    position: str
    """The position group (a position, a role, or `all`)."""
    effect: float
    """The sum of its nodes' effects (mean over examples)."""
    size: int
    """How many of its nodes fire on the clean examples."""

    @property
    def key(self) -> str:
        """`hook/group@position`."""
        return f"{self.hook}/{self.group}@{self.position}"


@dataclass
class GroupedCircuit:
    """A circuit of group nodes, with its faithfulness where it was found and on held-out examples."""

    grouping: str
    """The grouping's name (`Grouping.name`)."""
    nodes: list[GroupNode]
    """Its group nodes, strongest first."""
    found_on: Spread
    """Faithfulness and completeness on the examples it was found on, by number of group nodes kept."""
    held_out: Spread | None
    """The same on held-out examples (None when none were given)."""
    silent: int
    """Groups with a nonzero effect that never fire on the clean examples, left out."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GroupedCircuit:
        """The grouped circuit from its parsed JSON."""
        nodes = [GroupNode(**n) for n in data["nodes"]]
        return GroupedCircuit(data["grouping"], nodes, data["found_on"], data["held_out"], data["silent"])


def _group_masks(
    ranked: list[tuple[str, int, int]],
    sizes: list[int],
    members: dict[str, Membership],
    shapes: dict[str, tuple[int, int]],
) -> list[dict[str, Tensor]]:
    """The node masks `[pos, d_sae + 1]` of the first n ranked groups `(hook, position group, latent group)`."""
    masks = []
    for n in sizes:
        keep = {h: torch.zeros(shapes[h], device=members[h].latents.device) for h in members}
        for hook, pg, lg in ranked[:n]:
            keep[hook][pg, lg] = 1.0
        masks.append({h: (members[h].positions.T @ keep[h] @ members[h].latents) > 0 for h in members})
    return masks


def grouped_circuit(
    model: Model,
    saes: dict[str, SAE],
    task: Task,
    *,
    effects: NodeEffects,
    groups: Grouping,
    held_out: Task | None = None,
    node_threshold: float = 0.05,
    max_nodes: int = 32,
    curve_sizes: list[int] | None = None,
) -> GroupedCircuit:
    """The group nodes of `groups` that fire on `task`'s clean examples, by |summed effect| (from `effects`, as
    `node_effects` computes them on `task`); the circuit keeps those with |effect| >= `node_threshold`, at most
    `max_nodes`. Its faithfulness and completeness curves (at `curve_sizes`, by default the powers of two and the
    circuit's own size) are measured on `task` and on `held_out`, the same groups kept there."""
    order = check_saes(model, saes)
    if held_out is not None:
        check_held_out(task, held_out, per_position=True)
    device = task.tokens.device
    members = {h: groups.membership(h, device) for h in order}
    firing = fires(effects.clean)
    ranked: list[tuple[str, int, int]] = []
    values: list[float] = []
    counts: dict[tuple[str, int, int], int] = {}
    silent = 0
    for hook in order:
        m = members[hook]
        effect = torch.einsum("bpn,gp,ln->gl", effects.effects[hook].float(), m.positions, m.latents) / len(task.tokens)
        live = m.positions @ firing[hook].float() @ m.latents.T
        silent += int(((live == 0) & (effect != 0)).sum())
        for pg, lg in ((live > 0) & (effect != 0)).nonzero().tolist():
            ranked.append((hook, pg, lg))
            values.append(float(effect[pg, lg]))
            counts[(hook, pg, lg)] = int(live[pg, lg])
    order_idx = sorted(range(len(ranked)), key=lambda k: -abs(values[k]))
    ranked, values = [ranked[k] for k in order_idx], [values[k] for k in order_idx]
    kept = min(max_nodes, sum(abs(v) >= node_threshold for v in values))
    sizes = sorted(set(curve_sizes if curve_sizes is not None else default_sizes(len(ranked))) | {kept})
    shapes = {h: (members[h].positions.shape[0], members[h].latents.shape[0]) for h in order}
    masks = _group_masks(ranked, sizes, members, shapes)
    found = spread_curve(model, saes, task, keeps=masks, sizes=sizes)
    other = None if held_out is None else spread_curve(model, saes, held_out, keeps=masks, sizes=sizes)
    positions = groups.position_names()
    nodes = [
        GroupNode(h, groups.names(h)[lg], positions[pg], v, counts[(h, pg, lg)])
        for (h, pg, lg), v in zip(ranked[:kept], values[:kept])
    ]
    return GroupedCircuit(groups.name, nodes, found, other, silent)
