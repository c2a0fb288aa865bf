"""Per-module optimisers and frozen modules: ``TrainerConfig(module_optimizers=...)``.

A mapping from module name (a top-level key of ``model.params``: the module pool's names)
to how that module's parameters are updated::

    TrainerConfig(lr=1e-3, module_optimizers={
        "head_a": {"lr": 1e-2},                        # overrides of the global settings
        "head_b": {"optimizer": "sgd", "l2": 1e-4},
        "body": "frozen",                              # never changes (fine-tuning)
        "gate": optax.lion(1e-4),                      # any optax transformation, as given
    })

Modules not named use the global optimizer. The optax chain is::

    [zero the frozen modules' gradients] -> clip_by_global_norm(grad_clip)
        -> optax.partition({label: group transformation}, labels from the params tree)
    all wrapped in optax.MultiSteps when grad_accumulation_steps > 1

``optax.partition`` is the current name of ``optax.multi_transform``. Clipping stays
global: one norm over every trained module. A frozen module's gradient is zeroed before
the clip, so it does not count in that norm (as a torch parameter with
``requires_grad=False``, which ``clip_grad_norm_`` never sees), and the optimizer keeps no
state (no moments) for it. Only its *parameters* are frozen: collections such as
BatchNorm's ``batch_stats`` update in training steps as before (put the module in eval
mode, e.g. ``use_running_average=True``, to fix them too).

A group of overrides builds the global optimizer's chain (coupled L2, direction, learning
rate) from the merged settings; its ``lr`` replaces the base learning rate of the schedule
(warm-up, decay and ``min_lr`` as configured). A ``GradientTransformation`` value is used as
given, like a global one: ``lr``, ``l2`` and the schedule do not apply to it.

Validation (``check_module_optimizers``, in ``module_optimizers_config``, called by
``TrainerConfig.__post_init__``) needs no JAX; the names are checked against the model at
``fit`` (``check_module_names``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .. import registry
from .._lazy import lazy_module
from .config import OptimizerConfig, is_gradient_transformation, merge_config
from .module_optimizers_config import (
    FROZEN,
    OVERRIDE_KEYS,
    check_module_optimizers,
    is_frozen,
)

# Loaded when an optimizer is built: configuration is checked without loading JAX.
jax = lazy_module("jax")
optax = lazy_module("optax")

def check_module_names(module_optimizers: Mapping[str, Any], params: Mapping[str, Any]
                       ) -> None:
    """Checks at ``fit`` that every configured name is a module with parameters.

    Args:
      module_optimizers: ``TrainerConfig.module_optimizers``.
      params: the model's ``{module_name: params}``.

    Raises:
      ValueError: naming the unknown name(s) and the model's modules with parameters.
    """
    unknown = [name for name in module_optimizers if name not in params]
    if unknown:
        raise ValueError(
            f"TrainerConfig.module_optimizers names {unknown}, which are not modules with "
            f"parameters of this model; its modules with parameters are {sorted(params)}")


def default_label(module_optimizers: Mapping[str, Any]) -> str:
    """The group label of the modules not configured: "default", unless a module has
    that name (then "default_", ...)."""
    label = "default"
    while label in module_optimizers:
        label += "_"
    return label


def optimizer_transforms(optimizer: Any, l2: float, optimizer_config: OptimizerConfig,
                         learning_rate: Any) -> list[Any]:
    """The global optimizer's part of the chain for one set of settings.

    Args:
      optimizer: a name of ``registry.OPTIMIZERS`` or a GradientTransformation (returned
        alone, as given).
      l2: coupled L2 (torch's ``weight_decay``), added to the gradient first.
      optimizer_config: the optimizers' settings.
      learning_rate: a number or an ``optax.Schedule``.

    Returns:
      The transforms for ``optax.chain``: ``[add_decayed_weights?, *direction,
      scale_by_learning_rate]``.
    """
    if is_gradient_transformation(optimizer):
        return [optimizer]
    chain = [optax.add_decayed_weights(l2)] if l2 else []
    scale = registry.OPTIMIZERS.load(optimizer, "TrainerConfig.optimizer")
    chain.extend(scale(optimizer_config))
    chain.append(optax.scale_by_learning_rate(learning_rate))
    return chain


class GroupMember(NamedTuple):
    """Marks a module as a member of a group in ``ModuleOptimizersState.members`` (a
    pytree node without leaves; ``optax.MaskedNode`` marks the other modules)."""


class ModuleOptimizersState(NamedTuple):
    """The state of ``module_optimizers_transform``, in label order.

    Attributes:
      group_states: each group's (masked) optimizer state. A tuple, not
        ``optax.PartitionState``'s dict of labels: so the first dict key on a leaf's path
        stays its module's name (what ``update.keep_modules`` reads).
      members: per group, ``{module: GroupMember() or optax.MaskedNode()}`` over every
        module: which modules the group holds, in the state's *structure* (no leaves).
        A member's view of the state (``signatures.view_of``, shared task-family
        programs) then has the structure of the representative's only when each of its
        modules is in the same group as the representative's; otherwise the family
        trains through the general step, where the labels see the real module names.
    """

    group_states: tuple
    members: tuple


def module_optimizers_transform(config: Any, learning_rate: Any,
                                schedule_for: Callable[[float], Any] | None = None) -> Any:
    """The per-module part of the chain: ``optax.partition`` over the module groups.

    Args:
      config: the ``TrainerConfig`` (``module_optimizers`` non-empty).
      learning_rate: the global learning rate (a number or schedule).
      schedule_for: ``schedule_for(lr)`` -> the learning rate of a group whose overrides
        set ``lr`` (the Trainer passes the configured schedule built on that lr). Without
        it: ``learning_rate`` scaled by ``lr / config.lr`` (a number stays a number), or
        the constant ``lr`` when ``config.lr`` is 0.

    Returns:
      An ``optax.GradientTransformation`` whose state is a ``ModuleOptimizersState``.
    """
    settings = config.module_optimizers
    default = default_label(settings)
    groups = {default: optax.chain(*optimizer_transforms(
        config.optimizer, config.l2, config.optimizer_config, learning_rate))}
    for name, value in settings.items():
        groups[name] = _group(value, config, learning_rate, schedule_for)
    order = tuple(groups)

    def label(module: str) -> str:
        return module if module in settings else default

    def labels(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda path, _: label(path[0].key), tree)

    partition = optax.partition(groups, labels)

    def init(params: Any) -> ModuleOptimizersState:
        state = partition.init(params)
        members = tuple({module: GroupMember() if label(module) == group else optax.MaskedNode()
                         for module in params} for group in order)
        return ModuleOptimizersState(tuple(state.inner_states[group] for group in order),
                                     members)

    def update(updates: Any, state: ModuleOptimizersState, params: Any = None
               ) -> tuple[Any, ModuleOptimizersState]:
        inner = optax.PartitionState(dict(zip(order, state.group_states, strict=True)))
        updates, inner = partition.update(updates, inner, params)
        return updates, state._replace(
            group_states=tuple(inner.inner_states[group] for group in order))

    return optax.GradientTransformation(init, update)


def _group(value: Any, config: Any, learning_rate: Any,
           schedule_for: Callable[[float], Any] | None) -> Any:
    """One configured module's transformation."""
    if is_gradient_transformation(value):
        return value
    if is_frozen(value):
        return optax.set_to_zero()
    optimizer_config = value.get("optimizer_config", config.optimizer_config)
    if isinstance(optimizer_config, Mapping):
        optimizer_config = merge_config(config.optimizer_config, dict(optimizer_config))
    rate = learning_rate
    if "lr" in value:
        rate = _group_rate(value["lr"], config.lr, learning_rate, schedule_for)
    return optax.chain(*optimizer_transforms(
        value.get("optimizer", config.optimizer), value.get("l2", config.l2),
        optimizer_config, rate))


