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
``train=False`` in evaluation mode.

The initial values are the module's own (its constructor's ``rngs`` chose them), unless
the model is re-initialised from a seed given explicitly (``MultitaskClassifier.init(X,
seed=s)`` or ``init_from_loaders(..., seed=s)``; not a Trainer's or the model's default
seed): ``reinitialised_variables`` then redraws every ``nnx.Param`` from ``(s, module
name, variable path)`` with its own initializer and resets BatchNorm statistics to mean 0,
variance 1. A parameter's initializer is, in order: the ``<attribute>_init`` attribute of
the module that holds it (a user's module may keep one; one can be set on a Flax layer:
``layer.kernel_init = fn``), else, for Flax's own layers (``nnx.Linear``, ``Conv``,
``Embed``, ``LayerNorm``, ``BatchNorm``, ...), which do not keep the initializer they were
built with, their constructor's default ``<attribute>_init``. That default is refused (a
``ValueError``) where a module above the layer takes initializer arguments (``nnx.LSTMCell``,
``nnx.MultiHeadAttention``, a user's module with a ``kernel_init`` argument): it may have
passed the layer another one. A Flax layer built directly with a non-default initializer
is redrawn with the default unless that initializer is set on it as above.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ._lazy import lazy_module

# flax.nnx costs about as much to import as the rest of jaxmtl: loaded by the first NNX
# module jaxmtl handles (the user's own import of it comes first anyway).
nnx = lazy_module("flax.nnx")
variablelib = lazy_module("flax.nnx.variablelib")

PyTree = Any

#: The collection of trainable parameters and of BatchNorm statistics (Linen's names).
PARAMS, BATCH_STATS = "params", "batch_stats"


def is_nnx_module(module: Any) -> bool:
    """True for Flax NNX modules (``nnx.Module`` instances).

    Imports nothing: an NNX module exists only once ``flax.nnx`` has been imported.
    """
    loaded = sys.modules.get("flax.nnx")
    return loaded is not None and isinstance(module, loaded.Module)


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
        return self._nest([variable.get_value() for *_, variable in self.entries])

    def _nest(self, values: Sequence[Any]) -> dict[str, Any]:
        """``{collection: nested dict}`` of one value per entry, in ``entries``' order."""
        tree: dict[str, Any] = {}
        for (_, collection, keys, _), value in zip(self.entries, values, strict=True):
            node = tree.setdefault(collection, {})
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = jnp.asarray(value)
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


#: BatchNorm's running statistics as ``nnx.BatchNorm`` creates them.
_INITIAL_STATISTICS = {"mean": jnp.zeros, "var": jnp.ones}


def reinitialised_variables(spec: NnxSpec, module: nnx.Module, seed: int) -> dict[str, Any]:
    """The module's variables drawn afresh from ``seed``, laid out as ``initial_variables``.

    Every ``nnx.Param`` at NNX path ``p`` is drawn by its initializer (see the module
    docstring) from ``fold_in(fold_in(PRNGKey(seed), crc32(spec.name)), crc32(p))``, with
    its own shape and dtype: the same seed gives the same values in any process, and no
    draw depends on another module or on the order of the pool. BatchNorm statistics
    (``nnx.BatchStat`` named ``mean``/``var``) are reset to 0 and 1; other variable types
    (a user's counters, caches) keep the module's own values. ``module`` is not changed.

    Args:
      spec: ``NnxSpec.from_module(name, module)``.
      module: the NNX module itself (its layers carry the initializers).
      seed: the seed given to the model's ``init``/``init_from_loaders``.

    Returns:
      ``{collection: nested dict}`` as ``spec.initial_variables()``.

    Raises:
      ValueError: for a parameter whose initializer cannot be found, or another batch
        statistic than BatchNorm's, naming the module, the variable's path and the remedy.
    """
    nodes = dict(nnx.iter_graph(module))
    module_key = jax.random.fold_in(jax.random.PRNGKey(seed), _crc(spec.name))
    values = []
    for path, _, _, variable in spec.entries:
        value = jnp.asarray(variable.get_value())
        owner, attribute = nodes.get(path[:-1]), path[-1]
        where = f"NNX module '{spec.name}': {_describe(path, owner)}"
        if isinstance(variable, nnx.Param):
            initializer = _initializer(nodes, path, where)
            key = jax.random.fold_in(module_key, _crc("/".join(map(str, path))))
            values.append(_draw(owner, attribute, initializer, key, value, where))
        elif isinstance(variable, nnx.BatchStat):
            if attribute not in _INITIAL_STATISTICS:
                raise ValueError(
                    f"{where} is a BatchStat whose initial value jaxmtl does not know (it "
                    f"resets BatchNorm's 'mean' and 'var'); construct the module with the "
                    f"rngs you want and call init without seed to keep its own values")
            values.append(_INITIAL_STATISTICS[attribute](value.shape, value.dtype))
        else:
            values.append(value)
    return spec._nest(values)


def _crc(text: str) -> int:
    """A stable 31-bit hash of ``text`` (Python's ``hash`` of a str changes per process)."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def _describe(path: tuple, owner: Any) -> str:
    where = "/".join(map(str, path))
    return f"variable {where} ({type(owner).__name__}.{path[-1]})" if owner is not None \
        else f"variable {where}"


def _constructor_parameters(module: Any) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(type(module).__init__).parameters
    except (TypeError, ValueError):
        return {}


def _initializer(nodes: Mapping[tuple, Any], path: tuple, where: str) -> Callable:
    """The initializer of the parameter at ``path`` (see the module docstring)."""
    owner_path, attribute = path[:-1], path[-1]
    owner = nodes.get(owner_path)
    remedy = (f"set `{attribute}_init` on that module to the initializer to draw it with, "
              f"or construct the module with the rngs you want and call init without seed "
              f"(its own values are then kept)")
    stored = getattr(owner, f"{attribute}_init", None) if isinstance(attribute, str) else None
    if callable(stored):
        return stored
    default = None
    if isinstance(owner, nnx.Module) and type(owner).__module__.startswith("flax.") \
            and isinstance(attribute, str):
        parameter = _constructor_parameters(owner).get(f"{attribute}_init")
        default = parameter.default if parameter is not None else None
    if not callable(default):
        raise ValueError(f"{where}: no initializer found to redraw it from the seed (no "
                         f"`{attribute}_init` attribute, and not a Flax layer's parameter "
                         f"with a default initializer); {remedy}")
    for depth in range(len(owner_path)):
        above = nodes.get(owner_path[:depth])
        arguments = [argument for argument in _constructor_parameters(above)
                     if argument.endswith(("_init", "_initializer"))
                     ] if isinstance(above, nnx.Module) else []
        if arguments:
            at = "/".join(map(str, owner_path[:depth])) or "the module itself"
            raise ValueError(
                f"{where}: Flax does not keep the initializer a layer was built with, and "
                f"the {type(above).__name__} above it ({at}) takes initializer arguments "
                f"{arguments}, so it may have passed a non-default one; {remedy}")
    return default


def _draw(owner: Any, attribute: Any, initializer: Callable, key: jax.Array,
          value: jax.Array, where: str) -> jax.Array:
    """``initializer``'s draw of a value of ``value``'s shape and dtype."""
    shape = drawn_shape = value.shape
    if isinstance(owner, nnx.LinearGeneral) and attribute in ("kernel", "bias"):
        # LinearGeneral draws on the 2-D (kernel) or 1-D (bias) flattening of the shape.
        n_out = len(owner.out_features)
        drawn_shape = ((math.prod(shape[:-n_out]), math.prod(shape[-n_out:]))
                       if attribute == "kernel" else (math.prod(shape),))
    drawn = initializer(key, drawn_shape, value.dtype)
    drawn = jnp.asarray(getattr(drawn, "raw_value", drawn))  # partitioning metadata
    if drawn.shape != drawn_shape:
        raise ValueError(f"{where}: its initializer drew shape {drawn.shape}, expected "
                         f"{drawn_shape}")
    return jnp.reshape(drawn, shape).astype(value.dtype)


def nnx_specs(module_pool: Mapping[str, Any]) -> dict[str, NnxSpec]:
    """``{name: NnxSpec}`` for the NNX modules of ``module_pool``."""
    return {name: NnxSpec.from_module(name, module)
            for name, module in module_pool.items() if is_nnx_module(module)}
