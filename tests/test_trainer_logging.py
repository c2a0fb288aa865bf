"""Trainer with its services: evaluation cadence, JSON/TensorBoard logs, LR logging."""

import json

import numpy as np
import pytest
from conftest import make_task, read_events

from jaxmtl import MultitaskClassifier, Trainer


def fit_logged(loaders, tmp_path, **overrides):
    model = MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
    config = dict(n_epochs=2, lr=0.02, seed=0, progress_bar=False, logging=True,
                  log_writer="json", log_writer_config={"log_dir": str(tmp_path), "run_name": "run"})
    config.update(overrides)
    trainer = Trainer(**config)
    trainer.fit(model, loaders)
    return trainer, model


def test_json_log_every_epoch(two_task_loaders, tmp_path):
    trainer, model = fit_logged(two_task_loaders, tmp_path)
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    # 600 points per train loader, two loaders, evaluated once per epoch (Snorkel's default).
    expected_steps = [1200, 2400]
    for name in ["model/all/train/loss", "model/all/train/lr", "task1/d1/train/loss",
                 "task2/d2/train/loss", "task1/d1/valid/accuracy", "task2/d2/valid/accuracy",
                 "model/all/valid/accuracy"]:
        assert [step for step, _ in log[name]] == expected_steps, name
    assert log["model/all/train/lr"][0][1] == pytest.approx(0.02)
    # Train losses fall between epochs; the last valid scores are the model's.
    assert log["model/all/train/loss"][1][1] < log["model/all/train/loss"][0][1]
    scores = model.score([dl for dl in two_task_loaders if dl.dataset.split == "valid"])
    assert log["task1/d1/valid/accuracy"][-1][1] == pytest.approx(scores["task1/d1/valid/accuracy"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["n_epochs"] == 2 and config["log_writer"] == "json"
    assert trainer.metrics["model/all/train/loss"] == pytest.approx(log["model/all/train/loss"][-1][1])


def test_model_loss_is_mean_over_all_task_rows(two_task_loaders, tmp_path):
    _, _ = fit_logged(two_task_loaders, tmp_path, n_epochs=1)
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    task1, task2 = log["task1/d1/train/loss"][0][1], log["task2/d2/train/loss"][0][1]
    # Both loaders have 600 labelled rows, so the micro average is the plain mean.
    assert log["model/all/train/loss"][0][1] == pytest.approx((task1 + task2) / 2, rel=1e-6)


def test_evaluation_every_k_batches_and_warmup_lr(two_task_loaders, tmp_path):
    fit_logged(two_task_loaders, tmp_path, n_epochs=1,
               log_manager_config={"counter_unit": "batches", "evaluation_freq": 10},
               lr_scheduler="linear", lr_scheduler_config={"warmup_steps": 20})
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    steps = [step for step, _ in log["model/all/train/lr"]]
    assert len(steps) == 38 // 10
    # After update t the next LR is logged: warm-up lr*t/20, then linear decay over 18.
    lrs = [value for _, value in log["model/all/train/lr"]]
    np.testing.assert_allclose(lrs, [0.02 * 10 / 20, 0.02 * (38 - 20 - 0) / 18,
                                     0.02 * (38 - 20 - 10) / 18], rtol=1e-5)


def test_tensorboard_events(two_task_loaders, tmp_path):
    fit_logged(two_task_loaders, tmp_path, n_epochs=1, log_writer="tensorboard")
    files = list((tmp_path / "run").glob("events.out.tfevents.*"))
    assert len(files) == 1
    scalars = {value.tag: (event.step, value.simple_value)
               for event in read_events(files[0]) for value in event.summary.value
               if value.HasField("simple_value")}
    assert scalars["model/all/train/lr"] == (1200, pytest.approx(0.02))
    assert {"task1/d1/train/loss", "task2/d2/valid/accuracy", "model/all/train/loss"} <= set(scalars)


def test_no_output_without_progress_bar(two_task_loaders, capsys):
    model = MultitaskClassifier([make_task("task1")])
    Trainer(n_epochs=1, progress_bar=False, seed=0).fit(model, two_task_loaders[:1])
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("scheduler, expected", [
    ("constant", 0.02), ("linear", 0.0), ("exponential", 0.02 * 0.9 ** 38),
    ("step", 0.02 * 0.9 ** (38 // 5)), ("cosine", 0.0)])  # Snorkel's step gamma 0.9
def test_every_lr_scheduler_reaches_its_final_value(two_task_loaders, scheduler, expected):
    model = MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
    trainer = Trainer(n_epochs=1, lr=0.02, seed=0, progress_bar=False, lr_scheduler=scheduler)
    trainer.fit(model, two_task_loaders)
    # Logged after the last of 38 updates: the rate the next update would use.
    assert trainer.metrics["model/all/train/lr"] == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert trainer.warmup_steps == 0