def _group_rate(lr: float, base_lr: float, learning_rate: Any,
                schedule_for: Callable[[float], Any] | None) -> Any:
    if schedule_for is not None:
        return schedule_for(lr)
    if not callable(learning_rate):
        return lr
    if not base_lr:
        return lambda count: lr
    return lambda count: learning_rate(count) * (lr / base_lr)


def zero_frozen_gradients(module_optimizers: Mapping[str, Any]) -> Any | None:
    """A transformation that zeroes the frozen modules' gradients (None if none is
    frozen): placed before the global clip, so frozen modules do not count in its norm."""
    frozen = {name for name, value in module_optimizers.items() if is_frozen(value)}
    if not frozen:
        return None

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        return jax.tree_util.tree_map_with_path(
            lambda path, g: jax.numpy.zeros_like(g) if path[0].key in frozen else g,
            updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def uses_user_transformation(config: Any) -> bool:
    """Whether a user's ``optax.GradientTransformation`` is among the optimizers (global or
    per module): one that may label or mask parameters by module name."""
    if is_gradient_transformation(config.optimizer):
        return True
    return any(is_gradient_transformation(value)
               or (isinstance(value, Mapping) and is_gradient_transformation(value.get("optimizer")))
               for value in config.module_optimizers.values())


def lr_schedule_for(config: Any, n_batches_per_epoch: int) -> Callable[[float], Any]:
    """``schedule_for`` for ``make_optimizer``: the configured LR schedule on a group's lr.

    Args:
      config: the ``TrainerConfig``.
      n_batches_per_epoch: train batches in one epoch.

    Returns:
      ``lr -> make_lr_schedule(lr, config.lr_scheduler, ...)``'s schedule.
    """
    from .lr_schedules import make_lr_schedule

    def schedule_for(lr: float) -> Any:
        return make_lr_schedule(lr, config.lr_scheduler, config.lr_scheduler_config,
                                n_batches_per_epoch, config.n_epochs)[0]

    return schedule_for


def with_live_transformations(saved: Any, current: Mapping[str, Any]) -> Any:
    """``saved`` module_optimizers (read from JSON) with the current config's
    GradientTransformation values put back (JSON holds only their repr)."""
    if not isinstance(saved, Mapping):
        return saved
    return {name: current[name] if is_gradient_transformation(current.get(name)) else value
            for name, value in saved.items()}


__all__ = ["FROZEN", "OVERRIDE_KEYS", "GroupMember", "ModuleOptimizersState", "check_module_names",
           "check_module_optimizers", "default_label", "lr_schedule_for",
           "module_optimizers_transform", "optimizer_transforms", "with_live_transformations",
           "zero_frozen_gradients"]

