"""Where a training run's running metrics go besides the progress bar: TensorBoard or Weights & Biases."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from saelab.errors import ConfigError

TENSORBOARD = "tensorboard"


class TrainLogger(Protocol):
    """Records one scalar per SAE and metric at a point of training, counted in tokens."""

    def log(self, key: str, value: float, tokens: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger:
    """Event files in `folder/tensorboard/`."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("logger: tensorboard needs the tensorboard package; pip install tensorboard") from None
        self.writer = SummaryWriter(str(folder / TENSORBOARD))

    def log(self, key: str, value: float, tokens: int) -> None:
        self.writer.add_scalar(key, value, tokens)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run of project `saelab`, its files in `folder/wandb/`."""

    def __init__(self, folder: Path) -> None:
        try:
            import wandb  # pyright: ignore[reportMissingImports]  # optional; not installed by saelab
        except ImportError:
            raise ConfigError("logger: wandb needs the wandb package; pip install wandb") from None
        self.run = wandb.init(project="saelab", dir=str(folder))

    def log(self, key: str, value: float, tokens: int) -> None:
        self.run.log({key: value}, step=tokens)

    def close(self) -> None:
        self.run.finish()


def make_logger(kind: str, folder: Path) -> TrainLogger | None:
    """The logger `TrainConfig.logger` names (`none`: no logger), writing under `folder`."""
    if kind == "none":
        return None
    return TensorBoardLogger(folder) if kind == "tensorboard" else WandbLogger(folder)
