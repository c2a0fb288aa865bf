"""Task families: tasks that run one computation, each with its own same-shaped weights.

Many multi-task models repeat one structure per task: a shared body and a head per task
(``head_t = nn.Dense(2)``). Compiled per task set, T such tasks cost T programs; compiled
per *family*, they cost one per batch signature (input keys, shapes and dtypes, label
shape), whatever T is:

    families = task_families(graph, variables)
    family = family_of(families, "task7")
    view = view_modules(graph, family, family.index("task7"))   # {"head_task0": "head_task7", ...}
    probs = task_probs(graph, view_variables(variables, view), X_dict,
                       [family.representative])                 # task7's probabilities

Two tasks are in one family when their node sequences are isomorphic: the same length,
at each position the same op inputs (input keys, or earlier positions), and either the
same shared module or, in *slots*, modules that only that task uses, configured equally
(Flax modules compare as dataclasses) and with variables of the same shapes; and the
same loss and output functions. The public layout (``params[module_name]``) is unchanged.

Two ways to run a member with the representative's program:

- its *view* (``view_modules``, ``view_of``, ``view_variables``): the host picks the
  member's modules and renames them to the representative's, so the program holds only
  the modules one task runs and its size does not depend on T; ``write_back`` puts the
  results back. The per-step runner, predict, score and calculate_loss use it.
- stacking inside the program (``member_variables``): the members' slot variables are
  stacked and indexed by a traced member index; the gradient of that read reaches only
  the member's own weights. The fused runner uses it (the member changes inside a scan).

Dropout keys stay those of the per-task program: the node at each position folds the
member's own node index (a traced value) into the key, as ``apply_ops`` folds the node's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from .data import INPUT_KEY
from .graph import ALL_OUTPUTS, ModelGraph, same_module
from .model import PyTree, call_node, node_args

__all__ = ["TaskFamily", "apply_family", "family_of", "member_model_state",
           "member_variables", "task_families", "view_modules", "view_of", "view_variables",
           "write_back", "write_back_variables"]


@dataclasses.dataclass(frozen=True)
class TaskFamily:
    """Tasks that share one compiled computation (static: closed over by jitted functions).

    Attributes:
      tasks: the members, in graph order; ``tasks[0]`` is the representative, whose
        nodes the compiled computation runs.
      slots: the representative's own modules (used by it alone), in execution order.
      members: per slot, the module of each member at that place (``members[s][j]`` is
        member ``j``'s; ``members[s][0] == slots[s]``).
      fold_indices: per position of the representative's nodes, each member's node index
        there (its dropout stream, as ``apply_ops`` folds it).
    """

    tasks: tuple[str, ...]
    slots: tuple[str, ...]
    members: tuple[tuple[str, ...], ...]
    fold_indices: tuple[tuple[int, ...], ...]

    @property
    def representative(self) -> str:
        """The task whose nodes the family's computation runs."""
        return self.tasks[0]

    def index(self, task_name: str) -> int:
        """The member index of ``task_name`` (the traced value a step receives)."""
        return self.tasks.index(task_name)

    @property
    def member_modules(self) -> dict[str, int]:
        """Slot module name -> the index of the member that owns it."""
        return {module: j for modules in self.members for j, module in enumerate(modules)}


def _module_users(graph: ModelGraph) -> dict[str, set[str]]:
    users: dict[str, set[str]] = {}
    for task_name, node_ids in graph.task_nodes.items():
        for node_id in node_ids:
            users.setdefault(graph.nodes[node_id].module_name, set()).add(task_name)
    return users


def _structure(graph: ModelGraph, task_name: str, users: Mapping[str, set[str]]
               ) -> tuple[tuple, list[str]]:
    """A task's computation with its own modules replaced by slot numbers.

    Returns:
      (key, own modules in slot order): two tasks with equal keys run the same ops on
      the same inputs, up to which own module sits in each slot.
    """
    node_ids = graph.task_nodes[task_name]
    position = {node_id: p for p, node_id in enumerate(node_ids)}
    own: list[str] = []
    key = []
    for node_id in node_ids:
        node = graph.nodes[node_id]
        inputs = []
        for op_input in node.inputs:
            if op_input == ALL_OUTPUTS:
                inputs.append((ALL_OUTPUTS, tuple((name, position[source])
                                                  for name, source in node.view)))
            elif isinstance(op_input, str):
                inputs.append(("node", position[op_input]))
            elif op_input[0] == INPUT_KEY:
                inputs.append(op_input)
            else:
                inputs.append(("node", position[op_input[0]], op_input[1]))
        module_name = node.module_name
        if users.get(module_name) == {task_name}:
            if module_name not in own:
                own.append(module_name)
            module = ("slot", own.index(module_name))
        else:
            module = ("shared", module_name)
        key.append((tuple(inputs), module))
    return tuple(key), own


def _shapes(variables: PyTree | None, module_name: str) -> Any:
    if variables is None:
        return None
    return tuple(sorted(
        (col, tuple((str(path), leaf.shape, str(leaf.dtype)) for path, leaf
                    in jax.tree_util.tree_flatten_with_path(tree[module_name])[0]))
        for col, tree in variables.items() if module_name in tree))


def task_families(graph: ModelGraph, variables: PyTree | None = None
                  ) -> tuple[TaskFamily, ...]:
    """The families of two or more tasks that can share one compiled computation.

    Args:
      graph: the task graph.
      variables: the model's variables; members' slot modules must have variables of the
        same shapes and dtypes (a task whose modules are not created yet joins only tasks
        in the same condition).

    Returns:
      The families, each with at least two tasks; a task is in at most one.
    """
    users = _module_users(graph)
    groups: list[tuple[tuple, list[str], list[list[str]]]] = []  # (key, tasks, own modules)
    for task_name in graph.task_names:
        key, own = _structure(graph, task_name, users)
        signature = (key, tuple(_shapes(variables, m) for m in own))
        for group_key, tasks, owns in groups:
            first = tasks[0]
            if (group_key == signature
                    and same_module(graph.loss_funcs[first], graph.loss_funcs[task_name])
                    and same_module(graph.output_funcs[first], graph.output_funcs[task_name])
                    and all(same_module(graph.module_pool[a], graph.module_pool[b])
                            for a, b in zip(owns[0], own, strict=True))):
                tasks.append(task_name)
                owns.append(own)
                break
        else:
            groups.append((signature, [task_name], [own]))
    families = []
    for _, tasks, owns in groups:
        if len(tasks) < 2:
            continue
        fold_indices = tuple(
            tuple(graph.node_index(graph.task_nodes[t][p]) for t in tasks)
            for p in range(len(graph.task_nodes[tasks[0]])))
        families.append(TaskFamily(
            tasks=tuple(tasks), slots=tuple(owns[0]),
            members=tuple(zip(*owns, strict=True)), fold_indices=fold_indices))
    return tuple(families)


def family_of(families: Sequence[TaskFamily], task_name: str) -> TaskFamily | None:
    """The family that ``task_name`` belongs to, or None."""
    for family in families:
        if task_name in family.tasks:
            return family
    return None


def view_modules(graph: ModelGraph, family: TaskFamily, member: int) -> dict[str, str]:
    """The member's *view*: each module the representative runs -> the member's module.

    A tree restricted to the view and renamed (``view_of``) has the same structure for
    every member, so one program compiled on it serves them all, and its size does not
    depend on the number of members (the host picks the member's leaves, for free).
    """
    rename = {slot: family.members[s][member] for s, slot in enumerate(family.slots)}
    names = dict.fromkeys(graph.nodes[node_id].module_name
                          for node_id in graph.task_nodes[family.representative])
    return {name: rename.get(name, name) for name in names}


def _mirrors(modules: set[str]) -> Any:
    # A dict keyed by exactly the model's module names mirrors the params: optax states
    # (Adam's mu and nu, MultiSteps' accumulators) hold such dicts below NamedTuples.
    return lambda node: isinstance(node, dict) and bool(node) and set(node) == modules


def view_of(tree: PyTree, view: Mapping[str, str], modules: set[str]) -> PyTree:
    """``tree`` with every params-mirroring dict (keys ``modules``) restricted to ``view``.

    Args:
      tree: e.g. the optimizer state, ``{"params": params}``, or params themselves.
      view: ``view_modules``'s mapping (view key -> module name).
      modules: the module names of the full params dict.
    """
    def restrict(node: Any) -> Any:
        if _mirrors(modules)(node):
            return {key: node[source] for key, source in view.items() if source in node}
        return node

    return jax.tree.map(restrict, tree, is_leaf=_mirrors(modules))


def write_back(tree: PyTree, updated: PyTree, view: Mapping[str, str],
               modules: set[str]) -> PyTree:
    """Undoes ``view_of``: ``tree`` with the view's entries replaced by ``updated``'s.

    Modules outside the view keep their values (parameters and optimizer moments of
    modules the batch's task does not run, as torch leaves them).
    """
    def merge(node: Any, new: Any) -> Any:
        if _mirrors(modules)(node):
            return {**node, **{source: new[key] for key, source in view.items()
                               if key in new}}
        return new

    return jax.tree.map(merge, tree, updated, is_leaf=_mirrors(modules))


def _select(family: TaskFamily, tree: Mapping[str, Any], slot: int, member: jax.Array) -> Any:
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves),
                           *[tree[name] for name in family.members[slot]])
    return jax.tree.map(lambda leaf: leaf[member], stacked)


