"""saelab: a mechanistic-interpretability workbench built on sparse autoencoders."""

__version__ = "0.1.0"

from saelab.config import HarvestConfig, TextConfig, load_config  # noqa: E402
from saelab.harvest import harvest  # noqa: E402
from saelab.importer import import_arrays  # noqa: E402
from saelab.models import hook_points, load_model, save_model  # noqa: E402
from saelab.sae import SAE, SAEConfig, train_step  # noqa: E402
from saelab.store import ActivationStore  # noqa: E402
from saelab.train import TrainConfig, train  # noqa: E402

__all__ = [
    "ActivationStore",
    "HarvestConfig",
    "SAE",
    "SAEConfig",
    "TextConfig",
    "TrainConfig",
    "harvest",
    "hook_points",
    "import_arrays",
    "load_config",
    "load_model",
    "save_model",
    "train",
    "train_step",
]
