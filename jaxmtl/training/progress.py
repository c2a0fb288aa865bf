"""What a fit reports as it goes: an epoch's progress bar and the train-loss metrics.

``EpochProgress`` is the bar and the throughput of one epoch; ``train_loss_metrics`` turns
the device loss accumulator (read back on the host) into the ``task/dataset/split/loss``
metrics that the bar shows and the logs record.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from ..loader import DictDataLoader

Metrics = dict[str, float]
PROGRESS_REFRESH_SECONDS = 1.0


class EpochProgress:
    """The epoch's progress bar and throughput (points per second since its start).

    Args:
      epoch: the epoch, for the bar's label.
      total: the epoch's batches.
      initial: the batches already done (a resumed epoch).
      enabled: show the bar (``TrainerConfig.progress_bar``).
    """

    def __init__(self, epoch: int, total: int, initial: int, enabled: bool) -> None:
        # No tqdm object at all when disabled: even a disabled one creates tqdm's
        # multiprocessing lock on first use (~0.2 s of a fit's start-up).
        self.bar = tqdm(total=total, initial=initial, desc=f"Epoch {epoch}") if enabled \
            else None
        self.enabled, self.points = enabled, 0
        self.started = self.refreshed = time.perf_counter()

    def __enter__(self) -> EpochProgress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.bar is not None:
            self.bar.close()

    def advance(self, num_valid: int) -> None:
        """One batch (``num_valid`` real rows; 0 for a skipped one) is done."""
        if self.bar is not None:
            self.bar.update(1)
        self.points += num_valid

    def due(self) -> bool:
        """Whether the bar is shown and was last refreshed over a second ago (reading the
        running loss waits for the queued steps: at most once a second, never per step)."""
        now = time.perf_counter()
        if not self.enabled or now - self.refreshed <= PROGRESS_REFRESH_SECONDS:
            return False
        self.refreshed = now
        return True

    def points_per_second(self) -> float:
        """Real rows trained per second since the epoch started."""
        return self.points / max(time.perf_counter() - self.started, 1e-9)

    def show_running_loss(self, accumulated: Mapping[str, Any],
                          train_loaders: Sequence[DictDataLoader], task_names: Sequence[str],
                          last_logged: Metrics) -> None:
        """Shows the running train loss (from the host copy of the accumulator) and the
        throughput on the bar; right after an evaluation the accumulator is empty, so the
        loss ``last_logged`` holds is shown instead."""
        if self.bar is None:
            return
        running = train_loss_metrics(accumulated, train_loaders, task_names)
        loss = running.get("model/all/train/loss",
                           last_logged.get("model/all/train/loss", float("nan")))
        self.bar.set_postfix(loss=f"{loss:.4g}", points_per_s=round(self.points_per_second()))


def train_loss_metrics(accumulator: Mapping[str, Any], train_loaders: Sequence[DictDataLoader],
                       task_names: Sequence[str], lr_schedule: Callable[[int], Any] | None = None,
                       step: int | None = None) -> Metrics:
    """Mean train loss per task and loader, overall, and the current learning rate.

    Args:
      accumulator: the host copy of the loss accumulator: ``loss_sum`` and ``count``,
        each [num_train_loaders, num_tasks].
      train_loaders: the train loaders, in the accumulator's order.
      task_names: the model's tasks, in the accumulator's order.
      lr_schedule: the learning-rate schedule; with ``step``, adds
        ``model/all/train/lr``.
      step: the optimizer step the learning rate is read at.

    Returns:
      ``{"task/dataset/split/loss": mean}`` for every (loader, task) with rows, plus
      ``model/all/train/loss`` (over all rows) and ``model/all/train/lr``.
    """
    loss_sum = np.asarray(accumulator["loss_sum"], dtype=np.float64)
    count = np.asarray(accumulator["count"], dtype=np.float64)
    metrics: Metrics = {}
    for i, dl in enumerate(train_loaders):
        for j, task_name in enumerate(task_names):
            if count[i, j] > 0:
                key = "/".join([task_name, dl.dataset.name, dl.dataset.split, "loss"])
                metrics[key] = float(loss_sum[i, j] / count[i, j])
    if count.sum() > 0:
        metrics["model/all/train/loss"] = float(loss_sum.sum() / count.sum())
    if lr_schedule is not None and step is not None:
        metrics["model/all/train/lr"] = float(lr_schedule(step))
    return metrics
