"""The record every data loader of ``python -m benchmarks.mtl`` returns, and its helpers."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class MTLData:
    """A multi-task classification data set split into train/valid/test.

    Attributes:
      name: the data set's name (the DictDataset name).
      splits: split -> ``(X [N, D] float32, {task: int labels [N], -1 = no label})``.
      num_classes: task -> number of classes of its head.
      metrics: the Scorer metrics of every task; the first one selects the best epoch
        (the valid macro-average over tasks) and all enter Δm.
      loss_scale: task -> factor on the task's cross entropy (1 when absent): the
        scale-imbalanced synthetic makes the task losses differ by orders of magnitude.
      note: one line on how the data was built, for the report.
    """

    name: str
    splits: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]
    num_classes: dict[str, int]
    metrics: tuple[str, ...]
    loss_scale: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def task_names(self) -> list[str]:
        """The tasks, in the order of ``num_classes``."""
        return list(self.num_classes)


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package's directory, found without importing it.

    Raises:
      ModuleNotFoundError: the package is not installed.
      FileNotFoundError: the package has no such file (names the path looked at).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"Package {package!r} is not installed; it ships {relative!r} "
                                  f"(pip install -e '.[bench]')")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{package} has no {relative!r} (looked at {path})")
    return path


def split_indices(n: int, fractions: tuple[float, float], seed: int
                  ) -> dict[str, np.ndarray]:
    """A random train/valid/test partition of ``range(n)``; valid and test get ``fractions``."""
    order = np.random.default_rng(seed).permutation(n)
    n_valid, n_test = round(fractions[0] * n), round(fractions[1] * n)
    return {"valid": np.sort(order[:n_valid]), "test": np.sort(order[n_valid:n_valid + n_test]),
            "train": np.sort(order[n_valid + n_test:])}


def hide_labels(data: MTLData, fraction: float, seed: int, split: str = "train") -> MTLData:
    """A copy of ``data`` where ``fraction`` of each task's ``split`` labels are -1.

    Each task draws its own rows (independently), so most rows keep some labels.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction={fraction}: expected a value in [0, 1)")
    rng = np.random.default_rng(seed)
    X, labels = data.splits[split]
    hidden = {}
    for task, y in labels.items():
        y = y.copy()
        y[rng.permutation(len(y))[:round(fraction * len(y))]] = -1
        hidden[task] = y
    return MTLData(f"{data.name}_partial", {**data.splits, split: (X, hidden)},
                   data.num_classes, data.metrics, data.loss_scale,
                   f"{data.note}; {fraction:.0%} of each task's {split} labels are -1")
