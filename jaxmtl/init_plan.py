"""Which modules a model still lacks, and the batches that create them.

Pure planning for ``MultitaskClassifier.init_from_loaders`` / ``abstract_variables``: a
module is created from the first loader whose tasks run it, so every dataset needs only
its own tasks' input keys. Nothing here creates or compiles anything.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .evaluation import labels_to_tasks
from .loader import DictDataLoader
from .model import ModelGraph, PyTree, with_module_variables
from .nnx_modules import is_nnx_module, reinitialised_variables
from .task import is_flax_module

#: A loader and the tasks it creates modules for.
LoaderPlan = list[tuple[DictDataLoader, list[str]]]


def device_batch(tree: Mapping[str, Any]) -> dict[str, jax.Array]:
    """``tree``'s arrays as device arrays (one batch of inputs)."""
    return {key: jnp.asarray(value) for key, value in tree.items()}


def missing_modules(graph: ModelGraph, variables: PyTree | None, created: Collection[str],
                    task_names: Sequence[str], planned: Collection[str] = frozenset()
                    ) -> list[str]:
    """Flax modules the tasks run that have no variables and were never initialised
    (nor are ``planned`` to be): ``created`` names the modules init ran for, some of
    which have no variables."""
    known = set(created) | set(planned)
    if variables is not None:
        known |= {name for tree in variables.values() for name in tree}
    return [name for name in graph.modules_for(task_names)
            if name not in known and is_flax_module(graph.module_pool[name])]


def loader_plan(graph: ModelGraph, variables: PyTree | None, created: Collection[str],
                dataloaders: Sequence[DictDataLoader],
                remap_labels: Mapping[str, str | None] | None) -> tuple[LoaderPlan, set[str]]:
    """The loaders whose tasks run modules not created yet (with those tasks), each
    creating the modules no earlier one does, and all the modules they create.

    A loader's tasks are its dataset's label names that are tasks (after
    ``remap_labels``)."""
    plan, planned = [], set()
    for dataloader in dataloaders:
        tasks = list(dict.fromkeys(labels_to_tasks(
            graph, list(dataloader.dataset.Y_dict), remap_labels or {}).values()))
        missing = missing_modules(graph, variables, created, tasks, planned) if tasks else []
        if missing:
            plan.append((dataloader, tasks))
            planned |= set(missing)
    return plan, planned


def first_batches(plan: LoaderPlan) -> list[tuple[dict, list[str]]]:
    """``(X_dict, tasks)`` of each planned loader's first batch (epoch 0's order)."""
    return [(device_batch(dataloader.batch_at(dataloader.order(0), 0)[0]), tasks)
            for dataloader, tasks in plan]


def example_first_batches(plan: LoaderPlan) -> list[tuple[dict, list[str]]]:
    """As ``first_batches``, but batches of the first batches' shapes and dtypes, drawn by
    nobody (for tracing only: no loader state is read beyond the order)."""
    return [(device_batch(dl.example_batch(dl.shape_index(
        dl.rows_at(dl.order(0), 0)[0]))[0]), tasks) for dl, tasks in plan]


def with_seeded_nnx(graph: ModelGraph, variables: PyTree | None,
                    module_names: Sequence[str], seed: int) -> PyTree | None:
    """``variables`` plus the NNX modules among ``module_names`` redrawn from ``seed``
    (``init_variables`` then keeps them; without this it creates NNX modules from their
    own values). ``variables`` is not changed."""
    for name in module_names:
        module = graph.module_pool[name]
        if is_nnx_module(module):
            drawn = reinitialised_variables(graph.nnx_specs[name], module, seed)
            variables = with_module_variables(variables or {"params": {}}, name, drawn)
    return variables
