"""What an exact resume saves and restores, and the Trainer's optimizer-state files.

A resume checkpoint holds the whole training state (``train_tree``) plus JSON metadata of
the trainer's position; ``restore_training`` checks both against the live run before any
of it is used, so a mismatch fails loudly instead of resuming something else.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .._lazy import lazy_module
from .checkpoint import CHECKPOINTS_SUBDIR
from .config import TrainerConfig, from_dict
from .module_optimizers import with_live_transformations
from .orbax_io import CheckpointError, CheckpointMismatchError, restore_checkpoint
from .run_files import to_jsonable
from .step import TrainState, make_optimizer

ocp = lazy_module("orbax.checkpoint")  # imported by the first save/restore, not at import

logger = logging.getLogger(__name__)


def train_tree(state: TrainState, accumulator: dict[str, jax.Array]) -> dict[str, Any]:
    """The arrays an exact resume needs: the TrainState's leaves and the loss accumulator."""
    return {"step": state.step, "params": state.params, "model_state": state.model_state,
            "opt_state": state.opt_state, "rng": state.rng,
            "balancer_state": state.balancer_state, "accumulator": accumulator}


def check_position(root: str, trainer_meta: dict[str, Any], n_epochs: int | None,
                   n_batches_per_epoch: int | None) -> tuple[int, int]:
    """The resumed checkpoint's (epoch, batch in epoch), checked against this run.

    Raises:
      CheckpointError: if the position is negative, the batch lies outside an epoch of
        ``n_batches_per_epoch`` batches, or the epoch is past ``n_epochs`` (both values
        named).
    """
    epoch, batch = int(trainer_meta["epoch"]), int(trainer_meta["batch_in_epoch"])
    if epoch < 0 or batch < 0:
        raise CheckpointError(f"{root}: checkpoint at epoch {epoch}, batch {batch}: "
                              f"expected non-negative values")
    if n_batches_per_epoch is not None and batch >= n_batches_per_epoch:
        raise CheckpointError(
            f"{root}: checkpoint at batch_in_epoch {batch}, but an epoch of these loaders "
            f"has {n_batches_per_epoch} batches (0 to {n_batches_per_epoch - 1})"
        )
    if n_epochs is not None and (epoch > n_epochs or (epoch == n_epochs and batch > 0)):
        raise CheckpointError(
            f"{root}: checkpoint at epoch {epoch}, batch {batch}, past this run's "
            f"n_epochs={n_epochs}"
        )
    return epoch, batch


def restore_training(root: str, task_names: Sequence[str], n_train_loaders: int,
                     state: TrainState, accumulator: dict[str, jax.Array],
                     n_epochs: int | None = None, n_batches_per_epoch: int | None = None,
                     ) -> tuple[TrainState, dict[str, jax.Array], dict[str, Any]]:
    """Restores the latest resume checkpoint under ``root`` onto a freshly built state.

    Args:
      root: a ``checkpoint_dir``.
      task_names: the model's tasks (must equal the checkpoint's).
      n_train_loaders: number of train loaders (must equal the checkpoint's).
      state, accumulator: fresh ones; they give the expected structure and shapes.
      n_epochs, n_batches_per_epoch: this run's; the saved position must lie within
        them (None skips the check).

    Returns:
      (state, accumulator, meta): meta["trainer"] holds the position and settings.

    Raises:
      ValueError: if there is no checkpoint, it is unreadable or it does not match
        (tasks, number of loaders, position).
    """
    directory = os.path.join(root, CHECKPOINTS_SUBDIR)
    if os.path.isdir(root) and not os.path.isdir(directory):
        best = sorted(entry for entry in os.listdir(root) if entry.startswith("best_model_"))
        if best:
            raise CheckpointError(
                f"{root}: no resume checkpoints ({CHECKPOINTS_SUBDIR}/), only the best models "
                f"{best}: the run that wrote them finished with checkpoint_clear=True (the "
                f"default), which removes the resume checkpoints at the end. To continue "
                f"a finished run later, train it with checkpointer_config="
                f"{{'checkpoint_clear': False}}; to start from a best model, "
                f"model.load('{os.path.join(root, best[0])}') and fit without resume_from")
    # The metadata first: a run that does not match is named as such, before its arrays
    # are compared leaf by leaf.
    _, meta = restore_checkpoint(directory, None, {})
    trainer_meta = meta["trainer"]
    if trainer_meta.get("task_names") != list(task_names):
        raise CheckpointError(
            f"{root}: checkpoint of tasks {trainer_meta.get('task_names')}, but the model has "
            f"tasks {list(task_names)}"
        )
    if len(trainer_meta["loader_seeds"]) != n_train_loaders:
        raise CheckpointError(
            f"{root}: checkpoint was trained on {len(trainer_meta['loader_seeds'])} train "
            f"loaders, got {n_train_loaders}"
        )
    check_position(root, trainer_meta, n_epochs, n_batches_per_epoch)
    step = int(meta["save_count"]) - 1
    try:
        items, _ = restore_checkpoint(directory, step, {"train": train_tree(state, accumulator)})
    except CheckpointMismatchError as error:
        # The shared-count layout saved Adam's moments as opt_state/<i>/mu/<module>/...
        if any(path.startswith("opt_state/") and "/mu/" in path for path in error.unexpected):
            raise CheckpointMismatchError(
                f"{error}. The optimizer state looks like one saved before Adam and Adamax "
                f"kept a step count per module (2026-12-02): resume it with the jaxmtl that "
                f"wrote it, or start a new run from its weights (model.load("
                f"'{os.path.join(directory, str(step))}'), then fit)") from error
        raise
    tree = items["train"]
    state = state.replace(step=tree["step"], params=tree["params"],
                          model_state=tree["model_state"], opt_state=tree["opt_state"],
                          rng=tree["rng"], balancer_state=tree["balancer_state"])
    return state, tree["accumulator"], meta


