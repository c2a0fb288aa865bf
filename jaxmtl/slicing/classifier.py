"""SliceAwareClassifier: a MultitaskClassifier of one base task's slice tasks (Snorkel's).

    model = SliceAwareClassifier(base_architecture=nn.Sequential([nn.Dense(16), nn.relu]),
                                 head_dim=16, slice_names=["short", "rare"],
                                 input_data_key="x", task_name="task")
    train = model.make_slice_dataloader(train_dataset, S_train, batch_size=32, shuffle=True)
    valid = model.make_slice_dataloader(valid_dataset, S_valid, batch_size=64)
    Trainer(n_epochs=5).fit(model, [train, valid])
    model.score_slices([valid])   # every slice scored on the master head

Unlike Snorkel 0.10 (binary only), ``num_classes`` may be any K >= 2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import numpy as np

from ..analysis.scorer import Scorer
from ..classifier import MultitaskClassifier
from ..data import DictDataset
from ..evaluation import loader_list
from ..loader import DictDataLoader
from ..task import Operation, Task
from .labels import BASE_SLICE, add_slice_labels, check_slice_names
from .tasks import convert_to_slice_tasks

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["SliceAwareClassifier"]


def _default_scorer(num_classes: int) -> Scorer:
    # Snorkel's default is accuracy and (binary) F1; F1 of K > 2 classes is macro-averaged.
    return Scorer(metrics=["accuracy", "f1" if num_classes == 2 else "f1_macro"])


class SliceAwareClassifier(MultitaskClassifier):
    """A classifier with a slice expert per slice and a combiner over them (Snorkel's).

    The base task is ``base_architecture -> Dense(num_classes)`` on
    ``X_dict[input_data_key]``, labelled ``Y_dict[task_name]``; it is converted with
    ``convert_to_slice_tasks``, so the model's tasks are every slice's indicator and
    predictor tasks and the master task (named ``task_name``) whose head reads the
    combined slice representation.

    Args:
      base_architecture: a module mapping the input to a representation [B, head_dim].
      head_dim: the width of that representation (the input size of Snorkel's
        ``nn.Linear(head_dim, 2)`` and of its slice transforms). Flax infers the
        modules' shapes; a representation of another width fails when the model is
        initialised (as Snorkel's Linear would), naming both widths.
      slice_names: the slices; ``base`` (all rows) is added.
      input_data_key: the input key (Snorkel's default "input_data").
      task_name: the base task's name and label key (Snorkel's default "task").
      scorer: the base and predictor tasks' Scorer; defaults to accuracy and F1 (F1
        macro-averaged for K > 2).
      num_classes: K, the number of classes of the base task (2 in Snorkel).
      **multitask_kwargs: ``MultitaskClassifier``'s ``seed``, ``dataparallel``,
        ``device`` (``name`` defaults to ``"{task_name}_sliceaware_classifier"``).

    Attributes:
      base_task: the base Task (not itself in the model; the master task replaces it).
      slice_names: the slice names as given.
    """

    def __init__(
        self,
        base_architecture: Any,
        head_dim: int,
        slice_names: Sequence[str],
        input_data_key: str = "input_data",
        task_name: str = "task",
        scorer: Scorer | None = None,
        num_classes: int = 2,
        **multitask_kwargs: Any,
    ) -> None:
        for field, value, minimum in (("head_dim", head_dim, 1),
                                      ("num_classes", num_classes, 2)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or value < minimum:
                raise ValueError(f"SliceAwareClassifier: {field} must be an int >= {minimum}, "
                                 f"got {value!r}")
        check_slice_names(slice_names)
        self.head_dim = int(head_dim)
        self.num_classes = int(num_classes)
        self.base_task = Task(
            name=task_name,
            module_pool={"base_architecture": base_architecture,
                         "prediction_head": nn.Dense(self.num_classes)},
            op_sequence=[
                Operation("base_architecture", [("_input_", input_data_key)], name="input_op"),
                Operation("prediction_head", ["input_op"], name="head_op"),
            ],
            scorer=scorer if scorer is not None else _default_scorer(self.num_classes))
        multitask_kwargs.setdefault("name", f"{task_name}_sliceaware_classifier")
        super().__init__(tasks=convert_to_slice_tasks(self.base_task, slice_names,
                                                      self.head_dim),
                         **multitask_kwargs)
        self.slice_names = list(slice_names)

    def make_slice_dataloader(self, dataset: DictDataset, S: Any,
                              **dataloader_kwargs: Any) -> DictDataLoader:
        """A DictDataLoader over ``dataset`` with the slice labels added (in place).

        Args:
          dataset: carries the base task's labels ``Y_dict[task_name]``.
          S: ``SFApplier``/``PandasSFApplier`` output with one field per slice of the
            model, or a [N, len(slice_names)] 0/1 array in ``slice_names`` order.
          **dataloader_kwargs: ``DictDataLoader``'s (``batch_size``, ``shuffle``, ...).

        Raises:
          ValueError: the base task's labels are missing from ``dataset``, or ``S`` does
            not match the model's slices (see ``labels.slice_matrix``).
        """
        if self.base_task.name not in dataset.Y_dict:
            raise ValueError(
                f"Base task ({self.base_task.name}) labels missing from {dataset}")
        S_array = S if isinstance(S, np.ndarray) else np.asarray(S)
        if S_array.dtype.names is None and S_array.ndim == 2 \
                and S_array.shape[1] != len(self.slice_names):
            raise ValueError(
                f"Num. columns in S matrix ({S_array.shape[1]}) does not match num. "
                f"slice_names ({len(self.slice_names)}: {self.slice_names})")
        dataloader = DictDataLoader(dataset, **dataloader_kwargs)
        add_slice_labels(dataloader, self.base_task, S_array, self.slice_names)
        return dataloader

    def slice_label_remap(self, label_names: Sequence[str]) -> dict[str, str | None]:
        """``remap_labels`` that scores each slice's ``_pred`` labels on the master head.

        ``{base}_slice:{s}_pred`` -> the base task, ``{base}_slice:{s}_ind`` -> None
        (dropped); other labels are left alone. Names are matched exactly, not by
        substring as in Snorkel (a task named e.g. "predict" is not remapped).
        """
        prefix = f"{self.base_task.name}_slice:"
        slices = {*self.slice_names, BASE_SLICE}
        remap: dict[str, str | None] = {}
        for label in label_names:
            if not label.startswith(prefix):
                continue
            for suffix, target in (("_pred", self.base_task.name), ("_ind", None)):
                if label.endswith(suffix) and label[len(prefix):-len(suffix)] in slices:
                    remap[label] = target
        return remap

    def score_slices(self, dataloaders: DictDataLoader | Sequence[DictDataLoader],
                     as_dataframe: bool = False) -> Mapping[str, float] | pd.DataFrame:
        """Scores every slice's rows with the master head (``base_task``), not the slice heads.

        Each ``{task}_slice:{s}_pred`` label set is scored on the master task's
        predictions, so ``{task}_slice:{s}_pred/{dataset}/{split}/{metric}`` is the
        model's score on slice ``s``; indicator labels are left out.

        Returns:
          As ``score``: ``{"label/dataset/split/metric": value}`` or a DataFrame.
        """
        dataloaders = loader_list(dataloaders, "score_slices")
        labels = [label for dataloader in dataloaders for label in dataloader.dataset.Y_dict]
        return self.score(dataloaders, remap_labels=self.slice_label_remap(labels),
                          as_dataframe=as_dataframe)
