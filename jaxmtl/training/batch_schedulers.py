"""Batch schedulers: the order in which one epoch's batches are drawn from several loaders.

Each ``get_batches(dataloaders, epoch)`` yields ``(batch, dataloader)`` pairs. All
randomness comes from ``np.random.default_rng((seed, epoch))``, so the order of an epoch
is a pure function of ``(seed, epoch)``: a resumed run replays it exactly. The batches
inside one loader come from ``iter(dataloader)``; loaders shuffle their own examples.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from jaxmtl import registry


class DataLoaderLike(Protocol):
    """What a scheduler needs from a loader: iteration over batches and ``len()``."""

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int: ...


BatchIterator = Iterator[tuple[Any, DataLoaderLike]]


class BatchScheduler(abc.ABC):
    """Base class: yields one epoch of batches from several dataloaders."""

    def epoch_length(self, dataloaders: Sequence[DataLoaderLike]) -> int:
        """Steps in one epoch: every batch of every loader, one per step."""
        return sum(len(dataloader) for dataloader in dataloaders)

    @abc.abstractmethod
    def get_batches(self, dataloaders: Sequence[DataLoaderLike], epoch: int) -> BatchIterator:
        """Yields ``(batch, dataloader)`` for one epoch.

        Args:
          dataloaders: the loaders to draw from.
          epoch: 0-based epoch number (seeds the order of randomised schedulers).

        Yields:
          ``(batch, dataloader)``: the batch and the loader it came from (whose dataset
          names the task data, as Snorkel passes it on).
        """


class SequentialScheduler(BatchScheduler):
    """All batches of the first loader, then all of the second, and so on.

    Args:
      seed: ignored (accepted so that every scheduler is built the same way).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def get_batches(self, dataloaders: Sequence[DataLoaderLike], epoch: int) -> BatchIterator:
        """Yields every batch of every loader, loader by loader, in the given order.

        Args:
          dataloaders: the loaders to draw from.
          epoch: unused; the order does not depend on it.

        Yields:
          ``(batch, dataloader)`` pairs.
        """
        for dataloader in dataloaders:
            for batch in dataloader:
                yield batch, dataloader


def _check_seed(owner: str, seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"{owner}: seed must be an int >= 0, got {seed!r}")
    return int(seed)


def _take(dataloaders: Sequence[DataLoaderLike], loader_order: Iterable[int],
          restart: bool) -> BatchIterator:
    """Yields the next batch of ``dataloaders[i]`` for each ``i`` of ``loader_order``."""
    iterators: list[Iterator[Any] | None] = [None] * len(dataloaders)
    for index in loader_order:
        index = int(index)
        if iterators[index] is None:
            # Iterators start lazily: a loader is not asked for batches before its turn.
            iterators[index] = iter(dataloaders[index])
        try:
            batch = next(iterators[index])  # type: ignore[arg-type]
        except StopIteration:
            if not restart:
                raise RuntimeError(
                    f"dataloader {index} yielded fewer batches than its len() "
                    f"{len(dataloaders[index])}"
                ) from None
            iterators[index] = iter(dataloaders[index])
            batch = next(iterators[index])  # type: ignore[arg-type]
        yield batch, dataloaders[index]


class ShuffledScheduler(BatchScheduler):
    """Every batch of every loader exactly once, in a random order (Snorkel's default).

    Args:
      seed: non-negative int; the epoch's order is drawn from ``(seed, epoch)``.
    """

    def __init__(self, seed: int) -> None:
        self.seed = _check_seed("ShuffledScheduler", seed)

    def get_batches(self, dataloaders: Sequence[DataLoaderLike], epoch: int) -> BatchIterator:
        """Yields ``len(dl)`` batches of each loader ``dl``, loaders interleaved at random.

        Args:
          dataloaders: the loaders to draw from.
          epoch: 0-based epoch number.

        Yields:
          ``(batch, dataloader)`` pairs, ``sum(len(dl))`` of them.
        """
        rng = np.random.default_rng((self.seed, epoch))
        counts = [len(dataloader) for dataloader in dataloaders]
        loader_order = rng.permutation(np.repeat(np.arange(len(dataloaders)), counts))
        yield from _take(dataloaders, loader_order, restart=False)


