"""DictDataset: a named split of numpy-backed dicts of inputs and labels, checked once.

Inputs become numeric arrays (floats float32, integers int32 unless ``jax_enable_x64``),
labels hard ``[N]`` ints (-1 = no label) or soft ``[N, K]`` probabilities; every mistake
that would corrupt training silently is an error here. Batching is in ``loader.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

INPUT_KEY = "_input_"
SOFT_LABEL_TOLERANCE = 1e-3
MASK_SUFFIX = "_mask"

logger = logging.getLogger(__name__)


def mask_key(key: str) -> str:
    """The X_dict key of a variable-length input's mask: ``"<key>_mask"``."""
    return f"{key}{MASK_SUFFIX}"


def _is_ragged(value: Any) -> bool:
    """A list/tuple of 1-D rows: a variable-length input, whatever lengths the rows have.

    Rows that happen to share one length (a single comment to predict on, a batch of
    sentences of one length) still get their lengths and mask, so a model that reads the
    mask runs on them as on any other rows; a stacked array is a fixed-shape input.
    """
    return isinstance(value, (list, tuple)) and bool(value) and np.ndim(value[0]) == 1


def _pad_ragged(key: str, rows: Sequence[Any]) -> np.ndarray:
    """Stacks variable-length 1-D rows into [N, max_len], padding with zeros on the right."""
    arrays = [np.asarray(row) for row in rows]
    for i, row in enumerate(arrays):
        if row.ndim != 1:
            raise ValueError(
                f"X_dict['{key}']: element {i} has shape {row.shape}; a list input must hold "
                f"1-D arrays (padded to the longest), or pass one stacked array"
            )
    max_len = max(len(row) for row in arrays)
    dtype = np.result_type(*arrays)
    out = np.zeros((len(arrays), max_len), dtype=dtype)
    for i, row in enumerate(arrays):
        out[i, : len(row)] = row
    return out


def _x64_enabled() -> bool:
    # Imported here: data.py is numpy-only, and jax's config is read at call time.
    import jax

    return bool(jax.config.jax_enable_x64)


def _first_bad_row(bad: np.ndarray) -> int:
    """The leading-axis index of the first True entry of ``bad`` (any shape)."""
    return int(np.argwhere(bad)[0][0])


def _narrow_integers(name: str, array: np.ndarray) -> np.ndarray:
    """64-bit integers -> int32 when every value fits; else int64 (x64 on) or a ValueError.

    JAX without ``jax_enable_x64`` turns int64 into int32 by wrapping, so an out-of-range
    value would silently become another number.
    """
    if array.dtype.itemsize <= 4 or array.size == 0:
        return array
    info = np.iinfo(np.int32)
    outside = (array < info.min) | (array > info.max)
    if not np.any(outside):
        return array.astype(np.int32)
    row = _first_bad_row(outside)
    value = array[np.nonzero(outside)][0]
    fits_int64 = array.dtype != np.uint64 or array.max() <= np.iinfo(np.int64).max
    if _x64_enabled() and fits_int64:
        return array.astype(np.int64)
    raise ValueError(
        f"{name}: value {value} at row {row} is outside int32's range "
        f"[{info.min}, {info.max}]; JAX would wrap it without jax_enable_x64 "
        f"(enable it to keep int64, or remap the values)"
    )


def _as_input_array(key: str, value: Any) -> np.ndarray:
    """One input as a numeric array [N, ...]: floats become float32, 64-bit ints int32.

    Raises:
      ValueError: for a non-numeric dtype, a scalar, a value that is not finite as float32
        (nan, inf, or beyond float32's range), or a 64-bit integer outside int32's range
        while ``jax_enable_x64`` is off.
    """
    if isinstance(value, np.ndarray):
        array = value
    elif _is_ragged(value):
        array = _pad_ragged(key, value)
    else:
        array = np.asarray(value)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == bool
    ):
        raise ValueError(
            f"X_dict['{key}']: dtype {array.dtype} is not numeric; jaxmtl inputs must be "
            f"numeric arrays (encode text or ids as integers first)"
        )
    if array.ndim == 0:
        raise ValueError(f"X_dict['{key}']: expected an array with a leading [N] axis, got a scalar")
    if np.issubdtype(array.dtype, np.floating):
        # The finite check runs on the float32 values the model will see: a float64 beyond
        # float32's range becomes inf in the cast.
        with np.errstate(over="ignore"):
            cast = array.astype(np.float32, copy=False)
        not_finite = ~np.isfinite(cast)
        if np.any(not_finite):
            row = _first_bad_row(not_finite)
            original = array[np.nonzero(not_finite)][0]
            if np.isfinite(original):
                raise ValueError(
                    f"X_dict['{key}']: value {original} at row {row} overflows float32 "
                    f"(largest {np.finfo(np.float32).max:.6g}); inputs are cast to float32, "
                    f"rescale them first"
                )
            raise ValueError(f"X_dict['{key}']: non-finite value ({original}) at row {row}")
        return cast
    if np.issubdtype(array.dtype, np.integer):
        return _narrow_integers(f"X_dict['{key}']", array)
    return array


