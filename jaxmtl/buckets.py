"""Length buckets: the few padded lengths a variable-length input is cut to.

A batch of a variable-length input is padded to the smallest bucket length that holds its
longest row; the bucket lengths are fixed when the loader is built, chosen here to
minimise the expected padded length of the batches the loader will make, or given by
the user. The second half: how one compiled program serves all of a loader's shapes.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np

from .data import mask_key

DEFAULT_LENGTH_BUCKETS = 8
# Above this many distinct lengths, bucket boundaries are chosen on a coarser grid.
_MAX_CANDIDATES = 512


def optimal_boundaries(candidates: np.ndarray, weights: np.ndarray, n_buckets: int
                       ) -> tuple[int, ...]:
    """At most ``n_buckets`` bucket lengths minimising the expected padded length.

    Each length ``candidates[j]`` (ascending) occurs with weight ``weights[j]`` and is
    padded to the smallest chosen boundary >= it; the boundaries minimise
    ``sum_j weights[j] * boundary(candidates[j])``. The largest candidate is always a
    boundary. Exact dynamic programme, O(n_buckets * len(candidates)^2).

    Args:
      candidates: [M] ascending distinct lengths >= 1.
      weights: [M] non-negative weights.
      n_buckets: the most boundaries to return (>= 1).

    Returns:
      The boundaries, ascending.
    """
    c = np.asarray(candidates, np.float64)
    m = len(c)
    if n_buckets >= m:
        return tuple(int(v) for v in candidates)
    cumulative = np.cumsum(np.asarray(weights, np.float64))  # weight of c_0 .. c_j
    best = c * cumulative  # one bucket: everything up to c_j padded to c_j
    earlier = np.tril(np.ones((m, m), bool), -1)  # [j, i]: i < j
    previous = []
    for _ in range(n_buckets - 1):
        # Last bucket (c_i, c_j] padded to c_j, the rows up to c_i covered as best[i].
        total = best[None, :] + c[:, None] * (cumulative[:, None] - cumulative[None, :])
        total = np.where(earlier, total, np.inf)
        split = np.argmin(total, axis=1)
        cost = total[np.arange(m), split]
        better = cost < best
        previous.append(np.where(better, split, -1))
        best = np.where(better, cost, best)
    chosen, j = [m - 1], m - 1
    for split in reversed(previous):
        if split[j] >= 0:
            j = int(split[j])
            chosen.append(j)
    return tuple(int(candidates[j]) for j in sorted(chosen))


def _candidate_lengths(lengths: np.ndarray) -> np.ndarray:
    """Distinct lengths (>= 1), on a coarser grid when there are very many."""
    lengths = np.maximum(lengths, 1)
    top = int(lengths.max())
    step = -(-top // _MAX_CANDIDATES)
    return np.unique(np.minimum(-(-lengths // step) * step, top))


def auto_boundaries(lengths: np.ndarray, n_buckets: int, batch_size: int,
                    shuffle: bool, bucket_by_length: bool) -> tuple[int, ...]:
    """Bucket lengths of one variable-length input chosen to minimise expected padding.

    The padded length of a batch is the bucket of its longest row, so what is minimised
    is the expected bucket of that maximum over the batches the loader will make: with
    ``bucket_by_length`` rows of one bucket share batches, so each row's own length
    counts; in dataset order (``shuffle=False``) the maxima of the actual batches; with a
    shuffle, the maximum of ``batch_size`` random rows (CDF ``F(l) ** batch_size``).

    Args:
      lengths: [N] row lengths.
      n_buckets: the most bucket lengths to return.
      batch_size, shuffle, bucket_by_length: the loader's settings.

    Returns:
      Ascending bucket lengths; the last is the longest row (at least 1).
    """
    lengths = np.maximum(np.asarray(lengths), 1)
    candidates = _candidate_lengths(lengths)
    slot = np.searchsorted(candidates, lengths)  # the candidate each row rounds up to
    if bucket_by_length:
        weights = np.bincount(slot, minlength=len(candidates)).astype(np.float64)
    elif not shuffle:
        maxima = [slot[i : i + batch_size].max() for i in range(0, len(slot), batch_size)]
        weights = np.bincount(maxima, minlength=len(candidates)).astype(np.float64)
    else:
        cdf = np.cumsum(np.bincount(slot, minlength=len(candidates))) / len(slot)
        weights = np.diff(cdf ** min(batch_size, len(slot)), prepend=0.0)
    return optimal_boundaries(candidates, weights, n_buckets)


def explicit_boundaries(key: str, value: Any, longest: int) -> tuple[int, ...]:
    """User bucket lengths of input ``key``: sorted, capped at and ending with ``longest``."""
    try:
        values = [int(v) for v in value]
        ok = all(float(v) == int(v) >= 1 for v in value) and bool(values)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"DictDataLoader: length_buckets for '{key}' must be a non-empty list of ints "
            f">= 1 (bucket lengths), got {value!r}")
    return tuple(sorted({min(v, longest) for v in values} | {longest}))


@dataclasses.dataclass(frozen=True)
class BucketPlan:
    """A loader's buckets: its variable-length inputs, their bucket lengths, every batch
    shape, and each row's bucket (``plan_buckets``)."""

    ragged_keys: tuple[str, ...]
    bucket_lengths: dict[str, tuple[int, ...]]  # input name -> ascending bucket lengths
    bucket_shapes: list[tuple[int, ...]]  # every combination, in ``ragged_keys`` order
    row_buckets: np.ndarray  # [K, N] each row's bucket index per input
    shape_strides: np.ndarray  # [K] strides turning bucket indices into a shape index
    row_shape: np.ndarray  # [N] each row's shape index


