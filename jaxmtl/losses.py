"""Per-example classification losses (jittable); reduction and masking happen in the model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

REDUCTIONS = ("none", "mean", "sum")


def _reduce(losses: jax.Array, reduction: str) -> jax.Array:
    if reduction == "none":
        return losses
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    raise ValueError(f"Keyword 'reduction' must be one of {list(REDUCTIONS)}, got '{reduction}'")


def cross_entropy_with_probs(
    logits: jax.Array,
    probs: jax.Array,
    weight: jax.Array | None = None,
    reduction: str = "mean",
) -> jax.Array:
    """Cross entropy between logits and target probabilities (soft labels), as Snorkel's.

    ``loss_i = -sum_k weight_k * probs_ik * log_softmax(logits_i)_k``; on one-hot targets
    it equals hard-label cross entropy.

    Args:
      logits: [B, K] unnormalised scores.
      probs: [B, K] target probabilities.
      weight: optional [K] class weights.
      reduction: "none" ([B] losses), "mean" or "sum". With weights, "mean" is the plain
        mean over points (as Snorkel's, not torch's weighted mean).

    Returns:
      [B] losses or a scalar.
    """
    if logits.shape != probs.shape:
        raise ValueError(
            f"cross_entropy_with_probs: logits shape {logits.shape} and probs shape "
            f"{probs.shape} differ; expected both [B, K]"
        )
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    targets = probs if weight is None else probs * jnp.asarray(weight)
    return _reduce(-jnp.sum(targets * log_probs, axis=-1), reduction)


def cross_entropy(logits: jax.Array, labels: jax.Array, reduction: str = "mean") -> jax.Array:
    """Hard-label cross entropy. logits: [B, K]; labels: [B] ints in [0, K)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
    return _reduce(losses, reduction)


def default_loss(outputs: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example cross entropy [B]: hard if ``labels`` is [B] ints, soft if [B, K] probs."""
    if labels.ndim == 1:
        return cross_entropy(outputs, labels, reduction="none")
    return cross_entropy_with_probs(outputs, labels, reduction="none")
