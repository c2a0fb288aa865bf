"""Conversions between probabilities and predictions, and small array helpers."""

from __future__ import annotations

import jax
import numpy as np

TIE_BREAK_POLICIES = ("random", "true-random", "abstain")


def softmax_output(outputs: jax.Array) -> jax.Array:
    """The default task output function: softmax over the last axis, [B, K] -> [B, K]."""
    return jax.nn.softmax(outputs, axis=-1)


def probs_to_preds(
    probs: np.ndarray,
    tie_break_policy: str = "random",
    tol: float = 1e-5,
    seed: int | None = None,
) -> np.ndarray:
    """Turns probabilities [N, K] into predicted labels [N], breaking ties by policy.

    Classes within ``tol`` of a row's maximum tie. Policies (Snorkel's):
      "random": a pseudo-random tied class chosen from the row's values, so the same
        row always gets the same prediction;
      "true-random": a tied class drawn with ``np.random.default_rng(seed)``;
      "abstain": -1.

    Raises:
      ValueError: if probs has fewer than 2 classes or the policy is unknown.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] <= 1:
        raise ValueError(
            f"probs must have probabilities for at least 2 classes, shape [N, K]; "
            f"got shape {probs.shape}"
        )
    if tie_break_policy not in TIE_BREAK_POLICIES:
        raise ValueError(
            f"tie_break_policy={tie_break_policy} policy not recognized; "
            f"expected one of {list(TIE_BREAK_POLICIES)}"
        )
    is_max = np.abs(probs - probs.max(axis=1, keepdims=True)) < tol
    preds = np.argmax(probs, axis=1).astype(np.int64)
    tied_rows = np.flatnonzero(is_max.sum(axis=1) > 1)
    if len(tied_rows) == 0:
        return preds
    if tie_break_policy == "abstain":
        preds[tied_rows] = -1
        return preds
    rng = np.random.default_rng(seed) if tie_break_policy == "true-random" else None
    for row in tied_rows:
        candidates = np.flatnonzero(is_max[row])
        if rng is None:
            preds[row] = candidates[hash(tuple(probs[row].tolist())) % len(candidates)]
        else:
            preds[row] = rng.choice(candidates)
    return preds


def preds_to_probs(preds: np.ndarray, num_classes: int) -> np.ndarray:
    """One-hot probabilities [N, num_classes] from integer predictions [N]."""
    preds = np.asarray(preds).reshape(-1)
    if preds.size and (preds.min() < 0 or preds.max() >= num_classes):
        raise ValueError(
            f"preds_to_probs: predictions must be in [0, {num_classes}), got range "
            f"[{preds.min()}, {preds.max()}]"
        )
    return np.eye(num_classes)[preds]
