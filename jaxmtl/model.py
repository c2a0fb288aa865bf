"""The pure functional core: a task graph and the functions of pytrees that run it.

Variables are one pytree ``{collection: {module_name: subtree}}`` (Flax's collections:
``"params"``, ``"batch_stats"``, ...). A module used by several tasks or ops has one entry,
so its weights are shared. Everything here is a pure function of its arguments and can be
wrapped in ``jax.jit``, ``jax.grad``, ``jax.vmap`` or ``jax.pmap`` by a research script:

    graph = build_graph(tasks)
    variables = init_variables(graph, X_dict, jax.random.PRNGKey(0))
    outputs, _ = apply_ops(graph, variables, X_dict, graph.task_names, train=False)
    terms, _ = task_loss_terms(graph, variables, X_dict, Y_dict, mask)
    loss = total_loss(graph, terms)
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .data import INPUT_KEY
from .task import Operation, Task, is_flax_module

PyTree = Any
LossTerms = dict[str, tuple[jax.Array, jax.Array]]


def _takes_train(module: Any) -> bool:
    call = type(module).__call__ if is_flax_module(module) else module
    try:
        return "train" in inspect.signature(call).parameters
    except (TypeError, ValueError):
        return False


def _same_module(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # a module whose __eq__ fails cannot be shown equal
        return False


@dataclasses.dataclass(frozen=True, eq=False)
class ModelGraph:
    """The merged computation of a set of tasks (static: closed over by jitted functions).

    Attributes:
      task_names: task names in insertion order.
      module_pool: module name -> module, merged over tasks (first definition kept).
      op_sequences: task name -> its ops.
      loss_funcs, output_funcs, loss_weights: per task.
    """

    task_names: tuple[str, ...]
    module_pool: Mapping[str, Any]
    op_sequences: Mapping[str, tuple[Operation, ...]]
    loss_funcs: Mapping[str, Callable]
    output_funcs: Mapping[str, Callable]
    loss_weights: Mapping[str, float]

    @property
    def op_names(self) -> tuple[str, ...]:
        """All op names, in first-execution order over the tasks."""
        return tuple(op.name for op in self.ops_for(self.task_names))

    def ops_for(self, task_names: Sequence[str]) -> list[Operation]:
        """The ops needed for ``task_names``, each once, in execution order."""
        ops: dict[str, Operation] = {}
        for task_name in task_names:
            if task_name not in self.op_sequences:
                raise ValueError(
                    f"Unknown task '{task_name}'; the model has tasks {list(self.task_names)}"
                )
            for op in self.op_sequences[task_name]:
                ops.setdefault(op.name, op)
        return list(ops.values())

    def takes_train(self, module_name: str) -> bool:
        """Whether the module's ``__call__`` accepts a ``train`` keyword."""
        return _takes_train(self.module_pool[module_name])


def build_graph(tasks: Sequence[Task]) -> ModelGraph:
    """Merges tasks into one graph, checking that shared names mean the same thing.

    Raises:
      ValueError: on a duplicate task name; two different modules under one name; or two
        different ops (module or inputs) under one name.
    """
    module_pool: dict[str, Any] = {}
    ops: dict[str, tuple[str, Operation]] = {}
    op_sequences, loss_funcs, output_funcs, loss_weights = {}, {}, {}, {}
    for task in tasks:
        if task.name in op_sequences:
            raise ValueError(f"Found duplicate task '{task.name}'; task names must be unique")
        for name, module in task.module_pool.items():
            if name in module_pool and not _same_module(module_pool[name], module):
                raise ValueError(
                    f"Module name '{name}' is used for two different modules: "
                    f"{module_pool[name]!r} and {module!r} (task '{task.name}'); modules "
                    f"under one name share weights and must have the same configuration"
                )
            module_pool.setdefault(name, module)
        for op in task.op_sequence:
            if op.name in ops and ops[op.name][1] != op:
                other_task, other = ops[op.name]
                raise ValueError(
                    f"Op '{op.name}' is defined differently by task '{other_task}' ({other}) "
                    f"and task '{task.name}' ({op}); ops of one name are one computation"
                )
            ops.setdefault(op.name, (task.name, op))
        op_sequences[task.name] = tuple(task.op_sequence)
        loss_funcs[task.name] = task.loss_func
        output_funcs[task.name] = task.output_func
        loss_weights[task.name] = task.loss_weight
    return ModelGraph(
        task_names=tuple(op_sequences),
        module_pool=module_pool,
        op_sequences=op_sequences,
        loss_funcs=loss_funcs,
        output_funcs=output_funcs,
        loss_weights=loss_weights,
    )


