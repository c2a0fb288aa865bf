"""Creating a task graph's variables: eagerly, or as one compiled program per task lists.

``init_variables`` runs the forward pass of the tasks' ops once, creating each Linen
module's variables from ``fold_in(rng, module index)`` the first time the pass reaches it
and taking an NNX module's own values; ``compiled_init_variables`` does the same for
several batches inside one ``jax.jit`` (``init_program``, shared by equal graphs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from .data import INPUT_KEY
from .graph import ModelGraph
from .model import (
    PyTree,
    mode_kwargs,
    module_variables,
    node_args,
    run_module,
    with_module_variables,
)
from .nnx_modules import is_nnx_module
from .task import is_flax_module

__all__ = ["abstract_init_variables", "compiled_init_variables", "init_program",
           "init_variables", "one_shot_compiler_options"]


def _own_copy(variables: PyTree | None) -> PyTree:
    """A dict of dicts the caller may add modules to (``{"params": {}}`` for None)."""
    return {"params": {}} if variables is None else {
        col: dict(tree) for col, tree in variables.items()}


def init_variables(
    graph: ModelGraph,
    X_dict: Mapping[str, Any],
    rng: jax.Array,
    task_names: Sequence[str] | None = None,
    variables: PyTree | None = None,
) -> PyTree:
    """Creates the variables of the modules that ``task_names`` run, from one batch.

    Args:
      graph: the task graph.
      X_dict: a batch of inputs for those tasks (its shapes define the parameter shapes).
      rng: a PRNG key; Linen module ``m`` initialises from ``fold_in(rng,
        graph.module_index(m))``, so its weights do not depend on which batch or task set
        created it. An NNX module starts from its own values (``rng`` is not used).
      task_names: the tasks whose modules to create; defaults to every task.
      variables: existing variables: their modules are kept as they are (shared weights
        of a task added later) and only the others are created.

    Returns:
      ``{collection: {module_name: subtree}}`` (the given variables plus the new
      modules'); parameter-free modules have no entry.
    """
    task_names = graph.task_names if task_names is None else tuple(task_names)
    variables = _own_copy(variables)
    variables.setdefault("params", {})
    existing = {name for tree in variables.values() for name in tree}
    outputs: dict[str, Any] = {INPUT_KEY: dict(X_dict)}
    for node in graph.nodes_for(task_names):
        module = graph.module_pool[node.module_name]
        args = node_args(graph, node, outputs, task_names)
        if not is_flax_module(module):
            outputs[node.node_id] = run_module(node, task_names, args, module, *args)
            continue
        kwargs = mode_kwargs(graph, node.module_name, train=False)
        if is_nnx_module(module):
            spec = graph.nnx_specs[node.module_name]
            if node.module_name not in existing:
                # The NNX module's own values: its constructor's ``rngs`` drew them.
                variables = with_module_variables(variables, node.module_name,
                                                   spec.initial_variables())
                existing.add(node.module_name)
            module_vars = module_variables(variables, node.module_name)
            outputs[node.node_id], _ = run_module(node, task_names, args, spec.apply,
                                                   module_vars, args, kwargs, False, None)
            continue
        if node.module_name not in existing:
            key = jax.random.fold_in(rng, graph.module_index(node.module_name))
            params_key, dropout_key = jax.random.split(key)
            module_vars = run_module(node, task_names, args, module.init,
                                      {"params": params_key, "dropout": dropout_key}, *args,
                                      **kwargs)
            variables = with_module_variables(variables, node.module_name, module_vars)
            existing.add(node.module_name)
        module_vars = module_variables(variables, node.module_name)
        outputs[node.node_id] = run_module(node, task_names, args, module.apply, module_vars,
                                            *args, **kwargs)
    return variables


def compiled_init_variables(
    graph: ModelGraph,
    batches: Sequence[tuple[Mapping[str, Any], Sequence[str]]],
    rng: jax.Array,
    variables: PyTree | None = None,
) -> PyTree:
    """``init_variables`` over several batches, as one compiled program.

    ``init_variables(graph, X, rng, tasks, variables)`` runs for each ``(X, tasks)`` of
    ``batches`` in turn (a module is created by the first batch whose tasks run it), all
    inside one ``jax.jit``: run eagerly, every initialiser and every op of the forward
    pass that feeds the next module is its own small XLA program (dozens per model, more
    with every task). NNX modules' own values are taken outside the program (constants,
    not computed). Random draws are ``init_variables``'s; floating-point results may
    differ from it in the last bit where XLA fuses differently.

    Args:
      graph: the task graph.
      batches: ``(X_dict, task_names)`` pairs, in order.
      rng: the PRNG key, as ``init_variables``.
      variables: existing variables, kept as they are.

    Returns:
      The variables, as ``init_variables`` returns them.
    """
    program, args = _init_call(graph, batches, rng, variables)
    return program(*args)


def abstract_init_variables(
    graph: ModelGraph,
    batches: Sequence[tuple[Mapping[str, Any], Sequence[str]]],
    rng: jax.Array,
    variables: PyTree | None = None,
) -> PyTree:
    """What ``compiled_init_variables`` would return, as ``jax.ShapeDtypeStruct`` leaves:
    a trace of the same program, nothing compiled or computed (same arguments)."""
    # The jitted program itself, not a function calling it: its compiler options are
    # allowed on a top-level jit only.
    program, args = _init_call(graph, batches, rng, variables)
    return jax.eval_shape(program, *args)


def _init_call(graph: ModelGraph, batches: Sequence[tuple[Mapping[str, Any], Sequence[str]]],
               rng: jax.Array, variables: PyTree | None) -> tuple[Callable, tuple]:
    """The init program of ``batches``' task lists and its arguments."""
    task_lists = tuple(tuple(tasks) for _, tasks in batches)
    return init_program(graph, task_lists), (
        [dict(X) for X, _ in batches], rng, _with_nnx_values(graph, task_lists, variables))


