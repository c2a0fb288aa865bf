"""Saving and loading a model's variables: pure functions behind ``model.save``/``load``.

A params file is one msgpack map (``flax.serialization``)::

    {"format": "jaxmtl.params", "version": 2, "model": name, "task_names": [...],
     "module_pool": [every pool module's name], "checksum": "sha256:<hex>",
     "variables": {collection: {module: {...: ndarray}}}}

Version 1 files (no ``module_pool``, no ``checksum``) are still read. ``load_variables``
also reads what ``Checkpointer`` writes (Orbax): a ``best_model_<metric>`` directory, a
step directory ``<n>`` inside it, or a ``checkpoints/<n>`` step of a ``checkpoint_dir``.

Loading is all-or-nothing: ``load_variables`` returns the variables only after checking
them against the model (task names, modules, and, for an initialised model, every leaf's
shape and dtype), and raises a ValueError naming every difference otherwise.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import serialization, traverse_util

from ._io import atomic_write
from .task import is_flax_module

PyTree = Any

SAVE_FORMAT = "jaxmtl.params"
SAVE_VERSION = 2
READABLE_VERSIONS = (1, 2)
CHECKSUM_PREFIX = "sha256:"
MODEL_ITEM = "model"  # the Checkpointer's item holding the model's variables
_STEP_NAME = re.compile(r"^\d+$")


class SavedVariables(NamedTuple):
    """Variables read from a file or checkpoint, with what the source records about them.

    Attributes:
      variables: ``{collection: {module: {...: np.ndarray}}}``.
      task_names: the saving model's task names (None for a checkpoint directory).
      module_pool: the saving model's pool module names (None where not recorded: version 1
        files and checkpoint directories).
      source: where they came from, for error messages.
    """

    variables: PyTree
    task_names: list[str] | None
    module_pool: list[str] | None
    source: str


# --- the file format ------------------------------------------------------------------------
def _flat_leaves(variables: PyTree) -> dict[str, Any]:
    """``{"params/linear/kernel": leaf}`` over the nested dicts of ``variables``."""
    return {"/".join(map(str, path)): leaf
            for path, leaf in traverse_util.flatten_dict(variables).items()}


def variables_checksum(variables: PyTree) -> str:
    """``"sha256:<hex>"`` over every leaf's path, dtype, shape and bytes, in path order.

    Args:
      variables: nested dicts of arrays.

    Returns:
      The checksum; equal trees (same paths, dtypes, shapes and values) give equal sums.
    """
    digest = hashlib.sha256()
    for path, leaf in sorted(_flat_leaves(variables).items()):
        array = np.ascontiguousarray(leaf)
        digest.update(f"{path}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return CHECKSUM_PREFIX + digest.hexdigest()


def encode_params(variables: PyTree, model_name: str, task_names: Sequence[str],
                  module_pool: Sequence[str]) -> bytes:
    """The bytes of a version-2 params file.

    Args:
      variables: the model's variables ``{collection: {module: ...}}`` (moved to host).
      model_name: the model's name.
      task_names: the model's task names.
      module_pool: the names of every module in the model's pool (those without variables
        too, so that a load can tell "has no variables" from "was not in the model").

    Returns:
      msgpack bytes.
    """
    host = jax.tree.map(np.asarray, jax.device_get(variables))
    payload = {
        "format": SAVE_FORMAT,
        "version": SAVE_VERSION,
        "model": model_name,
        "task_names": list(task_names),
        "module_pool": sorted(module_pool),
        "checksum": variables_checksum(host),
        "variables": host,
    }
    return serialization.msgpack_serialize(payload)


def _check_tree(source: str, variables: Any) -> None:
    """Raises unless ``variables`` is ``{collection: {module: nested dicts of arrays}}``."""
    if not isinstance(variables, dict) or not variables:
        raise ValueError(f"{source}: 'variables' must be a non-empty map "
                         f"{{collection: {{module: ...}}}}, got {type(variables).__name__}")
    for collection, modules in variables.items():
        if not isinstance(modules, dict):
            raise ValueError(f"{source}: variables['{collection}'] must be a map "
                             f"{{module: ...}}, got {type(modules).__name__}")
    for path, leaf in _flat_leaves(variables).items():
        if not isinstance(leaf, np.ndarray) or not (
                np.issubdtype(leaf.dtype, np.number) or leaf.dtype == bool):
            raise ValueError(f"{source}: variable '{path}' must be a numeric array, "
                             f"got {type(leaf).__name__}")


def decode_params(data: bytes, source: str) -> SavedVariables:
    """Parses and verifies the bytes of a params file (version 1 or 2).

    Args:
      data: the file's bytes.
      source: the file's name, for error messages.

    Returns:
      The variables and what the file records about the saving model.

    Raises:
      ValueError: if the bytes are not a jaxmtl params file, name an unknown format or
        version, are malformed, or (version 2) fail the checksum.
    """
    try:
        payload = serialization.msgpack_restore(data)
    except Exception as error:  # msgpack raises several types for garbage
        raise ValueError(f"{source}: not a jaxmtl params file ({error})") from error
    if not isinstance(payload, dict) or "format" not in payload:
        raise ValueError(f"{source}: not a jaxmtl params file (format tag missing)")
    if payload["format"] != SAVE_FORMAT:
        raise ValueError(f"{source}: not a jaxmtl params file: format "
                         f"{payload['format']!r}, expected {SAVE_FORMAT!r}")
    version = payload.get("version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"{source}: unknown {SAVE_FORMAT} version {version!r}; this jaxmtl "
                         f"reads versions {list(READABLE_VERSIONS)} (saved by a newer jaxmtl?)")
    expected_fields = ["task_names", "variables"] + (
        ["module_pool", "checksum"] if version >= 2 else [])
    missing = [field for field in expected_fields if field not in payload]
    if missing:
        raise ValueError(f"{source}: {SAVE_FORMAT} version {version} file lacks fields "
                         f"{missing} (truncated or hand-edited?)")
    variables = payload["variables"]
    _check_tree(source, variables)
    for field in ("task_names", "module_pool"):
        names = payload.get(field)
        if names is not None and (not isinstance(names, (list, tuple))
                                  or not all(isinstance(n, str) for n in names)):
            raise ValueError(f"{source}: '{field}' must be a list of names, got {names!r}")
    if version >= 2:
        found = variables_checksum(variables)
        if payload["checksum"] != found:
            raise ValueError(
                f"{source}: checksum mismatch: the file records {payload['checksum']}, its "
                f"variables give {found} (the file is corrupt)"
            )
    module_pool = payload.get("module_pool")
    return SavedVariables(variables, list(payload["task_names"]),
                          None if module_pool is None else list(module_pool), source)


# --- reading Checkpointer directories (Orbax) -------------------------------------------------
def _has_model_item(step_dir: str) -> bool:
    return os.path.isdir(os.path.join(step_dir, MODEL_ITEM))


def _step_dirs(directory: str) -> list[str]:
    return sorted((name for name in os.listdir(directory)
                   if _STEP_NAME.match(name) and _has_model_item(os.path.join(directory, name))),
                  key=int)


def _resolve_checkpoint(directory: str) -> tuple[str, int | None]:
    """(manager directory, step) of a best-model directory or a step directory in one.

    Step None means the manager's latest.

    Raises:
      ValueError: if ``directory`` is neither, saying what was expected.
    """
    directory = os.path.abspath(directory)
    name = os.path.basename(directory)
    if _STEP_NAME.match(name) and _has_model_item(directory):
        return os.path.dirname(directory), int(name)
    if _step_dirs(directory):
        return directory, None
    best = sorted(d for d in os.listdir(directory) if d.startswith("best_model_"))
    if best or os.path.isdir(os.path.join(directory, "checkpoints")):
        raise ValueError(
            f"{directory}: a checkpoint_dir, not one checkpoint; pass one of its best-model "
            f"directories {best} or a step directory checkpoints/<n>"
        )
    raise ValueError(
        f"{directory}: not a model.save file nor a checkpoint directory; expected a "
        f"best_model_<metric> directory, a step directory <n> holding a '{MODEL_ITEM}' item, "
        f"or a file written by model.save"
    )


def read_checkpoint(directory: str) -> SavedVariables:
    """Reads the model's variables from a directory the ``Checkpointer`` wrote.

    Args:
      directory: a ``best_model_<metric>`` directory (its latest step is read), a step
        directory ``<n>`` inside it, or a ``checkpoints/<n>`` step of a checkpoint_dir.

    Returns:
      The variables as numpy arrays, restored from the checkpoint's own tree metadata (no
      target needed, so it works for an uninitialised model).

    Raises:
      ValueError: if ``directory`` is not such a directory, or is corrupt or truncated.
    """
    import orbax.checkpoint as ocp

    # Imported here: training/ imports the classifier, which imports this module.
    from .training.orbax_io import open_manager

    manager_dir, step = _resolve_checkpoint(directory)
    handlers = {MODEL_ITEM: ocp.StandardCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    manager = open_manager(manager_dir, None, async_save=False, item_handlers=handlers)
    try:
        step = manager.latest_step() if step is None else step
        if step is None or step not in manager.all_steps():
            raise ValueError(f"{directory}: no finished checkpoint to read "
                             f"(steps: {manager.all_steps()})")
        source = os.path.join(manager_dir, str(step))
        try:
            metadata = manager.item_metadata(step)[MODEL_ITEM]
            tree = getattr(metadata, "tree", metadata)
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
            restored = manager.restore(step, args=ocp.args.Composite(
                **{MODEL_ITEM: ocp.args.StandardRestore(abstract)}))[MODEL_ITEM]
        except Exception as error:  # orbax raises many types for corrupt or truncated files
            raise ValueError(
                f"{source}: cannot read the checkpoint's '{MODEL_ITEM}' item (corrupt or "
                f"truncated?): {error}"
            ) from error
    finally:
        manager.close()
    variables = jax.tree.map(np.asarray, restored)
    _check_tree(source, variables)
    return SavedVariables(variables, None, None, source)


# --- checking against the model --------------------------------------------------------------
def _leaf_specs(variables: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
    return {path: (tuple(np.shape(leaf)), str(leaf.dtype))
            for path, leaf in _flat_leaves(variables).items()}


def _modules(variables: PyTree) -> set[str]:
    return {module for tree in variables.values() for module in tree}


def check_compatible(saved: SavedVariables, task_names: Sequence[str],
                     module_pool: Mapping[str, Any], current: PyTree | None) -> None:
    """Raises unless ``saved`` fits the model exactly; nothing is loaded partially.

    Args:
      saved: what was read.
      task_names: the model's task names (compared as a set with the saved ones).
      module_pool: the model's module pool (name -> module).
      current: the model's variables, or None for an uninitialised model.

    Raises:
      ValueError: naming every difference: task names, saved modules not in the pool,
        modules of the model with no saved variables, and (initialised model) leaves
        missing, unexpected, or differing in shape or dtype. An initialised model is
        compared module by module with its own variables (a pool module it has not
        initialised yet, e.g. of a task added after init, takes the saved variables
        unchecked); an uninitialised one checks that every Flax module of its pool has
        saved variables, or was in the saving model's pool too (version-2 files).
    """
    problems = []
    if saved.task_names is not None and set(saved.task_names) != set(task_names):
        problems.append(f"saved task names {sorted(saved.task_names)} differ from the "
                        f"model's {sorted(task_names)}")
    saved_modules = _modules(saved.variables)
    unknown = sorted(saved_modules - set(module_pool))
    if unknown:
        problems.append(f"saved modules {unknown} are not in this model's module pool "
                        f"{sorted(module_pool)}")
    if current is not None:
        current_modules = _modules(current)
        absent = sorted(current_modules - saved_modules)
        if absent:
            problems.append(f"modules {absent} of the model have no saved variables")
        both = current_modules & saved_modules
        expected = {p: v for p, v in _leaf_specs(current).items() if p.split("/")[1] in both}
        found = {p: v for p, v in _leaf_specs(saved.variables).items() if p.split("/")[1] in both}
        differ = [f"{path}: expected {expected[path][0]} {expected[path][1]}, found "
                  f"{found[path][0]} {found[path][1]}"
                  for path in sorted(set(expected) & set(found)) if expected[path] != found[path]]
        details = []
        if set(expected) - set(found):
            details.append(f"missing {sorted(set(expected) - set(found))}")
        if set(found) - set(expected):
            details.append(f"unexpected {sorted(set(found) - set(expected))}")
        if differ:
            details.append(f"shape or dtype differs: {differ}")
        if details:
            problems.append("saved variables do not match the model's: " + "; ".join(details))
    else:
        # Without variables the model cannot say which modules own some; a Flax module
        # the file has none for is an error unless the saving model had it too (it then
        # owned none there), which only version-2 files record.
        known = set(saved.module_pool or ())
        absent = sorted(name for name, module in module_pool.items()
                        if is_flax_module(module) and name not in saved_modules
                        and name not in known)
        if absent:
            hint = ("" if saved.module_pool is not None else
                    " (this source does not record the saving model's pool: if these modules "
                    "own no variables, init the model first, then load, to compare exactly)")
            problems.append(f"modules {absent} of this model's pool have no saved "
                            f"variables{hint}")
    if problems:
        raise ValueError(f"{saved.source}: cannot load into this model: " + "; ".join(problems))


# --- the two entry points ------------------------------------------------------------------
def save_params(path: str | os.PathLike, variables: PyTree, model_name: str,
                task_names: Sequence[str], module_pool: Sequence[str]) -> None:
    """Writes a version-2 params file to ``path`` atomically (``atomic_write``).

    Args:
      path: the file; its directory is created if needed.
      variables, model_name, task_names, module_pool: as ``encode_params``.
    """
    atomic_write(path, encode_params(variables, model_name, task_names, module_pool))


def load_variables(path: str | os.PathLike, task_names: Sequence[str],
                   module_pool: Mapping[str, Any], current: PyTree | None) -> PyTree:
    """Reads and checks variables for a model from a params file or a checkpoint directory.

    Args:
      path: a ``model.save`` file, or a directory the ``Checkpointer`` wrote (see
        ``read_checkpoint``).
      task_names, module_pool, current: the model's (see ``check_compatible``).

    Returns:
      The variables ``{collection: {module: ...}}`` as numpy arrays.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if ``path`` is neither kind of source, is corrupt, or does not fit the
        model (see ``decode_params``, ``read_checkpoint`` and ``check_compatible``).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        saved = read_checkpoint(path)
    elif os.path.exists(path):
        with open(path, "rb") as f:
            saved = decode_params(f.read(), path)
    else:
        raise FileNotFoundError(f"{path}: no such file or directory (expected a model.save "
                                f"file or a checkpointer's best_model_<metric> directory)")
    check_compatible(saved, task_names, module_pool, current)
    return saved.variables