def member_variables(family: TaskFamily, variables: PyTree, member: jax.Array) -> PyTree:
    """``variables`` with each slot's entry replaced by member ``member``'s module's.

    Differentiable: the gradient with respect to ``variables`` reaches the member's own
    modules only (the others' gradients are zero).
    """
    view = {col: dict(tree) for col, tree in variables.items()}
    for slot, slot_module in enumerate(family.slots):
        for col, tree in variables.items():
            if slot_module in tree:
                view[col][slot_module] = _select(family, tree, slot, member)
    return view


def member_model_state(family: TaskFamily, old: PyTree, view: PyTree,
                       member: jax.Array) -> PyTree:
    """Writes a run's updated non-param collections (``view``) back to the member's modules.

    Args:
      family: the family.
      old: the collections before the run (``{col: {module: ...}}``, no "params").
      view: the collections ``apply_family`` returned (slots hold the member's entry).
      member: the member index.
    """
    new = {col: dict(tree) for col, tree in view.items()}
    for slot, slot_module in enumerate(family.slots):
        for col, tree in view.items():
            if slot_module not in tree:
                continue
            for j, module in enumerate(family.members[slot]):
                new[col][module] = jax.tree.map(
                    lambda updated, previous, j=j: jnp.where(member == j, updated, previous),
                    tree[slot_module], old[col][module])
    return new


