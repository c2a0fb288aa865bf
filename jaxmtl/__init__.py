"""jaxmtl: Snorkel's multi-task classification workflow in JAX (Flax modules, optax).

DictDataset -> Tasks of Operations over a shared module pool -> MultitaskClassifier ->
Trainer -> score/predict.

The API comes in layers (``jaxmtl.core``'s docstring describes them):

- ``jaxmtl``: Snorkel's ``snorkel.classification`` surface plus scoring (below, first
  group of ``__all__``);
- ``jaxmtl.core``: the pure functions and ``TrainState`` for a hand-written JAX loop;
- ``jaxmtl.balancers``: ``Balancer`` and ``make_balancer`` (multi-task gradient balancing);
- ``jaxmtl.training``: the Trainer's services; ``jaxmtl.registry``: every setting's choices.

The core names are also importable from here (``jaxmtl.train_step`` ...), as before; their
documented home is ``jaxmtl.core``.
"""

from . import balancers, core, registry
from ._lazy import lazy_module
from .analysis import Scorer, metric_score, metrics_dict_to_dataframe
from .classifier import MultitaskClassifier
from .compilation_cache import disable_compilation_cache, enable_compilation_cache
from .data import DictDataset
from .initialisation import init_variables
from .loader import Batch, DictDataLoader
from .losses import cross_entropy, cross_entropy_with_probs
from .model import (
    ModelGraph,
    apply_ops,
    build_graph,
    task_loss_terms,
    task_probs,
    total_loss,
)
from .task import Operation, Task
from .training import (
    AdamaxConfig,
    AdamConfig,
    Checkpointer,
    CheckpointerConfig,
    LogManager,
    LogManagerConfig,
    LogWriter,
    LogWriterConfig,
    LRSchedulerConfig,
    MetricWriter,
    OptimizerConfig,
    SGDConfig,
    TensorBoardWriter,
    Trainer,
    TrainerConfig,
    TrainState,
    make_optimizer,
    train_step,
)
from .utils import preds_to_probs, probs_to_preds

# Multi-task architectures (MMoE, PLE, ...): imported on first use of ``jaxmtl.modules``.
modules = lazy_module("jaxmtl.modules")

__version__ = "0.1.0"

__all__ = [
    # The Snorkel surface plus scoring.
    "AdamConfig",
    "AdamaxConfig",
    "Batch",
    "Checkpointer",
    "CheckpointerConfig",
    "DictDataLoader",
    "DictDataset",
    "LRSchedulerConfig",
    "LogManager",
    "LogManagerConfig",
    "LogWriter",
    "LogWriterConfig",
    "MetricWriter",
    "MultitaskClassifier",
    "Operation",
    "OptimizerConfig",
    "SGDConfig",
    "Scorer",
    "Task",
    "TensorBoardWriter",
    "Trainer",
    "TrainerConfig",
    "cross_entropy",
    "cross_entropy_with_probs",
    "disable_compilation_cache",
    "enable_compilation_cache",
    "metric_score",
    "metrics_dict_to_dataframe",
    "preds_to_probs",
    "probs_to_preds",
    # Kept importable from the top level for compatibility; documented in ``jaxmtl.core``.
    "ModelGraph",
    "TrainState",
    "apply_ops",
    "build_graph",
    "init_variables",
    "make_optimizer",
    "task_loss_terms",
    "task_probs",
    "total_loss",
    "train_step",
    # The layers.
    "balancers",
    "core",
    "registry",
]
