"""Reading and writing Orbax checkpoint directories, one process at a time.

The low layer under ``checkpoint.Checkpointer``, ``resume`` and ``persistence``: a
``CheckpointManager`` this process drives alone, and a restore that checks the saved
trees against the expected ones first and names every leaf that differs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._lazy import lazy_module

ocp = lazy_module("orbax.checkpoint")  # imported by the first checkpoint, not by `import jaxmtl`

PyTree = Any


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not match the model."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint whose trees do not match the model (another model's).

    Attributes:
      unexpected: the saved leaf paths the model has no place for (``leaf_shapes`` names).
    """

    def __init__(self, message: str, unexpected: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.unexpected = tuple(unexpected)


#: The tree items a ``Checkpointer`` checkpoint holds besides ``"meta"`` (JSON).
TREE_ITEMS = ("model", "train")


def _this_process_only() -> ocp.options.MultiprocessingOptions:
    # In a multi-process run one process writes and each reads for itself: no manager
    # may wait on a barrier that the other processes never reach.
    here = jax.process_index()
    return ocp.options.MultiprocessingOptions(primary_host=here, active_processes={here})


def open_manager(directory: str, max_to_keep: int | None, async_save: bool,
                 item_handlers: dict | None = None) -> ocp.CheckpointManager:
    """An Orbax ``CheckpointManager`` on ``directory`` that this process drives alone.

    Args:
      directory: the manager's directory (made absolute; not created).
      max_to_keep: how many steps to keep; None keeps all.
      async_save: save in the background.
      item_handlers: Orbax item handlers by item name, for reading without ``args``.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=False, enable_async_checkpointing=async_save,
        multiprocessing_options=_this_process_only(),
    )
    return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                 item_handlers=item_handlers)


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


def _path_name(entry: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def leaf_shapes(tree: PyTree, shape_of: Any = np.shape) -> dict[str, tuple[int, ...]]:
    """``{"params/linear/kernel": shape}`` for every leaf; tuples, dicts and NamedTuples
    all give plain names, so a saved tree and a live one compare equal."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: x is None)[0]
    return {"/".join(_path_name(e) for e in path): tuple(shape_of(leaf))
            for path, leaf in flat if leaf is not None}


def describe_mismatch(expected: dict[str, tuple], found: dict[str, tuple]) -> str:
    """Names the leaves missing or extra and the shapes that differ between two trees."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    differ = [f"{k}: expected {expected[k]}, found {found[k]}"
              for k in sorted(set(expected) & set(found)) if expected[k] != found[k]]
    parts = []
    if missing:
        parts.append(f"missing {missing}")
    if extra:
        parts.append(f"unexpected {extra}")
    if differ:
        parts.append(f"shape mismatch {differ}")
    return "; ".join(parts)


def restore_checkpoint(directory: str, step: int | None, target: Mapping[str, PyTree]
                       ) -> tuple[dict[str, PyTree], dict[str, Any]]:
    """Restores items of a checkpoint written by ``Checkpointer``.

    Args:
      directory: a checkpoint manager directory (e.g. ``<checkpoint_dir>/checkpoints``).
      step: the checkpoint number; None takes the latest.
      target: item name -> a tree with the expected structure, shapes and dtypes.

    Returns:
      (items, meta): the restored trees (as jax arrays) and the JSON metadata.

    Raises:
      ValueError: if ``directory`` holds no checkpoint, the checkpoint is corrupt or
        truncated, or its trees do not match ``target`` (naming what differs).
    """
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: not a jaxmtl checkpoint directory (it does not exist)")
    # A handler for every item a Checkpointer writes, read or not: Orbax warns about each
    # item on disk it has no handler for ("could not be restored") on every restore.
    handlers = {name: ocp.StandardCheckpointHandler()
                for name in dict.fromkeys([*target, *TREE_ITEMS])}
    handlers["meta"] = ocp.JsonCheckpointHandler()
    manager = open_manager(directory, None, async_save=False, item_handlers=handlers)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{directory}: not a jaxmtl checkpoint directory (no checkpoint)")
        meta = dict(manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"])
        items: dict[str, PyTree] = {}
        for name, tree in target.items():
            saved = manager.item_metadata(step)[name]
            if saved is None:
                raise CheckpointError(f"{directory}/{step}: the checkpoint has no '{name}' item")
            saved_shapes = leaf_shapes(getattr(saved, "tree", saved), lambda m: m.shape)
            expected = leaf_shapes(tree)
            mismatch = describe_mismatch(expected, saved_shapes)
            if mismatch:
                raise CheckpointMismatchError(
                    f"{directory}/{step}: saved '{name}' does not match the model: {mismatch}",
                    unexpected=tuple(sorted(set(saved_shapes) - set(expected))))
            restored = manager.restore(
                step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(_abstract(tree))})
            )
            items[name] = jax.tree.map(jnp.asarray, restored[name])
        return items, meta
    except CheckpointError:
        raise
    except Exception as error:  # orbax raises many types for corrupt or truncated files
        raise CheckpointError(
            f"{directory}: cannot read checkpoint {step} (corrupt or truncated?): {error}"
        ) from error
    finally:
        manager.close()