def apply_family(
    graph: ModelGraph,
    family: TaskFamily,
    view: PyTree,
    X_dict: Mapping[str, Any],
    member: jax.Array,
    *,
    train: bool = False,
    rng: jax.Array | None = None,
) -> tuple[dict[str, Any], PyTree]:
    """Runs the representative's ops with member ``member``'s weights (``apply_ops``'s twin).

    Args:
      graph: the task graph.
      family: the family.
      view: ``member_variables(family, variables, member)``.
      X_dict: the batch's inputs (the keys the family reads).
      member: int32 scalar, the member index (traced).
      train, rng: as ``apply_ops``; the node at position ``p`` draws dropout from
        ``fold_in(rng, index of the member's node p)``, as the member's own program does.

    Returns:
      (outputs, view): outputs keyed by the representative's node ids; the view with any
      updated mutable collections (write them back with ``member_model_state``).
    """
    task_names = (family.representative,)
    outputs: dict[str, Any] = {INPUT_KEY: dict(X_dict)}
    for position, node_id in enumerate(graph.task_nodes[family.representative]):
        node = graph.nodes[node_id]
        args = node_args(graph, node, outputs, task_names)
        node_rng = None
        if rng is not None:
            indices = family.fold_indices[position]
            index = indices[0] if len(set(indices)) == 1 else jnp.asarray(
                indices, jnp.int32)[member]
            node_rng = jax.random.fold_in(rng, index)
        outputs[node_id], view = call_node(graph, node, view, args, task_names, train=train,
                                           node_rng=node_rng)
    return outputs, view


def view_variables(variables: PyTree, view: Mapping[str, str]) -> PyTree:
    """``{collection: {module: ...}}`` restricted to the member's view and renamed.

    Running the representative's ops on it (``apply_ops``, ``task_probs``,
    ``task_loss_terms``) computes the member's outputs in evaluation mode: one program
    for every member.
    """
    return {col: {key: tree[source] for key, source in view.items() if source in tree}
            for col, tree in variables.items()}


def write_back_variables(variables: PyTree, updated: PyTree, view: Mapping[str, str]
                         ) -> PyTree:
    """Undoes ``view_variables``: the view's entries of ``updated`` written back."""
    new = {col: dict(tree) for col, tree in variables.items()}
    for col, tree in updated.items():
        for key, source in view.items():
            if key in tree:
                new.setdefault(col, {})[source] = tree[key]
    return new
