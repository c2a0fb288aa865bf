"""Snorkel's multi-task tutorial, ported to jaxmtl by swaps only, runs and learns.

The source is snorkel-team/snorkel-tutorials, multitask/multitask_tutorial.py (the
MultitaskClassifier / op_sequence version, Snorkel 0.9-0.10). Below it is kept cell by
cell: names, op names, module names, data keys, dataset names, Scorer, the trainer
config, ``trainer.fit`` and ``model.score``; markdown, plots and prints are left out.

Swaps made (torch / Snorkel -> jaxmtl / Flax / JAX), and nothing else:
  1. ``np.random.seed(SEED); random.seed(SEED); torch.manual_seed(SEED)`` ->
     ``rng = np.random.default_rng(SEED)`` for the data, and ``"seed": SEED`` in
     ``trainer_config`` for the parameters (``MultitaskClassifier(tasks)`` has
     ``seed=None``: the Trainer's seed initialises it at the first ``fit``).
  2. ``from utils import make_circle_dataset, ...`` (global numpy RNG, scikit-learn split)
     -> ``from per_task_inputs import ...`` (examples/per_task_inputs.py: the same
     labelling and 80/10/10 split in numpy, with the generator as third argument).
  3. ``from snorkel.classification import DictDataset, DictDataLoader, Operation, Task,
     MultitaskClassifier, Trainer`` and ``from snorkel.analysis import Scorer`` ->
     the same names ``from jaxmtl import ...``.
  4. ``torch.FloatTensor(a)`` -> ``np.asarray(a, dtype=np.float32)``;
     ``torch.LongTensor(a)`` -> ``np.asarray(a, dtype=np.int64)``.
  5. ``import torch.nn as nn`` -> ``import flax.linen as nn``;
     ``nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU())`` ->
     ``nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4), nn.relu])``;
     ``nn.Linear(4, 2)`` -> ``nn.Dense(2)`` (Flax infers input widths);
     ``nn.ModuleDict({...})`` -> ``{...}``.
  6. ``import torch.nn.functional as F`` -> ``import jax`` and ``import jaxmtl``;
     ``loss_func=F.cross_entropy`` -> ``loss_func=jaxmtl.cross_entropy`` (both return the
     scalar mean over the batch); ``output_func=partial(F.softmax, dim=1)`` ->
     ``output_func=partial(jax.nn.softmax, axis=1)``.
  7. ``"n_epochs": 10`` -> ``N_EPOCHS`` (also 10) and ``N = 1000`` kept: the test's time
     is compiles (one train step per task set, before and after ``add_task``), not
     epochs: with 1 epoch or 10 this test took the same ~15 s of CPU time here, and
     with 5 epochs Snorkel's own run falls short more often (lowest first-fit accuracy
     under 0.85 on 6 of 20 seeds, against 2 of 20 with 10).
  8. "Your turn": the blanks are filled in (the InvCircleDataset's X_dict/Y_dict, the
     inv_circle_task as the square_task template), and the task joins the trained model
     with ``model.add_task(inv_circle_task)`` rather than a rebuilt
     ``MultitaskClassifier([circle_task, square_task, inv_circle_task])``; the final
     asserts use ``model.task_names`` (Snorkel 0.10's model has no ``tasks`` attribute).

What this needs from jaxmtl (Snorkel's semantics): each dataset carries only its own
task's input key; the op ``base_mlp`` reads ``circle_data`` in one task and
``square_data`` / ``inv_circle_data`` in the others (one module, one set of weights); a
``loss_func`` that returns a scalar mean; ``MultitaskClassifier(tasks)`` seeded by the
Trainer.

Thresholds: Snorkel 0.10 + torch on the same data and settings (``.venv-bench/bin/python
-m benchmarks.tutorial_snorkel --seeds $(seq 0 19)``, data seed = torch seed), 20 seeds: the
lowest accuracy over tasks and splits is 0.86-0.95 after the first fit and 0.89-0.96 after
the second on 18 seeds; on 2 seeds the square task gets stuck near its majority rate
(0.70-0.79; the 2 -> 8 -> 4 ReLU body is small). Mean over seeds after the second fit: circle
0.94, square 0.93-0.94, inv_circle 0.95 (valid and test). Flax initialises differently
(LeCun-normal weights, zero biases), so a jaxmtl run is compared with that distribution,
not with one Snorkel seed.
"""

import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

N = 1000  # Data points per dataset
N_EPOCHS = 10
# Below Snorkel's lowest accuracy on each of its 18 of 20 seeds that do not get stuck
# (module docstring); majority rates are 0.79 (circle), 0.74 (square), 0.81 (inv_circle).
STAGE1_MIN = 0.85  # circle and square, every split, after the first fit
STAGE2_MIN = 0.85  # all three tasks, every split, after add_task + fit