class ProportionalScheduler(BatchScheduler):
    """Draws each batch's loader at random, with probability proportional to dataset size.

    An epoch has ``sum(len(dl))`` steps; at each, loader ``i`` is chosen with probability
    ``len(dl_i.dataset) / sum_j len(dl_j.dataset)`` and gives its next batch. Draws are
    with replacement, so a loader may give more batches than it has; its iterator then
    restarts (a new pass over its data).

    Args:
      seed: non-negative int; the epoch's draws come from ``(seed, epoch)``.
    """

    def __init__(self, seed: int) -> None:
        self.seed = _check_seed("ProportionalScheduler", seed)

    def get_batches(self, dataloaders: Sequence[DataLoaderLike], epoch: int) -> BatchIterator:
        """Yields ``sum(len(dl))`` batches, each from a loader drawn ∝ its dataset size.

        Args:
          dataloaders: loaders with a ``dataset`` attribute that has ``len()``.
          epoch: 0-based epoch number.

        Yields:
          ``(batch, dataloader)`` pairs.

        Raises:
          ValueError: if every dataset is empty.
        """
        if not dataloaders:
            return
        sizes = np.array([len(dataloader.dataset) for dataloader in dataloaders],  # type: ignore[attr-defined]
                         dtype=np.float64)
        if sizes.sum() <= 0:
            raise ValueError("ProportionalScheduler: all datasets are empty")
        n_steps = sum(len(dataloader) for dataloader in dataloaders)
        rng = np.random.default_rng((self.seed, epoch))
        loader_order = rng.choice(len(dataloaders), size=n_steps, p=sizes / sizes.sum())
        yield from _take(dataloaders, loader_order, restart=True)


class MixedScheduler(BatchScheduler):
    """Each step takes one batch from every loader: the setting gradient balancing assumes.

    An epoch has ``max(len(dl))`` steps; a loader that runs out restarts (a new pass over
    its data, in its next shuffled order), so every step sees every task.

    Args:
      seed: accepted so that every scheduler is built the same way (the order is the
        loaders' own).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    def epoch_length(self, dataloaders: Sequence[DataLoaderLike]) -> int:
        """Steps in one epoch: the longest loader's batch count."""
        return max((len(dataloader) for dataloader in dataloaders), default=0)

    def get_batches(self, dataloaders: Sequence[DataLoaderLike], epoch: int) -> BatchIterator:
        """Yields ``(batches, dataloaders)`` tuples, one batch of each loader per step.

        Args:
          dataloaders: the loaders to draw from.
          epoch: 0-based epoch number (unused: the loaders order their own rows).

        Yields:
          ``(tuple of batches, tuple of dataloaders)``, in the loaders' order.
        """
        iterators = [iter(dataloader) for dataloader in dataloaders]
        for _ in range(self.epoch_length(dataloaders)):
            group = []
            for i, dataloader in enumerate(dataloaders):
                try:
                    group.append(next(iterators[i]))
                except StopIteration:
                    iterators[i] = iter(dataloader)
                    group.append(next(iterators[i]))
            yield tuple(group), tuple(dataloaders)


def make_batch_scheduler(name: str, seed: int) -> BatchScheduler:
    """Builds the scheduler named by ``TrainerConfig.batch_scheduler``.

    Args:
      name: a name of ``jaxmtl.registry.BATCH_SCHEDULERS``: "sequential", "shuffled",
        "proportional" or "mixed".
      seed: seed of the randomised schedulers (non-negative int).

    Returns:
      The scheduler.

    Raises:
      ValueError: for an unknown ``name`` or an invalid ``seed``.
    """
    return registry.BATCH_SCHEDULERS.load(name, "make_batch_scheduler(name)")(seed)
