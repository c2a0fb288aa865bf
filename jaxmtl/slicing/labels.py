"""Slice labels: the indicator and predictor label sets of each slice, from a slice matrix.

``S`` is what Snorkel's ``SFApplier`` / ``PandasSFApplier`` return (a numpy record array,
one 0/1 int field per slicing function, named after it) or a plain ``[N, n_slices]`` 0/1
(or bool) array with the slice names given separately. For each slice ``s`` (and the
``base`` slice of all rows, added when ``S`` has none):

- ``{task}_slice:{s}_ind``: 1 where the row is in the slice, else 0 (binary, every row);
- ``{task}_slice:{s}_pred``: the base task's labels on the rows in the slice, -1 (no
  label; an all -1 row for soft labels) elsewhere.

``slice_label_dict`` is the pure function; ``add_slice_labels`` adds its result to a
dataloader's dataset in place, as Snorkel's does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..data import as_label_array

__all__ = ["BASE_SLICE", "add_slice_labels", "ind_task_name", "pred_task_name",
           "slice_label_dict", "slice_matrix"]

logger = logging.getLogger(__name__)

#: The slice of all rows, added to every slice set (Snorkel's name).
BASE_SLICE = "base"


def ind_task_name(base_task_name: str, slice_name: str) -> str:
    """The indicator task (and label set) of a slice: ``"{base}_slice:{slice}_ind"``."""
    return f"{base_task_name}_slice:{slice_name}_ind"


def pred_task_name(base_task_name: str, slice_name: str) -> str:
    """The predictor task (and label set) of a slice: ``"{base}_slice:{slice}_pred"``."""
    return f"{base_task_name}_slice:{slice_name}_pred"


def check_slice_names(slice_names: Sequence[str]) -> list[str]:
    """The slice names as a list, with ``base`` appended when absent.

    Raises:
      ValueError: a name that is not a non-empty str, contains '/', or is repeated.
    """
    if isinstance(slice_names, str):
        raise ValueError(f"slice_names must be a list of names, got the str {slice_names!r}")
    names = list(slice_names)
    for name in names:
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(
                f"slice name {name!r} must be a non-empty str without '/' (it becomes part "
                f"of the task names and metric keys 'task/dataset/split/metric')")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"slice_names repeat {repeated}; each slice needs a unique name")
    return names if BASE_SLICE in names else [*names, BASE_SLICE]


def slice_matrix(S: Any, slice_names: Sequence[str] | None = None
                 ) -> tuple[np.ndarray, list[str]]:
    """``S`` as a [N, n_slices] int32 0/1 matrix with its slice names, ``base`` included.

    Args:
      S: a record/structured array (``SFApplier`` output; names from its fields) or a
        [N, n_slices] array of 0/1 or bool (then ``slice_names`` names its columns).
      slice_names: the column names of a plain array; for a record array, if given, the
        fields it must have (in any order).

    Returns:
      (matrix [N, n] int32, names): the base slice's all-ones column is appended when
      ``S`` has no "base" field or column.

    Raises:
      ValueError: a plain array without names or with a different number of columns, a
        record array whose fields differ from ``slice_names``, or a value other than 0/1
        (naming the slice, the row and the value).
    """
    S = np.asarray(S) if not isinstance(S, np.ndarray) else S
    if S.dtype.names is not None:
        names = list(S.dtype.names)
        if slice_names is not None and (set(names) - {BASE_SLICE}
                                        != set(slice_names) - {BASE_SLICE}):
            expected = [name for name in slice_names if name != BASE_SLICE]
            raise ValueError(
                f"S has slice fields {names}, but the slices are {expected}; apply the "
                f"slicing functions of exactly these slices")
        columns = [np.asarray(S[name]).reshape(-1) for name in names]
        matrix = np.stack(columns, axis=1) if columns else np.zeros((len(S), 0))
    else:
        if S.ndim != 2:
            raise ValueError(
                f"S has shape {S.shape}; expected a record array (SFApplier's output) or "
                f"a [N, n_slices] 0/1 matrix")
        if slice_names is None:
            raise ValueError(
                f"S is a plain [N, n_slices] array (shape {S.shape}); pass slice_names to "
                f"name its columns, or a record array with one field per slice")
        names = list(slice_names)
        if S.shape[1] != len(names):
            raise ValueError(
                f"S has {S.shape[1]} columns but there are {len(names)} slice names "
                f"{names}; one column per slice")
        matrix = S
    check_slice_names(names)
    if matrix.dtype == bool:
        matrix = matrix.astype(np.int32)
    bad = ~np.isin(matrix, (0, 1))
    if np.any(bad):
        row, column = (int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"S: slice '{names[column]}' has value {matrix[row, column].item()!r} at row {row}; "
            f"slice membership must be 0/1 (or bool)")
    matrix = matrix.astype(np.int32)
    if BASE_SLICE not in names:
        matrix = np.concatenate([matrix, np.ones((len(matrix), 1), np.int32)], axis=1)
        names = [*names, BASE_SLICE]
    return matrix, names


def slice_label_dict(labels: Any, S: Any, base_task_name: str,
                     slice_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """The indicator and predictor label sets of every slice (pure).

    Args:
      labels: the base task's labels, hard [N] ints (-1 = no label) or soft [N, K].
      S: the slice matrix (see ``slice_matrix``).
      base_task_name: the base task's name (the prefix of the slice task names).
      slice_names: column names of a plain-array ``S``.

    Returns:
      ``{ind_task_name: [N] int32 0/1, pred_task_name: labels masked to the slice}`` for
      each slice, ``base`` last unless ``S`` has it elsewhere.

    Raises:
      ValueError: as ``slice_matrix``, or when ``S`` and ``labels`` differ in length.
    """
    labels = np.asarray(labels)
    matrix, names = slice_matrix(S, slice_names)
    if len(matrix) != len(labels):
        raise ValueError(
            f"S has {len(matrix)} rows but the labels of task '{base_task_name}' have "
            f"{len(labels)}; S must come from the same data points, in order")
    result: dict[str, np.ndarray] = {}
    for column, name in enumerate(names):
        member = matrix[:, column].astype(bool)
        pred = labels.copy()
        pred[~member] = -1
        result[ind_task_name(base_task_name, name)] = matrix[:, column].copy()
        result[pred_task_name(base_task_name, name)] = pred
    return result


def add_slice_labels(dataloader: Any, base_task: Any, S: Any,
                     slice_names: Sequence[str] | None = None) -> None:
    """Adds the slice tasks' labels to ``dataloader.dataset.Y_dict``, in place (Snorkel's).

    Args:
      dataloader: a ``DictDataLoader`` whose dataset carries the base task's labels.
      base_task: the Task (or its name) the slices refine.
      S: ``SFApplier``/``PandasSFApplier`` output, or a [N, n_slices] 0/1 array.
      slice_names: column names of a plain-array ``S``.

    Raises:
      ValueError: the dataset has no labels for the base task, or as ``slice_label_dict``.
    """
    task_name = base_task if isinstance(base_task, str) else base_task.name
    dataset = dataloader.dataset
    if task_name not in dataset.Y_dict:
        raise ValueError(
            f"Base task ({task_name}) labels missing from {dataset}; slice labels are "
            f"made from them")
    new = slice_label_dict(dataset.Y_dict[task_name], S, task_name, slice_names)
    for label_name, value in new.items():
        value = as_label_array(label_name, value)
        old = dataset.Y_dict.get(label_name)
        if old is not None and not np.array_equal(old, value):
            logger.warning("add_slice_labels: replacing the existing labels '%s' of dataset "
                           "%s (%s)", label_name, dataset.name, dataset.split)
        dataset.Y_dict[label_name] = value
