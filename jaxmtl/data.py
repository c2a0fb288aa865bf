"""Datasets and loaders: numpy-backed dicts of inputs and labels, fixed-shape batches.

A jitted step compiles once per (task set, batch shape), so every batch a loader yields has
the same shape: the last partial batch is padded (with repeats of its own rows, which keeps
batch statistics in-distribution) and carries a mask; padded label rows are set to -1, the
"no label" value, so even a hand-written loop ignores them in the loss.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

INPUT_KEY = "_input_"
SOFT_LABEL_TOLERANCE = 1e-3


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
    elif isinstance(value, (list, tuple)) and value and np.ndim(value[0]) == 1 and (
        len({len(v) for v in value}) > 1
    ):
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


def _as_label_array(key: str, value: Any) -> np.ndarray:
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
            raise ValueError(f"Y_dict['{key}']: labels of dtype {array.dtype} are not numeric")
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
      X_dict: input name -> array [N, ...] (float inputs become float32), or a list of
        variable-length 1-D arrays, padded with zeros to the longest.
      Y_dict: label name (usually a task name) -> hard labels int [N] (-1 = no label) or
        soft labels float [N, K] (rows sum to 1; a row of all -1 = no label).

    Raises:
      ValueError: on mismatched lengths, values not finite as float32, 64-bit integers
        outside int32's range (unless ``jax_enable_x64`` is on), a [N, 1] label column,
        soft-label rows that do not sum to 1 (tolerance 1e-3), non-numeric inputs, an empty
        dataset, or a name, split or label name that contains '/'.
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
        self.X_dict = {key: _as_input_array(key, value) for key, value in X_dict.items()}
        self.Y_dict = {key: _as_label_array(key, value) for key, value in (Y_dict or {}).items()}
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


class Batch(tuple):
    """A ``(X_dict, Y_dict)`` pair that also carries ``mask``: [B] bool, False on padding.

    It unpacks like Snorkel's batches (``X, Y = batch``); ``batch.mask`` and
    ``batch.num_valid`` tell real rows from padding.
    """

    mask: np.ndarray

    def __new__(cls, X_dict: dict, Y_dict: dict, mask: np.ndarray) -> Batch:
        batch = super().__new__(cls, (X_dict, Y_dict))
        batch.mask = mask
        return batch

    @property
    def num_valid(self) -> int:
        """Number of real (unpadded) rows."""
        return int(self.mask.sum())


_FIXED_SHAPE_BATCHES = (
    "jaxmtl batches are fixed-shape dicts of numpy arrays sliced from the DictDataset's "
    "arrays (the last partial batch is padded with repeats of its rows and masked), so "
    "that the jitted step compiles once"
)
# What to use instead of each torch DataLoader argument that jaxmtl does not support.
_UNSUPPORTED = {
    "collate_fn": "do per-example preprocessing (tokenising, padding, feature extraction) "
                  "when building the DictDataset's X_dict",
    "sampler": "use shuffle=True with seed= for a random order, or reorder, subset or "
               "repeat the DictDataset's rows to change what an epoch contains",
    "batch_sampler": "use batch_size=, shuffle=, seed= and drop_last=, or reorder the "
                     "DictDataset's rows",
    "worker_init_fn": "jaxmtl's workers are threads that only slice numpy arrays and run "
                      "no user code, so there is nothing to initialise; do per-example "
                      "preprocessing when building the DictDataset",
}
DEFAULT_PREFETCH_FACTOR = 2


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"DictDataLoader: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class DictDataLoader:
    """Yields fixed-shape batches of a DictDataset as dicts of numpy arrays.

    Snorkel's ``DictDataLoader`` is a torch ``DataLoader``; this one takes the torch
    keywords a Snorkel script passes and says what each does here.

    Args:
      dataset: the DictDataset to load.
      batch_size: rows per batch; the last partial batch is padded to it and masked.
      shuffle: draw a new permutation of the rows each epoch.
      seed: seed of the permutations; epoch ``e`` uses ``default_rng((seed, e))``, so the
        order is a pure function of (seed, epoch). None draws a seed once, at construction
        (recorded in ``self.seed``); the Trainer replaces a drawn seed with one derived
        from its own seed (``derive_seed``), so a seeded fit is reproducible.
      drop_last: drop the last partial batch instead of padding it.
      num_workers: 0 prepares each batch when it is asked for. N > 0 prepares batches in
        a pool of N background threads, ``N * prefetch_factor`` batches ahead of the
        consumer (slicing and copying the numpy arrays overlaps the training step). The
        batches and their order are the same as with 0. The threads live for one pass
        over the loader and are joined when it ends, also when the consumer stops early
        (``break``, ``close()``, or the iterator being dropped).
      prefetch_factor: batches prepared ahead per worker (torch's meaning); default 2.
        Only with ``num_workers > 0``.
      pin_memory: accepted, no effect: batches are host numpy arrays, and the training
        loop transfers them to the devices itself (asynchronously, one batch ahead).
      persistent_workers: accepted, no effect beyond torch's check that
        ``num_workers > 0``: starting a thread pool per pass costs microseconds, so the
        pool is not kept between passes.
      timeout: with ``num_workers > 0``, seconds to wait for a batch before raising
        ``RuntimeError`` (0 waits forever), as torch's.
      generator: a ``torch.Generator``; its ``initial_seed()`` is used as ``seed`` (the
        permutations are jaxmtl's, not torch's).
      multiprocessing_context, pin_memory_device, in_order: accepted, no effect (the
        workers are threads; batches always come in order).
      collate_fn, sampler, batch_sampler, worker_init_fn: not supported; anything but
        None raises ``ValueError`` saying what to use instead.

    Attributes:
      seed: the seed of the permutations in use.
      seed_given: whether the seed came from the user (``seed=`` or ``generator=``).
      epoch: the epoch whose permutation the next pass uses.
    """

    def __init__(
        self,
        dataset: DictDataset,
        batch_size: int = 32,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        *,
        num_workers: int = 0,
        prefetch_factor: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        timeout: float = 0,
        generator: Any = None,
        multiprocessing_context: Any = None,
        pin_memory_device: str = "",
        in_order: bool = True,
        collate_fn: Any = None,
        sampler: Any = None,
        batch_sampler: Any = None,
        worker_init_fn: Any = None,
    ) -> None:
        unsupported = {"collate_fn": collate_fn, "sampler": sampler,
                       "batch_sampler": batch_sampler, "worker_init_fn": worker_init_fn}
        if callable(batch_size):  # Snorkel's second positional argument is collate_fn
            unsupported["collate_fn"] = batch_size
        for name, value in unsupported.items():
            if value is not None:
                raise ValueError(
                    f"DictDataLoader: {name}={value!r} is not supported: "
                    f"{_FIXED_SHAPE_BATCHES}; {_UNSUPPORTED[name]}"
                )
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) \
                or batch_size < 1:
            raise ValueError(f"DictDataLoader: batch_size must be an int >= 1, got {batch_size!r}")
        if drop_last and len(dataset) < batch_size:
            raise ValueError(
                f"DictDataLoader: drop_last=True with batch_size={batch_size} > "
                f"len(dataset)={len(dataset)} would yield no batch"
            )
        self.num_workers = _check_count("num_workers", num_workers, 0)
        if self.num_workers == 0 and prefetch_factor is not None:
            raise ValueError(
                f"DictDataLoader: prefetch_factor={prefetch_factor!r} needs num_workers > 0 "
                f"(it is the number of batches each worker prepares ahead)"
            )
        if self.num_workers == 0 and persistent_workers:
            raise ValueError("DictDataLoader: persistent_workers=True needs num_workers > 0")
        self.prefetch_factor = DEFAULT_PREFETCH_FACTOR if prefetch_factor is None else \
            _check_count("prefetch_factor", prefetch_factor, 1)
        if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real) \
                or not math.isfinite(timeout) or timeout < 0:
            raise ValueError(
                f"DictDataLoader: timeout must be a number of seconds >= 0, got {timeout!r}"
            )
        self.timeout = float(timeout)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        if generator is not None:
            if not callable(getattr(generator, "initial_seed", None)):
                raise ValueError(
                    f"DictDataLoader: generator must be a torch.Generator (its "
                    f"initial_seed() seeds the shuffle), got {type(generator).__name__}; "
                    f"or pass seed="
                )
            generator_seed = int(generator.initial_seed())
            if seed is not None and int(seed) != generator_seed:
                raise ValueError(
                    f"DictDataLoader: seed={seed!r} and generator (initial_seed "
                    f"{generator_seed}) disagree; pass one of them"
                )
            seed = generator_seed
        if seed is not None:
            _check_count("seed", seed, 0)
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed_given = seed is not None
        self.seed = int(np.random.SeedSequence().entropy % 2**32) if seed is None else int(seed)
        self.drop_last = drop_last
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def derive_seed(self, trainer_seed: int, loader_index: int) -> int:
        """Replaces a seed drawn at construction with one derived from the Trainer's seed.

        A loader built with ``seed=None`` draws a random seed, which would make a fit with
        a fixed Trainer seed shuffle differently on every run. The Trainer calls this for
        each train loader; a seed the user gave (``seed=`` or ``generator=``) is kept.

        Args:
          trainer_seed: the Trainer's seed (non-negative int).
          loader_index: the loader's position among the train loaders, so that loaders of
            equal size do not shuffle in lockstep.

        Returns:
          The seed in use: the user's, or ``SeedSequence((trainer_seed, loader_index))``'s
          first 32-bit word.
        """
        if not self.seed_given:
            sequence = np.random.SeedSequence((int(trainer_seed), int(loader_index)))
            self.seed = int(sequence.generate_state(1)[0])
        return self.seed

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch whose permutation the next iteration uses."""
        self.epoch = int(epoch)

    def order(self, epoch: int) -> np.ndarray:
        """The row order of ``epoch``: [N] int indices."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng((self.seed, epoch)).permutation(n)

    def rows_at(self, order: np.ndarray, index: int) -> tuple[np.ndarray, int]:
        """Row indices [batch_size] of batch ``index`` and how many of them are real.

        A partial batch repeats its own rows up to ``batch_size``.
        """
        rows = order[index * self.batch_size : (index + 1) * self.batch_size]
        num_valid = len(rows)
        if num_valid < self.batch_size:
            rows = np.resize(rows, self.batch_size)
        return rows, num_valid

    def batch_at(self, order: np.ndarray, index: int) -> Batch:
        """Batch number ``index`` of the given row order, padded to ``batch_size``."""
        rows, num_valid = self.rows_at(order, index)
        mask = np.arange(self.batch_size) < num_valid
        X = {key: value[rows] for key, value in self.dataset.X_dict.items()}
        Y = {}
        for key, value in self.dataset.Y_dict.items():
            labels = value[rows]
            if num_valid < self.batch_size:
                labels[num_valid:] = -1
            Y[key] = labels
        return Batch(X, Y, mask)

    def __iter__(self) -> Iterator[Batch]:
        # The epoch's order is fixed when the first batch is asked for (a generator), so
        # a scheduler may create iterators before their turn.
        order = self.order(self.epoch)
        self.epoch += 1
        if self.num_workers == 0:
            for index in range(len(self)):
                yield self.batch_at(order, index)
        else:
            yield from self._prepared_in_background(order)

    def _prepared_in_background(self, order: np.ndarray) -> Iterator[Batch]:
        """``batch_at(order, i)`` for each i, prepared by a thread pool ahead of use."""
        n_batches = len(self)
        depth = self.num_workers * self.prefetch_factor
        executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.num_workers, thread_name_prefix="jaxmtl-DictDataLoader")
        pending: collections.deque[concurrent.futures.Future] = collections.deque()
        try:
            for index in range(min(depth, n_batches)):
                pending.append(executor.submit(self.batch_at, order, index))
            for index in range(n_batches):
                future = pending.popleft()
                if index + depth < n_batches:
                    pending.append(executor.submit(self.batch_at, order, index + depth))
                try:
                    batch = future.result(timeout=self.timeout or None)
                except concurrent.futures.TimeoutError:
                    raise RuntimeError(
                        f"DictDataLoader timed out after {self.timeout} seconds waiting for "
                        f"batch {index} (timeout={self.timeout})"
                    ) from None
                yield batch
        finally:
            # Runs at the end, on an error, and when the consumer closes or drops the
            # iterator early: no thread outlives the pass.
            executor.shutdown(wait=True, cancel_futures=True)
