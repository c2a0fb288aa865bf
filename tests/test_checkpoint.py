"""Checkpointer (Snorkel's tests re-expressed) and Trainer checkpointing on Orbax."""

import json
import os
import socket
import subprocess
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_task

from jaxmtl import MultitaskClassifier, Trainer
from jaxmtl.training.checkpoint import (
    Checkpointer,
    agree_run_name,
    resolve_checkpoint_dir,
)
from jaxmtl.training.config import CheckpointerConfig, TrainerConfig
from jaxmtl.training.locks import DirectoryLockedError
from jaxmtl.training.orbax_io import CheckpointError, restore_checkpoint
from jaxmtl.training.resume import save_optimizer_state
from jaxmtl.training.state import make_optimizer

METRIC = "task/dataset/valid/f1"


@pytest.fixture(scope="module")
def model():
    model = MultitaskClassifier([make_task("task1")])
    model.init({"data": np.zeros((2, 2), np.float32)})
    return model


def with_kernel(model, value):
    variables = jax.tree.map(np.asarray, model.variables)
    variables["params"]["linear1A"]["kernel"] = np.full_like(
        variables["params"]["linear1A"]["kernel"], value)
    model.variables = variables
    return model


def kernel(model):
    return float(np.asarray(model.params["linear1A"]["kernel"]).ravel()[0])


@pytest.mark.parametrize("mode, values, best", [("max", [0.5, 0.8, 0.7], 0.8),
                                                ("min", [0.5, 0.8, 0.3], 0.3)])
def test_best_model_by_metric_with_runway(model, tmp_path, mode, values, best):
    checkpointer = Checkpointer("epochs", 1.0, checkpoint_dir=str(tmp_path),
                                checkpoint_metric=f"{METRIC}:{mode}", checkpoint_runway=3)
    checkpointer.checkpoint(2, with_kernel(model, 0.1), {METRIC: 0.99})  # inside the runway
    assert checkpointer.best_metric_dict == {}
    for iteration, value in zip([3, 4, 5], values, strict=True):
        checkpointer.checkpoint(iteration, with_kernel(model, value), {METRIC: value})
    assert checkpointer.best_metric_dict == {METRIC: best}
    checkpointer.load_best_model(with_kernel(model, -1.0))
    assert kernel(model) == pytest.approx(best)
    checkpointer.clear()
    checkpointer.close()  # releases the lock file too
    assert sorted(os.listdir(tmp_path)) == [f"best_model_{METRIC.replace('/', '_')}"]


def test_task_metrics_each_keep_their_best(model, tmp_path):
    checkpointer = Checkpointer("epochs", 1.0, checkpoint_dir=str(tmp_path),
                                checkpoint_metric="task/dataset/valid/loss:min",
                                checkpoint_task_metrics=[f"{METRIC}:max"], checkpoint_clear=False)
    checkpointer.checkpoint(1, with_kernel(model, 1.0), {"task/dataset/valid/loss": 0.5, METRIC: 0.9})
    checkpointer.checkpoint(2, with_kernel(model, 2.0), {"task/dataset/valid/loss": 0.4, METRIC: 0.1})
    assert checkpointer.best_metric_dict == {"task/dataset/valid/loss": 0.4, METRIC: 0.9}
    checkpointer.wait_until_finished()
    best_f1 = os.path.join(tmp_path, f"best_model_{METRIC.replace('/', '_')}")
    items, meta = restore_checkpoint(best_f1, None, {"model": jax.device_get(model.variables)})
    assert float(np.asarray(items["model"]["params"]["linear1A"]["kernel"]).ravel()[0]) == 1.0
    assert meta["iteration"] == 1
    checkpointer.load_best_model(model)  # by checkpoint_metric (loss): the second
    assert kernel(model) == 2.0
    checkpointer.clear()  # checkpoint_clear=False keeps everything
    assert "checkpoints" in os.listdir(tmp_path)
    checkpointer.close()


