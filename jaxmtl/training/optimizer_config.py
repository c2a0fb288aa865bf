"""The optimizer's settings and its learning-rate schedule's, as Snorkel's.

``OptimizerConfig`` holds one config per torch optimizer Snorkel exposes (SGD, Adam,
Adamax); ``LRSchedulerConfig`` the warm-up and decay settings. Both are nested in
``TrainerConfig`` and, like it, validated at construction. No implementation module (nor
JAX) is imported.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from .. import registry
from .config_base import NestedConfig, check_finite, check_finite_non_negative


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
class OptimizerConfig(NestedConfig):
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
class LRSchedulerConfig(NestedConfig):
    """Learning-rate schedule settings, as Snorkel's ``LRSchedulerConfig``.

    Attributes:
      warmup_steps: linear warm-up from 0 to ``lr`` over this many ``warmup_unit``s
        (0: none).
      warmup_unit: "batches" or "epochs".
      warmup_percentage: warm-up as a fraction of all training steps, in [0, 1]; used
        when ``warmup_steps`` is 0 (as Snorkel).
      min_lr: the decaying schedules' floor (the learning rate never goes below it).
      exponential_config: ``gamma`` of ``lr_scheduler="exponential"``.
      step_config: ``step_size`` and ``gamma`` of ``lr_scheduler="step"``.
    """

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
            check_finite("LRSchedulerConfig", "warmup_steps", self.warmup_steps)
            if self.warmup_steps < 0:
                raise ValueError(
                    f"warmup_steps must be greater or equal than 0, got {self.warmup_steps}"
                )
        check_finite("LRSchedulerConfig", "warmup_percentage", self.warmup_percentage)
        if not 0.0 <= self.warmup_percentage <= 1.0:
            raise ValueError(
                f"LRSchedulerConfig.warmup_percentage must be in [0, 1], got "
                f"{self.warmup_percentage}"
            )
        check_finite_non_negative("LRSchedulerConfig", "min_lr", self.min_lr)
