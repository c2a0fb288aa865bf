"""training.fit_setup: the loader checks of Trainer.fit, with their exact errors."""

import numpy as np
import pytest

from jaxmtl import DictDataLoader, DictDataset, TrainerConfig
from jaxmtl.evaluation import loader_list
from jaxmtl.training.fit_setup import check_dataloaders


def _loader(name: str, split: str) -> DictDataLoader:
    dataset = DictDataset(name=name, split=split, X_dict={"x": np.zeros((4, 2), np.float32)},
                          Y_dict={"t": np.zeros(4, np.int64)})
    return DictDataLoader(dataset, batch_size=2)


def test_check_dataloaders_returns_the_train_loaders_in_order():
    train_a, valid, train_b = _loader("a", "train"), _loader("v", "valid"), _loader("b", "train")
    assert check_dataloaders(TrainerConfig(), [train_a, valid, train_b]) == [train_a, train_b]


def test_one_loader_or_a_list_of_them():
    """A single loader is taken as a list of one (model.score(loader) used to fail with
    "'Batch' object has no attribute 'dataset'"); anything else names what it got."""
    train = _loader("a", "train")
    assert check_dataloaders(TrainerConfig(), train) == [train]
    assert check_dataloaders(TrainerConfig(), (train,)) == [train]
    with pytest.raises(TypeError, match=r"^Trainer.fit expects a DictDataLoader or a list of "
                       r"them; item 1 is a list$"):
        check_dataloaders(TrainerConfig(), [train, [1, 2]])
    with pytest.raises(TypeError, match=r"^score expects a DictDataLoader or a list of them, "
                       r"got dict$"):
        loader_list({"a": train}, "score")


@pytest.mark.parametrize("loaders, message", [
    ([_loader("d", "dev")],
     "Dataloader splits must be one of ['train', 'valid', 'test']; dataset 'd' has split 'dev'"),
    ([_loader("v", "valid")], "Cannot find any dataloaders with split matching train split: train."),
])
def test_check_dataloaders_errors(loaders, message):
    with pytest.raises(ValueError) as info:
        check_dataloaders(TrainerConfig(), loaders)
    assert str(info.value) == message