def test_a_slice_task_metric_with_a_colon_is_a_checkpoint_metric(model, tmp_path):
    # Slice tasks are named "task_slice:<slice>_pred"; the mode follows the last ":".
    slice_metric = "task_slice:short_pred/dataset/valid/accuracy"
    checkpointer = Checkpointer("epochs", 1.0, checkpoint_dir=str(tmp_path),
                                checkpoint_metric=f"{slice_metric}:max")
    for iteration, value in [(1, 0.6), (2, 0.9), (3, 0.7)]:
        checkpointer.checkpoint(iteration, with_kernel(model, value), {slice_metric: value})
    assert checkpointer.best_metric_dict == {slice_metric: 0.9}
    assert kernel(checkpointer.load_best_model(with_kernel(model, -1.0))) == pytest.approx(0.9)
    checkpointer.clear()
    checkpointer.close()
    assert os.listdir(tmp_path) == ["best_model_task_slice_short_pred_dataset_valid_accuracy"]


def test_no_best_model_keeps_model(model, tmp_path):
    checkpointer = Checkpointer(checkpoint_dir=str(tmp_path), checkpoint_metric=f"{METRIC}:max")
    with_kernel(model, 7.0)
    checkpointer.checkpoint(1, model, {"other/metric/x/y": 1.0})
    assert kernel(checkpointer.load_best_model(model)) == 7.0
    checkpointer.close()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"checkpoint_runway": -1}, "CheckpointerConfig.checkpoint_runway must be >= 0, got -1"),
        ({"checkpoint_factor": 0},
         "CheckpointerConfig.checkpoint_factor must be an int >= 1, got 0"),
        ({"checkpoint_metric": "task/dataset/split/f1-min"},
         "CheckpointerConfig.checkpoint_metric: metric must be of the form 'metric_name:mode' "
         "where mode is 'max' or 'min', got 'task/dataset/split/f1-min'"),
        ({"checkpoint_metric": "task/dataset/split/f1:mode"},
         "Unrecognized checkpoint metric mode 'mode' (CheckpointerConfig.checkpoint_metric, "
         "metric 'task/dataset/split/f1'); expected one of ['min', 'max']"),
        ({"checkpoint_metric": "task/dataset/split:max"},
         "CheckpointerConfig.checkpoint_metric must be formatted "
         "'task/dataset/split/metric:mode', got 'task/dataset/split:max'"),
        ({"checkpoint_task_metrics": ["a/b/c/d:up"]},
         "Unrecognized checkpoint metric mode 'up' (CheckpointerConfig.checkpoint_task_metrics, "
         "metric 'a/b/c/d'); expected one of ['min', 'max']"),
    ],
)
def test_bad_config(tmp_path, kwargs, message):
    # Validated where the config is built, so the Checkpointer and the config say the same.
    for build in (lambda: CheckpointerConfig(**kwargs),
                  lambda: Checkpointer("epochs", 1.0, checkpoint_dir=str(tmp_path), **kwargs)):
        with pytest.raises(ValueError) as info:
            build()
        assert str(info.value) == message
    with pytest.raises(ValueError, match="checkpoint freq"):
        Checkpointer("epochs", 0.0, checkpoint_dir=str(tmp_path))


