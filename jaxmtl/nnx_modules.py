"""Flax NNX modules in the module pool: their state in the one variables pytree.

An ``nnx.Module`` is a Python object that owns its arrays. jaxmtl keeps the functional
contract of Linen modules for it: at model build ``nnx.split`` separates the module into
a static graph definition (kept in the ``ModelGraph``) and its state, and the state is
stored in the model's variables ``{collection: {module_name: ...}}`` like a Linen
module's; inside the pure apply ``nnx.merge`` rebuilds the module from the graph
definition and the (traced) state, calls it, and reads back what the call changed.

The layout, per NNX variable type:

==========================  ==============================================================
NNX variable                where it lives
==========================  ==============================================================
``nnx.Param`` (subclasses)   ``variables["params"][module_name]``: trained by the step
``nnx.BatchStat``            ``variables["batch_stats"][module_name]``: updated in training
other ``nnx.Variable``       the collection Flax's registry names for the type (e.g.
                             ``"cache"``), else the type's class name; updated in training
RNG state (``RngKey``,       not stored: in training each stream is re-seeded from the
``RngCount``)                step's dropout key of the op, as a Linen module's ``"dropout"``
                             stream is; outside training the module's own keys are used
==========================  ==============================================================

Inside a subtree the path is the module's attribute path with every key as a string
(``nnx.Sequential``'s layer ``0`` is ``"0"``), so the variables save, checkpoint and
restore as any other nested dict of arrays.

``train=True`` runs the module in NNX's training mode (``nnx.view(module,
deterministic=False, use_running_average=False)``, what ``module.train()`` sets) and
``train=False`` in evaluation mode. The initial values are the module's own (its
constructor's ``rngs`` chose them); the model's seed does not redraw them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import variablelib

PyTree = Any

#: The collection of trainable parameters and of BatchNorm statistics (Linen's names).
PARAMS, BATCH_STATS = "params", "batch_stats"


def is_nnx_module(module: Any) -> bool:
    """True for Flax NNX modules (``nnx.Module`` instances)."""
    return isinstance(module, nnx.Module)


def _collection(variable: nnx.Variable) -> str:
    if isinstance(variable, nnx.Param):
        return PARAMS
    if isinstance(variable, nnx.BatchStat):
        return BATCH_STATS
    try:
        return variablelib.variable_name_from_type(type(variable))
    except ValueError:  # an unregistered user type: named after its class
        return type(variable).__name__


def _mode_view(module: nnx.Module, train: bool) -> nnx.Module:
    return nnx.view(module, deterministic=not train, use_running_average=not train,
                    raise_if_not_found=False)


@dataclasses.dataclass(frozen=True, eq=False)
class NnxSpec:
    """The static half of an NNX module: graph definitions and where its state goes.

    Attributes:
      name: the module's name in the pool (for error messages).
      graphdefs: ``{True: training-mode graphdef, False: evaluation-mode graphdef}``.
      entries: per stored variable, in NNX's flat order: (NNX path, collection, path of
        string keys inside ``variables[collection][name]``, the variable as built).
      rng_entries: per RNG variable: (NNX path, the variable as built).
      takes_rngs: whether ``__call__`` takes ``rngs`` and the module holds no stream of
        its own (it is then given ``nnx.Rngs(op_key)`` in training).
    """

    name: str
    graphdefs: Mapping[bool, Any]
    entries: tuple[tuple[tuple, str, tuple[str, ...], nnx.Variable], ...]
    rng_entries: tuple[tuple[tuple, nnx.Variable], ...]
    takes_rngs: bool

    @classmethod
    def from_module(cls, name: str, module: nnx.Module) -> NnxSpec:
        """Splits ``module`` (it is not changed) into its static and stored parts.

        Raises:
          ValueError: if a variable's value is not a numeric array, naming the module and
            the variable's path.
        """
        graphdefs = {train: nnx.split(_mode_view(module, train))[0] for train in (True, False)}
        _, state = nnx.split(module)
        entries, rng_entries = [], []
        for path, variable in nnx.to_flat_state(state):
            if isinstance(variable, nnx.RngState):
                rng_entries.append((path, variable))
                continue
            value = variable.get_value()
            try:
                dtype = jnp.asarray(value).dtype
            except TypeError:
                dtype = None
            if dtype is None or not (jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)):
                raise ValueError(
                    f"NNX module '{name}': variable {'/'.join(map(str, path))} "
                    f"({type(variable).__name__}) holds {type(value).__name__}; jaxmtl "
                    f"stores NNX variables whose values are numeric arrays")
            entries.append((path, _collection(variable), tuple(map(str, path)), variable))
        try:
            parameters = inspect.signature(module).parameters
        except (TypeError, ValueError):
            parameters = {}
        takes_rngs = "rngs" in parameters and not rng_entries
        return cls(name, graphdefs, tuple(entries), tuple(rng_entries), takes_rngs)

    def initial_variables(self) -> dict[str, Any]:
        """The module's own values as ``{collection: nested dict}`` (RNG state left out)."""
        tree: dict[str, Any] = {}
        for _, collection, keys, variable in self.entries:
            node = tree.setdefault(collection, {})
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = jnp.asarray(variable.get_value())
        return tree

    def _state(self, module_vars: Mapping[str, Any], rng: jax.Array | None) -> nnx.State:
        items = []
        for path, collection, keys, variable in self.entries:
            try:
                value = module_vars[collection]
                for key in keys:
                    value = value[key]
            except (KeyError, TypeError) as error:
                raise KeyError(
                    f"NNX module '{self.name}': variables['{collection}']['{self.name}'] "
                    f"lacks {'/'.join(keys)}; it has {sorted(module_vars)} collections"
                ) from error
            items.append((path, variable.replace(value)))
        for index, (path, variable) in enumerate(self.rng_entries):
            if rng is not None and isinstance(variable, nnx.RngKey):
                items.append((path, variable.replace(jax.random.fold_in(_typed(rng), index))))
            elif rng is not None and isinstance(variable, nnx.RngCount):
                items.append((path, variable.replace(jnp.zeros((), jnp.uint32))))
            else:
                items.append((path, variable))
        return nnx.from_flat_state(items)

    def apply(self, module_vars: Mapping[str, Any], args: Sequence[Any],
              kwargs: Mapping[str, Any], train: bool, rng: jax.Array | None
              ) -> tuple[Any, dict[str, Any]]:
        """Calls the module on ``args`` with the given state; a pure function.

        Args:
          module_vars: ``{collection: subtree}`` of this module.
          args, kwargs: the call's arguments (kwargs: its train/eval keywords).
          train: training mode (NNX's ``train()``) or evaluation mode (``eval()``).
          rng: the op's dropout key, or None (the module's own RNG state is used).

        Returns:
          (output, updates): in training, the module's non-param collections after the
          call (e.g. new BatchNorm statistics); else an empty dict.
        """
        module = nnx.merge(self.graphdefs[train], self._state(module_vars, rng))
        kwargs = dict(kwargs)
        if self.takes_rngs and rng is not None and train:
            kwargs["rngs"] = nnx.Rngs(_typed(rng))
        output = module(*args, **kwargs)
        if not train:
            return output, {}
        _, state = nnx.split(module)
        values = dict(nnx.to_flat_state(state))
        updates: dict[str, Any] = {}
        for path, collection, keys, _ in self.entries:
            if collection == PARAMS:
                continue
            node = updates.setdefault(collection, {})
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = values[path].get_value()
        return output, updates


def _typed(rng: jax.Array) -> jax.Array:
    """``rng`` as a typed key (NNX's RNG variables hold typed keys)."""
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)


def nnx_specs(module_pool: Mapping[str, Any]) -> dict[str, NnxSpec]:
    """``{name: NnxSpec}`` for the NNX modules of ``module_pool``."""
    return {name: NnxSpec.from_module(name, module)
            for name, module in module_pool.items() if is_nnx_module(module)}
