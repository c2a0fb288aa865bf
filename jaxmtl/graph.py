"""The task graph: tasks' op sequences merged into one set of computation nodes.

Each task runs its own op sequence (as Snorkel does); an op becomes a *node*, and two
tasks' ops are one node, computed once, only when they are the same computation: the same
op name, module and inputs, where inputs that name earlier ops resolve to those ops'
nodes. So two tasks may both name an op ``base_mlp`` and read different input keys (the
Snorkel tutorial's layout): each gets its own node, and the weights are still shared,
because parameters belong to modules (by module name), not to ops.

A node's id is its op name when the name has one definition in the graph, else
``"{op_name}@{task_name}"`` for the definitions after the first; ``apply_ops`` returns
outputs keyed by node id.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn

from .data import INPUT_KEY
from .nnx_modules import NnxSpec, is_nnx_module, nnx_specs
from .task import Operation, Task, check_pool_entry

#: The keyword arguments a module may take to switch between training and evaluation,
#: with the value each takes in training (Flax's ``Dropout(deterministic=...)`` is inverted).
TRAIN_KEYWORDS = {"train": True, "training": True, "deterministic": False}

ALL_OUTPUTS = "[]"  # the resolved input of an op with ``inputs=[]``: its task's outputs dict


@dataclasses.dataclass(frozen=True)
class Node:
    """One computation: a module applied to resolved inputs.

    Attributes:
      node_id: the key of its output in ``apply_ops``'s outputs.
      op: the Operation it came from (the first task's, if several share it).
      inputs: resolved inputs: ``("_input_", key)``, a node id, ``(node_id, field)``, or
        ``ALL_OUTPUTS`` (then ``view`` maps the task's earlier op names to node ids).
      view: for ``ALL_OUTPUTS`` nodes, op name -> node id of the earlier ops of its task.
      tasks: the tasks that run it.
    """

    node_id: str
    op: Operation
    inputs: tuple[Any, ...]
    view: tuple[tuple[str, str], ...]
    tasks: tuple[str, ...]

    @property
    def module_name(self) -> str:
        """The module it applies."""
        return self.op.module_name


def train_keywords(module: Any) -> dict[str, bool]:
    """The train/eval keywords ``module.__call__`` accepts, with their training values."""
    # An NNX module's mode is also set by ``nnx_modules`` (NNX's train/eval views).
    call = type(module).__call__ if isinstance(module, nn.Module) else module
    try:
        parameters = inspect.signature(call).parameters
    except (TypeError, ValueError):
        return {}
    # A mode fixed at construction (``nn.Dropout(0.5, deterministic=True)``) is kept:
    # Flax refuses the same flag at construction and at call time.
    fields = getattr(module, "__dataclass_fields__", {})
    return {name: value for name, value in TRAIN_KEYWORDS.items()
            if name in parameters and not (name in fields and getattr(module, name) is not None)}


def same_module(a: Any, b: Any) -> bool:
    """Whether two module-pool entries (or loss/output functions, or two graphs'
    structures) are one and the same.

    The same object, or equal ones (Flax modules compare by configuration); an entry
    whose ``__eq__`` raises is equal only to itself.
    """
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # a module whose __eq__ fails cannot be shown equal
        return False


def module_difference(a: Any, b: Any, limit: int = 60) -> str:
    """How two module-pool entries differ, briefly: for Flax modules of one type the
    configuration fields that differ (``features=2 vs 10``; nested modules and lists of
    them field by field, ``layers[0].features=2 vs 3``), else their types."""
    def short(value: Any) -> str:
        text = " ".join(repr(value).split())
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def differences(left: Any, right: Any, path: str) -> list[str]:
        if same_module(left, right):
            return []
        if type(left) is type(right) and dataclasses.is_dataclass(left):
            return [line for field in dataclasses.fields(left)
                    if field.name not in ("parent", "name")
                    for line in differences(getattr(left, field.name, None),
                                            getattr(right, field.name, None),
                                            f"{path}.{field.name}".lstrip("."))]
        if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)) \
                and len(left) == len(right):
            return [line for index, pair in enumerate(zip(left, right, strict=True))
                    for line in differences(*pair, f"{path}[{index}]")]
        if type(left) is not type(right) and dataclasses.is_dataclass(left):
            return [f"{path or 'module'}: a {type(left).__name__} vs a {type(right).__name__}"]
        return [f"{path}={short(left)} vs {short(right)}" if path
                else f"{short(left)} vs {short(right)}"]

    lines = differences(a, b, "")
    kind = f"two {type(a).__name__}s with " if type(a) is type(b) else ""
    return kind + ", ".join(lines[:4]) + (f" (+{len(lines) - 4} more)" if len(lines) > 4 else "")


@dataclasses.dataclass(frozen=True, eq=False)
class ModelGraph:
    """The merged computation of a set of tasks (static: closed over by jitted functions).

    Two graphs are equal when they are built from the same computation: the same tasks,
    ops, loss and output functions and loss weights, and equal modules (Flax Linen modules
    compare by class and configuration; other callables, NNX modules included, by
    identity). Programs kept per graph (the model's initialisation) are then shared by
    equal graphs, e.g. by the models of a sweep in one process. A graph with a part that
    cannot be hashed (a module field holding an array) equals itself only.

    Attributes:
      task_names: task names in insertion order.
      module_pool: module name -> module, merged over tasks (first definition kept).
      op_sequences: task name -> its ops.
      loss_funcs, output_funcs, loss_weights: per task.
      nodes: node id -> Node, in first-execution order over the tasks.
      task_nodes: task name -> the node ids its ops resolve to, in order.
      nnx_specs: module name -> the static split of each Flax NNX module of the pool
        (graph definitions; see ``nnx_modules``).
    """

    task_names: tuple[str, ...]
    module_pool: Mapping[str, Any]
    op_sequences: Mapping[str, tuple[Operation, ...]]
    loss_funcs: Mapping[str, Callable]
    output_funcs: Mapping[str, Callable]
    loss_weights: Mapping[str, float]
    nodes: Mapping[str, Node] = dataclasses.field(default_factory=dict)
    task_nodes: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    nnx_specs: Mapping[str, NnxSpec] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def _structure(self) -> tuple | None:
        # Worked out when the graph is first used as a key, not for every graph that
        # add_task builds on the way.
        return _structure_key(self)

    @functools.cached_property
    def _hash(self) -> int:
        # Kept: the graph is a cache key on every evaluation and initialisation call.
        return id(self) if self._structure is None else hash(self._structure)

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, ModelGraph) or self._structure is None:
            return False
        return same_module(self._structure, other._structure)

    def __hash__(self) -> int:
        return self._hash

    @property
    def op_names(self) -> tuple[str, ...]:
        """All node ids (op names), in first-execution order over the tasks."""
        return tuple(self.nodes)

    def nodes_for(self, task_names: Sequence[str]) -> list[Node]:
        """The nodes needed for ``task_names``, each once, in execution order."""
        needed: dict[str, Node] = {}
        for task_name in task_names:
            if task_name not in self.task_nodes:
                raise ValueError(
                    f"Unknown task '{task_name}'; the model has tasks {list(self.task_names)}"
                )
            for node_id in self.task_nodes[task_name]:
                needed.setdefault(node_id, self.nodes[node_id])
        return list(needed.values())

    def ops_for(self, task_names: Sequence[str]) -> list[Operation]:
        """The ops of the nodes needed for ``task_names``, in execution order."""
        return [node.op for node in self.nodes_for(task_names)]

    @property
    def head_nodes(self) -> frozenset[str]:
        """The node ids of the tasks' last ops (their heads)."""
        return frozenset(nodes[-1] for nodes in self.task_nodes.values())

    def output_node(self, task_name: str) -> str:
        """The node id of the task's last op (its logits)."""
        return self.task_nodes[task_name][-1]

    def modules_for(self, task_names: Sequence[str]) -> list[str]:
        """Module names the tasks run, each once, in first-execution order."""
        return list(dict.fromkeys(node.module_name for node in self.nodes_for(task_names)))

    def node_index(self, node_id: str) -> int:
        """The node's position in the graph (fixed by the tasks, not by the batch)."""
        return list(self.nodes).index(node_id)

    def module_index(self, module_name: str) -> int:
        """The module's position in the pool (its initialisation key is folded from it)."""
        return list(self.module_pool).index(module_name)

    def input_keys(self, task_names: Sequence[str]) -> set[str] | None:
        """The ``X_dict`` keys the tasks read; None if one reads the whole outputs dict."""
        keys: set[str] = set()
        for node in self.nodes_for(task_names):
            for op_input in node.inputs:
                if op_input == ALL_OUTPUTS:
                    return None
                if isinstance(op_input, tuple) and op_input[0] == INPUT_KEY:
                    keys.add(op_input[1])
        return keys

    def train_keywords(self, module_name: str) -> dict[str, bool]:
        """The module's train/eval keywords with their training values (see TRAIN_KEYWORDS)."""
        return train_keywords(self.module_pool[module_name])

    def takes_train(self, module_name: str) -> bool:
        """Whether the module's ``__call__`` takes a train/eval keyword."""
        return bool(self.train_keywords(module_name))


def _structure_key(graph: ModelGraph) -> tuple | None:
    """Everything the graph's computation depends on, as one hashable tuple (None if a
    part cannot be hashed)."""
    key = (graph.task_names,
           *(tuple(part.items()) for part in (
               graph.module_pool, graph.op_sequences, graph.loss_funcs, graph.output_funcs,
               graph.loss_weights, graph.nodes, graph.task_nodes, graph.nnx_specs)))
    try:
        hash(key)
    except Exception:  # e.g. a Linen module with a list or array field
        return None
    return key


def _resolve(op_input: Any, view: Mapping[str, str]) -> Any:
    if isinstance(op_input, str):
        return view[op_input]
    source, field = op_input
    return op_input if source == INPUT_KEY else (view[source], field)


def build_graph(tasks: Sequence[Task]) -> ModelGraph:
    """Merges tasks into one graph, checking that shared module names mean one module.

    Raises:
      ValueError: on a duplicate task name, or two different modules under one name.
    """
    module_pool: dict[str, Any] = {}
    op_sequences, loss_funcs, output_funcs, loss_weights = {}, {}, {}, {}
    nodes: dict[str, Node] = {}
    node_by_key: dict[tuple, str] = {}
    task_nodes: dict[str, tuple[str, ...]] = {}
    for task in tasks:
        if task.name in op_sequences:
            raise ValueError(f"Found duplicate task '{task.name}'; task names must be unique")
        for name, module in task.module_pool.items():
            check_pool_entry(task.name, name, module)
            if name in module_pool and not same_module(module_pool[name], module):
                if is_nnx_module(module) or is_nnx_module(module_pool[name]):
                    raise ValueError(
                        f"Module name '{name}' is used for two different modules: a "
                        f"{type(module_pool[name]).__name__} and a {type(module).__name__} "
                        f"object (task '{task.name}'); an NNX module owns its weights, so "
                        f"tasks that share it must put the same object in their pools")
                raise ValueError(
                    f"Module name '{name}' is used for two different modules: "
                    f"{module_difference(module_pool[name], module)} (task '{task.name}'); "
                    f"modules under one name share weights and must have the same "
                    f"configuration")
            module_pool.setdefault(name, module)
        view: dict[str, str] = {}
        sequence: list[str] = []
        for op in task.op_sequence:
            if op.inputs:
                inputs, view_items = tuple(_resolve(i, view) for i in op.inputs), ()
            else:
                inputs, view_items = (ALL_OUTPUTS,), tuple(view.items())
            key = (op.name, op.module_name, inputs, view_items)
            node_id = node_by_key.get(key)
            if node_id is None:
                node_id = op.name if op.name not in nodes else f"{op.name}@{task.name}"
                node_by_key[key] = node_id
                nodes[node_id] = Node(node_id, op, inputs, view_items, (task.name,))
            elif task.name not in nodes[node_id].tasks:
                node = nodes[node_id]
                nodes[node_id] = dataclasses.replace(node, tasks=(*node.tasks, task.name))
            view[op.name] = node_id
            sequence.append(node_id)
        task_nodes[task.name] = tuple(dict.fromkeys(sequence))
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
        nodes=nodes,
        task_nodes=task_nodes,
        nnx_specs=nnx_specs(module_pool),
    )
