"""The pure functional core: the functions of pytrees that run a task graph.

Variables are one pytree ``{collection: {module_name: subtree}}`` (Flax's collections:
``"params"``, ``"batch_stats"``, ...). A module used by several tasks or ops has one entry,
so its weights are shared. Everything here is a pure function of its arguments and can be
wrapped in ``jax.jit``, ``jax.grad``, ``jax.vmap`` or ``jax.pmap`` by a research script:

    graph = build_graph(tasks)
    variables = init_variables(graph, X_dict, jax.random.PRNGKey(0))  # initialisation.py
    outputs, _ = apply_ops(graph, variables, X_dict, graph.task_names, train=False)
    terms, _ = task_loss_terms(graph, variables, X_dict, Y_dict, mask)
    loss = total_loss(graph, terms)

A batch runs only the ops of the tasks it carries, so each dataset needs only its own
tasks' input keys; ``init_variables(..., task_names=...)`` initialises just those tasks'
modules, and a module's initial weights depend on the seed and its place in the pool, not
on which batch created them.

Flax NNX modules in the pool keep the same contract: their state is split into the same
variables pytree (``nnx_modules`` gives the layout) and merged back inside these pure
functions, so nothing here mutates a module object.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from .data import INPUT_KEY
from .graph import ALL_OUTPUTS, ModelGraph, Node, build_graph, train_keywords
from .loss_terms import (
    LossTerms,
    active_mask,
    describe_value,
    losses_from_outputs,
    task_logits,
    total_loss,
)
from .nnx_modules import is_nnx_module
from .task import is_flax_module

__all__ = [
    "MissingInputError", "ModelGraph", "active_mask", "apply_ops", "build_graph", "call_node",
    "losses_from_outputs", "mode_kwargs", "module_variables", "node_args", "run_module",
    "shared_representation", "task_logits", "task_loss_terms", "task_probs", "total_loss",
    "train_keywords", "with_module_variables",
]

PyTree = Any


class MissingInputError(KeyError):
    """An op reads an input key or an output element that is not there (a ``KeyError``)."""

    def __str__(self) -> str:
        return str(self.args[0])


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f"'{name}'" for name in names)


def _tasks_of(node: Node, task_names: Sequence[str]) -> str:
    return _quoted([t for t in node.tasks if t in task_names] or list(node.tasks))


def node_args(graph: ModelGraph, node: Node, outputs: Mapping[str, Any],
              task_names: Sequence[str]) -> list:
    """The arguments ``node``'s module is called with, read from ``outputs``.

    Raises:
      MissingInputError: an input key or output element that is not there.
      ValueError: a task head that reads a whole tuple/dict output.
    """
    if node.inputs == (ALL_OUTPUTS,):
        return [{INPUT_KEY: outputs[INPUT_KEY],
                 **{name: outputs[node_id] for name, node_id in node.view}}]
    args = []
    for op_input, written in zip(node.inputs, node.op.inputs, strict=True):
        if isinstance(op_input, str):
            value = outputs[op_input]
            if isinstance(value, (tuple, list, Mapping)) and node.node_id in graph.head_nodes:
                # A Dense head would read a tuple as one stacked array and train on it.
                raise ValueError(
                    f"Op '{node.op.name}' (module '{node.module_name}') of task "
                    f"{_tasks_of(node, task_names)} is a task head and reads the whole "
                    f"output of op '{written}', which is a {describe_value(value)}; a head needs "
                    f"an array: pick an element with ('{written}', index_or_key)")
            args.append(value)
            continue
        source, field = op_input
        value = outputs[source]
        try:
            args.append(value[field])
        except (KeyError, IndexError, TypeError) as error:
            where = (f"Op '{node.op.name}' (module '{node.module_name}') of task "
                     f"{_tasks_of(node, task_names)}")
            if source == INPUT_KEY:
                raise MissingInputError(
                    f"{where} reads input ('{INPUT_KEY}', {field!r}), which this batch does "
                    f"not have; its X_dict keys are {sorted(value)}") from error
            raise MissingInputError(
                f"{where} reads {written!r}, but op '{written[0]}' returned "
                f"{describe_value(value)}, which has no element {field!r}") from error
    return args


def run_module(node: Node, task_names: Sequence[str], inputs: Sequence[Any], fn: Callable,
                *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``; a failure is annotated with the op, its tasks and inputs."""
    try:
        return fn(*args, **kwargs)
    except Exception as error:
        error.add_note(
            f"jaxmtl: raised in op '{node.op.name}' (module '{node.module_name}') of task "
            f"{_tasks_of(node, task_names)}, called with "
            f"{', '.join(describe_value(a) for a in inputs) or 'no arguments'}")
        raise


