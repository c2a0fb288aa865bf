"""Multi-digit: pairs of scikit-learn's 8x8 digits overlapped with a shift (MultiMNIST-like).

The 1,797 images come from scikit-learn's bundled ``sklearn/datasets/data/digits.csv.gz``
(64 pixel columns in 0..16, then the digit), read with numpy: no download and no
scikit-learn API. The images are first split 60/20/20 into train/valid/test pools, so a
test pair never reuses a training image. A pair puts the left digit in columns 0-7 and
the right digit in columns ``shift``..``shift``+7 of an 8 x (8 + shift) canvas (the
pixel-wise maximum where they overlap), scaled to [0, 1]: two 10-class tasks, ``left``
and ``right``.
"""

from __future__ import annotations

import numpy as np

from benchmarks.data_splits import MTLData, package_file, split_indices

DIGITS_FILE = "datasets/data/digits.csv.gz"


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 images ``[N, 8, 8]`` float32 in 0..16 and their digits ``[N]``."""
    table = np.loadtxt(package_file("sklearn", DIGITS_FILE), delimiter=",")
    if table.shape != (1797, 65):
        raise ValueError(f"{DIGITS_FILE}: shape {table.shape}, expected (1797, 65)")
    return table[:, :64].reshape(-1, 8, 8).astype(np.float32), table[:, 64].astype(np.int64)


def overlap_pairs(images: np.ndarray, left: np.ndarray, right: np.ndarray,
                  shift: int) -> np.ndarray:
    """Canvases ``[P, 8 * (8 + shift)]``: image ``left[p]`` at column 0, ``right[p]`` at ``shift``."""
    canvas = np.zeros((len(left), 8, 8 + shift), np.float32)
    canvas[:, :, :8] = images[left]
    canvas[:, :, shift:shift + 8] = np.maximum(canvas[:, :, shift:shift + 8], images[right])
    return canvas.reshape(len(left), -1) / 16.0


def load(n_train: int = 6000, n_eval: int = 1000, shift: int = 4, seed: int = 0) -> MTLData:
    """The multi-digit data set.

    Args:
      n_train: training pairs; n_eval: valid pairs and test pairs (each).
      shift: columns between the two digits' left edges (8: side by side, no overlap).
      seed: the image split and the pairing (fixed across training seeds).
    """
    images, digits = read_digits()
    pools = split_indices(len(digits), (0.2, 0.2), seed)
    rng = np.random.default_rng(seed + 1)
    splits = {}
    for split, size in (("train", n_train), ("valid", n_eval), ("test", n_eval)):
        left, right = rng.choice(pools[split], size), rng.choice(pools[split], size)
        splits[split] = (overlap_pairs(images, left, right, shift),
                         {"left": digits[left], "right": digits[right]})
    return MTLData("digits", splits, {"left": 10, "right": 10}, ("accuracy",),
                   note=f"{n_train}/{n_eval}/{n_eval} pairs of 8x8 digits, shift {shift} "
                        f"(8x{8 + shift} canvas), images split 60/20/20 before pairing")