def test_snorkel_multitask_tutorial_port():
    """The ported tutorial trains two tasks, then three, to Snorkel's accuracy."""
    # %% Environment Setup
    SEED = 123
    rng = np.random.default_rng(SEED)

    # %% Create Toy Data
    from per_task_inputs import make_circle_dataset, make_square_dataset

    R = 1  # Unit distance

    X_train, X_valid, X_test = {}, {}, {}
    Y_train, Y_valid, Y_test = {}, {}, {}

    circle_train, circle_valid, circle_test = make_circle_dataset(N, R, rng)
    (X_train["circle"], Y_train["circle"]) = circle_train
    (X_valid["circle"], Y_valid["circle"]) = circle_valid
    (X_test["circle"], Y_test["circle"]) = circle_test

    square_train, square_valid, square_test = make_square_dataset(N, R, rng)
    (X_train["square"], Y_train["square"]) = square_train
    (X_valid["square"], Y_valid["square"]) = square_valid
    (X_test["square"], Y_test["square"]) = square_test

    assert X_train["circle"].shape == (800, 2)
    assert set(Y_train["circle"]) == {0, 1}

    # %% Make DataLoaders
    from jaxmtl import DictDataLoader, DictDataset

    dataloaders = []
    for task_name in ["circle", "square"]:
        for split, X, Y in (
            ("train", X_train, Y_train),
            ("valid", X_valid, Y_valid),
            ("test", X_test, Y_test),
        ):
            X_dict = {f"{task_name}_data": np.asarray(X[task_name], dtype=np.float32)}
            Y_dict = {f"{task_name}_task": np.asarray(Y[task_name], dtype=np.int64)}
            dataset = DictDataset(f"{task_name}Dataset", split, X_dict, Y_dict)
            dataloader = DictDataLoader(dataset, batch_size=32)
            dataloaders.append(dataloader)

    # %% Define Model: Tasks
    import flax.linen as nn

    from jaxmtl import Operation

    # Define a two-layer MLP module and a one-layer prediction "head" module
    base_mlp = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(4), nn.relu])
    head_module = nn.Dense(2)

    # The module pool contains all the modules this task uses
    module_pool = {"base_mlp": base_mlp, "circle_head_module": head_module}

    # "From the input dictionary, pull out 'circle_data' and send it through input_module"
    op1 = Operation(
        name="base_mlp", module_name="base_mlp", inputs=[("_input_", "circle_data")]
    )

    # "Pass the output of op1 (the MLP module) as input to the head_module"
    op2 = Operation(
        name="circle_head", module_name="circle_head_module", inputs=["base_mlp"]
    )

    op_sequence = [op1, op2]

    import jax

    import jaxmtl
    from jaxmtl import Scorer, Task

    circle_task = Task(
        name="circle_task",
        module_pool=module_pool,
        op_sequence=op_sequence,
        loss_func=jaxmtl.cross_entropy,
        output_func=partial(jax.nn.softmax, axis=1),
        scorer=Scorer(metrics=["accuracy"]),
    )

    # %% Again, but faster
    square_task = Task(
        name="square_task",
        module_pool={"base_mlp": base_mlp, "square_head": nn.Dense(2)},
        op_sequence=[
            Operation("base_mlp", [("_input_", "square_data")]),
            Operation("square_head", ["base_mlp"]),
        ],
    )

    # %% Model
    from jaxmtl import MultitaskClassifier

    model = MultitaskClassifier([circle_task, square_task])

    # %% Train Model
    from jaxmtl import Trainer

    trainer_config = {"progress_bar": False, "n_epochs": N_EPOCHS, "lr": 0.02, "seed": SEED}

    trainer = Trainer(**trainer_config)
    trainer.fit(model, dataloaders)

    # %% Evaluate model
    scores = model.score(dataloaders)

    expected = {f"{task}_task/{task}Dataset/{split}/accuracy"
                for task in ("circle", "square") for split in ("train", "valid", "test")}
    task_scores = {k: v for k, v in scores.items() if not k.startswith("model/")}
    assert set(task_scores) == expected
    low = {k: v for k, v in task_scores.items() if not v > STAGE1_MIN}
    assert not low, f"accuracies at or below {STAGE1_MIN} after the first fit: {low}"

    # %% Your Turn: Create the data
    from per_task_inputs import make_inv_circle_dataset

    # We flip the inequality when generating the labels so that our positive
    # class is now _outside_ the circle.
    inv_circle_train, inv_circle_valid, inv_circle_test = make_inv_circle_dataset(N, R, rng)
    (X_train["inv_circle"], Y_train["inv_circle"]) = inv_circle_train
    (X_valid["inv_circle"], Y_valid["inv_circle"]) = inv_circle_valid
    (X_test["inv_circle"], Y_test["inv_circle"]) = inv_circle_test

    # %% Create the DictDataLoader
    X_dict = {"inv_circle_data": np.asarray(X_train["inv_circle"], dtype=np.float32)}
    Y_dict = {"inv_circle_task": np.asarray(Y_train["inv_circle"], dtype=np.int64)}
    inv_dataset = DictDataset("InvCircleDataset", "train", X_dict, Y_dict)
    inv_dataloader = DictDataLoader(dataset=inv_dataset, batch_size=32)

    all_dataloaders = dataloaders + [inv_dataloader]

    # %% Create the task
    inv_circle_task = Task(
        name="inv_circle_task",
        module_pool={"base_mlp": base_mlp, "inv_circle_head": nn.Dense(2)},
        op_sequence=[
            Operation("base_mlp", [("_input_", "inv_circle_data")]),
            Operation("inv_circle_head", ["base_mlp"]),
        ],
    )

    # %% Create the model
    model.add_task(inv_circle_task)

    # %% Train the model
    trainer.fit(model, all_dataloaders)
    scores = model.score(all_dataloaders)

    # %% Validation
    assert len(model.task_names) == 3
    assert len(model.module_pool) == 4  # 1 shared module plus 3 separate task heads

    task_scores = {k: v for k, v in scores.items() if not k.startswith("model/")}
    assert set(task_scores) == expected | {"inv_circle_task/InvCircleDataset/train/accuracy"}
    low = {k: v for k, v in task_scores.items() if not v > STAGE2_MIN}
    assert not low, f"accuracies at or below {STAGE2_MIN} after add_task + fit: {low}"
    assert scores["model/all/train/accuracy"] == pytest.approx(
        np.mean([v for k, v in task_scores.items() if "/train/" in k]))