def _op_args(op: Operation, outputs: dict[str, Any]) -> list[Any]:
    if not op.inputs:
        return [outputs]
    args = []
    for op_input in op.inputs:
        if isinstance(op_input, str):
            args.append(outputs[op_input])
        else:
            source, field = op_input
            args.append(outputs[source][field])
    return args


def _module_variables(variables: PyTree, module_name: str) -> dict[str, Any]:
    return {col: tree[module_name] for col, tree in variables.items() if module_name in tree}


def _with_module_variables(variables: PyTree, module_name: str, updates: Mapping) -> PyTree:
    new = {col: dict(tree) for col, tree in variables.items()}
    for col, tree in updates.items():
        new.setdefault(col, {})[module_name] = tree
    return new


def init_variables(graph: ModelGraph, X_dict: Mapping[str, Any], rng: jax.Array) -> PyTree:
    """Creates the variables of every module by running all ops once on ``X_dict``.

    Args:
      graph: the task graph.
      X_dict: a batch of inputs (its shapes define the parameter shapes).
      rng: a PRNG key; module ``i`` (in execution order) initialises from ``fold_in(rng, i)``.

    Returns:
      ``{collection: {module_name: subtree}}``; parameter-free modules have no entry.
    """
    variables: dict[str, dict[str, Any]] = {"params": {}}
    outputs: dict[str, Any] = {INPUT_KEY: dict(X_dict)}
    initialised: set[str] = set()
    for index, op in enumerate(graph.ops_for(graph.task_names)):
        module = graph.module_pool[op.module_name]
        args = _op_args(op, outputs)
        if not is_flax_module(module):
            outputs[op.name] = module(*args)
            continue
        kwargs = {"train": False} if graph.takes_train(op.module_name) else {}
        if op.module_name not in initialised:
            key = jax.random.fold_in(rng, index)
            params_key, dropout_key = jax.random.split(key)
            module_vars = module.init({"params": params_key, "dropout": dropout_key}, *args,
                                      **kwargs)
            variables = _with_module_variables(variables, op.module_name, module_vars)
            initialised.add(op.module_name)
        outputs[op.name] = module.apply(_module_variables(variables, op.module_name), *args,
                                        **kwargs)
    return variables


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
    """Runs the ops of ``task_names`` on a batch.

    Args:
      graph: the task graph.
      variables: ``{collection: {module_name: subtree}}``.
      X_dict: input name -> [B, ...] array.
      task_names: tasks whose ops to run (shared ops run once).
      train: passed to modules that take a ``train`` keyword; in training, non-param
        collections (e.g. ``batch_stats``) are mutable and returned updated.
      rng: PRNG key for the ``"dropout"`` stream (op ``i`` uses ``fold_in(rng, i)``);
        required when a module draws random numbers.
      overrides: op name -> output to use instead of running that op (e.g. a shared
        representation to differentiate with respect to).
      until: stop after this op.

    Returns:
      (outputs, variables): outputs maps op name -> output, plus ``"_input_"`` -> X_dict;
      variables carries any updated mutable collections.
    """
    outputs: dict[str, Any] = {INPUT_KEY: dict(X_dict), **(overrides or {})}
    op_index = {name: i for i, name in enumerate(graph.op_names)}
    for op in graph.ops_for(task_names):
        if op.name in outputs:
            if op.name == until:
                break
            continue
        module = graph.module_pool[op.module_name]
        args = _op_args(op, outputs)
        if not is_flax_module(module):
            outputs[op.name] = module(*args)
            continue
        kwargs: dict[str, Any] = {"train": train} if graph.takes_train(op.module_name) else {}
        if rng is not None:
            kwargs["rngs"] = {"dropout": jax.random.fold_in(rng, op_index[op.name])}
        module_vars = _module_variables(variables, op.module_name)
        mutable = [col for col in module_vars if col != "params"] if train else []
        if mutable:
            output, updates = module.apply(module_vars, *args, mutable=mutable, **kwargs)
            variables = _with_module_variables(variables, op.module_name, updates)
        else:
            output = module.apply(module_vars, *args, **kwargs)
        outputs[op.name] = output
        if op.name == until:
            break
    return outputs, variables


