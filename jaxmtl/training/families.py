"""Task families on the per-step and fused paths: which loaders step through a family's
shared program, and the member's view of the state that program reads and writes.

A family (``signatures.task_families``) is a set of tasks whose ops and modules have one
structure; one compiled step serves all of them, on a view of the state in which the
member's modules carry the representative's names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax

from ..loader import DictDataLoader
from ..model import ModelGraph
from ..signatures import (
    TaskFamily,
    family_of,
    task_families,
    view_modules,
    view_of,
    view_variables,
    write_back,
    write_back_variables,
)
from .step import TrainState


class Route(NamedTuple):
    """How a loader's batches reach a family step."""

    family: TaskFamily
    task: str
    input_keys: tuple[str, ...] | None
    member: int
    view: dict[str, str]
    program: Any = None


def state_view(state: TrainState, view: dict[str, str], modules: set[str]) -> TrainState:
    """The member's view of the state: the modules its task runs, under the
    representative's names (``signatures.view_of``)."""
    return state.replace(params=view_of(state.params, view, modules),
                         opt_state=view_of(state.opt_state, view, modules),
                         model_state=view_variables(state.model_state, view))


def write_view_back(state: TrainState, view_state: TrainState, view: dict[str, str],
                     modules: set[str]) -> TrainState:
    """``state`` with the member's updated view written back under the member's names."""
    return view_state.replace(
        params=write_back(state.params, view_state.params, view, modules),
        opt_state=write_back(state.opt_state, view_state.opt_state, view, modules),
        model_state=write_back_variables(state.model_state, view_state.model_state, view))


def views_fit(state: TrainState, family: TaskFamily, graph: ModelGraph) -> bool:
    """Whether the optimizer sees each member's view as it sees the whole model.

    Optimizers that act leaf by leaf (all of jaxmtl's; clipping by the global norm sees
    the same norm, the other modules' gradients being zero) give the view the state
    ``view_of`` cuts from the full one; a user transformation that labels or masks
    modules by name may not, and its family then trains through the general step. (The
    structures can agree where the transformation keeps no state for the modules it tells
    apart, e.g. ``set_to_zero``; so the Trainer sends families to the general step whenever
    a user's transformation is configured: ``family_routes(shared=False)``.)
    """
    modules = set(state.params)
    # Every member's view has the representative's keys, so the optimizer's own state
    # for a view has one structure: traced once, compared with each member's cut.
    expected = jax.tree.structure(jax.eval_shape(
        state.tx.init, view_of(state.params, view_modules(graph, family, 0), modules)))
    return all(
        jax.tree.structure(view_of(state.opt_state, view_modules(graph, family, member),
                                   modules)) == expected
        for member in range(len(family.tasks)))


def family_routes(graph: ModelGraph, state: TrainState,
                  train_loaders: Sequence[DictDataLoader],
                  diagnostics: bool = False, shared: bool = True) -> dict[int, Route]:
    """Loader id -> its family route, for loaders that label one task of a family.

    Empty with a balancer or interference diagnostics (they need the general step), when
    ``shared`` is False (a user's optax transformation, which may tell modules apart by
    name: a member's view renames them; also ``PerStepRunner.share_family_programs``).
    """
    if not shared or state.balancer is not None or diagnostics:
        return {}
    families = task_families(graph, state.variables)
    fits: dict[TaskFamily, bool] = {}
    routes = {}
    for dl in train_loaders:
        tasks = [k for k in dl.dataset.Y_dict if k in graph.op_sequences]
        family = family_of(families, tasks[0]) if len(tasks) == 1 else None
        if family is None:
            continue
        if family not in fits:
            fits[family] = views_fit(state, family, graph)
        if not fits[family]:
            continue
        keys = graph.input_keys([family.representative])
        member = family.index(tasks[0])
        routes[id(dl)] = Route(family, tasks[0], None if keys is None else tuple(sorted(keys)),
                                member, view_modules(graph, family, member))
    return routes
