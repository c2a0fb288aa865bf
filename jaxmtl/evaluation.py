"""Evaluation of a MultitaskClassifier: its compiled programs, calculate_loss, predict, score.

``EvalPrograms`` caches the jitted evaluation programs of one model graph, one per kind
("probs", "forward", "loss"), task set and device placement; a single task with a
``TaskFamily`` runs its family representative's program on its own view of the
variables, so every member of the family shares one compile. ``calculate_loss``,
``predict`` and ``score`` are the bodies of the ``MultitaskClassifier`` methods of the
same names (which document them); the classifier holds the programs and calls these::

    programs = EvalPrograms.shared(model.graph)
    probs_fn, variables = programs.probs_fn(("task_a",), parallel, model.variables)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from .analysis.scorer import metrics_dict_to_dataframe
from .buckets import (
    BucketShapes,
    at_bucket_shape,
    bucket_widths,
    pad_to_longest,
    switches_bucket_shapes,
)
from .loader import DictDataLoader
from .model import ModelGraph, PyTree, apply_ops, task_loss_terms, task_probs
from .parallel import DataParallel
from .signatures import family_of, task_families, view_modules, view_variables
from .utils import probs_to_preds

if TYPE_CHECKING:  # pandas is imported only when a DataFrame is asked for
    import pandas as pd

    from .classifier import MultitaskClassifier

logger = logging.getLogger("jaxmtl.classifier")  # the records keep their logger's name


def drop_padding(rows: np.ndarray, valid: Sequence[int]) -> np.ndarray:
    """Keeps the first ``valid[i]`` rows of each equal-sized batch block of ``rows``."""
    if all(n == valid[0] for n in valid) and len(rows) == sum(valid):
        return rows
    size = len(rows) // len(valid)
    blocks = rows.reshape(len(valid), size, *rows.shape[1:])
    return np.concatenate([block[:n] for block, n in zip(blocks, valid, strict=True)])


def macro_averages(scores: Mapping[str, float]) -> dict[str, float]:
    """``model/all/{split}/{metric}``: the mean over label sets (tasks x datasets) of a split.

    NaN scores (e.g. roc_auc with one class present) are left out of the mean.
    """
    grouped: dict[tuple[str, str], list[float]] = {}
    for key, value in scores.items():
        _, _, split, metric = key.split("/", 3)
        grouped.setdefault((split, metric), []).append(float(value))
    averages = {}
    for (split, metric), values in grouped.items():
        finite = [v for v in values if not np.isnan(v)]
        averages[f"model/all/{split}/{metric}"] = float(np.mean(finite)) if finite else float("nan")
    return averages


def labels_to_tasks(graph: ModelGraph, label_names: Sequence[str],
                    remap_labels: Mapping[str, str | None]) -> dict[str, str]:
    """Label name -> the task whose head predicts it, for the labels that have one.

    Args:
      graph: the model graph (its tasks).
      label_names: a dataset's label names.
      remap_labels: label name -> task name (None drops the label); other labels map to
        the task of their own name, if any.

    Raises:
      ValueError: if ``remap_labels`` maps a label to a name that is not a task (Snorkel
        raises a KeyError there; a typo would silently drop the label set).
    """
    mapping = {}
    for label in label_names:
        task = remap_labels.get(label, label)
        if label in remap_labels and task is not None and task not in graph.op_sequences:
            raise ValueError(f"remap_labels maps label '{label}' to '{task}', which is not a "
                             f"task of the model; the tasks are {list(graph.task_names)} "
                             f"(map a label to None to skip it)")
        if task is not None and task in graph.op_sequences:
            mapping[label] = task
    return mapping


class EvalPrograms:
    """The jitted evaluation programs of one model graph, compiled on first use.

    Args:
      graph: the model graph; a model whose graph changes builds a new ``EvalPrograms``.
    """

    def __init__(self, graph: ModelGraph) -> None:
        self.graph = graph
        self._programs: dict[Any, Any] = {}
        self._families: tuple | None = None

    @staticmethod
    def shared(graph: ModelGraph) -> EvalPrograms:
        """The ``EvalPrograms`` of ``graph``, one for equal graphs (``ModelGraph``'s
        equality: the same computation), so a new model of an earlier model's tasks, as in
        a sweep, traces and compiles no evaluation program again. The last few graphs'
        are kept."""
        return _shared_eval_programs(graph)

    def family_view(self, task_names: Sequence[str]) -> tuple[str, dict[str, str]] | None:
        """For a single task with a ``TaskFamily``: (the representative, the task's view).

        The representative's program run on the task's view of the variables computes
        the task's outputs: every member of the family shares that one program.
        """
        if len(task_names) != 1:
            return None
        # Structural families suffice here: a view holds the member's own variables, and
        # a member whose shapes differ only gets a program of its own. Kept per graph.
        if self._families is None:
            self._families = task_families(self.graph)
        family = family_of(self._families, task_names[0])
        if family is None:
            return None
        return family.representative, view_modules(self.graph, family,
                                                   family.index(task_names[0]))

    def program(self, kind: str, task_names: tuple[str, ...], parallel: DataParallel,
                shapes: BucketShapes | None = None) -> Any:
        """The compiled program of ``kind`` for the task set, placed by ``parallel``.

        Args:
          kind: "probs" (``(variables, X) -> {task: probs}``), "forward" (``(variables,
            X) -> {op: output}``) or "loss" (``(variables, X, Y, mask) -> {task: (sum,
            count)}``).
          task_names: the tasks it computes.
          parallel: the device placement it is compiled for.
          shapes: "probs" only: a loader's ``buckets.bucket_widths``; the program then
            takes X at the longest shape and the batch's shape index, ``(variables, X,
            shape)``, and computes at that shape's lengths (one program for all shapes).
        """
        if shapes is not None and kind != "probs":
            raise ValueError(f"EvalPrograms.program: shapes are for kind 'probs' (its "
                             f"outputs do not follow the lengths); got kind {kind!r}")
        key = (kind, task_names, parallel, shapes)
        if key not in self._programs:
            graph = self.graph
            if shapes is not None:
                def fn(v: PyTree, x: Mapping[str, Any], shape: Any) -> Any:
                    return at_bucket_shape(
                        shapes, shape, lambda x, v: task_probs(graph, v, x, task_names), x, v)
            elif kind == "probs":
                fn = lambda v, x: task_probs(graph, v, x, task_names)  # noqa: E731
            elif kind == "forward":
                fn = lambda v, x: apply_ops(graph, v, x, task_names)[0]  # noqa: E731
            else:
                fn = lambda v, x, y, m: task_loss_terms(graph, v, x, y, m)[0]  # noqa: E731
            self._programs[key] = parallel.compile(fn)
        return self._programs[key]

    def probs_fn(self, tasks: tuple[str, ...], parallel: DataParallel, variables: PyTree,
                 shapes: BucketShapes | None = None) -> tuple[Any, PyTree]:
        """``((variables, X, *shape) -> {task: probs}, variables to pass)``: for a task with
        a family, the representative's program and the task's view of the variables
        (compiled once for all members), else the task set's program (``shapes``: as
        ``program``'s; the function then takes the shape index too)."""
        family_view = self.family_view(tasks)
        if family_view is None:
            return self.program("probs", tasks, parallel, shapes), variables
        representative, view = family_view
        program = self.program("probs", (representative,), parallel, shapes)
        keys = self.graph.input_keys([representative])

        def probs(variables: PyTree, X_dict: Mapping[str, Any], *shape: Any
                  ) -> dict[str, jax.Array]:
            if keys is not None:  # every member's batch has the same X keys
                X_dict = {key: X_dict[key] for key in sorted(keys) if key in X_dict}
            return {tasks[0]: program(variables, X_dict, *shape)[representative]}

        return probs, view_variables(variables, view)


