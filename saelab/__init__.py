"""saelab: a mechanistic-interpretability workbench built on sparse dictionaries.

The stable public API: the pipeline (harvest, import, train) and the entry point of every analysis. Each stage
also has its own package (`saelab.dictionaries`, `saelab.train`, `saelab.analysis`, `saelab.absorption`,
`saelab.circuits`, `saelab.heads`, `saelab.steering`, `saelab.evals`) with the rest of its API.
"""

from __future__ import annotations

__version__ = "0.1.0"

from saelab.absorption import AbsorptionConfig, AbsorptionResult, run_absorption
from saelab.analysis import AnalysisConfig, FeatureStore, analyze
from saelab.circuits import Circuit, CircuitConfig, find_circuit, run_circuit
from saelab.config import HarvestConfig, TextConfig, load_config
from saelab.dictionaries import SAE, SAEConfig, train_step
from saelab.errors import SaelabError
from saelab.evals.run_evals import EvalSettings, run_evals
from saelab.harvest import harvest
from saelab.heads import CompositionScores, composition_scores, direct_feature_attribution
from saelab.importer import import_arrays
from saelab.models import hook_points, load_model, save_model
from saelab.run import RunDir
from saelab.steering import Intervention, SteerConfig, SteeringResult, run_steering
from saelab.store import ActivationStore
from saelab.train import TrainConfig, TrainedSAE, train

__all__ = [
    "AbsorptionConfig",
    "AbsorptionResult",
    "ActivationStore",
    "AnalysisConfig",
    "Circuit",
    "CircuitConfig",
    "CompositionScores",
    "EvalSettings",
    "FeatureStore",
    "HarvestConfig",
    "Intervention",
    "RunDir",
    "SAE",
    "SAEConfig",
    "SaelabError",
    "SteerConfig",
    "SteeringResult",
    "TextConfig",
    "TrainConfig",
    "TrainedSAE",
    "analyze",
    "composition_scores",
    "direct_feature_attribution",
    "find_circuit",
    "harvest",
    "hook_points",
    "import_arrays",
    "load_config",
    "load_model",
    "run_absorption",
    "run_circuit",
    "run_evals",
    "run_steering",
    "save_model",
    "train",
    "train_step",
]