def as_label_array(key: str, value: Any) -> np.ndarray:
    """One label set: hard labels [N] (int32, -1 = no label) or soft labels [N, K] float32.

    Raises:
      ValueError: for non-integral or out-of-range hard labels, a [N, 1] column (hard labels
        with a trailing axis, or K=1 probabilities, which no classifier can use), soft
        labels outside [0, 1] or whose rows do not sum to 1, or any other shape.
    """
    array = np.asarray(value)
    if array.ndim == 1:
        if np.issubdtype(array.dtype, np.floating):
            if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
                raise ValueError(
                    f"Y_dict['{key}']: hard labels [N] must be integers (-1 = no label); "
                    f"got non-integral values"
                )
            too_big = np.abs(array) >= 2.0**63
            if np.any(too_big):
                raise ValueError(
                    f"Y_dict['{key}']: value {array[too_big][0]} at row "
                    f"{_first_bad_row(too_big)} is outside int32's range; hard labels are "
                    f"class indices (-1 = no label)"
                )
            array = array.astype(np.int64)
        elif not np.issubdtype(array.dtype, np.integer):
            hint = "; use labels.astype(int) (0/1 class indices)" if array.dtype == bool else ""
            raise ValueError(
                f"Y_dict['{key}']: labels of dtype {array.dtype} are not numeric{hint}")
        if array.size and np.any(array < -1):
            raise ValueError(
                f"Y_dict['{key}']: hard labels must be >= -1 (-1 = no label), got {array.min()}"
            )
        array = _narrow_integers(f"Y_dict['{key}']", array)
        return array if array.dtype == np.int64 else array.astype(np.int32)
    if array.ndim == 2 and array.shape[1] == 1:
        raise ValueError(
            f"Y_dict['{key}']: shape {array.shape} (a [N, 1] column) looks like a column of "
            f"hard labels; pass y.ravel() ([N] ints) or [N, K] probabilities with K >= 2"
        )
    if array.ndim == 2:
        with np.errstate(over="ignore"):
            array = array.astype(np.float32)
        if not np.all(np.isfinite(array)):
            bad = _first_bad_row(~np.isfinite(array))
            raise ValueError(f"Y_dict['{key}']: non-finite soft label at row {bad}")
        unlabelled = np.all(array == -1, axis=1)
        labelled = array[~unlabelled]
        if np.any(labelled < 0) or np.any(labelled > 1):
            raise ValueError(
                f"Y_dict['{key}']: soft labels must be probabilities in [0, 1] "
                f"(or a row of all -1 for no label)"
            )
        sums = labelled.sum(axis=1)
        off = np.abs(sums - 1.0) > SOFT_LABEL_TOLERANCE
        if np.any(off):
            row = int(np.flatnonzero(~unlabelled)[np.argmax(off)])
            raise ValueError(
                f"Y_dict['{key}']: soft-label row {row} sums to {float(array[row].sum()):.6f}, "
                f"expected 1 (tolerance {SOFT_LABEL_TOLERANCE})"
            )
        return array
    raise ValueError(
        f"Y_dict['{key}']: labels have shape {array.shape}, expected [N] ints or "
        f"[N, K] probabilities"
    )


def is_active(labels: np.ndarray) -> np.ndarray:
    """Rows that carry a label: hard label != -1, or a soft row that is not all -1. [N] bool."""
    if labels.ndim == 1:
        return labels != -1
    return np.any(labels != -1, axis=1)


