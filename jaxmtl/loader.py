"""DictDataLoader: fixed-shape batches of a DictDataset, as dicts of numpy arrays.

A jitted step compiles once per batch shape, so every batch a loader yields has the same
number of rows: the last partial batch is padded (with repeats of its own rows, which keeps
batch statistics in-distribution) and carries a mask; padded label rows are set to -1, the
"no label" value, so even a hand-written loop ignores them in the loss.

A variable-length input (``DictDataset.lengths``) is cut per batch to a *bucket length*:
the smallest of a few lengths fixed at construction that holds the batch's longest row, so
a batch pays for its own rows, not the dataset's longest, and the number of batch shapes
(compiled programs) per loader is bounded and known up front (``bucket_shapes``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import numbers
from collections.abc import Iterator
from typing import Any

import numpy as np

from .buckets import DEFAULT_LENGTH_BUCKETS, plan_buckets
from .data import DictDataset, mask_key


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

    Every batch has ``batch_size`` rows. A variable-length input ``key`` (a list of 1-D
    arrays of different lengths in the DictDataset) comes as ``X["key"]`` [B, L] with its
    mask ``X["key_mask"]`` [B, L] bool, L the smallest of ``bucket_lengths["key"]`` that
    holds the batch's longest row; all other inputs have their dataset shape.

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
      length_buckets: how variable-length inputs (``dataset.lengths``) are padded. Each
        batch cuts such an input ``key`` and its mask ``"<key>_mask"`` to the smallest
        bucket length that holds the batch's longest row, so the loader makes at most
        ``len(bucket_shapes)`` batch shapes (each one compiled program per jitted
        function). An int n (default 8): at most n shapes per loader, the bucket lengths
        chosen at construction to minimise the expected padded length for these loader
        settings (``auto_boundaries``); with k variable-length inputs each gets
        ``floor(n ** (1/k))`` buckets. ``1`` pads every batch to the dataset's longest
        row. A list of ints: these bucket lengths (for a dataset with one variable-length
        input); a dict: input name -> list. Lengths above the longest row become it, and
        the longest row's length is always added. No effect on fixed-shape inputs.
      bucket_by_length: batch rows of similar length together, so little is padded:
        rows are grouped by bucket, shuffled within their group (with ``shuffle``), cut
        into batches, and the batches shuffled. Only the last batch of an epoch may be
        partial (its rows are a random run of the length-sorted rows). The order is still
        a pure function of (seed, epoch) and a permutation of the rows each epoch. Note
        that ``predict`` returns rows in the loader's order, so this reorders its output
        even with ``shuffle=False``. No effect on a dataset without variable-length inputs.
      collate_fn, sampler, batch_sampler, worker_init_fn: not supported; anything but
        None raises ``ValueError`` saying what to use instead.

    Attributes:
      seed: the seed of the permutations in use.
      seed_given: whether the seed came from the user (``seed=`` or ``generator=``).
      epoch: the epoch whose permutation the next pass uses.
      ragged_keys: the dataset's variable-length inputs, in ``dataset.lengths`` order.
      bucket_lengths: variable-length input name -> its bucket lengths, ascending.
      bucket_shapes: every combination of bucket lengths a batch can have (tuples in
        ``ragged_keys`` order; ``[()]`` without variable-length inputs): the batch shapes.
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
        length_buckets: int | Any = DEFAULT_LENGTH_BUCKETS,
        bucket_by_length: bool = False,
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
        self.bucket_by_length = bool(bucket_by_length)
        self._init_buckets(length_buckets)

    def _init_buckets(self, length_buckets: Any) -> None:
        """Sets ``ragged_keys``, ``bucket_lengths``, ``bucket_shapes`` and each row's bucket."""
        if isinstance(length_buckets, numbers.Integral):
            _check_count("length_buckets", length_buckets, 1)
        plan = plan_buckets(getattr(self.dataset, "lengths", {}) or {}, length_buckets,
                            self.dataset.name, len(self.dataset), self.batch_size,
                            self.shuffle, self.bucket_by_length)
        self.ragged_keys, self.bucket_lengths = plan.ragged_keys, plan.bucket_lengths
        self.bucket_shapes = plan.bucket_shapes
        self._row_buckets, self._shape_strides = plan.row_buckets, plan.shape_strides
        self._row_shape = plan.row_shape

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
        """The row order of ``epoch``: [N] int indices, a pure function of (seed, epoch).

        Batch ``i`` is ``order[i * batch_size : (i + 1) * batch_size]``.
        """
        n = len(self.dataset)
        if not (self.bucket_by_length and self.ragged_keys):  # fixed shapes: as ever
            if not self.shuffle:
                return np.arange(n)
            return np.random.default_rng((self.seed, epoch)).permutation(n)
        return self._bucketed_order(epoch)

    def _bucketed_order(self, epoch: int) -> np.ndarray:
        """Rows grouped by batch shape (longest first), batches shuffled; the partial one last."""
        n, size = len(self.dataset), self.batch_size
        rng = np.random.default_rng((self.seed, epoch)) if self.shuffle else None
        rows = rng.permutation(n) if rng is not None else np.arange(n)
        rows = rows[np.argsort(-self._row_shape[rows], kind="stable")]  # shuffled within
        n_full, tail = divmod(n, size)
        # Where the partial batch is cut from the sorted rows (random, so that drop_last
        # does not always drop the same kind of rows).
        cut = int(rng.integers(n_full + 1)) * size if rng is not None else n_full * size
        partial = rows[cut : cut + tail]
        full = np.concatenate([rows[:cut], rows[cut + tail :]]).reshape(n_full, size)
        if rng is not None:
            full = full[rng.permutation(n_full)]
        return np.concatenate([full.reshape(-1), partial])

    def shape_index(self, rows: np.ndarray) -> int:
        """The index in ``bucket_shapes`` of the batch made of ``rows`` (0 if no ragged key)."""
        if not self.ragged_keys:
            return 0
        return int((self._row_buckets[:, rows].max(axis=1) * self._shape_strides).sum())

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
        return self._assemble(rows, num_valid, self.shape_index(rows))

    def example_batch(self, shape: int = 0) -> Batch:
        """A batch with the shapes and dtypes of ``bucket_shapes[shape]``'s batches.

        Its rows are the dataset's first ``batch_size`` (repeated if the dataset is
        smaller), cut or padded to the bucket's lengths: what a program for that batch
        shape can be compiled from before such a batch comes (only its shapes count).
        """
        if not 0 <= shape < len(self.bucket_shapes):
            raise ValueError(f"example_batch: shape must be in [0, "
                             f"{len(self.bucket_shapes)}), got {shape}")
        rows = np.resize(np.arange(len(self.dataset)), self.batch_size)
        return self._assemble(rows, self.batch_size, shape)

    def _assemble(self, rows: np.ndarray, num_valid: int, shape: int) -> Batch:
        mask = np.arange(self.batch_size) < num_valid
        width = {}
        for key, length in zip(self.ragged_keys, self.bucket_shapes[shape], strict=True):
            width[key] = width[mask_key(key)] = length
        X = {key: value[rows, : width[key]] if key in width else value[rows]
             for key, value in self.dataset.X_dict.items()}
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

