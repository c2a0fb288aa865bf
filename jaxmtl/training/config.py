"""Trainer settings: frozen dataclasses with Snorkel's field names and defaults.

Every config accepts plain dicts for its nested configs (as Snorkel's ``merge_config``
does) and converts them once, at construction, and is validated there (``__post_init__``):
unknown keys and values outside the allowed set raise ``ValueError`` naming the field,
the value and what is allowed. The allowed names come from ``jaxmtl.registry``, the one
list per concept that the factories read too; this module imports no implementation
module (not even JAX), so a config can be built and checked before anything is compiled.

This module holds ``TrainerConfig`` and is the home of every config name; the nested
configs live by concept: ``optimizer_config`` (optimizer and learning-rate schedule),
``service_config`` (evaluation cadence, checkpoints, logs) and ``config_base`` (dict
conversion and the numeric checks they share).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import registry
from .config_base import (
    ConfigT,
    NestedConfig,
    check_finite,
    check_finite_non_negative,
    check_non_negative,
    from_dict,
    is_gradient_transformation,
    merge_config,
)
from .module_optimizers_config import check_module_optimizers
from .optimizer_config import (
    AdamaxConfig,
    AdamConfig,
    ExponentialConfig,
    LRSchedulerConfig,
    OptimizerConfig,
    SGDConfig,
    StepConfig,
)
from .service_config import (
    CheckpointerConfig,
    LogManagerConfig,
    LogWriterConfig,
    check_run_name,
    parse_metric_modes,
)

# The allowed names as tuples, for callers that list them; each is its registry's names.
OPTIMIZERS = registry.OPTIMIZERS.names
LR_SCHEDULERS = registry.LR_SCHEDULERS.names
BATCH_SCHEDULERS = registry.BATCH_SCHEDULERS.names
PRECISIONS = registry.PRECISIONS.names
LOG_WRITERS = registry.LOG_WRITERS.names
COUNTER_UNITS = registry.COUNTER_UNITS.names
WARMUP_UNITS = registry.WARMUP_UNITS.names
ON_NONFINITE = registry.ON_NONFINITE.names
PARALLEL_MODES = registry.PARALLEL_MODES.names
BALANCER_NAMES = registry.BALANCERS.names


@dataclass(frozen=True)
class ClassifierConfig:
    """Snorkel's ``ClassifierConfig`` (``TrainerConfig.model_config``).

    Accepted so that Snorkel configs load unchanged; as in Snorkel, the Trainer does not
    read it. Pass ``device`` and ``dataparallel`` to ``MultitaskClassifier`` instead.
    """

    device: int = 0
    dataparallel: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.device, bool) or not isinstance(self.device, int):
            raise ValueError(f"ClassifierConfig.device must be an int, got {self.device!r}")
        if not isinstance(self.dataparallel, bool):
            raise ValueError(
                f"ClassifierConfig.dataparallel must be a bool, got {self.dataparallel!r}")


@dataclass(frozen=True)
class TrainerConfig(NestedConfig):
    """Settings for the Trainer, with Snorkel's field names and defaults.

    Attributes:
      seed: seed of every random choice in training (parameter init when the model is not
        yet initialised, dropout keys, batch order); None draws one at ``fit`` and records
        it in ``Trainer.seed``.
      n_epochs: number of passes over the train split.
      lr: base learning rate (shaped by ``lr_scheduler``).
      l2: coupled L2 penalty, as torch's ``weight_decay`` (added to the gradient before
        the optimizer).
      grad_clip: clip the global gradient norm to this value; 0 or None disables clipping.
      train_split, valid_split, test_split: split names of the dataloaders.
      progress_bar: show a tqdm bar per epoch.
      model_config: Snorkel's ``ClassifierConfig``; accepted and, as in Snorkel, unused.
      log_manager_config, checkpointing, checkpointer_config, logging, log_writer,
        log_writer_config: evaluation cadence, checkpoints and logs (Snorkel's).
      optimizer: "sgd", "adam", "adamax" or any ``optax.GradientTransformation`` (used as
        given: ``lr``, ``l2`` and ``optimizer_config`` then do not apply; clipping does).
      optimizer_config: per-optimizer settings.
      lr_scheduler: "constant", "linear", "exponential", "step" or "cosine".
      lr_scheduler_config: warm-up and decay settings.
      batch_scheduler: order of batches across train loaders: "sequential", "shuffled",
        "proportional", or "mixed" (one batch of every loader per step).
      balancer: multi-task gradient balancing: "equal" (the plain summed loss),
        "uncertainty", "dwa", "rlw", "gradnorm", "pcgrad", "cagrad", "mgda", "famo",
        "nash_mtl", "imtl", "aligned_mtl", "upgrad", "db_mtl" (``registry.BALANCERS``),
        or a ``Balancer`` object; ``balancer_config`` holds its settings (``num_tasks`` and,
        for gradient methods, ``shared`` = the modules used by several tasks, are filled
        in from the model). Methods that compare tasks need several tasks per step
        ("mixed" scheduler); with one task per step they reduce to that task's gradient.
      grad_accumulation_steps: apply the optimizer every k steps on the mean of the k
        batches' gradients (``optax.MultiSteps``). The learning-rate schedule still
        counts batches: an update applies the rate of its first batch, and
        ``model/all/train/lr`` logs the rate applied to the next batch.
      precision: "fp32", or "bf16" (bfloat16 forward/backward on float32 parameters;
        losses and metrics stay float32).
      steps_per_call: with K > 1, the train datasets are put on the device and each
        device call runs K steps in a ``lax.scan`` (one device only); same results as
        K = 1, without per-step host work.
      parallel: with several local devices (and the model's ``dataparallel``): "auto" or
        "pmap" (``jax.pmap``), "sharded" (``jax.jit`` over a ``NamedSharding`` mesh) or
        "single" (one device). The loaders' batch size is the global batch.
      on_nonfinite: what ``fit`` does when a training loss is NaN or infinite: "raise"
        (stop with ``FloatingPointError``) or "warn" (log a warning and continue).
      log_task_gradients: interference diagnostics: at each evaluation, log the per-task
        gradient norms on the shared modules, their pairwise cosines, the balancer's
        task weights and the fraction of steps with a conflicting pair
        (``diagnostics/...`` keys; ``jaxmtl.training.diagnostics``). Accumulated on the
        device inside the step; costs about one more backward pass per task for methods
        that have no per-task gradients of their own (e.g. "equal"). Cosines need steps
        with several tasks ("mixed" scheduler or multi-task datasets).
      module_optimizers: per-module optimisers, module name -> a dict of overrides of
        ``optimizer``/``lr``/``l2``/``optimizer_config``, an ``optax.GradientTransformation``
        (used as given), or "frozen" (parameters never change); modules not named use the
        global optimizer; clipping stays global (see ``training.module_optimizers``).
    """

    seed: int | None = None
    n_epochs: int = 1
    lr: float = 0.01
    l2: float = 0.0
    grad_clip: float | None = 1.0
    train_split: str = "train"
    valid_split: str = "valid"
    test_split: str = "test"
    progress_bar: bool = True
    model_config: ClassifierConfig = field(default_factory=ClassifierConfig)
    log_manager_config: LogManagerConfig = field(default_factory=LogManagerConfig)
    checkpointing: bool = False
    checkpointer_config: CheckpointerConfig = field(default_factory=CheckpointerConfig)
    logging: bool = False
    log_writer: str = "tensorboard"
    log_writer_config: LogWriterConfig = field(default_factory=LogWriterConfig)
    optimizer: Any = "adam"
    optimizer_config: OptimizerConfig = field(default_factory=OptimizerConfig)
    lr_scheduler: str = "constant"
    lr_scheduler_config: LRSchedulerConfig = field(default_factory=LRSchedulerConfig)
    batch_scheduler: str = "shuffled"
    parallel: str = "auto"
    steps_per_call: int = 1
    balancer: Any = "equal"
    balancer_config: dict = field(default_factory=dict)
    grad_accumulation_steps: int = 1
    precision: str = "fp32"
    on_nonfinite: str = "raise"
    log_task_gradients: bool = False
    module_optimizers: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._convert_nested()
        object.__setattr__(self, "module_optimizers", check_module_optimizers(
            self.module_optimizers, self.optimizer, self.optimizer_config))
        registry.PARALLEL_MODES.check(self.parallel, "TrainerConfig.parallel")
        if not is_gradient_transformation(self.optimizer):
            registry.OPTIMIZERS.check(self.optimizer, "TrainerConfig.optimizer")
        registry.LR_SCHEDULERS.check(self.lr_scheduler, "TrainerConfig.lr_scheduler")
        registry.BATCH_SCHEDULERS.check(self.batch_scheduler, "TrainerConfig.batch_scheduler")
        registry.LOG_WRITERS.check(self.log_writer, "TrainerConfig.log_writer")
        registry.PRECISIONS.check(self.precision, "TrainerConfig.precision")
        registry.ON_NONFINITE.check(self.on_nonfinite, "TrainerConfig.on_nonfinite")
        if isinstance(self.balancer, str):
            registry.BALANCERS.check(self.balancer, "TrainerConfig.balancer")
        _check_balancer_config(self.balancer, self.balancer_config)
        if not isinstance(self.grad_accumulation_steps, int) or self.grad_accumulation_steps < 1:
            raise ValueError(
                f"TrainerConfig.grad_accumulation_steps must be an int >= 1, got "
                f"{self.grad_accumulation_steps!r}"
            )
        if not isinstance(self.steps_per_call, int) or self.steps_per_call < 1:
            raise ValueError(
                f"TrainerConfig.steps_per_call must be an int >= 1, got {self.steps_per_call!r}"
            )
        if self.steps_per_call > 1 and self.batch_scheduler == "mixed":
            raise ValueError(
                f"TrainerConfig.steps_per_call={self.steps_per_call} does not support "
                f"batch_scheduler='mixed'; use steps_per_call=1 or another scheduler"
            )
        if not isinstance(self.log_task_gradients, bool):
            raise ValueError(f"TrainerConfig.log_task_gradients must be a bool, got "
                             f"{self.log_task_gradients!r}")
        if not isinstance(self.n_epochs, int) or self.n_epochs < 0:
            raise ValueError(f"TrainerConfig.n_epochs must be an int >= 0, got {self.n_epochs!r}")
        check_finite_non_negative("TrainerConfig", "lr", self.lr)
        check_finite_non_negative("TrainerConfig", "l2", self.l2)
        if self.grad_clip is not None:
            check_finite_non_negative("TrainerConfig", "grad_clip", self.grad_clip)


def _check_balancer_config(balancer: Any, balancer_config: Any) -> None:
    """``TrainerConfig.balancer`` and ``balancer_config``: a name with its settings, or an object.

    Checking a named balancer's setting names reads its factory's signature, which loads
    the balancer module (and JAX) only when settings are given.
    """
    if not isinstance(balancer, str):
        base = sys.modules.get("jaxmtl.training.balancers.base")
        if base is None or not isinstance(balancer, base.Balancer):
            raise ValueError(
                f"TrainerConfig.balancer must be one of {list(registry.BALANCERS.names)} or a "
                f"Balancer, got {balancer!r} ({type(balancer).__name__})")
    if not isinstance(balancer_config, Mapping) or not all(
            isinstance(key, str) for key in balancer_config):
        raise ValueError(
            f"TrainerConfig.balancer_config must be a dict of setting name -> value, got "
            f"{balancer_config!r}")
    if not balancer_config:
        return
    if not isinstance(balancer, str):
        raise ValueError(
            f"TrainerConfig.balancer_config={dict(balancer_config)!r} applies to a balancer "
            f"given by name; balancer is a Balancer object, so build it with these settings")
    factory = registry.BALANCERS.load(balancer, "TrainerConfig.balancer")
    allowed = sorted(inspect.signature(factory).parameters)
    unknown = sorted(set(balancer_config) - set(allowed))
    if unknown:
        raise ValueError(
            f"TrainerConfig.balancer_config: unknown key(s) {unknown} for balancer "
            f"'{balancer}'; allowed: {allowed}")


# Snorkel 0.10's class names for the nested configs (snorkel.utils.optimizers and
# snorkel.utils.lr_schedulers), so that code constructing them by name ports unchanged.
SGDOptimizerConfig = SGDConfig
AdamOptimizerConfig = AdamConfig
AdamaxOptimizerConfig = AdamaxConfig
ExponentialLRSchedulerConfig = ExponentialConfig
StepLRSchedulerConfig = StepConfig

__all__ = [
    "BALANCER_NAMES", "BATCH_SCHEDULERS", "COUNTER_UNITS", "LOG_WRITERS", "LR_SCHEDULERS",
    "ON_NONFINITE", "OPTIMIZERS", "PARALLEL_MODES", "PRECISIONS", "WARMUP_UNITS",
    "AdamConfig", "AdamOptimizerConfig", "AdamaxConfig", "AdamaxOptimizerConfig",
    "CheckpointerConfig", "ClassifierConfig", "ConfigT", "ExponentialConfig",
    "ExponentialLRSchedulerConfig", "LRSchedulerConfig", "LogManagerConfig", "LogWriterConfig",
    "NestedConfig", "OptimizerConfig", "SGDConfig", "SGDOptimizerConfig", "StepConfig",
    "StepLRSchedulerConfig", "TrainerConfig", "check_finite", "check_finite_non_negative",
    "check_non_negative", "check_run_name", "from_dict", "is_gradient_transformation",
    "merge_config", "parse_metric_modes",
]