@functools.lru_cache(maxsize=8)
def _shared_eval_programs(graph: ModelGraph) -> EvalPrograms:
    return EvalPrograms(graph)


def calculate_loss(model: MultitaskClassifier, X_dict: Mapping[str, Any],
                   Y_dict: Mapping[str, Any]) -> tuple[dict[str, jax.Array], dict[str, int]]:
    """``model.calculate_loss``: per-task mean loss and active-row count."""
    programs = model.eval_programs
    tasks = tuple(name for name in Y_dict if name in programs.graph.op_sequences)
    variables = model.ensure_variables(X_dict, tasks)
    parallel = model.parallel
    family_view = programs.family_view(tasks)
    if family_view is not None:  # the representative's program on the task's view
        representative, view = family_view
        batch = parallel.put_batch(X_dict, {representative: Y_dict[tasks[0]]},
                                   np.ones(len(next(iter(X_dict.values()))), bool))
        terms = programs.program("loss", (representative,), parallel)(
            parallel.replicate(view_variables(variables, view)), *batch)
        terms = {tasks[0]: terms[representative]}
    else:
        batch = parallel.put_batch(X_dict, {t: Y_dict[t] for t in tasks},
                                   np.ones(len(next(iter(X_dict.values()))), bool))
        terms = programs.program("loss", tasks, parallel)(parallel.replicate(variables),
                                                          *batch)
    # Per-device sums under pmap: adding them over the device axis gives the totals.
    terms = {t: (np.asarray(s, np.float64).sum(), np.asarray(c).sum())
             for t, (s, c) in terms.items()}
    loss_dict, count_dict = {}, {}
    for task_name, (loss_sum, count) in terms.items():
        count = int(count)
        if count > 0:
            loss_dict[task_name] = loss_sum / count
            count_dict[task_name] = count
    return loss_dict, count_dict


