"""Operations and Tasks: a task is a sequence of operations over a pool of named modules."""

from __future__ import annotations

import functools
import inspect
import math
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax

from .analysis.scorer import Scorer
from .data import INPUT_KEY
from .losses import default_loss
from .nnx_modules import is_nnx_module
from .utils import softmax_output

OpInput = str | tuple[str, str | int]


def _normalize_input(module_name: str, op_input: Any) -> OpInput:
    if isinstance(op_input, str):
        return op_input
    if isinstance(op_input, (tuple, list)) and len(op_input) == 2 and isinstance(op_input[0], str):
        source, field = op_input
        if isinstance(field, (str, int)) and not isinstance(field, bool):
            return (source, field)
    raise ValueError(
        f"Operation '{module_name}': input {op_input!r} must be an op name, "
        f"('{INPUT_KEY}', key) or (op_name, index_or_key)"
    )


class Operation:
    """One step of a task: apply module ``module_name`` to the outputs of earlier steps.

    Args:
      module_name: key of the module in the task's module pool.
      inputs: what the module is called with, in order. Each entry is an op name (that
        op's whole output), ``("_input_", key)`` (an input array of the batch) or
        ``(op_name, index_or_key)`` (an element of a tuple/dict output). An empty list
        passes the whole outputs dict (op name -> output, plus "_input_" -> X_dict).
      name: the op's name, which later ops refer to; defaults to ``module_name``.
    """

    def __init__(self, module_name: str, inputs: Sequence[Any], name: str | None = None) -> None:
        if not isinstance(module_name, str) or not module_name:
            raise ValueError(f"Operation: module_name must be a non-empty str, got {module_name!r}")
        if isinstance(inputs, (str, tuple)):
            raise ValueError(
                f"Operation '{module_name}': inputs must be a list, got {inputs!r} "
                f"(wrap a single input in a list)"
            )
        self.module_name = module_name
        self.inputs: tuple[OpInput, ...] = tuple(_normalize_input(module_name, i) for i in inputs)
        self.name = name if name is not None else module_name
        if self.name == INPUT_KEY:
            raise ValueError(f"Operation name '{INPUT_KEY}' is reserved for the batch inputs")

    def _key(self) -> tuple:
        return (self.name, self.module_name, self.inputs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Operation) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Operation(name={self.name}, module_name={self.module_name}, "
            f"inputs={list(self.inputs)})"
        )

    def sources(self) -> list[str]:
        """Names of the ops (or "_input_") this op reads from."""
        return [i if isinstance(i, str) else i[0] for i in self.inputs]


def is_linen_module(module: Any) -> bool:
    """True for Flax Linen modules (``flax.linen.Module`` instances)."""
    return isinstance(module, nn.Module)


def is_flax_module(module: Any) -> bool:
    """True for Flax modules, Linen or NNX: they own variables that jaxmtl creates and trains.

    Any other pool entry is a parameter-free callable (``check_pool_entry`` rejects
    callables that hold parameters).
    """
    return isinstance(module, nn.Module) or is_nnx_module(module)


ACCEPTED_MODULES = ("a Flax Linen module, a Flax NNX module, or a parameter-free callable "
                    "(a function such as jax.nn.relu or jnp.tanh, a lambda, an object "
                    "holding no arrays)")


def _holds(value: Any, depth: int = 0) -> str | None:
    """What in ``value`` holds parameters jaxmtl would not see (a module or an array)."""
    if isinstance(value, nn.Module):
        return f"a Flax Linen module ({type(value).__name__})"
    if is_nnx_module(value):
        return f"a Flax NNX module ({type(value).__name__})"
    if isinstance(value, jax.Array):
        return f"a jax array of shape {tuple(value.shape)}"
    if depth >= 2:
        return None
    if isinstance(value, (list, tuple)):
        children = list(value)
    elif isinstance(value, Mapping):
        children = list(value.values())
    else:
        return None
    for child in children:
        found = _holds(child, depth + 1)
        if found:
            return found
    return None


def _hidden_parameters(module: Any) -> str | None:
    """Why a callable that is not a Flax module would silently not train, or None."""
    if isinstance(module, functools.partial):
        for value in (module.func, *module.args, *module.keywords.values()):
            found = _holds(value) or _hidden_parameters(value)
            if found:
                return f"a functools.partial over {found}"
        return None
    if isinstance(module, types.MethodType):
        found = _holds(module.__self__)
        return f"a method of {found}" if found else _hidden_parameters(module.__self__)
    if isinstance(module, types.FunctionType):
        # A function calling a module it closes over would run that module's weights
        # untrained; arrays it closes over are constants and stay allowed.
        try:
            closure = inspect.getclosurevars(module)
        except (TypeError, ValueError):
            return None
        for name, value in {**closure.nonlocals, **closure.globals}.items():
            if is_flax_module(value):
                return f"a function that calls {_holds(value)} it refers to as '{name}'"
        return None
    if isinstance(module, (types.BuiltinFunctionType, type)):
        return None
    attributes = dict(getattr(module, "__dict__", {}))
    for slot in getattr(type(module), "__slots__", ()):
        if isinstance(slot, str) and hasattr(module, slot):
            attributes[slot] = getattr(module, slot)
    for name, value in attributes.items():
        found = _holds(value)
        if found:
            return f"a {type(module).__name__} object whose attribute '{name}' is {found}"
    return None


