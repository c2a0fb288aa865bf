"""Checks of a model and its loaders before the first step: mistakes that train nothing.

Each is a pure function of the model's graph and the loaders' data, run once per ``fit``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from ..classifier import MultitaskClassifier
from ..data import is_active
from ..loader import DictDataLoader
from ..loss_terms import per_example_loss
from ..model import ModelGraph, apply_ops, task_logits
from ..signatures import family_of, task_families

logger = logging.getLogger(__name__)


def warn_unused_labels(model: MultitaskClassifier, dataloaders: Sequence[DictDataLoader],
                       train_split: str) -> None:
    """Warns about label names that match no task, and a train split that labels none.

    A typo in a ``Y_dict`` key trains nothing and scores nothing; Snorkel is silent.
    """
    tasks = set(model.task_names)
    for dl in dataloaders:
        unknown = sorted(set(dl.dataset.Y_dict) - tasks)
        if unknown:
            logger.warning(
                "Dataset '%s' (%s): labels %s match no task of the model and are ignored; "
                "the tasks are %s", dl.dataset.name, dl.dataset.split, unknown,
                model.task_names)
    train = [dl for dl in dataloaders if dl.dataset.split == train_split]
    if train and not any(set(dl.dataset.Y_dict) & tasks for dl in train):
        logger.warning(
            "No '%s' dataloader labels any task of the model (its label names: %s; the "
            "tasks: %s): fit will not train anything", train_split,
            sorted({key for dl in train for key in dl.dataset.Y_dict}), model.task_names)


def warn_single_task_steps(balancer: Any, batch_scheduler: str, model: MultitaskClassifier,
                           train_loaders: Sequence[DictDataLoader]) -> None:
    """Warns when a gradient balancer (PCGrad, MGDA, ...) will only ever see one task per
    step: each train loader labels at most one task and the scheduler is not "mixed", so
    every step's combined gradient is that one task's, the plain summed loss's."""
    if balancer is None or not getattr(balancer, "needs_task_grads", False) \
            or batch_scheduler == "mixed":
        return
    tasks = set(model.task_names)
    per_loader = [len(set(dl.dataset.Y_dict) & tasks) for dl in train_loaders]
    if max(per_loader, default=0) <= 1:
        logger.warning(
            "The balancer compares per-task gradients, but every train loader labels one "
            "task and batch_scheduler=%r gives each step one loader's batch: each step "
            "trains one task and the balancer reduces to the plain summed loss. Use "
            "batch_scheduler='mixed' (one batch of every loader per step), or datasets "
            "that label several tasks", batch_scheduler)


def output_widths(model: MultitaskClassifier, dataloaders: Sequence[DictDataLoader]
                  ) -> dict[str, int]:
    """Task name -> K, the width of its logits [B, K], from shapes alone (no compute).

    Each task's width is traced from the first loader that labels it; a task whose family
    (``signatures.task_families``) already has a width takes it without a trace.
    """
    widths: dict[str, int] = {}
    # Members of a task family have equal heads (same configuration and shapes): one
    # trace per family, not per task, keeps this independent of the number of tasks.
    families = task_families(model.graph, model.variables)
    for dl in dataloaders:
        tasks = []
        for task in dl.dataset.Y_dict:
            if task not in model.graph.op_sequences or task in widths:
                continue
            family = family_of(families, task)
            known = [widths[m] for m in family.tasks if m in widths] if family else []
            if known:
                widths[task] = known[0]
            else:
                tasks.append(task)
        if not tasks:
            continue
        X_dict, _ = dl.batch_at(dl.order(0), 0)
        shapes = jax.eval_shape(functools.partial(_logits, model.graph, tuple(tasks)),
                                model.variables, X_dict)
        widths.update({t: int(shape.shape[-1]) for t, shape in shapes.items()})
    return widths