def shared_representation(graph: ModelGraph, task_names: Sequence[str]) -> str:
    """The last op (in execution order) that every one of ``task_names`` runs.

    Raises:
      ValueError: if the tasks share no op.
    """
    common = set.intersection(*(
        {op.name for op in graph.op_sequences[name]} for name in task_names))
    shared = [op.name for op in graph.ops_for(task_names) if op.name in common]
    if not shared:
        raise ValueError(f"Tasks {list(task_names)} share no op: there is no shared "
                         f"representation to differentiate with respect to")
    return shared[-1]


def task_logits(graph: ModelGraph, outputs: Mapping[str, Any], task_name: str) -> jax.Array:
    """The output of a task's last op: its logits [B, K]."""
    return outputs[graph.op_sequences[task_name][-1].name]


def active_mask(labels: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Rows that count in the loss: labelled (not -1) and, if ``mask`` is given, real. [B]."""
    labelled = labels != -1 if labels.ndim == 1 else jnp.any(labels != -1, axis=1)
    return labelled if mask is None else labelled & mask


def _safe_labels(labels: jax.Array, active: jax.Array) -> jax.Array:
    # Inactive rows get class 0 so a user loss never sees -1 (whose gradient could be NaN
    # even where the row is masked out afterwards).
    if labels.ndim == 1:
        return jnp.where(active, labels, 0)
    one_hot_first = jnp.zeros_like(labels).at[:, 0].set(1.0)
    return jnp.where(active[:, None], labels, one_hot_first)


def losses_from_outputs(
    graph: ModelGraph,
    outputs: Mapping[str, Any],
    Y_dict: Mapping[str, jax.Array],
    mask: jax.Array | None = None,
) -> LossTerms:
    """Masked loss sums and counts per task from already computed outputs.

    Returns:
      task name -> (sum of per-example losses over active rows, number of active rows),
      for each label key of ``Y_dict`` that names a task of the graph.
    """
    terms: LossTerms = {}
    for task_name, labels in Y_dict.items():
        if task_name not in graph.op_sequences:
            continue
        # Losses are float32 even when the forward pass runs in bfloat16.
        logits = task_logits(graph, outputs, task_name).astype(jnp.float32)
        active = active_mask(labels, mask)
        per_example = graph.loss_funcs[task_name](logits, _safe_labels(labels, active))
        if per_example.shape != active.shape:
            raise ValueError(
                f"Task '{task_name}': loss_func returned shape {per_example.shape}, expected "
                f"per-example losses of shape {active.shape}"
            )
        loss_sum = jnp.sum(jnp.where(active, per_example, 0.0).astype(jnp.float32))
        terms[task_name] = (loss_sum, jnp.sum(active).astype(jnp.float32))
    return terms


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


def total_loss(graph: ModelGraph, terms: LossTerms,
               counts: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """Sum over tasks of ``loss_weight * masked mean``; a task with no active row adds 0.

    Args:
      graph: the task graph (for loss weights).
      terms: task -> (loss sum, count), e.g. from ``task_loss_terms``.
      counts: optional task -> count to divide by instead of the terms' own counts (the
        global count across devices, so that the mean is over all devices' rows).
    """
    loss = jnp.zeros((), jnp.float32)
    for task_name, (loss_sum, count) in terms.items():
        divisor = count if counts is None else counts[task_name]
        loss = loss + graph.loss_weights[task_name] * loss_sum / jnp.maximum(divisor, 1.0)
    return loss


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