def plan_buckets(lengths: dict[str, np.ndarray], length_buckets: Any, dataset_name: str,
                 n_rows: int, batch_size: int, shuffle: bool, bucket_by_length: bool
                 ) -> BucketPlan:
    """The buckets of a loader over a dataset with variable-length inputs ``lengths``.

    Args:
      lengths: input name -> [N] row lengths (``DictDataset.lengths``; empty when every
        input has a fixed shape).
      length_buckets: the loader's setting: an int n (at most n shapes in all, the bucket
        lengths chosen by ``auto_boundaries``), a list of bucket lengths (one
        variable-length input), or a dict input name -> list.
      dataset_name, n_rows: the dataset's, for messages and shapes.
      batch_size, shuffle, bucket_by_length: the loader's settings.

    Raises:
      ValueError: a dict naming an input that is not variable-length; a list with
        several variable-length inputs; bucket lengths that are not ints >= 1.
    """
    if isinstance(length_buckets, dict):
        unknown = sorted(set(length_buckets) - set(lengths))
        if unknown:
            raise ValueError(
                f"DictDataLoader: length_buckets names {unknown}, which are not "
                f"variable-length inputs of dataset '{dataset_name}' (those are "
                f"{list(lengths)})")
    elif not isinstance(length_buckets, numbers.Integral) and len(lengths) > 1:
        raise ValueError(
            f"DictDataLoader: a list length_buckets={length_buckets!r} is ambiguous for "
            f"dataset '{dataset_name}' with variable-length inputs {list(lengths)}; "
            f"pass a dict input name -> bucket lengths")
    counted = isinstance(length_buckets, numbers.Integral)
    per_key = max(1, int(int(length_buckets) ** (1 / max(len(lengths), 1)) + 1e-9)) \
        if counted else DEFAULT_LENGTH_BUCKETS
    bucket_lengths: dict[str, tuple[int, ...]] = {}
    for key, row_lengths in lengths.items():
        longest = max(int(row_lengths.max()), 1)
        given = length_buckets.get(key) if isinstance(length_buckets, dict) else (
            None if counted else length_buckets)
        bucket_lengths[key] = (
            explicit_boundaries(key, given, longest) if given is not None else
            auto_boundaries(row_lengths, per_key, batch_size, shuffle, bucket_by_length))
    keys = tuple(lengths)
    # Each row's bucket index per key [K, N], and its combination as one int [N].
    row_buckets = np.array([np.searchsorted(bucket_lengths[k], lengths[k]) for k in keys],
                           np.int64).reshape(len(keys), n_rows)
    sizes = [len(bucket_lengths[k]) for k in keys]
    strides = np.array([int(np.prod(sizes[i + 1 :])) for i in range(len(sizes))], np.int64)
    shapes = [tuple(bucket_lengths[k][int(i)] for k, i in zip(
        keys, np.unravel_index(s, sizes) if sizes else (), strict=True))
        for s in range(int(np.prod(sizes)))]
    return BucketPlan(keys, bucket_lengths, shapes, row_buckets, strides,
                      (strides[:, None] * row_buckets).sum(axis=0))


