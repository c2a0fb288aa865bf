"""Trainer settings: frozen dataclasses with Snorkel's field names and defaults.

Every config accepts plain dicts for its nested configs (as Snorkel's ``merge_config``
does) and converts them once, at construction, and is validated there (``__post_init__``):
unknown keys and values outside the allowed set raise ``ValueError`` naming the field,
the value and what is allowed. The allowed names come from ``jaxmtl.registry``, the one
list per concept that the factories read too; this module imports no implementation
module (not even JAX), so a config can be built and checked before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .. import registry

ConfigT = TypeVar("ConfigT")

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


def is_gradient_transformation(value: Any) -> bool:
    """Whether ``value`` is an ``optax.GradientTransformation``, without importing optax.

    A value can only be one if the caller has imported optax already, so configuration
    never loads it (nor JAX) itself.
    """
    optax = sys.modules.get("optax")
    return optax is not None and isinstance(value, optax.GradientTransformation)


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


def check_finite_non_negative(owner: str, field_name: str, value: Any) -> None:
    """Raises ValueError naming ``owner.field_name`` unless ``value`` is a finite number >= 0."""
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

    def __post_init__(self) -> None:
        check_finite_non_negative("SGDConfig", "momentum", self.momentum)


@dataclass(frozen=True)
class AdamConfig:
    """torch.optim.Adam settings: ``betas``, ``eps`` and ``amsgrad``."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False

    def __post_init__(self) -> None:
        _check_betas("AdamConfig", self)
        check_finite_non_negative("AdamConfig", "eps", self.eps)
        if not isinstance(self.amsgrad, bool):
            raise ValueError(f"AdamConfig.amsgrad must be a bool, got {self.amsgrad!r}")


@dataclass(frozen=True)
class AdamaxConfig:
    """torch.optim.Adamax settings: ``betas`` and ``eps``."""

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        _check_betas("AdamaxConfig", self)
        check_finite_non_negative("AdamaxConfig", "eps", self.eps)


def _check_betas(owner: str, config: AdamConfig | AdamaxConfig) -> None:
    """``betas``: two numbers in [0, 1) (torch's check), stored as a tuple."""
    betas = config.betas
    if (isinstance(betas, str) or not hasattr(betas, "__len__") or len(betas) != 2
            or not all(isinstance(b, numbers.Real) and not isinstance(b, bool)
                       and 0.0 <= b < 1.0 for b in betas)):
        raise ValueError(f"{owner}.betas must be two numbers in [0, 1), got {betas!r}")
    object.__setattr__(config, "betas", tuple(betas))


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

    def __post_init__(self) -> None:
        check_finite_non_negative("ExponentialConfig", "gamma", self.gamma)


@dataclass(frozen=True)
class StepConfig:
    """Step decay: multiply by ``gamma`` every ``step_size`` steps after warm-up."""

    step_size: int = 5
    gamma: float = 0.9

    def __post_init__(self) -> None:
        if (isinstance(self.step_size, bool) or not isinstance(self.step_size, int)
                or self.step_size < 1):
            raise ValueError(f"StepConfig.step_size must be an int >= 1, got {self.step_size!r}")
        check_finite_non_negative("StepConfig", "gamma", self.gamma)


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
        registry.WARMUP_UNITS.check(self.warmup_unit, "LRSchedulerConfig.warmup_unit")
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
        check_finite_non_negative("LRSchedulerConfig", "min_lr", self.min_lr)


@dataclass(frozen=True)
class LogManagerConfig:
    """When to evaluate: every ``evaluation_freq`` ``counter_unit``s (Snorkel's semantics)."""

    counter_unit: str = "epochs"
    evaluation_freq: float = 1.0

    def __post_init__(self) -> None:
        registry.COUNTER_UNITS.check(self.counter_unit, "LogManagerConfig.counter_unit")
        _check_finite("LogManagerConfig", "evaluation_freq", self.evaluation_freq)
        if self.evaluation_freq <= 0:
            raise ValueError(
                f"LogManagerConfig.evaluation_freq must be > 0, got {self.evaluation_freq!r}"
            )


