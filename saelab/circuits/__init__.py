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
  mean-ablated; completeness ablates C itself. Both are measured on the examples the circuit was found on and on
  held-out ones, with bootstrap intervals and per-example ranges (`spread`); nodes that never fire on the clean
  examples are not circuit nodes.
- Group nodes (`groups`): latents grouped by head (direct feature attribution), by feature family, and positions
  by the task's roles, so that a circuit carries over to fresh examples; `agreement` compares the effect
  estimates with exact patching (Pearson and Spearman).

Modules: `tasks` (what a circuit explains: `Task`, metrics, `induction_task`, `prompt_task`), `splice`
(spliced forward passes, `Nodes`, clean and baseline states), `nodes` (node effects, `exact_patching`),
`edges`, `faithfulness`, `graph` (`Node`, `Edge`, `Circuit`, `find_circuit`) and `config` (`CircuitConfig`,
`run_circuit`).

A model with a known circuit lives in `saelab.toys.induction` (`train_induction_model`, `induction_run`):
for the `induction_task` its circuit is a previous-token latent feeding an induction latent. Its names are
still importable from here for this release (`from saelab.circuits import induction_run`), through a lazy
module `__getattr__`, so that this package never imports the toys (they import it).
"""

from __future__ import annotations

import importlib
from typing import Any

from saelab.circuits.agreement import Agreement, effect_agreement, estimate_agreement
from saelab.circuits.config import CircuitConfig, InductionData, PromptData, run_circuit, sae_folders
from saelab.circuits.edges import edge_effects
from saelab.circuits.faithfulness import Curves, Faithfulness, faithfulness_curve
from saelab.circuits.graph import Circuit, Edge, Node, find_circuit
from saelab.circuits.groups import GroupedCircuit, Grouping, GroupNode, grouped_circuit, grouping
from saelab.circuits.nodes import Aggregation, Method, NodeEffects, NodeKey, aggregate, exact_patching, node_effects
from saelab.circuits.splice import (
    CHUNK_ELEMENTS,
    Baseline,
    Nodes,
    baseline_states,
    clean_states,
    encode_nodes,
    spliced_output,
)
from saelab.circuits.spread import Spread, spread_curve
from saelab.circuits.tasks import (
    Metric,
    Prompt,
    Task,
    induction_task,
    prompt_task,
    repeated_tokens,
    similarity_metric,
    token_metric,
)
from saelab.errors import CircuitError

_encode = encode_nodes  # the flat module's names for these, kept for this release
_output = spliced_output

_TOYS = {
    "ALPHABET",
    "BOS",
    "INDUCTION_HOOKS",
    "induction_accuracy",
    "induction_run",
    "induction_texts",
    "induction_tokenizer",
    "train_induction_model",
}


def __getattr__(name: str) -> Any:
    """The induction toy's names (they moved to `saelab.toys.induction`), imported when first asked for."""
    if name not in _TOYS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module("saelab.toys.induction"), name)


__all__ = [
    "CHUNK_ELEMENTS",
    "Agreement",
    "Aggregation",
    "Baseline",
    "Circuit",
    "CircuitConfig",
    "CircuitError",
    "Curves",
    "Edge",
    "Faithfulness",
    "GroupNode",
    "GroupedCircuit",
    "Grouping",
    "InductionData",
    "Method",
    "Metric",
    "Node",
    "NodeEffects",
    "NodeKey",
    "Nodes",
    "Prompt",
    "PromptData",
    "Spread",
    "Task",
    "aggregate",
    "baseline_states",
    "clean_states",
    "edge_effects",
    "effect_agreement",
    "encode_nodes",
    "estimate_agreement",
    "exact_patching",
    "faithfulness_curve",
    "find_circuit",
    "grouped_circuit",
    "grouping",
    "induction_task",
    "node_effects",
    "prompt_task",
    "repeated_tokens",
    "run_circuit",
    "sae_folders",
    "similarity_metric",
    "spliced_output",
    "spread_curve",
    "token_metric",
]