def _logits(graph: ModelGraph, tasks: tuple[str, ...], variables: Any, X_dict: Any
            ) -> dict[str, Any]:
    outputs, _ = apply_ops(graph, variables, X_dict, tasks)
    return {t: task_logits(graph, outputs, t) for t in tasks}


def check_labels_fit_heads(model: MultitaskClassifier,
                           dataloaders: Sequence[DictDataLoader]) -> dict[str, int]:
    """Hard labels must lie in [0, K) and soft labels have K columns, K the head's width.

    Returns:
      Task name -> K, for the tasks the loaders label (``output_widths``).

    Raises:
      ValueError: naming the task, the dataset, the offending value and K (a label K on
        a K-class head, the usual 1-indexed mistake, would otherwise train on NaN).
    """
    widths = output_widths(model, dataloaders)
    for dl in dataloaders:
        dataset = dl.dataset
        for task, labels in dataset.Y_dict.items():
            if task not in widths:
                continue
            k = widths[task]
            where = f"Task '{task}', dataset '{dataset.name}' ({dataset.split})"
            if labels.ndim == 2:
                if labels.shape[1] != k:
                    raise ValueError(
                        f"{where}: soft labels have {labels.shape[1]} columns, but the "
                        f"task's head outputs K = {k} classes")
                continue
            labelled = labels[is_active(labels)]
            if labelled.size and int(labelled.max()) >= k:
                bad = int(labelled.max())
                row = int(np.flatnonzero(labels == bad)[0])
                raise ValueError(
                    f"{where}: label {bad} (row {row}) is outside the head's K = {k} "
                    f"classes; hard labels must be 0 .. {k - 1} (-1 = no label). "
                    f"1-indexed labels? Subtract 1.")
    return widths


def check_scalar_losses(model: MultitaskClassifier, dataloaders: Sequence[DictDataLoader],
                        widths: dict[str, int], rows: int = 8) -> None:
    """A ``loss_func`` that returns a scalar must be the mean of its rows' losses.

    jaxmtl evaluates such a loss row by row (``loss_terms.per_example_loss``) and averages
    over the active rows of each batch, which reproduces a plain mean (``F.cross_entropy``)
    but not a weighted mean (torch's ``weight=``: ``sum(w[y] * ce) / sum(w[y])``) or a
    sum: those would train as the unweighted mean, silently. Checked on up to ``rows``
    labelled rows of each task's first loader, with random logits.

    Raises:
      ValueError: naming the task, both values and what to write instead.
    """
    rng = np.random.default_rng(0)
    checked = set()
    for dl in dataloaders:
        for task, labels in dl.dataset.Y_dict.items():
            if task in checked or task not in widths:
                continue
            checked.add(task)
            loss_func = model.graph.loss_funcs[task]
            labelled = np.asarray(labels)[is_active(labels)][:rows]
            if len(labelled) < 2:
                continue
            logits = rng.normal(size=(len(labelled), widths[task])).astype(np.float32)
            whole = loss_func(logits, labelled)
            if np.ndim(whole) != 0:
                continue  # per-row losses: used as they are
            # The row-by-row losses training uses, against the loss of the rows at once.
            by_row = float(np.mean(per_example_loss(loss_func, logits, labelled, task)))
            whole = float(whole)
            if not np.isclose(whole, by_row, rtol=1e-4, atol=1e-6):
                raise ValueError(
                    f"Task '{task}': loss_func returns a scalar that is not the mean of its "
                    f"rows' losses ({whole:.6g} on {len(labelled)} rows, their mean "
                    f"{by_row:.6g}): a weighted mean (torch's weight=) or a sum? jaxmtl "
                    f"averages per-row losses over each batch's labelled rows, so it would "
                    f"train as the plain mean. Return per-row losses [B] instead (class "
                    f"weights: w[labels] * cross entropy, averaged over rows as Snorkel's "
                    f"cross_entropy_with_probs(weight=) does) or a plain mean")
