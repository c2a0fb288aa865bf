"""Slice tasks: a base task turned into per-slice indicator and predictor tasks plus a master.

``convert_to_slice_tasks(base_task, slice_names)`` follows Snorkel 0.10
(``snorkel.slicing.utils.convert_to_slice_tasks``). The base task's last op is its head;
the ops before it are the *body*. For each slice ``s`` (``base`` included):

============================ ===================================================================
task                         ops after the body (op name = module name unless noted)
============================ ===================================================================
``{t}_slice:{s}_ind``        ``{t}_slice:{s}_ind_head``: ``nn.Dense(2)``, in the slice or not
``{t}_slice:{s}_pred``       ``{t}_slice:{s}_pred_transform``: ``SliceTransform`` (neck -> neck),
                             then op ``{t}_slice:{s}_pred_head`` on the module
                             ``{t}_slice:shared_pred_head`` (one head for every slice)
``{t}`` (the master)         all of the above, then ``{t}_master_combiner``
                             (``SliceCombinerModule``, reading the outputs dict) and
                             ``{t}_master_head`` (the base task's head module)
============================ ===================================================================

Indicator tasks score F1 (membership is often imbalanced), as Snorkel's. Predictor tasks
and the master keep the base task's scorer, loss and output functions (Snorkel uses the
defaults; keeping the base task's lets soft-label or custom losses carry over); the master
keeps its loss weight. The predictor heads share one module *name*, which in jaxmtl is
what shares weights (Snorkel puts one ``nn.Linear`` object under several names).

Multi-class: the predictor heads and the master head have the base head's K outputs;
indicator heads are always binary; the combiner's confidence rule handles any K (see
``jaxmtl.slicing.combiner``).

Unlike Snorkel, the base task is not modified: the tasks get new module pools that hold
the body's modules (the same objects) and the new heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn

from ..analysis.scorer import Scorer
from ..task import Operation, Task, is_linen_module
from .combiner import SliceCombinerModule, SliceTransform
from .labels import check_slice_names, ind_task_name, pred_task_name

__all__ = ["convert_to_slice_tasks", "master_combiner_name", "master_head_name",
           "shared_pred_head_name"]


def shared_pred_head_name(base_task_name: str) -> str:
    """The module name of the predictor head every slice shares."""
    return f"{base_task_name}_slice:shared_pred_head"


def master_combiner_name(base_task_name: str) -> str:
    """The master task's combiner module (and op) name (Snorkel's)."""
    return f"{base_task_name}_master_combiner"


def master_head_name(base_task_name: str) -> str:
    """The master task's head module (and op) name (Snorkel's)."""
    return f"{base_task_name}_master_head"


def _predictor_head(task_name: str, head_module: Any) -> Any:
    """A fresh module configured as the base head: K outputs from the neck."""
    if is_linen_module(head_module):
        return head_module  # a Linen module is a configuration; weights follow the name
    out_features = getattr(head_module, "out_features", None)
    if isinstance(out_features, int):  # e.g. flax.nnx.Linear
        return nn.Dense(out_features)
    raise ValueError(
        f"Task '{task_name}': its head module {type(head_module).__name__} is neither a "
        f"Flax Linen module nor an NNX module with an int out_features; the slice "
        f"predictor heads copy the head's configuration (e.g. nn.Dense(K))")


def _body_pool(base_task: Task, body_ops: Sequence[Operation]) -> dict[str, Any]:
    used = {op.module_name for op in body_ops}
    return {name: module for name, module in base_task.module_pool.items() if name in used}


def convert_to_slice_tasks(base_task: Task, slice_names: Sequence[str],
                           neck_size: int | None = None) -> list[Task]:
    """The slice indicator and predictor tasks of ``base_task`` and its master task.

    Args:
      base_task: a Task whose last op is its head, applied to the body's representation
        ``[B, H]`` (the "neck") and returning ``[B, K]`` logits, K >= 2.
      slice_names: the slices (``base``, all rows, is added when absent).
      neck_size: H, if known (``SliceAwareClassifier``'s ``head_dim``): initialising
        the model then fails with a clear error on a representation of another width.
        None (Snorkel's signature) takes H from the representation.

    Returns:
      ``2 * (len(slice_names) + 1) + 1`` tasks (one fewer pair if ``base`` was given):
      the indicator tasks, the predictor tasks, then the master task named as the base
      task. Train them with loaders from ``add_slice_labels``.

    Raises:
      ValueError: a bad slice name (see ``labels.check_slice_names``), a base task with
        only one op (no body to share), or a head that cannot be copied.
    """
    names = check_slice_names(slice_names)
    task = base_task.name
    if len(base_task.op_sequence) < 2:
        raise ValueError(
            f"Task '{task}' has one op; slicing needs a body (the ops before the head) "
            f"whose representation the slice heads share")
    head_op = base_task.op_sequence[-1]
    head_module = base_task.module_pool[head_op.module_name]
    body_ops = list(base_task.op_sequence[:-1])
    body_pool = _body_pool(base_task, body_ops)
    pred_head_module = shared_pred_head_name(task)
    pred_head = _predictor_head(task, head_module)

    ind_tasks, pred_tasks, slice_ops = [], [], []
    for name in names:
        ind_name = ind_task_name(task, name)
        ind_op = Operation(f"{ind_name}_head", list(head_op.inputs))
        ind_tasks.append(Task(
            name=ind_name, module_pool={**body_pool, ind_op.module_name: nn.Dense(2)},
            op_sequence=[*body_ops, ind_op], scorer=Scorer(metrics=["f1"])))
        slice_ops.append(ind_op)
    for name in names:
        pred_name = pred_task_name(task, name)
        transform_op = Operation(f"{pred_name}_transform", list(head_op.inputs))
        head = Operation(pred_head_module, [transform_op.name], name=f"{pred_name}_head")
        pred_tasks.append(Task(
            name=pred_name,
            module_pool={**body_pool,
                         transform_op.module_name: SliceTransform(neck_size),
                         pred_head_module: pred_head},
            op_sequence=[*body_ops, transform_op, head], scorer=base_task.scorer,
            loss_func=base_task.loss_func, output_func=base_task.output_func))
        slice_ops += [transform_op, head]

    combiner_op = Operation(master_combiner_name(task), [])
    master_op = Operation(master_head_name(task), [combiner_op.name])
    master_pool = {**body_pool, **{op.module_name: module for t in ind_tasks + pred_tasks
                                   for op in t.op_sequence[len(body_ops):]
                                   for module in [t.module_pool[op.module_name]]},
                   combiner_op.module_name: SliceCombinerModule(),
                   master_op.module_name: head_module}
    master = Task(
        name=task, module_pool=master_pool,
        op_sequence=[*body_ops, *slice_ops, combiner_op, master_op], scorer=base_task.scorer,
        loss_func=base_task.loss_func, output_func=base_task.output_func,
        loss_weight=base_task.loss_weight)
    return [*ind_tasks, *pred_tasks, master]
