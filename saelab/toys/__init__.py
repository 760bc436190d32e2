"""Models and data with known answers, for the tests, the notebooks and the docs (never used by the analyses):

- `saelab.toys.induction`: a two-layer attention-only decoder that does induction (its circuit is known) and
  `induction_run`, a whole run over it;
- `saelab.toys.ioi`: an indirect-object-identification toy whose trained heads are named (S2-finder, name mover) next
  to frozen random distractor heads, with positive and negative prompts of one length;
- `saelab.toys.synthetic`: activations built from a known overcomplete dictionary (`make_synthetic`) and how
  much of it an SAE recovers;
- `saelab.toys.planted`: activations with a planted feature hierarchy, for feature absorption;
- `saelab.toys.hedging`: parent/child features that a too-narrow SAE hedges (`parent_child`);
- `saelab.toys.attributes`: tasks with known attributes for the supervised-dictionary eval (planted attributes and a
  linear readout; the induction model's head output).
"""

from __future__ import annotations

from saelab.toys.induction import (
    ALPHABET,
    ARCHITECTURE,
    BOS,
    INDUCTION_HOOKS,
    TARGET_ACCURACY,
    char_decoder,
    harvest_and_train,
    induction_accuracy,
    induction_run,
    induction_texts,
    induction_tokenizer,
    train_induction_model,
)
from saelab.toys.planted import Planted, planted_absorption, planted_probe_data
from saelab.toys.synthetic import TINY_DECODER, SyntheticData, decoder_config, make_synthetic, max_cosines, recovery

__all__ = [
    "ALPHABET",
    "ARCHITECTURE",
    "BOS",
    "INDUCTION_HOOKS",
    "TARGET_ACCURACY",
    "TINY_DECODER",
    "char_decoder",
    "decoder_config",
    "harvest_and_train",
    "Planted",
    "SyntheticData",
    "induction_accuracy",
    "induction_run",
    "induction_texts",
    "induction_tokenizer",
    "make_synthetic",
    "max_cosines",
    "planted_absorption",
    "planted_probe_data",
    "recovery",
    "train_induction_model",
]
