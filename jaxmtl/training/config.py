"""Trainer settings: frozen dataclasses with Snorkel's field names and defaults.

Every config accepts plain dicts for its nested configs (as Snorkel's ``merge_config``
does) and converts them once, at construction. Unknown keys and values outside the
allowed set raise ``ValueError`` naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, TypeVar

import optax

# The allowed names, kept here so that configuration depends on no implementation module
# (tests/test_config.py checks they equal jaxmtl.parallel's and the balancers' own lists).
PARALLEL_MODES = ("auto", "pmap", "sharded", "single")
BALANCER_NAMES = ("equal", "uncertainty", "dwa", "rlw", "gradnorm", "pcgrad", "cagrad", "mgda",
                  "famo", "nash_mtl", "imtl", "aligned_mtl", "upgrad", "db_mtl")

ConfigT = TypeVar("ConfigT")

OPTIMIZERS = ("sgd", "adam", "adamax")
LR_SCHEDULERS = ("constant", "linear", "exponential", "step", "cosine")
BATCH_SCHEDULERS = ("sequential", "shuffled", "proportional", "mixed")
PRECISIONS = ("fp32", "bf16")
LOG_WRITERS = ("json", "tensorboard")
COUNTER_UNITS = ("points", "batches", "epochs")
WARMUP_UNITS = ("batches", "epochs")
ON_NONFINITE = ("raise", "warn")


def _check_choice(owner: str, field_name: str, value: Any, allowed: tuple[str, ...],
                  message: str) -> None:
    if value not in allowed:
        raise ValueError(
            f"{message} '{value}' ({owner}.{field_name}); expected one of {list(allowed)}"
        )


def _check_non_negative(owner: str, field_name: str, value: float) -> None:
    if value is None or value < 0:
        raise ValueError(f"{owner}.{field_name} must be >= 0, got {value!r}")


def _check_finite(owner: str, field_name: str, value: Any) -> None:
    """A real, finite number (numpy scalars included); strings and bools are not."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{owner}.{field_name} must be a number, got {value!r} ({type(value).__name__})"
        )
    if not math.isfinite(value):
        raise ValueError(f"{owner}.{field_name} must be a finite number, got {value!r}")


def _check_finite_non_negative(owner: str, field_name: str, value: Any) -> None:
    _check_finite(owner, field_name, value)
    _check_non_negative(owner, field_name, value)


def from_dict(cls: type[ConfigT], value: Any) -> ConfigT:
    """Builds the config dataclass ``cls`` from ``value`` (an instance, a dict or None).

    Nested dataclass fields given as dicts are converted recursively; a key that is not a
    field of ``cls`` raises ``ValueError`` listing the valid fields.
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{cls.__name__}: expected a dict or {cls.__name__}, got {type(value).__name__}")
    return merge_config(cls(), value)


def merge_config(config: ConfigT, updates: dict[str, Any]) -> ConfigT:
    """Returns a copy of ``config`` with ``updates`` applied; nested dicts merge recursively."""
    fields = {f.name: f for f in dataclasses.fields(config)}  # type: ignore[arg-type]
    unknown = sorted(set(updates) - set(fields))
    if unknown:
        raise ValueError(
            f"{type(config).__name__}: unknown config key(s) {unknown}; "
            f"valid keys are {sorted(fields)}"
        )
    changes = {}
    for key, new_value in updates.items():
        current = getattr(config, key)
        if dataclasses.is_dataclass(current) and isinstance(new_value, dict):
            changes[key] = merge_config(current, new_value)
        else:
            changes[key] = new_value
    return dataclasses.replace(config, **changes)  # type: ignore[type-var]


class _NestedConfig:
    """Converts dict-valued nested config fields to their dataclasses after init."""

    def _convert_nested(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default) and not dataclasses.is_dataclass(value):
                object.__setattr__(self, f.name, from_dict(type(default), value))


@dataclass(frozen=True)
class SGDConfig:
    """torch.optim.SGD settings Snorkel exposes (momentum without dampening)."""

    momentum: float = 0.9


@dataclass(frozen=True)
class AdamConfig:
    """torch.optim.Adam settings: ``betas``, ``eps`` and ``amsgrad``."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False


@dataclass(frozen=True)
class AdamaxConfig:
    """torch.optim.Adamax settings: ``betas`` and ``eps``."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass(frozen=True)
class OptimizerConfig(_NestedConfig):
    """Per-optimizer settings, as Snorkel's ``OptimizerConfig``."""

    sgd_config: SGDConfig = field(default_factory=SGDConfig)
    adam_config: AdamConfig = field(default_factory=AdamConfig)
    adamax_config: AdamaxConfig = field(default_factory=AdamaxConfig)

    def __post_init__(self) -> None:
        self._convert_nested()


@dataclass(frozen=True)
class ExponentialConfig:
    """Exponential decay: ``lr * gamma ** step`` after warm-up."""

    gamma: float = 0.9


@dataclass(frozen=True)
class StepConfig:
    """Step decay: multiply by ``gamma`` every ``step_size`` steps after warm-up."""

    step_size: int = 5
    gamma: float = 0.9