def check_pool_entry(task_name: str, module_name: str, module: Any) -> None:
    """Raises unless ``module`` is a pool entry jaxmtl can run and train.

    Accepted: Flax Linen modules, Flax NNX modules, and parameter-free callables. A
    callable that holds parameters jaxmtl cannot see (a ``functools.partial`` over a
    module, an equinox or other object with jax arrays among its attributes, a function
    calling a module it closes over) would run with weights that never train: it is
    rejected.

    Raises:
      ValueError: naming the task, the module and what is accepted.
    """
    if not callable(module):
        raise ValueError(
            f"Task '{task_name}': module_pool['{module_name}'] is {type(module).__name__}, "
            f"expected {ACCEPTED_MODULES}")
    if is_flax_module(module):
        return
    found = _hidden_parameters(module)
    if found:
        raise ValueError(
            f"Task '{task_name}': module_pool['{module_name}'] is {found}; jaxmtl would run "
            f"those weights without training them. Expected {ACCEPTED_MODULES}; put the "
            f"module itself in the pool (bind arguments in the op's inputs or in a Flax "
            f"module's attributes)")


def validate_op_sequence(
    task_name: str, module_pool: Mapping[str, Any], op_sequence: Sequence[Operation]
) -> None:
    """Checks that every op names a pooled module and reads only earlier ops or inputs."""
    seen: dict[str, Operation] = {}
    for position, op in enumerate(op_sequence):
        if not isinstance(op, Operation):
            raise ValueError(
                f"Task '{task_name}': op_sequence[{position}] is {type(op).__name__}, "
                f"expected Operation"
            )
        if op.module_name not in module_pool:
            raise ValueError(
                f"Task '{task_name}': op '{op.name}' uses module '{op.module_name}', which is "
                f"not in the module_pool (modules: {sorted(module_pool)})"
            )
        for source in op.sources():
            if source == INPUT_KEY:
                continue
            if source not in seen:
                later = any(o.name == source for o in op_sequence[position + 1 :])
                where = "is defined later in the sequence" if later else "is not defined"
                raise ValueError(
                    f"Task '{task_name}': op '{op.name}' reads from op '{source}', which {where}"
                )
        if op.name in seen and seen[op.name] != op:
            raise ValueError(
                f"Task '{task_name}': two different ops are named '{op.name}': "
                f"{seen[op.name]} and {op}"
            )
        seen[op.name] = op


class Task:
    """A named prediction problem: ops over a module pool, with loss, output and scorer.

    Args:
      name: task name; also the label key in ``Y_dict`` the task trains on.
      module_pool: module name -> Flax Linen module, Flax NNX module (its variables
        join the model's variables under its name; see ``jaxmtl.nnx_modules``), or a
        parameter-free callable (e.g. ``jax.nn.relu``); a callable that holds
        parameters (a ``functools.partial`` over a module, an object with jax arrays
        among its attributes) is rejected. Modules with the same name across tasks share
        one set of weights (tasks share an NNX module by holding the same object). A module whose ``__call__`` takes ``train`` or ``training`` gets True in
        training steps and False elsewhere; one that takes ``deterministic`` (Flax's
        Dropout convention) gets the inverse.
      op_sequence: the ops to run; the last op's output is the task's logits [B, K].
        Another task may use the same op names with other inputs: each task runs its
        own ops (weights are shared by module name, not by op name).
      scorer: the Scorer for ``score``; defaults to ``Scorer(metrics=["accuracy"])``.
      loss_func: ``loss_func(outputs [B, K], labels [B] int or [B, K] probs) -> [B]``
        per-example losses; jittable; sees every row (padding and -1 rows included, with
        labels replaced by a safe value) and is masked afterwards. A loss_func that
        returns a scalar mean over the rows (Snorkel's ``F.cross_entropy`` form, e.g.
        ``jaxmtl.cross_entropy``) is evaluated row by row and trains the same. Defaults
        to cross entropy, hard or soft by label rank.
      output_func: ``output_func(outputs [B, K]) -> probs [B, K]``; defaults to softmax.
      loss_weight: multiplies this task's loss in the summed training loss.
    """

    def __init__(
        self,
        name: str,
        module_pool: Mapping[str, Any],
        op_sequence: Sequence[Operation],
        scorer: Scorer | None = None,
        loss_func: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
        output_func: Callable[[jax.Array], jax.Array] | None = None,
        loss_weight: float = 1.0,
    ) -> None:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"Task name must be a non-empty str without '/', got {name!r}")
        if not op_sequence:
            raise ValueError(f"Task '{name}': op_sequence is empty")
        for module_name, module in module_pool.items():
            check_pool_entry(name, module_name, module)
        validate_op_sequence(name, module_pool, op_sequence)
        if scorer is not None and not isinstance(scorer, Scorer):
            raise ValueError(
                f"Task '{name}': scorer is {type(scorer).__name__}, expected a Scorer "
                f"(the order is Snorkel's: name, module_pool, op_sequence, scorer, "
                f"loss_func, output_func)")
        for field_name, func in (("loss_func", loss_func), ("output_func", output_func)):
            if func is not None and (isinstance(func, Scorer) or not callable(func)):
                raise ValueError(
                    f"Task '{name}': {field_name} is {type(func).__name__}, expected a "
                    f"callable")
        if isinstance(loss_weight, bool) or not isinstance(loss_weight, (int, float)) \
                or not math.isfinite(loss_weight) or loss_weight < 0:
            # A negative weight would train the task to be wrong (gradient ascent).
            raise ValueError(
                f"Task '{name}': loss_weight must be a finite number >= 0, got "
                f"{loss_weight!r}")
        self.name = name
        self.module_pool = dict(module_pool)
        self.op_sequence = list(op_sequence)
        self.loss_func = loss_func if loss_func is not None else default_loss
        self.output_func = output_func if output_func is not None else softmax_output
        self.scorer = scorer if scorer is not None else Scorer(metrics=["accuracy"])
        self.loss_weight = float(loss_weight)

    def __repr__(self) -> str:
        return f"Task(name={self.name}, ops={[op.name for op in self.op_sequence]})"
