"""Training: configuration, the pure train step, the Trainer shell and its services."""

from .checkpoint import Checkpointer
from .config import (
    AdamaxConfig,
    AdamConfig,
    CheckpointerConfig,
    LogManagerConfig,
    LogWriterConfig,
    LRSchedulerConfig,
    OptimizerConfig,
    SGDConfig,
    TrainerConfig,
)
from .log_manager import LogManager
from .step import TrainState, make_optimizer, train_step
from .trainer import Trainer
from .writers import LogWriter, MetricWriter, TensorBoardWriter

__all__ = [
    "Checkpointer",
    "AdamConfig",
    "AdamaxConfig",
    "CheckpointerConfig",
    "LRSchedulerConfig",
    "LogManager",
    "LogManagerConfig",
    "LogWriter",
    "LogWriterConfig",
    "MetricWriter",
    "OptimizerConfig",
    "SGDConfig",
    "TensorBoardWriter",
    "TrainState",
    "Trainer",
    "TrainerConfig",
    "make_optimizer",
    "train_step",
]
