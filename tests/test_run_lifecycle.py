"""A run's life in its directories: fresh runs replace earlier ones, resumed runs continue
their log and best models (also from another directory), failures keep the first error."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import linear_data, make_task

import jaxmtl
from jaxmtl.training.checkpoint import Checkpointer
from jaxmtl.training.locks import DirectoryLockedError
from jaxmtl.training.writers import LogWriter

# 300 rows in batches of 16: 19 batches per epoch, 38 in all; an evaluation and a
# checkpoint every 5 batches (the last at batch 35 = epoch 1, batch 16).
N_EPOCHS = 2
# Train loss "max": the best model is the first evaluation's, long before any interruption.
METRIC = "model/all/train/loss:max"


class FailingLoader(jaxmtl.DictDataLoader):
    """Raises when its ``fail_at``-th batch is drawn (an interruption mid-epoch)."""

    def __init__(self, *args, fail_at=-1, **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_at, self.drawn = fail_at, 0

    def batch_at(self, order, index):
        self.drawn += 1
        if self.drawn == self.fail_at:
            raise KeyboardInterrupt(f"interrupted at batch {self.drawn}")
        return super().batch_at(order, index)


def loaders(fail_at=-1, shuffle_seed=3):
    X, Y = linear_data(300, 0)
    train = jaxmtl.DictDataset("d", "train", {"data": X}, {"task1": Y})
    Xv, Yv = linear_data(64, 1)
    valid = jaxmtl.DictDataset("d", "valid", {"data": Xv}, {"task1": Yv})
    return [FailingLoader(train, batch_size=16, shuffle=True, seed=shuffle_seed,
                          fail_at=fail_at),
            jaxmtl.DictDataLoader(valid, batch_size=64)]


def trainer(checkpoint_dir, log_dir, run_name, **kwargs):
    settings = dict(
        n_epochs=N_EPOCHS, lr=0.05, seed=0, progress_bar=False, lr_scheduler="linear",
        checkpointing=True, logging=True, log_writer="json",
        log_writer_config={"log_dir": str(log_dir), "run_name": run_name},
        log_manager_config={"counter_unit": "batches", "evaluation_freq": 5},
        checkpointer_config={"checkpoint_dir": str(checkpoint_dir), "checkpoint_clear": False,
                             "checkpoint_metric": METRIC},
    )
    settings.update(kwargs)
    return jaxmtl.Trainer(**settings)


def new_model():
    return jaxmtl.MultitaskClassifier([make_task("task1")])


def fit(checkpoint_dir, log_dir, run_name, fail_at=-1, resume_from=None, shuffle_seed=3,
        **kwargs):
    model, run = new_model(), trainer(checkpoint_dir, log_dir, run_name, **kwargs)
    if fail_at > 0:
        with pytest.raises(KeyboardInterrupt, match=f"interrupted at batch {fail_at}"):
            run.fit(model, loaders(fail_at, shuffle_seed))
    else:
        run.fit(model, loaders(shuffle_seed=shuffle_seed), resume_from=resume_from)
    return model, run


def read_log(log_dir, run_name):
    with open(os.path.join(log_dir, run_name, "log.json")) as f:
        return json.load(f)


def assert_same_log(got, expected):
    assert sorted(got) == sorted(expected)
    for name in expected:
        assert [step for step, _ in got[name]] == [step for step, _ in expected[name]], name
        np.testing.assert_allclose([v for _, v in got[name]], [v for _, v in expected[name]],
                                   rtol=1e-6, atol=1e-6, err_msg=name)


def assert_same_tree(got, expected):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("full")
    model, run = fit(path / "ck", path / "logs", "full")
    log = read_log(path / "logs", "full")
    # 7 evaluations; the best (max train loss) is the first, the final state is not it.
    assert len(log["model/all/train/loss"]) == 7
    return {"best": jax.device_get(model.params), "final": jax.device_get(run.state.params),
            "log": log, "ck": path / "ck", "logs": path / "logs"}


def test_second_run_in_a_used_dir_replaces_the_first(tmp_path, uninterrupted, caplog):
    # Run 1 (another batch order) then run 2 in the same directory: run 2 is the
    # uninterrupted run, whatever run 1 left there.
    first, _ = fit(tmp_path / "ck", tmp_path / "logs", "run", shuffle_seed=99)
    with pytest.raises(AssertionError):
        assert_same_tree(first.params, uninterrupted["best"])
    with caplog.at_level("INFO", logger="jaxmtl.training.checkpoint"):
        second, run = fit(tmp_path / "ck", tmp_path / "logs", "run")
    assert_same_tree(second.params, uninterrupted["best"])
    assert_same_tree(run.state.params, uninterrupted["final"])
    assert_same_log(read_log(tmp_path / "logs", "run"), uninterrupted["log"])
    # Resuming the finished run 2 restores run 2's final state (not run 1's).
    model, resumed = fit(tmp_path / "ck", tmp_path / "logs", "run",
                         resume_from=str(tmp_path / "ck"))
    assert_same_tree(resumed.state.params, uninterrupted["final"])
    assert_same_tree(model.params, uninterrupted["best"])
    assert "holds an earlier run's ['best_model_model_all_train_loss', 'checkpoints']: " \
           "this new run replaces them" in caplog.text


def test_resume_continues_the_log_in_the_same_run(tmp_path, uninterrupted):
    fit(tmp_path / "ck", tmp_path / "logs", "run", fail_at=24)
    interrupted = read_log(tmp_path / "logs", "run")
    assert [s for s, _ in interrupted["model/all/train/loss"]] == [80, 160, 240, 316]  # 300 rows: the 19th batch has 12
    model, run = fit(tmp_path / "ck", tmp_path / "logs", "run", resume_from=str(tmp_path / "ck"))
    assert_same_log(read_log(tmp_path / "logs", "run"), uninterrupted["log"])
    assert_same_tree(run.state.params, uninterrupted["final"])
    assert_same_tree(model.params, uninterrupted["best"])
    assert not [name for name in os.listdir(tmp_path / "ck") if name.endswith(".lock")]


def test_resume_into_another_checkpoint_dir_and_run(tmp_path, uninterrupted):
    fit(tmp_path / "ck1", tmp_path / "logs", "run1", fail_at=24)
    model, run = fit(tmp_path / "ck2", tmp_path / "logs", "run2",
                     resume_from=str(tmp_path / "ck1"))
    # The best model (first evaluation, before the interruption) was carried over.
    assert_same_tree(model.params, uninterrupted["best"])
    assert_same_tree(run.state.params, uninterrupted["final"])
    assert_same_log(read_log(tmp_path / "logs", "run2"), uninterrupted["log"])
    assert sorted(os.listdir(tmp_path / "ck2")) == ["best_model_model_all_train_loss",
                                                    "checkpoints"]


def test_failed_fit_raises_its_own_error_and_closes_everything(tmp_path, monkeypatch, caplog):
    closed = []
    original_cleanup, original_close = LogWriter.cleanup, Checkpointer.close

    def failing_cleanup(self):
        closed.append("log writer")
        original_cleanup(self)
        raise OSError("disk full while writing log.json")

    def failing_close(self):
        closed.append("checkpointer")
        original_close(self)
        raise OSError("orbax could not finish")

    monkeypatch.setattr(LogWriter, "cleanup", failing_cleanup)
    monkeypatch.setattr(Checkpointer, "close", failing_close)
    with caplog.at_level("ERROR"):
        fit(tmp_path / "ck", tmp_path / "logs", "run", fail_at=12)  # raises KeyboardInterrupt
    assert closed == ["log writer", "checkpointer"]
    assert "Closing the log writer after a failed fit raised too" in caplog.text
    assert "Closing the checkpointer after a failed fit raised too" in caplog.text
    # Both directories were released although closing failed.
    for directory in (tmp_path / "ck", tmp_path / "logs" / "run"):
        assert not [name for name in os.listdir(directory) if name.endswith(".lock")]


@pytest.mark.parametrize("kwargs, message", [
    ({"n_epochs": 1}, r"checkpoint at epoch 1, batch 16, past this run's n_epochs=1"),
    ({"n_epochs": 0}, r"checkpoint at epoch 1, batch 16, past this run's n_epochs=0"),
])
def test_resume_checks_the_saved_position(tmp_path, uninterrupted, kwargs, message):
    # Logging into the resumed run's own log directory.
    run = trainer(tmp_path / "ck", uninterrupted["logs"], "full", **kwargs)
    with pytest.raises(ValueError, match=message):
        run.fit(new_model(), loaders(), resume_from=str(uninterrupted["ck"]))
    # The failed resume released its directories and left the resumed run's log alone.
    assert not [n for n in os.listdir(tmp_path / "ck") if n.endswith(".lock")]
    assert not [n for n in os.listdir(uninterrupted["logs"] / "full") if n.endswith(".lock")]
    assert read_log(uninterrupted["logs"], "full") == uninterrupted["log"]


def test_resume_checks_the_number_of_loaders(tmp_path, uninterrupted):
    X, Y = linear_data(300, 5)
    extra = jaxmtl.DictDataLoader(jaxmtl.DictDataset("e", "train", {"data": X}, {"task1": Y}),
                                  batch_size=16)
    run = trainer(tmp_path / "ck", tmp_path / "logs", "run")
    with pytest.raises(ValueError, match="checkpoint was trained on 1 train loaders, got 2"):
        run.fit(new_model(), [*loaders(), extra], resume_from=str(uninterrupted["ck"]))


@pytest.mark.slow
def test_two_processes_agree_on_the_default_checkpoint_dir(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "default_dir_run.py")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = [subprocess.Popen([sys.executable, script, str(tmp_path / "logs"), str(pid),
                                   "2", str(port)], cwd=os.path.dirname(script),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for pid in range(2)]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        results.append(stdout.split("RESULT ")[1].split())
    (date,) = os.listdir(tmp_path / "logs")
    (time,) = os.listdir(tmp_path / "logs" / date)
    expected = os.path.join(str(tmp_path / "logs"), date, time, "")
    assert [directory for directory, _ in results] == [expected, expected]
    assert results[0][1] == results[1][1]  # both loaded the same best model


@pytest.mark.parametrize("held", ["ck/.jaxmtl-checkpoint.lock", "logs/run/.jaxmtl-log.lock"])
def test_fit_in_a_directory_held_by_a_live_run_fails_fast(tmp_path, held):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        lock = tmp_path / held
        lock.parent.mkdir(parents=True)
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(DirectoryLockedError,
                           match=rf"{lock.parent} is in use by another run \(pid {sleeper.pid}"):
            fit(tmp_path / "ck", tmp_path / "logs", "run")
        assert json.loads(lock.read_text())["pid"] == sleeper.pid  # left alone
    finally:
        sleeper.kill()
        sleeper.wait()
