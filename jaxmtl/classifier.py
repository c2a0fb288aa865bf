"""MultitaskClassifier: a thin shell over the pure core in ``model.py``.

It holds the task graph and the current variables, and caches one jitted function per
task set; all math lives in ``model.py``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .analysis.scorer import metrics_dict_to_dataframe
from .data import DictDataLoader
from .model import (
    ModelGraph,
    PyTree,
    apply_ops,
    build_graph,
    init_variables,
    task_loss_terms,
    task_probs,
)
from .parallel import DataParallel, choose_parallel, local_parallel
from .persistence import load_variables, save_params
from .task import Operation, Task
from .utils import probs_to_preds

logger = logging.getLogger(__name__)

def _as_device_batch(tree: Mapping[str, Any]) -> dict[str, jax.Array]:
    return {key: jnp.asarray(value) for key, value in tree.items()}


def _drop_padding(rows: np.ndarray, valid: Sequence[int]) -> np.ndarray:
    """Keeps the first ``valid[i]`` rows of each equal-sized batch block of ``rows``."""
    if all(n == valid[0] for n in valid) and len(rows) == sum(valid):
        return rows
    size = len(rows) // len(valid)
    blocks = rows.reshape(len(valid), size, *rows.shape[1:])
    return np.concatenate([block[:n] for block, n in zip(blocks, valid, strict=True)])


def _macro_averages(scores: Mapping[str, float]) -> dict[str, float]:
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


class MultitaskClassifier:
    """A multi-task classifier: tasks share modules (and weights) by module name.

    Args:
      tasks: the Tasks to model.
      name: model name; defaults to the class name.
      seed: seed of parameter initialisation (``init`` may override it).
      dataparallel: use all local devices for data parallelism when there are several.

    Attributes:
      variables: ``{collection: {module_name: ...}}`` once initialised, else None.
      params: ``variables["params"]``.
    """

    def __init__(self, tasks: Sequence[Task], name: str | None = None, seed: int = 0,
                 dataparallel: bool = True) -> None:
        self.name = name if name is not None else type(self).__name__
        self.seed = seed
        self.dataparallel = dataparallel
        self._tasks: list[Task] = []
        self.graph: ModelGraph = build_graph([])
        self.variables: PyTree | None = None
        self._jitted: dict[Any, Any] = {}
        self._owning_modules: set[str] | None = None
        self._parallel: DataParallel | None = None
        for task in tasks:
            self.add_task(task)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name}, tasks={self.task_names})"

    # --- structure -------------------------------------------------------------------
    @property
    def task_names(self) -> list[str]:
        """Task names, in the order they were added."""
        return list(self.graph.task_names)

    @property
    def op_sequences(self) -> dict[str, list[Operation]]:
        """Task name -> its op sequence."""
        return {name: list(ops) for name, ops in self.graph.op_sequences.items()}

    @property
    def module_pool(self) -> dict[str, Any]:
        """Module name -> module, merged over tasks."""
        return dict(self.graph.module_pool)

    @property
    def scorers(self) -> dict[str, Any]:
        """Task name -> its Scorer."""
        return {task.name: task.scorer for task in self._tasks}

    @property
    def params(self) -> PyTree | None:
        """Trainable parameters ``{module_name: ...}`` (None before initialisation)."""
        return None if self.variables is None else self.variables["params"]

    def add_task(self, task: Task) -> None:
        """Adds a task; its modules join the pool (existing names keep their weights).

        Raises:
          ValueError: as ``build_graph`` (duplicate task, conflicting module or op).
        """
        if not isinstance(task, Task):
            raise ValueError(f"add_task expects a Task, got {type(task).__name__}")
        self.graph = build_graph([*self._tasks, task])
        self._tasks.append(task)
        self._jitted: dict[Any, Any] = {}
        self._owning_modules: set[str] | None = None
        self._parallel: DataParallel | None = None
        if self.variables is not None:
            logger.info("Task '%s' added to an initialised model; new modules are "
                        "initialised on the next batch", task.name)

    # --- parameters ------------------------------------------------------------------
    def init(self, X_dict: Mapping[str, Any], seed: int | None = None) -> PyTree:
        """Initialises every module's variables from a batch of inputs.

        Modules already initialised keep their weights (so a task added later shares them).

        Args:
          X_dict: input name -> array [B, ...] (one batch is enough).
          seed: initialisation seed; defaults to the model's ``seed``.

        Returns:
          The model's variables.
        """
        rng = jax.random.PRNGKey(self.seed if seed is None else seed)
        fresh = init_variables(self.graph, _as_device_batch(X_dict), rng)
        if self.variables is not None:
            for col, tree in self.variables.items():
                fresh.setdefault(col, {}).update(tree)
        self.variables = fresh
        return self.variables

    def _ensure_variables(self, X_dict: Mapping[str, Any]) -> PyTree:
        known = set() if self.variables is None else {
            name for tree in self.variables.values() for name in tree
        }
        if self.variables is None or not known >= self._param_modules_needed(X_dict):
            self.init(X_dict)
        return self.variables

    def _param_modules_needed(self, X_dict: Mapping[str, Any]) -> set[str]:
        # Modules that own variables: those init would create (found without compute).
        if self._owning_modules is None:
            shapes = jax.eval_shape(
                lambda x: init_variables(self.graph, x, jax.random.PRNGKey(0)),
                _as_device_batch(X_dict),
            )
            self._owning_modules = {name for tree in shapes.values() for name in tree}
        return self._owning_modules

    # --- jitted entry points -----------------------------------------------------------
    @property
    def parallel(self) -> DataParallel:
        """How predict, score and calculate_loss use the local devices (``dataparallel``)."""
        if self._parallel is None:
            self._parallel = local_parallel(self.dataparallel)
        return self._parallel

    def _compiled(self, kind: str, task_names: tuple[str, ...], parallel: DataParallel) -> Any:
        key = (kind, task_names, parallel)
        if key not in self._jitted:
            graph = self.graph
            if kind == "probs":
                fn = lambda v, x: task_probs(graph, v, x, task_names)  # noqa: E731
            elif kind == "forward":
                fn = lambda v, x: apply_ops(graph, v, x, task_names)[0]  # noqa: E731
            else:
                fn = lambda v, x, y, m: task_loss_terms(graph, v, x, y, m)[0]  # noqa: E731
            self._jitted[key] = parallel.compile(fn)
        return self._jitted[key]

    def forward(self, X_dict: Mapping[str, Any], task_names: Sequence[str]) -> dict[str, Any]:
        """Evaluation-mode outputs of every op the tasks need, plus "_input_" -> X_dict."""
        variables = self._ensure_variables(X_dict)
        single = choose_parallel("single")
        return self._compiled("forward", tuple(task_names), single)(
            variables, _as_device_batch(X_dict))

    def calculate_loss(
        self, X_dict: Mapping[str, Any], Y_dict: Mapping[str, Any]
    ) -> tuple[dict[str, jax.Array], dict[str, int]]:
        """Per-task mean loss and active-row count, for tasks with active rows (Snorkel's).

        Rows whose label is -1 are ignored; label names that are not tasks are skipped.
        """
        variables = self._ensure_variables(X_dict)
        tasks = tuple(name for name in Y_dict if name in self.graph.op_sequences)
        parallel = self.parallel
        batch = parallel.put_batch(X_dict, {t: Y_dict[t] for t in tasks},
                                   np.ones(len(next(iter(X_dict.values()))), bool))
        terms = self._compiled("loss", tasks, parallel)(parallel.replicate(variables), *batch)
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

    def _labels_to_tasks(self, label_names: Sequence[str],
                         remap_labels: Mapping[str, str | None]) -> dict[str, str]:
        mapping = {}
        for label in label_names:
            task = remap_labels.get(label, label)
            if task is not None and task in self.graph.op_sequences:
                mapping[label] = task
        return mapping

    def predict(
        self,
        dataloader: DictDataLoader,
        return_preds: bool = False,
        remap_labels: Mapping[str, str | None] | None = None,
    ) -> dict[str, dict[str, np.ndarray]]:
        """Golds and probabilities (and predictions) of every label set the model can read.

        Args:
          dataloader: a DictDataLoader; padded rows are dropped.
          return_preds: also return argmax predictions (``probs_to_preds``).
          remap_labels: label name -> task name whose head predicts it (None drops it).

        Returns:
          {"golds": {label: [N] or [N, K]}, "probs": {label: [N, K]}[, "preds": {label: [N]}]}
        """
        labels_to_tasks = self._labels_to_tasks(list(dataloader.dataset.Y_dict),
                                                remap_labels or {})
        tasks = tuple(dict.fromkeys(labels_to_tasks.values()))
        golds: dict[str, list] = {label: [] for label in labels_to_tasks}
        valid: list[int] = []
        probs: dict[str, list] = {label: [] for label in labels_to_tasks}
        if tasks:
            parallel = self.parallel
            probs_fn = self._compiled("probs", tasks, parallel)
            device_variables = None
            for batch in dataloader:
                X_dict, Y_dict = batch
                n_rows = len(next(iter(X_dict.values())))
                mask = getattr(batch, "mask", np.ones(n_rows, bool))
                if device_variables is None:
                    device_variables = parallel.replicate(self._ensure_variables(X_dict))
                device_X, _, _ = parallel.put_batch(X_dict, {}, mask)
                batch_probs = probs_fn(device_variables, device_X)
                valid.append(int(mask.sum()))
                for label, task in labels_to_tasks.items():
                    probs[label].append(parallel.gather_rows(batch_probs[task]))
                    golds[label].append(np.asarray(Y_dict[label])[: valid[-1]])
        # One device-to-host copy per label set; padded rows are dropped on the host.
        results: dict[str, dict[str, np.ndarray]] = {
            "golds": {label: np.concatenate(v) for label, v in golds.items() if v},
            "probs": {label: _drop_padding(np.asarray(jnp.concatenate(v)), valid)
                      for label, v in probs.items() if v},
        }
        if return_preds:
            results["preds"] = {label: probs_to_preds(p) for label, p in results["probs"].items()}
        return results

    def score(
        self,
        dataloaders: Sequence[DictDataLoader],
        remap_labels: Mapping[str, str | None] | None = None,
        as_dataframe: bool = False,
    ) -> dict[str, float] | pd.DataFrame:
        """Scores every label set with its task's Scorer, per dataloader.

        Returns:
          ``{"label/dataset/split/metric": value}`` plus, per split and metric, the macro
          average over label sets as ``"model/all/{split}/{metric}"`` (a target for
          checkpointing); with ``as_dataframe`` a DataFrame with columns label, dataset,
          split, metric, score.
        """
        scores: dict[str, float] = {}
        for dataloader in dataloaders:
            dataset = dataloader.dataset
            labels_to_tasks = self._labels_to_tasks(list(dataset.Y_dict), remap_labels or {})
            extra = set(dataset.Y_dict) - set(labels_to_tasks)
            if extra:
                logger.info("Ignoring extra labels in dataloader (%s): %s", dataset.split,
                            sorted(extra))
            results = self.predict(dataloader, return_preds=True, remap_labels=remap_labels)
            for label, task in labels_to_tasks.items():
                task_scores = self.scorers[task].score(
                    golds=results["golds"][label],
                    preds=results["preds"][label],
                    probs=results["probs"][label],
                )
                for metric, value in task_scores.items():
                    scores["/".join([label, dataset.name, dataset.split, metric])] = value
        scores.update(_macro_averages(scores))
        return metrics_dict_to_dataframe(scores) if as_dataframe else scores

    # --- persistence -----------------------------------------------------------------
    def save(self, model_path: str | os.PathLike) -> None:
        """Saves the variables to ``model_path``: a msgpack file, written atomically.

        The layout (``persistence.encode_params``): ``{"format": "jaxmtl.params",
        "version": 2, "model", "task_names", "module_pool", "checksum", "variables"}``.

        Raises:
          ValueError: if the model is uninitialised.
        """
        if self.variables is None:
            raise ValueError("Cannot save an uninitialised model: call init or train it first")
        save_params(model_path, self.variables, self.name, self.task_names,
                    list(self.graph.module_pool))

    def load(self, model_path: str | os.PathLike) -> None:
        """Loads variables from a ``save`` file or a Checkpointer directory; all or nothing.

        Works on an uninitialised model. ``model_path`` may be a file written by ``save``
        (version 1 or 2), a ``best_model_<metric>`` directory, a step directory inside it,
        or a ``checkpoints/<n>`` step of a checkpoint_dir.

        Raises:
          FileNotFoundError: if ``model_path`` does not exist.
          ValueError: if it is neither kind of source, is corrupt (checksum, format,
            version, malformed payload), or does not fit this model (task names, missing
            or unexpected modules, a leaf's shape or dtype); see ``persistence``. The
            model is unchanged when loading fails.
        """
        variables = load_variables(model_path, self.task_names, self.graph.module_pool,
                                   self.variables)
        self.variables = jax.tree.map(jnp.asarray, variables)