def _tuples(value: Any) -> Any:
    # JSON turns tuples into lists; config tuples (e.g. Adam's betas) come back as tuples.
    if isinstance(value, dict):
        return {key: _tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    return value


def save_optimizer_state(path: str, state: TrainState, config: TrainerConfig) -> None:
    """Writes the optimizer state, update count and config (Orbax directory ``path``)."""
    tree = {"opt_state": state.opt_state, "step": state.step}
    manager = ocp.CheckpointManager(os.path.abspath(path),
                                    options=ocp.CheckpointManagerOptions(create=True))
    try:
        step = (manager.latest_step() or 0) + 1
        manager.save(step, args=ocp.args.Composite(
            train=ocp.args.StandardSave(jax.device_get(tree)),
            meta=ocp.args.JsonSave({"trainer_config": to_jsonable(config)}),
        ))
        manager.wait_until_finished()
    finally:
        manager.close()


def load_optimizer_state(path: str, current: TrainerConfig, params: Any
                         ) -> tuple[TrainerConfig, dict[str, Any] | None]:
    """Reads what ``save_optimizer_state`` wrote.

    Args:
      path: the directory given to ``save_optimizer_state``.
      current: the config in use (supplies a custom optax optimizer, which is not JSON).
      params: the model's parameters, or None if it is not initialised.

    Returns:
      (config, optimizer): the saved config, and ``{"opt_state", "step"}`` or None when
      ``params`` is None or does not match the saved optimizer state (a warning says so).

    Raises:
      ValueError: if ``path`` holds no trainer checkpoint, or it is unreadable or corrupt.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a jaxmtl trainer checkpoint (it does not exist)")
    manager = ocp.CheckpointManager(os.path.abspath(path))
    try:
        step = manager.latest_step()
        if step is None:
            raise CheckpointError(f"{path}: not a jaxmtl trainer checkpoint")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        saved = dict(meta["meta"]["trainer_config"])
    except CheckpointError:
        raise
    except Exception as error:  # orbax raises many types for corrupt or truncated files
        raise CheckpointError(
            f"{path}: cannot read the trainer checkpoint (corrupt or truncated?): {error}"
        ) from error
    finally:
        manager.close()
    if not isinstance(current.optimizer, str):
        saved["optimizer"] = current.optimizer
    saved["module_optimizers"] = with_live_transformations(saved.get("module_optimizers"),
                                                           current.module_optimizers)
    config = from_dict(TrainerConfig, _tuples(saved))
    if params is None:
        logger.warning("Trainer.load: no model, or a model without parameters, was given; "
                       "restored the config only (pass the trained model to restore the "
                       "optimizer state)")
        return config, None
    tx = make_optimizer(config, lambda count: config.lr)
    target = {"opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    try:
        items, _ = restore_checkpoint(path, step, {"train": target})
    except CheckpointMismatchError as error:  # another model's: documented as a warning
        logger.warning("Trainer.load: %s; restored the config only", error)
        return config, None
    return config, items["train"]


def continue_optimizer(state: TrainState, loaded: dict[str, Any] | None) -> TrainState:
    """``state`` with the optimizer state of ``load_optimizer_state``: the moments (and
    Adam's bias-correction count) continue, while the learning-rate schedule and the step
    count start again with the new fit, as every fit's do (a schedule continued from a
    finished run would stay at its end: a linear decay's lr 0, nothing trained).

    A loaded state whose shapes do not match (another model) is ignored with a warning.
    """
    if loaded is None:
        return state
    if jax.tree.map(np.shape, loaded["opt_state"]) != jax.tree.map(np.shape, state.opt_state):
        logger.warning("The loaded optimizer state does not match this model's parameters; "
                       "starting a fresh optimizer.")
        return state
    return state.replace(opt_state=restart_schedules(loaded["opt_state"]))


def restart_schedules(opt_state: Any) -> Any:
    """``opt_state`` with every learning-rate schedule's count (``optax``'s
    ``ScaleByScheduleState``) at 0; every other leaf as it is."""
    def is_schedule(node: Any) -> bool:
        return isinstance(node, optax.ScaleByScheduleState)

    return jax.tree.map(
        lambda node: node._replace(count=jnp.zeros_like(node.count)) if is_schedule(node)
        else node, opt_state, is_leaf=is_schedule)