@dataclass(frozen=True)
class LRSchedulerConfig(_NestedConfig):
    """Learning-rate schedule settings, as Snorkel's ``LRSchedulerConfig``."""

    warmup_steps: float = 0
    warmup_unit: str = "batches"
    warmup_percentage: float = 0.0
    min_lr: float = 0.0
    exponential_config: ExponentialConfig = field(default_factory=ExponentialConfig)
    step_config: StepConfig = field(default_factory=StepConfig)

    def __post_init__(self) -> None:
        self._convert_nested()
        _check_choice("LRSchedulerConfig", "warmup_unit", self.warmup_unit, WARMUP_UNITS,
                      "Unrecognized warmup_unit")
        if self.warmup_steps is not None:
            _check_finite("LRSchedulerConfig", "warmup_steps", self.warmup_steps)
            if self.warmup_steps < 0:
                raise ValueError(
                    f"warmup_steps must be greater or equal than 0, got {self.warmup_steps}"
                )
        _check_finite("LRSchedulerConfig", "warmup_percentage", self.warmup_percentage)
        if not 0.0 <= self.warmup_percentage <= 1.0:
            raise ValueError(
                f"LRSchedulerConfig.warmup_percentage must be in [0, 1], got "
                f"{self.warmup_percentage}"
            )
        _check_finite_non_negative("LRSchedulerConfig", "min_lr", self.min_lr)


@dataclass(frozen=True)
class LogManagerConfig:
    """When to evaluate: every ``evaluation_freq`` ``counter_unit``s (Snorkel's semantics)."""

    counter_unit: str = "epochs"
    evaluation_freq: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("LogManagerConfig", "counter_unit", self.counter_unit, COUNTER_UNITS,
                      "Unrecognized counter_unit")
        if not self.evaluation_freq or self.evaluation_freq <= 0:
            raise ValueError(
                f"LogManagerConfig.evaluation_freq must be > 0, got {self.evaluation_freq!r}"
            )


@dataclass(frozen=True)
class CheckpointerConfig:
    """Checkpointing settings, as Snorkel's ``CheckpointerConfig``.

    ``checkpoint_dir`` defaults to "checkpoints" as in Snorkel 0.10; None puts the
    checkpoints beside the logs when logging is on (else in "checkpoints").
    """

    checkpoint_dir: str | None = "checkpoints"
    checkpoint_factor: int = 1
    checkpoint_metric: str = "model/all/train/loss:min"
    checkpoint_task_metrics: tuple[str, ...] | None = None
    checkpoint_runway: float = 0
    checkpoint_clear: bool = True


@dataclass(frozen=True)
class LogWriterConfig:
    """Where logs go: ``{log_dir}/{run_name}``; ``run_name`` defaults to a timestamp."""

    log_dir: str = "logs"
    run_name: str | None = None


@dataclass(frozen=True)
class ClassifierConfig:
    """Snorkel's ``ClassifierConfig`` (``TrainerConfig.model_config``).

    Accepted so that Snorkel configs load unchanged; as in Snorkel, the Trainer does not
    read it. Pass ``device`` and ``dataparallel`` to ``MultitaskClassifier`` instead.
    """

    device: int = 0
    dataparallel: bool = True


@dataclass(frozen=True)
class TrainerConfig(_NestedConfig):
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
        "uncertainty", "dwa", "rlw", "gradnorm", "pcgrad", "cagrad", "mgda", "famo", or a
        ``Balancer`` object; ``balancer_config`` holds its settings (``num_tasks`` and,
        for gradient methods, ``shared`` = the modules used by several tasks, are filled
        in from the model). Methods that compare tasks need several tasks per step
        ("mixed" scheduler); with one task per step they reduce to that task's gradient.
      grad_accumulation_steps: apply the optimizer every k steps on the summed gradients
        (``optax.MultiSteps``).
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

    def __post_init__(self) -> None:
        self._convert_nested()
        _check_choice("TrainerConfig", "parallel", self.parallel, PARALLEL_MODES,
                      "Unrecognized parallel mode")
        if not isinstance(self.optimizer, optax.GradientTransformation):
            _check_choice("TrainerConfig", "optimizer", self.optimizer, OPTIMIZERS,
                          "Unrecognized optimizer option")
        _check_choice("TrainerConfig", "lr_scheduler", self.lr_scheduler, LR_SCHEDULERS,
                      "Unrecognized lr scheduler option")
        _check_choice("TrainerConfig", "batch_scheduler", self.batch_scheduler,
                      BATCH_SCHEDULERS, "Unrecognized batch scheduler option")
        _check_choice("TrainerConfig", "log_writer", self.log_writer, LOG_WRITERS,
                      "Unrecognized writer option")
        _check_choice("TrainerConfig", "precision", self.precision, PRECISIONS,
                      "Unrecognized precision")
        _check_choice("TrainerConfig", "on_nonfinite", self.on_nonfinite, ON_NONFINITE,
                      "Unrecognized on_nonfinite option")
        if isinstance(self.balancer, str):
            _check_choice("TrainerConfig", "balancer", self.balancer, BALANCER_NAMES,
                          "Unrecognized balancer")
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
        if not isinstance(self.n_epochs, int) or self.n_epochs < 0:
            raise ValueError(f"TrainerConfig.n_epochs must be an int >= 0, got {self.n_epochs!r}")
        _check_finite_non_negative("TrainerConfig", "lr", self.lr)
        _check_finite_non_negative("TrainerConfig", "l2", self.l2)
        if self.grad_clip is not None:
            _check_finite_non_negative("TrainerConfig", "grad_clip", self.grad_clip)


# Snorkel 0.10's class names for the nested configs (snorkel.utils.optimizers and
# snorkel.utils.lr_schedulers), so that code constructing them by name ports unchanged.
SGDOptimizerConfig = SGDConfig
AdamOptimizerConfig = AdamConfig
AdamaxOptimizerConfig = AdamaxConfig
ExponentialLRSchedulerConfig = ExponentialConfig
StepLRSchedulerConfig = StepConfig