def module_variables(variables: PyTree, module_name: str) -> dict[str, Any]:
    """``{collection: subtree}`` of ``module_name`` (the collections it has entries in)."""
    return {col: tree[module_name] for col, tree in variables.items() if module_name in tree}


def with_module_variables(variables: PyTree, module_name: str, updates: Mapping) -> PyTree:
    """A copy of ``variables`` with ``updates`` ({collection: subtree}) set under ``module_name``."""
    new = {col: dict(tree) for col, tree in variables.items()}
    for col, tree in updates.items():
        new.setdefault(col, {})[module_name] = tree
    return new


def mode_kwargs(graph: ModelGraph, module_name: str, train: bool) -> dict[str, bool]:
    """The train/eval keyword arguments ``module_name``'s ``__call__`` takes."""
    # ``deterministic`` is the inverse of ``train`` (Flax's Dropout convention).
    return {name: value if train else not value
            for name, value in graph.train_keywords(module_name).items()}


def apply_ops(
    graph: ModelGraph,
    variables: PyTree,
    X_dict: Mapping[str, Any],
    task_names: Sequence[str],
    *,
    train: bool = False,
    rng: jax.Array | None = None,
    overrides: Mapping[str, Any] | None = None,
    until: str | None = None,
) -> tuple[dict[str, Any], PyTree]:
    """Runs the ops of ``task_names`` (and no others) on a batch.

    Args:
      graph: the task graph.
      variables: ``{collection: {module_name: subtree}}``.
      X_dict: input name -> [B, ...] array; only the keys these tasks read are needed.
      task_names: tasks whose ops to run (an op shared by several runs once).
      train: modules that take a ``train``/``training`` keyword get ``train``, those that
        take ``deterministic`` get ``not train``; in training, non-param collections
        (e.g. ``batch_stats``) are mutable and returned updated.
      rng: PRNG key for the ``"dropout"`` stream (node ``i`` of the graph uses
        ``fold_in(rng, i)``); required when a Linen module draws random numbers. An NNX
        module's RNG streams are re-seeded from node ``i``'s key (without it, they keep
        the module's own keys).
      overrides: node id -> output to use instead of running that node (e.g. a shared
        representation to differentiate with respect to).
      until: stop after this node.

    Returns:
      (outputs, variables): outputs maps node id (the op name, or ``op@task`` for a
      second definition of a name) -> output, plus ``"_input_"`` -> X_dict; variables
      carries any updated mutable collections.

    Raises:
      MissingInputError: (a KeyError) an op reads an input key the batch lacks, naming
        the op, its tasks and the keys the batch has.
    """
    outputs: dict[str, Any] = {INPUT_KEY: dict(X_dict), **(overrides or {})}
    for node in graph.nodes_for(task_names):
        if node.node_id in outputs:
            if node.node_id == until:
                break
            continue
        args = node_args(graph, node, outputs, task_names)
        node_rng = None if rng is None else jax.random.fold_in(
            rng, graph.node_index(node.node_id))
        outputs[node.node_id], variables = call_node(graph, node, variables, args, task_names,
                                                     train=train, node_rng=node_rng)
        if node.node_id == until:
            break
    return outputs, variables


