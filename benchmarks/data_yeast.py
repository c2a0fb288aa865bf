"""Yeast: 2,417 genes, 103 features, 14 binary gene-function labels (MULAN's yeast).

Read with pandas from the ``river/datasets/yeast.csv.gz`` file of river's wheel (columns
Att1..Att103, Class1..Class14 as 0/1): no download and no river API. Split 60/20/20 at
random with a fixed seed; features standardised with the train split's mean and std.
Tasks ``c1``..``c14`` (positive rates from about 1 % to 75 %), scored by F1 and ROC-AUC.
"""

from __future__ import annotations

import numpy as np

from benchmarks.data_splits import MTLData, hide_labels, package_file, split_indices

YEAST_FILE = "datasets/yeast.csv.gz"
N_FEATURES, N_LABELS = 103, 14


def read_yeast() -> tuple[np.ndarray, np.ndarray]:
    """Features ``[2417, 103]`` float32 and labels ``[2417, 14]`` int64 in {0, 1}."""
    import pandas as pd

    table = pd.read_csv(package_file("river", YEAST_FILE))
    features = [f"Att{i}" for i in range(1, N_FEATURES + 1)]
    labels = [f"Class{i}" for i in range(1, N_LABELS + 1)]
    missing = sorted(set(features + labels) - set(table.columns))
    if missing or len(table) != 2417:
        raise ValueError(f"{YEAST_FILE}: {len(table)} rows, missing columns {missing}; "
                         f"expected 2417 rows with Att1..Att103 and Class1..Class14")
    return (table[features].to_numpy(np.float32),
            table[labels].astype(int).to_numpy(np.int64))


def load(seed: int = 0) -> MTLData:
    """The yeast data set (split by ``seed``, fixed across training seeds)."""
    X, Y = read_yeast()
    parts = split_indices(len(X), (0.2, 0.2), seed)
    mean, std = X[parts["train"]].mean(0), X[parts["train"]].std(0) + 1e-6
    splits = {split: (((X[rows] - mean) / std).astype(np.float32),
                      {f"c{j + 1}": Y[rows, j] for j in range(N_LABELS)})
              for split, rows in parts.items()}
    return MTLData("yeast", splits, {f"c{j + 1}": 2 for j in range(N_LABELS)},
                   ("f1", "roc_auc"),
                   note="2,417 genes split 60/20/20, 103 standardised features, 14 binary tasks")


def load_partial(seed: int = 0, fraction: float = 0.5) -> MTLData:
    """Yeast with ``fraction`` of each task's train labels set to -1 (valid/test complete)."""
    return hide_labels(load(seed), fraction, seed + 1)