def test_restore_errors(model, tmp_path):
    target = {"model": jax.device_get(model.variables)}
    with pytest.raises(ValueError, match="not a jaxmtl checkpoint directory"):
        restore_checkpoint(str(tmp_path / "missing"), None, target)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no checkpoint"):
        restore_checkpoint(str(tmp_path / "empty"), None, target)
    checkpointer = Checkpointer(checkpoint_dir=str(tmp_path / "ck"), checkpoint_metric=f"{METRIC}:max")
    checkpointer.checkpoint(1, model, {METRIC: 1.0})
    checkpointer.close()
    wider = MultitaskClassifier([make_task("task1", hidden=7)])
    wider.init({"data": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"shape mismatch.*linear1A.*kernel.*expected \(2, 7\), found \(2, 10\)"):
        restore_checkpoint(str(tmp_path / "ck" / "checkpoints"), None,
                           {"model": jax.device_get(wider.variables)})
    other = MultitaskClassifier([make_task("task1", ("A", "Z"))])
    other.init({"data": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match=r"missing \[.*linear2Z.*unexpected \[.*linear2B"):
        restore_checkpoint(str(tmp_path / "ck" / "checkpoints"), None,
                           {"model": jax.device_get(other.variables)})
    # Truncate every array file of the checkpoint: a clear error, not a partial load.
    for folder, _, files in os.walk(tmp_path / "ck" / "checkpoints" / "0" / "model"):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "r+b") as f:
                f.truncate(max(0, os.path.getsize(path) // 3))
    with pytest.raises(ValueError, match="cannot read checkpoint 0"):
        restore_checkpoint(str(tmp_path / "ck" / "checkpoints"), None, target)


def test_trainer_loads_best_model_at_end(two_task_loaders, tmp_path):
    model = MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
    trainer = Trainer(n_epochs=2, lr=0.5, seed=0, progress_bar=False, checkpointing=True,
                      optimizer="sgd", logging=True, log_writer="json",
                      log_writer_config={"log_dir": str(tmp_path), "run_name": "run"},
                      log_manager_config={"counter_unit": "batches", "evaluation_freq": 7},
                      checkpointer_config={"checkpoint_dir": str(tmp_path / "ck"),
                                           "checkpoint_metric": "task2/d2/valid/accuracy:max"})
    trainer.fit(model, two_task_loaders)
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    history = [value for _, value in log["task2/d2/valid/accuracy"]]
    assert len(history) == 2 * 38 // 7
    best = max(history)
    assert history[-1] != best  # a large SGD step makes the last evaluation not the best
    valid = [dl for dl in two_task_loaders if dl.dataset.split == "valid"]
    assert model.score(valid)["task2/d2/valid/accuracy"] == pytest.approx(best)
    assert sorted(os.listdir(tmp_path / "ck")) == ["best_model_task2_d2_valid_accuracy"]
    # checkpoint_clear=True (the default) removed the resume checkpoints: continuing the
    # finished run says so (it used to say "not a jaxmtl checkpoint directory").
    with pytest.raises(CheckpointError, match=r"no resume checkpoints \(checkpoints/\), only "
                       r"the best models \['best_model_task2_d2_valid_accuracy'\]: the run "
                       r"that wrote them finished with checkpoint_clear=True"):
        trainer.fit(model, two_task_loaders, resume_from=str(tmp_path / "ck"))


def test_a_checkpoint_metric_no_evaluation_computes_is_an_error(two_task_loaders, tmp_path):
    """A typo in checkpoint_metric used to train to the end and keep the last model (an
    INFO line only); the first checkpointing evaluation now names it and the nearest
    metric, the logs are closed and the model keeps readable weights."""
    model = MultitaskClassifier([make_task("task1"), make_task("task2", ("A", "C"))])
    trainer = Trainer(n_epochs=2, lr=0.5, seed=0, progress_bar=False, checkpointing=True,
                      optimizer="sgd",
                      log_manager_config={"counter_unit": "batches", "evaluation_freq": 7},
                      checkpointer_config={"checkpoint_dir": str(tmp_path / "ck"),
                                           "checkpoint_metric": "task2/d2/valid/acuracy:max"})
    with pytest.raises(ValueError, match=r"^CheckpointerConfig.checkpoint_metric: "
                       r"'task2/d2/valid/acuracy' is not among the metrics this evaluation "
                       r"computed.*did you mean 'task2/d2/valid/accuracy' or "):
        trainer.fit(model, two_task_loaders)
    assert np.isfinite(model.score(two_task_loaders)["task2/d2/valid/accuracy"])
    trainer = Trainer(n_epochs=1, seed=0, progress_bar=False, checkpointing=True,
                      checkpointer_config={"checkpoint_dir": str(tmp_path / "ck"),
                                           "checkpoint_task_metrics": ["task3/d2/valid/f1:max"]})
    with pytest.raises(ValueError, match=r"^CheckpointerConfig.checkpoint_task_metrics: "
                       r"'task3/d2/valid/f1' is not among"):
        trainer.fit(model, two_task_loaders)


def test_resuming_an_optimizer_state_saved_before_per_module_counts_says_so(
        two_task_loaders, tmp_path, monkeypatch):
    """A checkpoint whose Adam state has one count for all modules (written before Adam
    kept a count per module) is refused with the reason and a way on, not only a list
    of tree paths; its weights still load."""
    from jaxmtl.training import state as state_module

    def shared_count_adam(options):  # the layout before per-module counts
        b1, b2 = options.adam_config.betas
        return (optax.scale_by_adam(b1=b1, b2=b2, eps=options.adam_config.eps),)

    settings = dict(n_epochs=2, seed=0, progress_bar=False, checkpointing=True,
                    checkpointer_config={"checkpoint_dir": str(tmp_path / "ck"),
                                         "checkpoint_clear": False})
    with monkeypatch.context() as patched:
        patched.setattr(state_module, "scale_by_torch_adam", shared_count_adam)
        Trainer(**{**settings, "n_epochs": 1}).fit(MultitaskClassifier([make_task("task1")]),
                                                    two_task_loaders[:1])
    model = MultitaskClassifier([make_task("task1")])
    with pytest.raises(CheckpointError, match=r"The optimizer state looks like one saved "
                       r"before Adam and Adamax kept a step count per module .*model.load\("):
        Trainer(**settings).fit(model, two_task_loaders[:1], resume_from=str(tmp_path / "ck"))
    model.load(str(tmp_path / "ck" / "checkpoints" / "0"))
    assert sorted(model.params) == ["linear1A", "linear2B"]


def test_trainer_save_load_continues_optimizer(two_task_loaders, tmp_path):
    model = MultitaskClassifier([make_task("task1")])
    trainer = Trainer(n_epochs=1, lr=0.01, seed=0, progress_bar=False, l2=0.001,
                      lr_scheduler="linear")
    trainer.fit(model, two_task_loaders[:1])
    trainer.save(str(tmp_path / "trainer"))
    restored = Trainer(lr=0.5)
    restored.load(str(tmp_path / "trainer"), model)
    assert restored.config.lr == 0.01 and restored.config.l2 == 0.001
    assert restored.config.optimizer_config.adam_config.betas == (0.9, 0.999)
    before = jax.tree.map(np.array, model.params)
    restored.fit(model, two_task_loaders[:1])
    # Adam's moments and bias-correction count continued (19 updates before the save, 19
    # after; a rebuilt optimizer would have counted 19) ...
    adam = [node for node in jax.tree.leaves(
        restored.state.opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByAdamState))
        if isinstance(node, optax.ScaleByAdamState)]
    assert [int(node.count) for node in adam] == [38, 38]  # one per module
    # ... while the fit's step count and its linear decay started again: continued, the
    # decay stayed at its end (lr 0) and the second fit trained nothing.
    schedules = [node for node in jax.tree.leaves(
        restored.state.opt_state, is_leaf=lambda n: isinstance(n, optax.ScaleByScheduleState))
        if isinstance(node, optax.ScaleByScheduleState)]
    assert [int(node.count) for node in schedules] == [19] and int(restored.state.step) == 19
    assert restored.metrics["model/all/train/lr"] == pytest.approx(0.01 * (1 - 19 / 19))
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(before), jax.tree.leaves(model.params), strict=True))
    assert moved > 1e-3
    # A model whose params do not fit: config only, a warning, and a fresh optimizer.
    other = MultitaskClassifier([make_task("task1", hidden=3)])
    other.init({"data": np.zeros((1, 2), np.float32)})
    fresh = Trainer()
    fresh.load(str(tmp_path / "trainer"), other)
    assert fresh.config.lr == 0.01 and fresh.loaded_optimizer is None
    with pytest.raises(ValueError, match="nothing to save"):
        Trainer().save(str(tmp_path / "x"))