def call_node(graph: ModelGraph, node: Node, variables: PyTree, args: Sequence[Any],
              task_names: Sequence[str], *, train: bool, node_rng: jax.Array | None
              ) -> tuple[Any, PyTree]:
    """Runs one node's module (Linen, NNX or a plain callable) on ``args``.

    Args:
      graph, node: the graph and the node to run.
      variables: ``{collection: {module_name: ...}}`` holding the node's module.
      args: the node's inputs (``node_args``).
      task_names: the tasks being run (named in errors).
      train: training mode (train/eval keywords, mutable collections).
      node_rng: the node's dropout key, or None.

    Returns:
      (output, variables with the module's updated mutable collections).
    """
    module = graph.module_pool[node.module_name]
    if not is_flax_module(module):
        return run_module(node, task_names, args, module, *args), variables
    kwargs: dict[str, Any] = mode_kwargs(graph, node.module_name, train)
    module_vars = module_variables(variables, node.module_name)
    if is_nnx_module(module):
        output, updates = run_module(
            node, task_names, args, graph.nnx_specs[node.module_name].apply, module_vars,
            args, kwargs, train, node_rng)
        return output, with_module_variables(variables, node.module_name, updates)
    if node_rng is not None:
        kwargs["rngs"] = {"dropout": node_rng}
    mutable = [col for col in module_vars if col != "params"] if train else []
    if not mutable:
        return run_module(node, task_names, args, module.apply, module_vars, *args,
                           **kwargs), variables
    output, updates = run_module(node, task_names, args, module.apply, module_vars, *args,
                                  mutable=mutable, **kwargs)
    return output, with_module_variables(variables, node.module_name, updates)


def shared_representation(graph: ModelGraph, task_names: Sequence[str]) -> str:
    """The last node (in execution order) that every one of ``task_names`` runs.

    Raises:
      ValueError: if the tasks share no op.
    """
    common = set.intersection(*(set(graph.task_nodes[name]) for name in task_names))
    shared = [node.node_id for node in graph.nodes_for(task_names) if node.node_id in common]
    if not shared:
        raise ValueError(f"Tasks {list(task_names)} share no op: there is no shared "
                         f"representation to differentiate with respect to")
    return shared[-1]


def task_loss_terms(
    graph: ModelGraph,
    variables: PyTree,
    X_dict: Mapping[str, Any],
    Y_dict: Mapping[str, jax.Array],
    mask: jax.Array | None = None,
    *,
    train: bool = False,
    rng: jax.Array | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[LossTerms, PyTree]:
    """Runs the batch's tasks and returns their masked loss terms and updated variables.

    Args:
      graph, variables, X_dict: as in ``apply_ops``.
      Y_dict: label name -> [B] int labels (-1 = none) or [B, K] probabilities; labels
        whose name is not a task are ignored.
      mask: optional [B] bool, False on padded rows.
      train, rng, overrides: as in ``apply_ops``.

    Returns:
      (terms, variables): task -> (loss sum over active rows, active count).
    """
    task_names = [name for name in Y_dict if name in graph.op_sequences]
    outputs, variables = apply_ops(graph, variables, X_dict, task_names, train=train, rng=rng,
                                   overrides=overrides)
    return losses_from_outputs(graph, outputs, Y_dict, mask), variables


def task_probs(
    graph: ModelGraph,
    variables: PyTree,
    X_dict: Mapping[str, Any],
    task_names: Sequence[str],
) -> dict[str, jax.Array]:
    """Evaluation-mode probabilities: task name -> ``output_func(logits)`` [B, K]."""
    outputs, _ = apply_ops(graph, variables, X_dict, task_names, train=False)
    return {
        name: graph.output_funcs[name](task_logits(graph, outputs, name)) for name in task_names
    }
