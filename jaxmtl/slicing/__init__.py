"""Slice-aware training (Snorkel's ``snorkel.slicing`` model side) on the multi-task core.

Slicing functions mark critical subsets ("slices") of the data; the model gets, per slice,
an indicator head (is the row in the slice?) and a predictor head (the task, trained on
the slice's rows only), and the base task's head reads a combination of the slices'
representations weighted by the indicators' confidence::

    from jaxmtl.slicing import SliceAwareClassifier
    model = SliceAwareClassifier(body, head_dim=16, slice_names=["f", "g"],
                                 input_data_key="x", task_name="task")
    train = model.make_slice_dataloader(train_dataset, S_train, batch_size=32, shuffle=True)

``S`` is an ``SFApplier``/``PandasSFApplier`` output (``jaxmtl.slicing.functions``:
Snorkel's ``slicing_function`` and appliers, without torch; Snorkel's own work too) or a
[N, n_slices] 0/1 array. The lower-level pieces
(``add_slice_labels``, ``convert_to_slice_tasks``, ``SliceCombinerModule``) build the
same model from any base Task; the slice tasks are ordinary tasks, so every Trainer
feature applies. Multi-class base tasks work too (Snorkel 0.10's model is binary only).

Not imported by ``import jaxmtl``; ``import jaxmtl.slicing`` loads it.
"""

from .classifier import SliceAwareClassifier
from .combiner import SliceCombinerModule, SliceTransform, combine_slice_representations
from .functions import PandasSFApplier, SFApplier, SlicingFunction, slicing_function
from .labels import (
    BASE_SLICE,
    add_slice_labels,
    ind_task_name,
    pred_task_name,
    slice_label_dict,
    slice_matrix,
)
from .tasks import convert_to_slice_tasks

__all__ = [
    "BASE_SLICE",
    "PandasSFApplier",
    "SFApplier",
    "SliceAwareClassifier",
    "SliceCombinerModule",
    "SliceTransform",
    "SlicingFunction",
    "add_slice_labels",
    "combine_slice_representations",
    "convert_to_slice_tasks",
    "ind_task_name",
    "pred_task_name",
    "slice_label_dict",
    "slice_matrix",
    "slicing_function",
]