# --- one program for every bucket shape -----------------------------------------------------
# One compiled program per bucket shape costs a whole XLA compile per shape (mostly a fixed
# cost per program, ~1 s of a CPU core for a small model), which a first fit pays before
# its first epoch ends. Instead a loader's batch goes to the device at the loader's longest
# bucket shape with the index of its own shape, and the computation runs at that shape's
# lengths in one ``lax.switch`` branch per shape (``at_bucket_shape``): one program serves
# every shape and compiles in ~1/3 the time of one per shape. The train step switches only
# its forward and backward passes (``training.step.at_shape``), prediction its forward.

#: Per bucket shape of a loader: ``((input key, length), ...)``, the masks' keys included.
BucketShapes = tuple[tuple[tuple[str, int], ...], ...]


def cut_to_widths(X_dict: dict[str, Any], widths: tuple[tuple[str, int], ...]
                  ) -> dict[str, Any]:
    """``X_dict`` with each listed input cut to its length along axis 1."""
    lengths = dict(widths)
    return {key: value[:, : lengths[key]] if key in lengths else value
            for key, value in X_dict.items()}


def at_bucket_shape(shapes: BucketShapes, shape: Any, run: Any, X_dict: dict[str, Any],
                    *operands: Any) -> Any:
    """``run(X_dict cut to shapes[shape], *operands)``, one ``lax.switch`` branch per shape.

    ``X_dict`` holds the variable-length inputs at the longest shape; ``shape`` is a traced
    int32 index. Every branch must return the same structure (e.g. gradients and losses:
    nothing whose shape follows the widths). One program then serves every bucket shape,
    each branch computing at its own lengths.
    """
    import jax  # the bucket choice above is numpy only

    def branch(widths: tuple) -> Any:
        return lambda X, *ops: run(cut_to_widths(X, widths), *ops)

    return jax.lax.switch(shape, [branch(widths) for widths in shapes], X_dict, *operands)


def switches_bucket_shapes(parallel: Any, n_shapes: int) -> bool:
    """Whether ``parallel`` (a ``DataParallel``) runs ``n_shapes`` bucket shapes as one
    switched program: several shapes, jit modes (not pmap), CPU devices.

    On a CPU a compile costs seconds and a switch nothing. On a GPU, XLA reads a switch's
    index on the host, a wait for the device per step that would undo asynchronous
    dispatch; there (and under pmap) each shape keeps its own program.
    """
    return (n_shapes > 1 and parallel.mode != "pmap"
            and all(device.platform == "cpu" for device in parallel.devices))


def bucket_widths(dl: Any) -> BucketShapes:
    """The lengths each of ``dl``'s bucket shapes cuts its inputs to, masks included."""
    shapes = []
    for shape in dl.bucket_shapes:
        widths: list[tuple[str, int]] = []
        for key, length in zip(dl.ragged_keys, shape, strict=True):
            widths += [(key, length), (mask_key(key), length)]
        shapes.append(tuple(widths))
    return tuple(shapes)


def pad_to_longest(X_dict: dict[str, np.ndarray], dl: Any
                   ) -> tuple[dict[str, np.ndarray], int]:
    """A batch of ``dl`` at its longest bucket shape, and the index of its own shape.

    The positions added are zeros (False in the masks); the step cuts them off again
    before any module sees them.
    """
    lengths = tuple(X_dict[key].shape[1] for key in dl.ragged_keys)
    shape = dl.bucket_shapes.index(lengths)
    padded = dict(X_dict)
    for key, longest in zip(dl.ragged_keys, dl.bucket_shapes[-1], strict=True):
        for name in (key, mask_key(key)):
            value = X_dict[name]
            if value.shape[1] < longest:
                widths = [(0, 0)] * value.ndim
                widths[1] = (0, longest - value.shape[1])
                padded[name] = np.pad(value, widths)
    return padded, shape
