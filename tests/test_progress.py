"""training.progress: the train-loss metrics against hand-computed means, and the bar."""

import itertools

import numpy as np

from jaxmtl import DictDataLoader, DictDataset
from jaxmtl.training.progress import EpochProgress, train_loss_metrics


def _loader(name: str) -> DictDataLoader:
    dataset = DictDataset(name=name, split="train", X_dict={"x": np.zeros((4, 2), np.float32)},
                          Y_dict={"t1": np.zeros(4, np.int64)})
    return DictDataLoader(dataset, batch_size=2)


def test_train_loss_metrics_are_the_means_per_loader_and_task_and_overall():
    accumulator = {"loss_sum": np.array([[2.0, 0.0], [3.0, 6.0]]),
                   "count": np.array([[4, 0], [2, 3]])}
    metrics = train_loss_metrics(accumulator, [_loader("a"), _loader("b")], ["t1", "t2"],
                                 lr_schedule=lambda step: 0.1 * step, step=3)
    assert metrics.keys() == {"t1/a/train/loss", "t1/b/train/loss", "t2/b/train/loss",
                              "model/all/train/loss", "model/all/train/lr"}
    np.testing.assert_allclose(
        [metrics["t1/a/train/loss"], metrics["t1/b/train/loss"], metrics["t2/b/train/loss"],
         metrics["model/all/train/loss"], metrics["model/all/train/lr"]],
        [2.0 / 4, 3.0 / 2, 6.0 / 3, 11.0 / 9, 0.3], rtol=1e-12)


def test_train_loss_metrics_of_an_empty_accumulator_are_empty_without_a_schedule():
    accumulator = {"loss_sum": np.zeros((1, 1)), "count": np.zeros((1, 1))}
    assert train_loss_metrics(accumulator, [_loader("a")], ["t1"]) == {}


def test_progress_counts_points_and_refreshes_at_most_once_a_second(monkeypatch):
    clock = itertools.chain([10.0, 10.5, 11.5, 11.6], itertools.repeat(12.0))
    monkeypatch.setattr("jaxmtl.training.progress.time.perf_counter", lambda: next(clock))
    with EpochProgress(epoch=0, total=3, initial=1, enabled=True) as progress:  # t = 10.0
        progress.advance(5)
        progress.advance(0)
        assert progress.bar.n == 3  # initial 1 + two batches
        assert [progress.due(), progress.due(), progress.due()] == [False, True, False]
        assert progress.points_per_second() == 5 / (12.0 - 10.0)


def test_disabled_progress_is_never_due_and_makes_no_bar(monkeypatch):
    # A disabled tqdm bar would still create tqdm's multiprocessing lock (~0.2 s).
    monkeypatch.setattr("jaxmtl.training.progress.tqdm", None)
    with EpochProgress(epoch=0, total=3, initial=0, enabled=False) as progress:
        progress.advance(4)
        assert not progress.due()
        assert progress.bar is None and progress.points == 4
