"""MultitaskClassifier: a thin shell over the pure core in ``model.py``.

It holds the task graph and the current variables, and caches one jitted function per
task set (``evaluation.EvalPrograms``); all math lives in ``model.py``, the evaluation
entry points' bodies in ``evaluation.py``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from . import evaluation, init_plan
from .evaluation import EvalPrograms
from .initialisation import abstract_init_variables, compiled_init_variables, init_variables
from .loader import DictDataLoader
from .model import ModelGraph, PyTree, build_graph
from .parallel import DataParallel, choose_parallel
from .persistence import load_variables, save_params
from .task import Operation, Task
from .training.guards import InterruptGuard

if TYPE_CHECKING:  # pandas is imported only when a DataFrame is asked for
    import pandas as pd

logger = logging.getLogger(__name__)

#: Up to this many loaders creating modules, ``init_from_loaders`` compiles one program.
COMPILED_INIT_LOADERS = 4


def _devices_for(device: int | None, dataparallel: bool) -> tuple[Any, ...] | None:
    """The devices Snorkel's ``device`` argument selects (None: JAX's defaults)."""
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (int, np.integer)):
        raise ValueError(f"MultitaskClassifier: device must be an int index or -1 for the "
                         f"CPU, got {device!r}")
    if device == -1:
        devices = tuple(jax.devices("cpu"))
        return devices if dataparallel else devices[:1]
    local = tuple(jax.local_devices())
    if not 0 <= device < len(local):
        raise ValueError(f"MultitaskClassifier: device={device} is not one of the "
                         f"{len(local)} local devices {list(local)} (or -1 for the CPU)")
    return local if dataparallel else (local[device],)


class MultitaskClassifier:
    """A multi-task classifier: tasks share modules (and weights) by module name.

    Args:
      tasks: the Tasks to model.
      name: model name; defaults to the class name.
      seed: seed of parameter initialisation. The rule, in one place: an explicit
        ``init(..., seed=)`` wins; else this seed; else (None, the default) the seed of
        the ``Trainer`` whose ``fit`` first initialises the model; else 0 (a model
        initialised outside ``fit``, e.g. by ``score`` or ``init``). A model that already
        has weights keeps them; only modules it lacks (a task added later) are created.
        Flax NNX modules start from their own values whatever this seed; an explicit
        ``init(..., seed=)`` or ``init_from_loaders(..., seed=)`` redraws them.
      dataparallel: use all local devices for data parallelism when there are several.
      device: Snorkel's device: a device index into ``jax.local_devices()`` or -1 for
        the CPU (``jax.devices("cpu")``); None (default) uses JAX's default devices.
        With ``dataparallel`` all devices of that platform are used, else this one.

    Attributes:
      variables: ``{collection: {module_name: ...}}`` once initialised, else None.
      params: ``variables["params"]``.
    """

    def __init__(self, tasks: Sequence[Task], name: str | None = None,
                 seed: int | None = None, dataparallel: bool = True,
                 device: int | None = None) -> None:
        self.name = name if name is not None else type(self).__name__
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ValueError(f"MultitaskClassifier: seed must be an int or None, got {seed!r}")
        self.seed = seed
        self.dataparallel = dataparallel
        self.device = device
        self.devices = _devices_for(device, dataparallel)
        self._tasks: list[Task] = []
        self.graph: ModelGraph = build_graph([])
        self.variables: PyTree | None = None
        self._created: set[str] = set()  # modules init ran for (some have no variables)
        # (the graph they were fetched for, its programs); fetched on first use.
        self._eval_programs: tuple[ModelGraph, EvalPrograms] | None = None
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
          ValueError: as ``build_graph`` (duplicate task, conflicting module).
        """
        if not isinstance(task, Task):
            raise ValueError(f"add_task expects a Task, got {type(task).__name__}")
        self.graph = build_graph([*self._tasks, task])
        self._tasks.append(task)
        self._eval_programs = None
        self._parallel = None
        if self.variables is not None:
            logger.info("Task '%s' added to an initialised model; its new modules are "
                        "initialised from the first batch that carries it", task.name)

    # --- parameters ------------------------------------------------------------------
    def init_seed(self, fallback: int | None = None) -> int:
        """The seed a fresh initialisation uses: the model's, else ``fallback``, else 0."""
        if self.seed is not None:
            return int(self.seed)
        return 0 if fallback is None else int(fallback)

    def _missing_modules(self, task_names: Sequence[str]) -> list[str]:
        """Flax modules the tasks run that were never initialised."""
        return init_plan.missing_modules(self.graph, self.variables, self._created, task_names)

    def init(self, X_dict: Mapping[str, Any], seed: int | None = None,
             task_names: Sequence[str] | None = None) -> PyTree:
        """Initialises the modules of ``task_names`` from a batch of their inputs.

        Modules already initialised keep their weights (so a task added later shares
        them); a module's initial weights depend on the seed and its place in the module
        pool only, so initialising from several batches (one per dataset) in any order
        gives the same weights. Flax NNX modules start from their own values, unless
        ``seed`` is given: then the NNX modules this call creates are redrawn from it
        (``nnx_modules.reinitialised_variables``: every ``nnx.Param`` from the seed, its
        module's name and its path, with its own initializer; BatchNorm statistics
        reset).

        Args:
          X_dict: input name -> array [B, ...] (one batch is enough).
          seed: initialisation seed (it also redraws NNX modules); defaults to the
            model's ``seed`` (0 if None), with NNX modules keeping their own values.
          task_names: tasks to initialise; defaults to every task whose input keys are
            all in ``X_dict``.

        Returns:
          The model's variables.

        Raises:
          ValueError: if ``X_dict`` holds the inputs of no task; with ``seed``, if an NNX
            parameter's initializer cannot be found (naming the module and the path).
        """
        if task_names is None:
            task_names = [t for t in self.task_names
                          if (self.graph.input_keys([t]) or set()) <= set(X_dict)]
            if not task_names:
                needed = {t: sorted(self.graph.input_keys([t]) or ()) for t in self.task_names}
                raise ValueError(
                    f"init: X_dict has keys {sorted(X_dict)}, which hold the inputs of no "
                    f"task; the tasks read {needed}")
        resolved = self.init_seed() if seed is None else int(seed)
        variables = (self.variables if seed is None else init_plan.with_seeded_nnx(
            self.graph, self.variables, self._missing_modules(task_names), resolved))
        self._compiled_init([(init_plan.device_batch(X_dict), task_names)],
                            jax.random.PRNGKey(resolved), variables)
        self._created |= set(self.graph.modules_for(task_names))
        return self.variables

    def _compiled_init(self, batches: list[tuple[dict, Sequence[str]]], rng: jax.Array,
                       variables: PyTree | None) -> None:
        """``self.variables`` = ``variables`` grown by ``compiled_init_variables`` over
        ``batches`` (set only when it succeeds).

        A Ctrl-C waits for the program (seconds): delivered mid-compile it would throw
        the compile away, and a set-up interrupted again would never progress.
        """
        with InterruptGuard() as guard, guard.critical():
            self.variables = compiled_init_variables(self.graph, batches, rng, variables)

    def init_from_loaders(self, dataloaders: Sequence[DictDataLoader],
                          seed: int | None = None,
                          remap_labels: Mapping[str, str | None] | None = None, *,
                          fallback_seed: int | None = None) -> PyTree:
        """Creates every module the loaders' tasks need, from one batch of each loader.

        A loader's tasks are its dataset's label names that are tasks (after
        ``remap_labels``). Each module is created from the first loader whose tasks run
        it, so every dataset needs only its own tasks' input keys. Nothing is computed
        for a model that already has all the modules.

        Args:
          dataloaders: DictDataLoaders, in order.
          seed: the seed when the model's ``seed`` is None (the model's wins, as in
            ``Trainer.fit``). Given, it also redraws the NNX modules this call creates
            from that same seed, as ``init(..., seed=)`` does.
          remap_labels: label name -> task name, as in ``predict``.
          fallback_seed: as ``seed``, but NNX modules keep their own values: the seed of
            a ``Trainer`` initialising the model it fits.

        Returns:
          The model's variables (None if no loader carries a task).

        Raises:
          ValueError: with ``seed``, if an NNX parameter's initializer cannot be found
            (naming the module and the path).
        """
        plan, planned = init_plan.loader_plan(self.graph, self.variables, self._created,
                                              dataloaders, remap_labels)
        batches = init_plan.first_batches(plan)
        if batches:
            resolved = self.init_seed(seed if seed is not None else fallback_seed)
            variables = (self.variables if seed is None else init_plan.with_seeded_nnx(
                self.graph, self.variables, sorted(planned), resolved))
            rng = jax.random.PRNGKey(resolved)
            # One compiled program for a few loaders; with many (a head each, typically),
            # the first loader's modules (the shared body, most weights) compiled and the
            # rest eagerly, where every head of one shape reuses the same small op
            # programs: the one program's compile grows with the loaders (64: 17 s, eager
            # 4 s; 2: 1.75 s, eager 1.8 s).
            compiled = batches if len(batches) <= COMPILED_INIT_LOADERS else batches[:1]
            self._compiled_init(compiled, rng, variables)
            for X_dict, tasks in batches[len(compiled):]:
                self.variables = init_variables(self.graph, X_dict, rng, tasks,
                                                self.variables)
            self._created |= planned
        return self.variables

    def abstract_variables(self, dataloaders: Sequence[DictDataLoader], *,
                           fallback_seed: int | None = None) -> PyTree:
        """The variables ``init_from_loaders(dataloaders, fallback_seed=...)`` would give
        the model, as ``jax.ShapeDtypeStruct`` leaves: traced, nothing created or compiled
        (the Trainer compiles its step from them while the model initialises).

        Returns:
          The abstract variables (``{"params": {}}`` for a model without parameters), or
          None when more than ``COMPILED_INIT_LOADERS`` loaders create modules: their
          trace alone would cost about what the overlap saves (64 heads: 1.6 s).
        """
        plan, _ = init_plan.loader_plan(self.graph, self.variables, self._created,
                                        dataloaders, None)
        if len(plan) > COMPILED_INIT_LOADERS:
            return None
        batches = init_plan.example_first_batches(plan)
        if not batches:
            return jax.eval_shape(lambda v: v, self.variables or {"params": {}})
        rng = jax.random.PRNGKey(self.init_seed(fallback_seed))
        return abstract_init_variables(self.graph, batches, rng, self.variables)

    def ensure_variables(self, X_dict: Mapping[str, Any], task_names: Sequence[str]
                         ) -> PyTree:
        """The model's variables, after creating the modules ``task_names`` need but lack.

        Args:
          X_dict: a batch of inputs (as in ``init``) to create missing modules from.
          task_names: the tasks about to run.

        Returns:
          ``self.variables`` (``{"params": {}}`` for a model without parameters).
        """
        if self._missing_modules(task_names):
            self.init(X_dict, task_names=task_names)
        if self.variables is None:
            self.variables = {"params": {}}
        return self.variables

    # --- jitted entry points -----------------------------------------------------------
    @property
    def parallel(self) -> DataParallel:
        """How predict, score and calculate_loss use the local devices (``dataparallel``)."""
        if self._parallel is None:
            devices = self.devices if self.devices is not None else jax.local_devices()
            self._parallel = choose_parallel("auto", self.dataparallel, devices)
        return self._parallel

    @property
    def eval_programs(self) -> EvalPrograms:
        """The jitted evaluation programs of the current graph (another when it changes),
        shared with the models of equal graphs (``EvalPrograms.shared``)."""
        if self._eval_programs is None or self._eval_programs[0] is not self.graph:
            self._eval_programs = (self.graph, EvalPrograms.shared(self.graph))
        return self._eval_programs[1]

    def forward(self, X_dict: Mapping[str, Any], task_names: Sequence[str]) -> dict[str, Any]:
        """Evaluation-mode outputs of every op the tasks need, plus "_input_" -> X_dict."""
        variables = self.ensure_variables(X_dict, task_names)
        single = choose_parallel("single", devices=self.devices)
        return self.eval_programs.program("forward", tuple(task_names), single)(
            variables, init_plan.device_batch(X_dict))

    def calculate_loss(
        self, X_dict: Mapping[str, Any], Y_dict: Mapping[str, Any]
    ) -> tuple[dict[str, jax.Array], dict[str, int]]:
        """Per-task mean loss and active-row count, for tasks with active rows (Snorkel's).

        Rows whose label is -1 are ignored; label names that are not tasks are skipped.
        """
        return evaluation.calculate_loss(self, X_dict, Y_dict)

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
          {"golds": {label: [N] or [N, K]}, "probs": {label: [N, K]}[, "preds": {label: [N]}]},
          rows in the order of the loader's pass: the dataset's order for a loader with
          ``shuffle=False`` and ``bucket_by_length=False``, else ``dataloader.order(e)``
          with ``e`` the loader's epoch before the call (the pass advances it:
          ``dataloader.epoch - 1`` after it); ``my_array[dataloader.order(e)]`` lines an
          array of your own up with them.
        """
        return evaluation.predict(self, dataloader, return_preds, remap_labels)

    def score(
        self,
        dataloaders: DictDataLoader | Sequence[DictDataLoader],
        remap_labels: Mapping[str, str | None] | None = None,
        as_dataframe: bool = False,
    ) -> dict[str, float] | pd.DataFrame:
        """Scores every label set with its task's Scorer, per dataloader (a list of
        DictDataLoaders, or one).

        Returns:
          ``{"label/dataset/split/metric": value}`` plus, per split and metric, the macro
          average over label sets as ``"model/all/{split}/{metric}"`` (a target for
          checkpointing); with ``as_dataframe`` a DataFrame with columns label, dataset,
          split, metric, score.
        """
        return evaluation.score(self, dataloaders, remap_labels, as_dataframe)

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
        (version 1 or 2), a ``best_model_<metric>`` directory, a numbered checkpoint inside
        it, or a ``checkpoints/<n>`` of a checkpoint_dir (``<n>`` numbers a run's
        checkpoints from 0; its ``meta/`` holds the iteration it was taken at).

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
        # Every module is now what the file says (a module without variables has none).
        self._created = set(self.graph.module_pool)
