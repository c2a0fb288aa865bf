"""Batch schedulers over tiny fake loaders: order, counts, determinism in (seed, epoch)."""

from collections import Counter

import numpy as np
import pytest

from jaxmtl.training.batch_schedulers import (
    ProportionalScheduler,
    SequentialScheduler,
    ShuffledScheduler,
    make_batch_scheduler,
)


class FakeLoader(list):
    """A list of batches with a ``dataset``, as a DictDataLoader presents itself."""

    def __init__(self, batches, dataset_size: int) -> None:
        super().__init__(batches)
        self.dataset = list(range(dataset_size))
        self.n_iters = 0

    def __iter__(self):
        self.n_iters += 1
        return super().__iter__()

    def __hash__(self) -> int:
        return id(self)

    def __eq__(self, other) -> bool:
        return self is other


def _loaders() -> list[FakeLoader]:
    # Snorkel's test data: two datasets of 5 points, batch size 2 -> 3 batches each.
    return [
        FakeLoader([[0, 1], [2, 3], [4]], dataset_size=5),
        FakeLoader([[5, 6], [7, 8], [9]], dataset_size=5),
    ]


def _data(scheduler, loaders, epoch: int = 0) -> list[int]:
    data = []
    for batch, loader in scheduler.get_batches(loaders, epoch):
        assert any(loader is dl for dl in loaders)
        assert all((x < 5) == (loader is loaders[0]) for x in batch)
        data.extend(batch)
    return data


def test_sequential() -> None:
    assert _data(SequentialScheduler(), _loaders()) == list(range(10))


def test_shuffled_covers_every_batch_once_out_of_order() -> None:
    data = _data(ShuffledScheduler(seed=123), _loaders())
    assert sorted(data) == list(range(10))
    assert data != sorted(data)


def test_shuffled_keeps_each_loaders_own_order() -> None:
    data = _data(ShuffledScheduler(seed=5), _loaders())
    assert [x for x in data if x < 5] == [0, 1, 2, 3, 4]
    assert [x for x in data if x >= 5] == [5, 6, 7, 8, 9]


def test_shuffled_order_is_pure_function_of_seed_and_epoch() -> None:
    orders = {(seed, epoch): _data(ShuffledScheduler(seed), _loaders(), epoch)
              for seed in (0, 1) for epoch in range(4)}
    for (seed, epoch), order in orders.items():
        assert _data(ShuffledScheduler(seed), _loaders(), epoch) == order
    assert len({tuple(order) for order in orders.values()}) > 1


def test_shuffled_matches_numpy_permutation() -> None:
    """The loader order is rng.permutation of [0]*len(dl0) + [1]*len(dl1)."""
    loaders = _loaders()
    expected = np.random.default_rng((7, 3)).permutation([0, 0, 0, 1, 1, 1])
    got = [0 if loader is loaders[0] else 1
           for _, loader in ShuffledScheduler(7).get_batches(loaders, 3)]
    assert got == expected.tolist()


def test_proportional_draws_by_dataset_size_and_restarts() -> None:
    small = FakeLoader([["s0"], ["s1"]], dataset_size=10)
    big = FakeLoader([["b0"], ["b1"], ["b2"], ["b3"], ["b4"], ["b5"], ["b6"], ["b7"]],
                     dataset_size=90)
    loaders = [small, big]
    draws = list(ProportionalScheduler(seed=0).get_batches(loaders, 0))
    assert len(draws) == 10  # sum of len(dl)

    expected_order = np.random.default_rng((0, 0)).choice(2, size=10, p=[0.1, 0.9])
    assert [0 if dl is small else 1 for _, dl in draws] == expected_order.tolist()
    # Each loader's batches come in its own order, restarting when it runs out.
    big_batches = [batch[0] for batch, dl in draws if dl is big]
    assert big_batches == [f"b{i % 8}" for i in range(len(big_batches))]


def test_proportional_frequencies() -> None:
    loaders = [FakeLoader([[i] for i in range(100)], dataset_size=25),
               FakeLoader([[i] for i in range(100)], dataset_size=75)]
    counts = Counter(id(dl) for _, dl in ProportionalScheduler(3).get_batches(loaders, 0))
    share = counts[id(loaders[0])] / 200
    assert abs(share - 0.25) < 0.08  # 200 Bernoulli(0.25) draws: std ~0.031


def test_proportional_is_deterministic_per_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        loaders = _loaders()
        return [0 if dl is loaders[0] else 1
                for _, dl in ProportionalScheduler(seed).get_batches(loaders, epoch)]

    assert order(4, 2) == order(4, 2)
    assert len({tuple(order(4, epoch)) for epoch in range(6)}) > 1


def test_shuffled_short_loader_raises() -> None:
    class ShortLoader(FakeLoader):
        def __len__(self) -> int:
            return 3

    loaders = [ShortLoader([[0]], dataset_size=1)]
    with pytest.raises(RuntimeError, match="fewer batches"):
        list(ShuffledScheduler(0).get_batches(loaders, 0))


@pytest.mark.parametrize(
    ("name", "cls"),
    [("sequential", SequentialScheduler), ("shuffled", ShuffledScheduler),
     ("proportional", ProportionalScheduler)],
)
def test_make_batch_scheduler(name: str, cls: type) -> None:
    scheduler = make_batch_scheduler(name, seed=11)
    assert type(scheduler) is cls
    assert scheduler.seed == 11


def test_make_batch_scheduler_errors() -> None:
    with pytest.raises(ValueError, match="Unrecognized batch scheduler option 'foo'"):
        make_batch_scheduler("foo", seed=0)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        make_batch_scheduler("shuffled", seed=-1)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        ShuffledScheduler(seed=None)  # type: ignore[arg-type]


def test_proportional_restarts_exhausted_loader() -> None:
    # The one-batch loader holds 99% of the data, so it is drawn far more than once.
    heavy = FakeLoader([["h"]], dataset_size=990)
    light = FakeLoader([[f"l{i}"] for i in range(9)], dataset_size=10)
    draws = list(ProportionalScheduler(seed=1).get_batches([heavy, light], 0))
    n_heavy = sum(dl is heavy for _, dl in draws)
    assert len(draws) == 10
    assert n_heavy >= 2
    assert heavy.n_iters == n_heavy
    assert [batch for batch, dl in draws if dl is heavy] == [["h"]] * n_heavy