def _with_nnx_values(graph: ModelGraph, task_lists: Sequence[Sequence[str]],
                     variables: PyTree | None) -> PyTree:
    """``variables`` (a fresh dict of dicts) plus the own values of the NNX modules the
    tasks run that it lacks: constants of the init program, not computed by it."""
    variables = _own_copy(variables)
    existing = {name for tree in variables.values() for name in tree}
    for name in graph.modules_for(list(dict.fromkeys(t for ts in task_lists for t in ts))):
        if name not in existing and is_nnx_module(graph.module_pool[name]):
            variables = with_module_variables(variables, name,
                                               graph.nnx_specs[name].initial_variables())
    return variables


# XLA options of a program that runs once (an initialisation), on the CPU.
# (`xla_cpu_use_fusion_emitters=False` compiled such a program in 2/3 the time, but the
# setting outlived its program: every later program of the process ran on one core.)
_ONE_SHOT_CPU_OPTIONS = {"xla_backend_optimization_level": 0}


def one_shot_compiler_options() -> dict[str, Any] | None:
    """``compiler_options`` for a program that runs once: on the CPU, no LLVM
    optimisation (its passes cost more compile time than they save); elsewhere None."""
    return dict(_ONE_SHOT_CPU_OPTIONS) if jax.default_backend() == "cpu" else None


@functools.lru_cache(maxsize=8)
def init_program(graph: ModelGraph, task_lists: tuple[tuple[str, ...], ...]) -> Callable:
    """The jitted initialisation of ``compiled_init_variables``, kept per graph and task
    lists: a set-up cut short (Ctrl-C) and started again compiles nothing new."""
    def init_all(X_dicts: list, rng: jax.Array, variables: PyTree) -> PyTree:
        for X_dict, tasks in zip(X_dicts, task_lists, strict=True):
            variables = init_variables(graph, X_dict, rng, tasks, variables)
        return variables

    # The program runs once: on the CPU, LLVM's optimisation passes cost more compile time
    # than they save (0.9 s instead of 1.6 s on the reference model; the initial values
    # can differ from an optimised build's in the last bit, as from an eager run's).
    return jax.jit(init_all, compiler_options=one_shot_compiler_options())