def predict(model: MultitaskClassifier, dataloader: DictDataLoader, return_preds: bool,
            remap_labels: Mapping[str, str | None] | None
            ) -> dict[str, dict[str, np.ndarray]]:
    """``model.predict``: golds and probabilities (and predictions) of every label set."""
    programs = model.eval_programs
    label_tasks = labels_to_tasks(programs.graph, list(dataloader.dataset.Y_dict),
                                  remap_labels or {})
    tasks = tuple(dict.fromkeys(label_tasks.values()))
    golds: dict[str, list] = {label: [] for label in label_tasks}
    valid: list[int] = []
    probs: dict[str, list] = {label: [] for label in label_tasks}
    if tasks:
        parallel = model.parallel
        probs_fn = None
        device_variables = None
        # Several bucket shapes: one program for all (buckets.at_bucket_shape).
        switched = switches_bucket_shapes(parallel, len(getattr(dataloader, "bucket_shapes",
                                                                 ())))
        shapes = bucket_widths(dataloader) if switched else None
        for batch in dataloader:
            X_dict, Y_dict = batch
            n_rows = len(next(iter(X_dict.values())))
            mask = getattr(batch, "mask", np.ones(n_rows, bool))
            if device_variables is None:
                variables = model.ensure_variables(X_dict, tasks)
                probs_fn, variables = programs.probs_fn(tasks, parallel, variables, shapes)
                device_variables = parallel.replicate(variables)
            shape = ()
            if switched:
                X_dict, index = pad_to_longest(X_dict, dataloader)
                shape = (np.int32(index),)
            device_X, _, _ = parallel.put_batch(X_dict, {}, mask)
            batch_probs = probs_fn(device_variables, device_X, *shape)
            valid.append(int(mask.sum()))
            for label, task in label_tasks.items():
                probs[label].append(parallel.gather_rows(batch_probs[task]))
                golds[label].append(np.asarray(Y_dict[label])[: valid[-1]])
    # One device-to-host copy per label set; padded rows are dropped on the host.
    results: dict[str, dict[str, np.ndarray]] = {
        "golds": {label: np.concatenate(v) for label, v in golds.items() if v},
        "probs": {label: drop_padding(np.asarray(jnp.concatenate(v)), valid)
                  for label, v in probs.items() if v},
    }
    if return_preds:
        results["preds"] = {label: probs_to_preds(p) for label, p in results["probs"].items()}
    return results


def loader_list(dataloaders: DictDataLoader | Sequence[DictDataLoader], caller: str
                ) -> list[DictDataLoader]:
    """``dataloaders`` as a list: one DictDataLoader, or a list/tuple of them.

    Raises:
      TypeError: for anything else, naming ``caller``, the offending value's type and
        its position.
    """
    if isinstance(dataloaders, DictDataLoader):
        return [dataloaders]
    if not isinstance(dataloaders, (list, tuple)):
        raise TypeError(f"{caller} expects a DictDataLoader or a list of them, got "
                        f"{type(dataloaders).__name__}")
    for index, dataloader in enumerate(dataloaders):
        if not isinstance(dataloader, DictDataLoader):
            raise TypeError(f"{caller} expects a DictDataLoader or a list of them; item "
                            f"{index} is a {type(dataloader).__name__}")
    return list(dataloaders)


def score(model: MultitaskClassifier, dataloaders: Sequence[DictDataLoader],
          remap_labels: Mapping[str, str | None] | None, as_dataframe: bool
          ) -> dict[str, float] | pd.DataFrame:
    """``model.score``: every label set scored by its task's Scorer, per dataloader."""
    scores: dict[str, float] = {}
    for dataloader in loader_list(dataloaders, "score"):
        dataset = dataloader.dataset
        label_tasks = labels_to_tasks(model.graph, list(dataset.Y_dict), remap_labels or {})
        extra = set(dataset.Y_dict) - set(label_tasks)
        if extra:
            logger.info("Ignoring extra labels in dataloader (%s): %s", dataset.split,
                        sorted(extra))
        results = model.predict(dataloader, return_preds=True, remap_labels=remap_labels)
        for label, task in label_tasks.items():
            task_scores = model.scorers[task].score(
                golds=results["golds"][label],
                preds=results["preds"][label],
                probs=results["probs"][label],
            )
            for metric, value in task_scores.items():
                scores["/".join([label, dataset.name, dataset.split, metric])] = value
    scores.update(macro_averages(scores))
    return metrics_dict_to_dataframe(scores) if as_dataframe else scores
