"""What ``Trainer.fit`` decides before its first step: the loaders, the optimizer, the run.

``check_dataloaders`` picks the train loaders (and rejects loaders of unknown splits);
``compile_settings`` builds the optimizer, learning-rate schedule and balancer that a
later fit of the same model and settings reuses (``fit_cache_key``) with its compiled
steps; ``FitRun`` is what the set-up hands the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from ..evaluation import loader_list
from ..loader import DictDataLoader
from .balancers import Balancer, balancer_for_tasks
from .config import TrainerConfig
from .lr_schedules import applied_schedule, make_lr_schedule
from .module_optimizers import lr_schedule_for
from .step import make_optimizer

if TYPE_CHECKING:
    from ..classifier import MultitaskClassifier
    from ..parallel import DataParallel


class CompiledFit(NamedTuple):
    """What a later ``fit`` of the same model and settings reuses: nothing is traced or
    compiled again."""

    tx: Any
    lr_schedule: Any
    warmup_steps: int
    balancer: Balancer | None
    steps: Any  # the runner's compiled programs; None before the first fit


class FitRun(NamedTuple):
    """What ``fit``'s set-up decided; read by the loop and its helpers."""

    dataloaders: Sequence[DictDataLoader]
    train_loaders: list[DictDataLoader]
    n_batches_per_epoch: int
    cache_key: tuple
    compiled: CompiledFit
    #: The runner, when set-up made it before the model's initialisation so that its
    #: steps compile meanwhile (``Trainer._compile_while_initialising``); else None.
    runner: Any = None


def check_dataloaders(config: TrainerConfig, dataloaders: Sequence[DictDataLoader]
                      ) -> list[DictDataLoader]:
    """The loaders of ``config.train_split``, after checking every loader's split.

    Raises:
      TypeError: for a value that is not a DictDataLoader (``evaluation.loader_list``).
      ValueError: for a dataset whose split is not the train, valid or test split (naming
        the dataset and its split), or no train loader.
    """
    all_splits = [config.train_split, config.valid_split, config.test_split]
    dataloaders = loader_list(dataloaders, "Trainer.fit")
    for dl in dataloaders:
        if dl.dataset.split not in all_splits:
            raise ValueError(
                f"Dataloader splits must be one of {all_splits}; dataset "
                f"'{dl.dataset.name}' has split '{dl.dataset.split}'"
            )
    train_loaders = [dl for dl in dataloaders if dl.dataset.split == config.train_split]
    if not train_loaders:
        raise ValueError(
            f"Cannot find any dataloaders with split matching train split: "
            f"{config.train_split}."
        )
    return train_loaders


def make_fit_balancer(config: TrainerConfig, model: MultitaskClassifier) -> Balancer | None:
    """The configured balancer; None for "equal" with no settings (the plain summed loss)."""
    if not isinstance(config.balancer, str):
        return config.balancer
    if config.balancer == "equal" and not config.balancer_config:
        return None
    task_modules = {name: {op.module_name for op in ops}
                    for name, ops in model.op_sequences.items()}
    return balancer_for_tasks(config.balancer, config.balancer_config, task_modules)


def fit_cache_key(model: MultitaskClassifier, config: TrainerConfig, n_batches_per_epoch: int,
                  parallel: DataParallel, train_loaders: Sequence[DictDataLoader]) -> tuple:
    """What a fit's optimizer and compiled steps depend on: equal keys reuse them."""
    return (model.graph, repr(config), n_batches_per_epoch, parallel,
            tuple(dl.batch_size for dl in train_loaders),
            tuple((dl.ragged_keys, tuple(dl.bucket_shapes)) for dl in train_loaders))


def compile_settings(config: TrainerConfig, model: MultitaskClassifier,
                     n_batches_per_epoch: int) -> CompiledFit:
    """The optimizer, learning-rate schedule (and its warm-up length) and balancer of a
    fit, with no compiled steps yet."""
    lr_schedule, warmup_steps = make_lr_schedule(
        config.lr, config.lr_scheduler, config.lr_scheduler_config,
        n_batches_per_epoch, config.n_epochs,
    )
    tx = make_optimizer(config, lr_schedule, lr_schedule_for(config, n_batches_per_epoch))
    logged = applied_schedule(lr_schedule, config.grad_accumulation_steps)
    return CompiledFit(tx, logged, warmup_steps, make_fit_balancer(config, model), None)
