"""The slice combiner: per-slice representations reweighted by slice membership and confidence.

Snorkel's ``SliceCombinerModule`` (``snorkel.slicing.modules.slice_combiner``), as a
parameter-free Flax Linen module, with its math as a pure function::

    attention = softmax(p_in_slice * confidence / temperature)       # over slices, [B, S]
    combined = sum_s attention[:, s] * representation[:, s, :]       # [B, H]

where, per slice ``s``, ``p_in_slice`` is the indicator head's probability that the row
is in the slice (softmax of its two logits, class 1), ``representation`` is the output of
the slice's predictor transform, and ``confidence`` is read from the slice's predictor
head (softmax over its K logits):

========== ================================================================================
confidence the predictor head's confidence
========== ================================================================================
"positive" ``p[:, 1]``, the probability of class 1: Snorkel 0.10's binary rule (K = 2 only)
"max"      ``max_k p[:, k]``, the probability of the predicted class: any K >= 2
"auto"     "positive" for K = 2 (as Snorkel), "max" for K > 2 (the default)
========== ================================================================================

Snorkel 0.10 refuses K > 2 in the combiner; "max" is the rule of Snorkel's earlier
releases (the maximum score across classes) and is what makes the multi-class model
work: a slice expert that is sure of its answer, on a row that is in its slice, gets the
weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["CONFIDENCE_RULES", "SliceCombinerModule", "SliceTransform",
           "combine_slice_representations", "slice_outputs"]

CONFIDENCE_RULES = ("auto", "positive", "max")


def _confidence(predictor_logits: jax.Array, rule: str) -> jax.Array:
    """[B, S, K] predictor logits -> [B, S] confidences (see the module docstring)."""
    num_classes = predictor_logits.shape[-1]
    probs = jax.nn.softmax(predictor_logits, axis=-1)
    if rule == "auto":
        rule = "positive" if num_classes == 2 else "max"
    if rule == "positive":
        if num_classes != 2:
            raise ValueError(
                f"SliceCombinerModule: confidence='positive' (the probability of class 1, "
                f"Snorkel 0.10's binary rule) needs K = 2 predictor logits, got K = "
                f"{num_classes}; use confidence='max' or 'auto'")
        return probs[..., 1]
    return jnp.max(probs, axis=-1)


def combine_slice_representations(
    indicator_logits: jax.Array,
    predictor_logits: jax.Array,
    representations: jax.Array,
    temperature: float = 1.0,
    confidence: str = "auto",
) -> jax.Array:
    """Reweights per-slice representations by slice membership times predictor confidence.

    Args:
      indicator_logits: [B, S, 2] logits of the slices' indicator heads (class 1 = in
        the slice).
      predictor_logits: [B, S, K] logits of the slices' predictor heads, K >= 2.
      representations: [B, S, H] outputs of the slices' predictor transforms.
      temperature: divides the attention scores; large values approach the plain mean.
      confidence: "auto", "positive" or "max" (see the module docstring).

    Returns:
      [B, H]: ``sum_s softmax_s(p_in_slice * confidence / temperature) * representation``.

    Raises:
      ValueError: on an unknown ``confidence``, K < 2, or K != 2 with "positive".
    """
    if confidence not in CONFIDENCE_RULES:
        raise ValueError(f"SliceCombinerModule: confidence={confidence!r}, expected one of "
                         f"{list(CONFIDENCE_RULES)}")
    if predictor_logits.shape[-1] < 2:
        raise ValueError(
            f"SliceCombinerModule: predictor heads return {predictor_logits.shape[-1]} "
            f"logit(s) per row; expected K >= 2 class logits [B, K]")
    in_slice = jax.nn.softmax(indicator_logits, axis=-1)[..., 1]
    scores = in_slice * _confidence(predictor_logits, confidence) / temperature
    attention = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bs,bsh->bh", attention, representations)


def slice_outputs(outputs: Mapping[str, Any], ind_key: str, pred_key: str, feat_key: str
                  ) -> tuple[list[str], list[Any], list[Any], list[Any]]:
    """Groups an outputs dict's slice ops by slice: (prefixes, indicators, preds, features).

    A slice is the prefix of an output name ending in ``ind_key`` (Snorkel's op names:
    ``"{task}_slice:{name}_ind_head"``); its predictor and feature outputs are
    ``prefix + pred_key`` and ``prefix + feat_key``. Slices come in sorted prefix order
    (Snorkel sorts the op names; pairing by prefix keeps the three lists aligned whatever
    the slice names are).

    Raises:
      ValueError: if there is no slice, or a slice lacks its predictor or feature output.
    """
    prefixes = sorted(name[: -len(ind_key)] for name in outputs if name.endswith(ind_key))
    if not prefixes:
        raise ValueError(
            f"SliceCombinerModule: no output name ends with '{ind_key}' (the indicator "
            f"heads); outputs are {sorted(outputs)}")
    for prefix in prefixes:
        missing = [prefix + key for key in (pred_key, feat_key) if prefix + key not in outputs]
        if missing:
            raise ValueError(
                f"SliceCombinerModule: slice '{prefix}' has an indicator output but no "
                f"{missing}; outputs are {sorted(outputs)}")
    return (prefixes, [outputs[p + ind_key] for p in prefixes],
            [outputs[p + pred_key] for p in prefixes],
            [outputs[p + feat_key] for p in prefixes])


class SliceCombinerModule(nn.Module):
    """Combines the slices' predictor representations (Snorkel's ``SliceCombinerModule``).

    Used as an op with ``inputs=[]``: it receives its task's outputs dict (op name ->
    output) and reads, per slice, the indicator head (``slice_ind_key``), the predictor
    head (``slice_pred_key``, raw logits) and the predictor transform
    (``slice_pred_feat_key``) outputs, matched by name suffix. Parameter-free.

    Attributes:
      slice_ind_key: suffix of the indicator heads' op names.
      slice_pred_key: suffix of the predictor heads' op names.
      slice_pred_feat_key: suffix of the predictor transforms' op names.
      temperature: divides the attention scores (Snorkel's ``temperature``).
      confidence: the predictor-confidence rule, "auto", "positive" or "max" (see
        ``jaxmtl.slicing.combiner``); "auto" is Snorkel 0.10's for K = 2.
    """

    slice_ind_key: str = "_ind_head"
    slice_pred_key: str = "_pred_head"
    slice_pred_feat_key: str = "_pred_transform"
    temperature: float = 1.0
    confidence: str = "auto"

    def __call__(self, outputs: Mapping[str, Any]) -> jax.Array:
        """The reweighted representation [B, H] from an outputs dict of slice ops."""
        _, indicators, predictors, features = slice_outputs(
            outputs, self.slice_ind_key, self.slice_pred_key, self.slice_pred_feat_key)
        return combine_slice_representations(
            jnp.stack(indicators, axis=1), jnp.stack(predictors, axis=1),
            jnp.stack(features, axis=1), self.temperature, self.confidence)


class SliceTransform(nn.Module):
    """A Dense layer as wide as its input: a slice's predictor transform.

    Snorkel's ``nn.Linear(neck_size, neck_size)``; Flax infers the input width, so the
    neck size need not be known when the tasks are built. Parameters as ``nn.Dense``'s
    (``kernel`` [H, H], lecun-normal; ``bias`` [H], zeros).

    Attributes:
      neck_size: the width the input must have (``SliceAwareClassifier``'s ``head_dim``),
        or None for any width.
    """

    neck_size: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, H] -> [B, H].

        Raises:
          ValueError: ``neck_size`` is set and H differs from it.
        """
        width = x.shape[-1]
        if self.neck_size is not None and width != self.neck_size:
            # Snorkel's Linear(head_dim, head_dim) fails on this shape; ignoring head_dim
            # would train heads of another size than the user asked for.
            raise ValueError(
                f"SliceAwareClassifier: head_dim={self.neck_size}, but the base "
                f"architecture's representation is {width} wide (shape {tuple(x.shape)}); "
                f"the slice heads are as wide as it: pass head_dim={width}, or change the "
                f"base architecture's output width")
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (width, width))
        bias = self.param("bias", nn.initializers.zeros_init(), (width,))
        return x @ kernel + bias