# --- one run per directory: replacement, locks, refused saves --------------------------------

def test_fresh_checkpointer_replaces_an_earlier_run(model, tmp_path, caplog):
    first = Checkpointer(checkpoint_dir=str(tmp_path), checkpoint_metric=f"{METRIC}:max")
    for step in range(3):  # steps 0, 1, 2; best (0.9) at step 2
        first.checkpoint(step + 1, with_kernel(model, 5.0 + step), {METRIC: 0.7 + 0.1 * step})
    first.close()
    second = Checkpointer(checkpoint_dir=str(tmp_path), checkpoint_metric=f"{METRIC}:max")
    with caplog.at_level("INFO", logger="jaxmtl.training.checkpoint"):
        second.checkpoint(1, with_kernel(model, 1.0), {METRIC: 0.1})  # worse than run 1's
    assert "holds an earlier run's" in caplog.text
    second.wait_until_finished()
    assert os.listdir(tmp_path / "checkpoints") == ["0"]
    assert kernel(second.load_best_model(with_kernel(model, -1.0))) == 1.0  # not run 1's 7.0
    second.close()


def test_refused_save_is_an_error(model, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    checkpointer = Checkpointer(checkpoint_dir=str(tmp_path), checkpoint_metric=f"{METRIC}:max")
    monkeypatch.setattr(ocp.CheckpointManager, "save", lambda self, step, args=None: False)
    with pytest.raises(ValueError, match=r"checkpoints: Orbax declined to save checkpoint 0"):
        checkpointer.checkpoint(1, model, {METRIC: 1.0})
    monkeypatch.undo()
    checkpointer.close()


def write_lock(directory, pid, host=None, **extra):
    path = directory / ".jaxmtl-checkpoint.lock"
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), **extra}))
    return path