class DictDataset:
    """A named split of inputs and labels, each a dict of arrays with a leading [N] axis.

    Args:
      name: dataset name; appears in metric keys ``task/dataset/split/metric``.
      split: split name, e.g. "train", "valid", "test".
      X_dict: input name -> array [N, ...] (float inputs become float32), or a list (or
        tuple) of 1-D rows: a variable-length input, stored zero-padded to the longest
        row [N, max_len], with its row lengths in ``lengths[key]`` and a mask
        ``X_dict["<key>_mask"]`` [N, max_len] bool (True on real positions). Loaders cut
        each batch of it (and of its mask) to a bucket length (see ``DictDataLoader``).
        Rows that all have one length are still a variable-length input with a mask (all
        True), so one new row to predict on feeds a model that reads the mask; pass one
        stacked array [N, L] for a fixed-shape input.
      Y_dict: label name (usually a task name) -> hard labels int [N] (-1 = no label) or
        soft labels float [N, K] (rows sum to 1; a row of all -1 = no label).

    Raises:
      ValueError: on mismatched lengths, values not finite as float32, 64-bit integers
        outside int32's range (unless ``jax_enable_x64`` is on), a [N, 1] label column,
        soft-label rows that do not sum to 1 (tolerance 1e-3), non-numeric inputs, an empty
        dataset, a name, split or label name that contains '/', or an input named
        ``"<key>_mask"`` beside a variable-length input ``key``.

    Attributes:
      lengths: variable-length input name -> its row lengths [N] int (empty when every
        input has a fixed shape).
    """

    def __init__(
        self,
        name: str,
        split: str,
        X_dict: Mapping[str, Any],
        Y_dict: Mapping[str, Any],
    ) -> None:
        for field, value in (("name", name), ("split", split)):
            if not isinstance(value, str) or "/" in value:
                raise ValueError(
                    f"DictDataset '{name}' ({split}): {field} {value!r} must be a string "
                    f"without '/' (metric keys are 'task/dataset/split/metric')"
                )
        slashed = [key for key in (Y_dict or {}) if "/" in str(key)]
        if slashed:
            raise ValueError(
                f"DictDataset '{name}' ({split}): label names {slashed} contain '/' "
                f"(metric keys are 'label/dataset/split/metric')"
            )
        self.name = name
        self.split = split
        if not X_dict:
            raise ValueError(f"DictDataset '{name}' ({split}): X_dict is empty")
        ragged = [key for key, value in X_dict.items() if _is_ragged(value)]
        clashing = [mask_key(key) for key in ragged if mask_key(key) in X_dict]
        if clashing:
            raise ValueError(
                f"DictDataset '{name}' ({split}): X_dict has keys {clashing}, the names of "
                f"the masks of the variable-length inputs "
                f"{[k[: -len(MASK_SUFFIX)] for k in clashing]}; rename them"
            )
        self.X_dict = {key: _as_input_array(key, value) for key, value in X_dict.items()}
        self.lengths: dict[str, np.ndarray] = {}
        for key in ragged:
            lengths = np.array([len(row) for row in X_dict[key]], np.int32)
            self.lengths[key] = lengths
            empty = np.flatnonzero(lengths == 0)
            if len(empty):
                # Legal (an empty comment), but a masked pooling over no real position
                # gives its fill value (e.g. -1e9 for a masked max) as the representation.
                logger.warning(
                    "DictDataset '%s' (%s): %d row(s) of X_dict['%s'] are empty (first: row "
                    "%d); their mask is all False, so a model pooling over the mask sees no "
                    "real position there", name, split, len(empty), key, int(empty[0]))
            width = self.X_dict[key].shape[1]
            self.X_dict[mask_key(key)] = np.arange(width)[None, :] < lengths[:, None]
        self.Y_dict = {key: as_label_array(key, value) for key, value in (Y_dict or {}).items()}
        lengths = {f"X_dict['{k}']": len(v) for k, v in self.X_dict.items()}
        lengths.update({f"Y_dict['{k}']": len(v) for k, v in self.Y_dict.items()})
        if len(set(lengths.values())) > 1:
            raise ValueError(
                f"DictDataset '{name}' ({split}): arrays have different lengths: {lengths}"
            )
        if next(iter(lengths.values())) == 0:
            raise ValueError(f"DictDataset '{name}' ({split}): the dataset is empty (N = 0)")

    def __len__(self) -> int:
        return len(next(iter(self.X_dict.values())))

    def __getitem__(self, index: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return (
            {key: value[index] for key, value in self.X_dict.items()},
            {key: value[index] for key, value in self.Y_dict.items()},
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name}, X_keys={list(self.X_dict)}, "
            f"Y_keys={list(self.Y_dict)})"
        )

    @classmethod
    def from_tensors(
        cls,
        X_tensor: Any,
        Y_tensor: Any,
        split: str,
        input_data_key: str = "input_data",
        task_name: str = "task",
        dataset_name: str = "default_dataset",
    ) -> DictDataset:
        """Builds a one-input, one-task dataset from an input array and a label array."""
        return cls(
            name=dataset_name,
            split=split,
            X_dict={input_data_key: X_tensor},
            Y_dict={task_name: Y_tensor},
        )


# The loader lives in loader.py; these names stay importable from here.
