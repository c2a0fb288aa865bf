"""One compiled step for every bucket shape of a loader: the runner's side.

A loader with length buckets (``DictDataLoader.bucket_shapes``) makes batches of a few
shapes. One compiled step per shape costs a whole XLA compile per shape (mostly a fixed
cost per program, ~1 s of a CPU core for a small model), which a first fit pays before
its first epoch ends. Instead the per-step runner sends such a loader's batch at the
loader's longest bucket shape, with the index of its own shape; the step runs its
forward and backward passes at that shape's lengths, one ``lax.switch`` branch per shape
(``step.at_shape``), and the optimizer update once after them. One program serves all
the shapes, and compiles in ~1/3 the time of one per shape.
"""

from __future__ import annotations

import numpy as np

from ..buckets import BucketShapes
from ..data import mask_key
from ..loader import DictDataLoader

__all__ = ["bucket_widths", "pad_to_longest"]


def bucket_widths(dl: DictDataLoader) -> BucketShapes:
    """The lengths each of ``dl``'s bucket shapes cuts its inputs to, masks included."""
    shapes = []
    for shape in dl.bucket_shapes:
        widths: list[tuple[str, int]] = []
        for key, length in zip(dl.ragged_keys, shape, strict=True):
            widths += [(key, length), (mask_key(key), length)]
        shapes.append(tuple(widths))
    return tuple(shapes)


def pad_to_longest(X_dict: dict[str, np.ndarray], dl: DictDataLoader
                   ) -> tuple[dict[str, np.ndarray], int]:
    """A batch of ``dl`` at its longest bucket shape, and the index of its own shape.

    The positions added are zeros (False in the masks); the step cuts them off again
    before any module sees them.
    """
    lengths = tuple(X_dict[key].shape[1] for key in dl.ragged_keys)
    shape = dl.bucket_shapes.index(lengths)
    padded = dict(X_dict)
    for key, longest in zip(dl.ragged_keys, dl.bucket_shapes[-1], strict=True):
        for name in (key, mask_key(key)):
            value = X_dict[name]
            if value.shape[1] < longest:
                widths = [(0, 0)] * value.ndim
                widths[1] = (0, longest - value.shape[1])
                padded[name] = np.pad(value, widths)
    return padded, shape