@dataclass(frozen=True)
class CheckpointerConfig:
    """Checkpointing settings, as Snorkel's ``CheckpointerConfig``.

    ``checkpoint_dir`` defaults to "checkpoints" as in Snorkel 0.10; None puts the
    checkpoints beside the logs when logging is on (else in "checkpoints").
    ``checkpoint_metric`` and each of ``checkpoint_task_metrics`` is
    ``"task/dataset/split/metric:mode"`` with mode "min" or "max" (a list is stored as a
    tuple).
    """

    checkpoint_dir: str | None = "checkpoints"
    checkpoint_factor: int = 1
    checkpoint_metric: str = "model/all/train/loss:min"
    checkpoint_task_metrics: tuple[str, ...] | None = None
    checkpoint_runway: float = 0
    checkpoint_clear: bool = True

    def __post_init__(self) -> None:
        owner = "CheckpointerConfig"
        if self.checkpoint_dir is not None and (
                not isinstance(self.checkpoint_dir, str) or not self.checkpoint_dir):
            raise ValueError(f"{owner}.checkpoint_dir must be a non-empty path or None, got "
                             f"{self.checkpoint_dir!r}")
        if (isinstance(self.checkpoint_factor, bool) or not isinstance(self.checkpoint_factor, int)
                or self.checkpoint_factor < 1):
            raise ValueError(f"{owner}.checkpoint_factor must be an int >= 1, got "
                             f"{self.checkpoint_factor!r}")
        check_finite_non_negative(owner, "checkpoint_runway", self.checkpoint_runway)
        if not isinstance(self.checkpoint_clear, bool):
            raise ValueError(f"{owner}.checkpoint_clear must be a bool, got "
                             f"{self.checkpoint_clear!r}")
        parse_metric_modes([self.checkpoint_metric], f"{owner}.checkpoint_metric")
        if self.checkpoint_task_metrics is not None:
            if isinstance(self.checkpoint_task_metrics, str):
                raise ValueError(
                    f"{owner}.checkpoint_task_metrics must be a list of "
                    f"'task/dataset/split/metric:mode' strings or None, got the string "
                    f"{self.checkpoint_task_metrics!r}")
            object.__setattr__(self, "checkpoint_task_metrics",
                               tuple(self.checkpoint_task_metrics))
            parse_metric_modes(self.checkpoint_task_metrics, f"{owner}.checkpoint_task_metrics")


def parse_metric_modes(metric_modes: Iterable[str] | None, where: str) -> dict[str, str]:
    """Parses checkpoint metrics ``"task/dataset/split/metric:mode"`` into metric -> mode.

    Args:
      metric_modes: the strings; None means none.
      where: the field that holds them, for error messages.

    Returns:
      ``{"task/dataset/split/metric": "min" | "max"}`` in the given order.

    Raises:
      ValueError: for a string without exactly one ":", a mode other than "min"/"max", or a
        metric name without four "/"-separated parts.
    """
    modes: dict[str, str] = {}
    for metric_mode in metric_modes or ():
        parts = str(metric_mode).split(":")
        if len(parts) != 2:
            raise ValueError(
                f"{where}: metric must be of the form 'metric_name:mode' where mode is "
                f"'max' or 'min', got {metric_mode!r}"
            )
        metric, mode = parts
        registry.METRIC_MODES.check(mode, f"{where}, metric {metric!r}")
        if len(metric.split("/")) != 4:
            raise ValueError(
                f"{where} must be formatted 'task/dataset/split/metric:mode', got "
                f"{metric_mode!r}"
            )
        modes[metric] = mode
    return modes


def check_run_name(run_name: str) -> str:
    """Returns ``run_name`` if it names one directory inside ``log_dir``.

    Raises:
      ValueError: for an empty name, an absolute path, a path separator, or a "." or ".."
        name (any of which would put the logs outside ``{log_dir}/{run_name}``).
    """
    separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
    if (not isinstance(run_name, str) or run_name in ("", ".", "..")
            or os.path.isabs(run_name) or any(sep in run_name for sep in separators)):
        raise ValueError(
            f"log_writer_config.run_name must be a plain directory name (no path separator, "
            f"not absolute, not '.' or '..'), got {run_name!r}"
        )
    return run_name


@dataclass(frozen=True)
class LogWriterConfig:
    """Where logs go: ``{log_dir}/{run_name}``; ``run_name`` defaults to a timestamp.

    ``run_name``, when given, must be a plain directory name (see ``check_run_name``).
    """

    log_dir: str = "logs"
    run_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.log_dir, str | os.PathLike) or not os.fspath(self.log_dir):
            raise ValueError(
                f"LogWriterConfig.log_dir must be a non-empty path, got {self.log_dir!r}")
        if self.run_name is not None:
            check_run_name(self.run_name)


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
        from .module_optimizers import check_module_optimizers  # imports no JAX
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