def test_checkpoint_dir_held_by_a_live_process_fails_fast(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        write_lock(tmp_path, sleeper.pid)
        with pytest.raises(DirectoryLockedError,
                           match=rf"checkpoint_dir {tmp_path} is in use by another run "
                                 rf"\(pid {sleeper.pid} on host {socket.gethostname()}"):
            Checkpointer(checkpoint_dir=str(tmp_path))
        # The same pid with another start time: the owner died and the pid was reused.
        write_lock(tmp_path, sleeper.pid, start=1)
        Checkpointer(checkpoint_dir=str(tmp_path)).close()
    finally:
        sleeper.kill()
        sleeper.wait()
    # A lock on another host cannot be checked: it holds.
    write_lock(tmp_path, 1, host="some-other-host")
    with pytest.raises(DirectoryLockedError, match="pid 1 on host some-other-host"):
        Checkpointer(checkpoint_dir=str(tmp_path))


def test_stale_lock_is_taken_over_and_released_on_close(tmp_path, caplog):
    finished = subprocess.Popen(["true"])
    finished.wait()  # its pid is dead now
    lock = write_lock(tmp_path, finished.pid)
    with caplog.at_level("WARNING", logger="jaxmtl.training.locks"):
        checkpointer = Checkpointer(checkpoint_dir=str(tmp_path))
    assert f"Taking over the stale lock {lock} of pid {finished.pid}" in caplog.text
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    checkpointer.close()
    assert not lock.exists()


def test_checkpoint_dir_is_the_same_on_every_process(tmp_path):
    config = {"log_dir": str(tmp_path), "run_name": None}
    # Process 1 has no log writer: the directory comes from the config and the agreed name.
    assert resolve_checkpoint_dir(None, True, config, "2026_01_01/10_00_00/") == \
        os.path.join(str(tmp_path), "2026_01_01/10_00_00/")
    assert resolve_checkpoint_dir(None, True, {"log_dir": "logs", "run_name": "r"}, "ignored") \
        == os.path.join("logs", "r")
    assert resolve_checkpoint_dir(None, False, config, None) == "checkpoints"
    assert resolve_checkpoint_dir("mine", True, config, "x") == "mine"
    with pytest.raises(ValueError, match=r"run_name must be a plain directory name.*'\.\./up'"):
        resolve_checkpoint_dir(None, True, {"run_name": "../up"}, None)
    assert agree_run_name("2026_01_01/10_00_00/") == "2026_01_01/10_00_00/"  # one process


def test_trainer_load_of_a_corrupt_optimizer_state_raises(model, tmp_path):
    config = TrainerConfig()
    tx = make_optimizer(config, lambda count: config.lr)
    state = SimpleNamespace(opt_state=tx.init(model.params), step=jnp.asarray(5, jnp.int32))
    save_optimizer_state(str(tmp_path / "trainer"), state, config)
    loaded = Trainer()
    loaded.load(str(tmp_path / "trainer"), model)
    assert int(loaded.loaded_optimizer["step"]) == 5
    for folder, _, files in os.walk(tmp_path / "trainer"):
        if "train" in os.path.relpath(folder, tmp_path / "trainer").split(os.sep):
            for name in files:
                path = os.path.join(folder, name)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 3)
    with pytest.raises(ValueError, match=r"trainer: cannot read checkpoint 1 \(corrupt"):
        Trainer().load(str(tmp_path / "trainer"), model)
    with pytest.raises(ValueError, match="not a jaxmtl trainer checkpoint"):
        Trainer().load(str(tmp_path / "missing"), model)
