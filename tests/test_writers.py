"""Log writers: JSON log/config files and TensorBoard event files read back from disk."""

import glob
import json
import os
import re
import socket
import subprocess
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import read_events
from tensorboardX.proto import event_pb2

from jaxmtl.training.config import LogWriterConfig, TrainerConfig
from jaxmtl.training.locks import DirectoryLockedError
from jaxmtl.training.writers import (
    LogWriter,
    MetricWriter,
    RunDirectoryWriter,
    TensorBoardWriter,
    make_log_writer,
)


def _scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    (path,) = glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    scalars: dict[str, list[tuple[int, float]]] = {}
    for event in read_events(path):
        for value in event.summary.value:
            if value.HasField("simple_value"):
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def _text(log_dir: str, tag: str) -> str:
    (path,) = glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    for event in read_events(path):
        for value in event.summary.value:
            if value.tag.startswith(tag) and value.HasField("tensor"):
                return value.tensor.string_val[0].decode()
    raise AssertionError(f"no text summary {tag!r}")


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


def test_log_writer(tmp_path) -> None:
    writer = LogWriter(log_dir=str(tmp_path), run_name="my_run")
    writer.add_scalar("my_value", value=0.5, step=2)
    writer.add_scalar("my_value", value=np.float32(0.25), step=4)
    writer.add_scalar("other", value=jnp.asarray(1.5), step=np.int64(4))
    writer.write_log("my_log.json")
    log = _read_json(tmp_path / "my_run" / "my_log.json")
    assert log == {"my_value": [[2, 0.5], [4, 0.25]], "other": [[4, 1.5]]}


def test_cleanup_writes_log_json(tmp_path) -> None:
    writer = LogWriter(config=LogWriterConfig(log_dir=str(tmp_path), run_name="r"))
    writer.add_scalar("a", 1.0, 1)
    writer.cleanup()
    assert _read_json(tmp_path / "r" / "log.json") == {"a": [[1, 1.0]]}


def test_write_text(tmp_path) -> None:
    writer = LogWriter(log_dir=str(tmp_path), run_name="my_run")
    writer.write_text("my log text", "my_text.txt")
    assert (tmp_path / "my_run" / "my_text.txt").read_text() == "my log text"


def test_write_config_dict(tmp_path) -> None:
    config = {"a": 8, "b": "my text"}
    writer = LogWriter(log_dir=str(tmp_path), run_name="my_run")
    writer.write_config(config)
    assert _read_json(tmp_path / "my_run" / "config.json") == config


@dataclass(frozen=True)
class _Inner:
    pair: tuple[int, int] = (1, 2)
    array: object = None


@dataclass(frozen=True)
class _Outer:
    inner: _Inner
    name: str = "x"


def test_write_config_dataclasses_and_optax(tmp_path) -> None:
    writer = LogWriter(log_dir=str(tmp_path), run_name="r")
    writer.write_config(_Outer(_Inner(array=np.arange(3))), "nested.json")
    assert _read_json(tmp_path / "r" / "nested.json") == {
        "inner": {"pair": [1, 2], "array": [0, 1, 2]}, "name": "x"}

    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1))
    config = TrainerConfig(optimizer=optimizer, lr_scheduler_config={"warmup_steps": 2})
    writer.write_config(config)
    written = _read_json(tmp_path / "r" / "config.json")
    assert written["optimizer"] == repr(optimizer)
    assert written["lr_scheduler_config"]["warmup_steps"] == 2
    assert written["optimizer_config"]["adam_config"]["betas"] == [0.9, 0.999]
    assert written["checkpointer_config"]["checkpoint_dir"] == "checkpoints"


def test_default_run_name_is_timestamp(tmp_path) -> None:
    writer = LogWriter(log_dir=str(tmp_path))
    date, time, rest = writer.run_name.split("/")
    assert (len(date), len(time), rest) == (10, 8, "")
    assert os.path.isdir(writer.log_dir)
    assert writer.log_dir.startswith(str(tmp_path))


def test_context_manager_writes_log_on_error(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with LogWriter(log_dir=str(tmp_path), run_name="r") as writer:
            writer.add_scalar("loss", 0.5, 3)
            raise RuntimeError("boom")
    assert _read_json(tmp_path / "r" / "log.json") == {"loss": [[3, 0.5]]}


def test_tensorboard_writer(tmp_path) -> None:
    config = {"a": 8, "b": "my text"}
    writer = TensorBoardWriter(run_name="my_run", log_dir=str(tmp_path))
    writer.add_scalar("my_value", value=0.5, step=2)
    writer.add_scalar("my_value", value=jnp.float32(0.25), step=4.0)
    writer.add_scalar("model/all/train/lr", value=np.float64(1e-3), step=4)
    writer.write_config(config)
    writer.cleanup()
    writer.cleanup()  # closing twice is harmless

    run_dir = str(tmp_path / "my_run")
    assert _read_json(os.path.join(run_dir, "config.json")) == config
    scalars = _scalars(run_dir)
    assert scalars["my_value"] == [(2, 0.5), (4, 0.25)]
    ((step, lr),) = scalars["model/all/train/lr"]
    assert step == 4
    np.testing.assert_allclose(lr, 1e-3, rtol=1e-6)  # simple_value is float32
    assert json.loads(_text(run_dir, "config")) == config
    assert not os.path.exists(os.path.join(run_dir, "log.json"))


def test_both_writers_are_metric_writers_and_siblings(tmp_path) -> None:
    step_scalars = {"model/all/train/loss": np.float32(0.5), "model/all/train/lr": 0.25}
    json_writer = LogWriter(run_name="json", log_dir=str(tmp_path))
    tb_writer = TensorBoardWriter(run_name="tb", log_dir=str(tmp_path))
    for writer in (json_writer, tb_writer):
        assert isinstance(writer, MetricWriter) and isinstance(writer, RunDirectoryWriter)
        writer.write_scalars(4, step_scalars)
        writer.write_scalars(8, {"model/all/train/loss": 0.125})
        writer.flush()
        writer.close()
    assert not isinstance(tb_writer, LogWriter)  # siblings: no JSON log behind TensorBoard
    assert not isinstance(object(), MetricWriter)
    expected = {"model/all/train/loss": [[4, 0.5], [8, 0.125]], "model/all/train/lr": [[4, 0.25]]}
    assert _read_json(str(tmp_path / "json" / "log.json")) == expected
    assert {name: [list(point) for point in points]
            for name, points in _scalars(str(tmp_path / "tb")).items()} == expected
    assert not os.path.exists(tmp_path / "tb" / "log.json")


def test_tensorboard_context_manager_flushes_on_error(tmp_path) -> None:
    with pytest.raises(RuntimeError):
        with TensorBoardWriter(log_dir=str(tmp_path), run_name="r") as writer:
            writer.add_scalar("loss", 2.0, 7)
            raise RuntimeError("boom")
    assert _scalars(str(tmp_path / "r")) == {"loss": [(7, 2.0)]}


def test_tensorboard_rejects_fractional_step(tmp_path) -> None:
    with TensorBoardWriter(log_dir=str(tmp_path), run_name="r") as writer:
        with pytest.raises(ValueError, match="step must be an integer"):
            writer.add_scalar("loss", 1.0, 0.5)


def test_make_log_writer(tmp_path) -> None:
    config = {"log_dir": str(tmp_path), "run_name": "r"}
    json_writer = make_log_writer("json", config)
    assert type(json_writer) is LogWriter
    tb_writer = make_log_writer("tensorboard", LogWriterConfig(**config))
    assert isinstance(tb_writer, TensorBoardWriter)
    tb_writer.cleanup()
    with pytest.raises(ValueError, match="Unrecognized writer option 'foo'"):
        make_log_writer("foo", config)


# --- atomic writes (jaxmtl._io.atomic_write) -----------------------------------------------
def test_write_json_failure_leaves_old_file_and_no_temp_file(tmp_path) -> None:
    writer = LogWriter(log_dir=str(tmp_path), run_name="run")
    writer.write_json({"a": [1, 2]}, "log.json")
    with pytest.raises(TypeError, match="not JSON serializable"):
        # json.dump writes '{"a": ' before it meets the set: a torn file if not atomic.
        writer.write_json({"a": {1, 2}}, "log.json")
    assert [n for n in os.listdir(writer.log_dir) if not n.endswith(".lock")] == ["log.json"]
    with open(os.path.join(writer.log_dir, "log.json")) as f:
        assert json.load(f) == {"a": [1, 2]}


def test_concurrent_write_json_to_one_path_leaves_a_whole_file(tmp_path) -> None:
    import threading

    writer = LogWriter(log_dir=str(tmp_path), run_name="run")
    objects = [{"writer": k, "values": list(range(20_000))} for k in range(2)]
    errors: list[BaseException] = []

    def write_many(obj) -> None:
        try:
            for _ in range(20):
                writer.write_json(obj, "log.json")
        except BaseException as error:  # a shared temp file: FileNotFoundError on replace
            errors.append(error)

    threads = [threading.Thread(target=write_many, args=(obj,)) for obj in objects]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [n for n in os.listdir(writer.log_dir) if not n.endswith(".lock")] == ["log.json"]
    with open(os.path.join(writer.log_dir, "log.json")) as f:
        assert json.load(f) in objects


def test_atomic_write_bytes_text_and_mode(tmp_path) -> None:
    from jaxmtl._io import atomic_write

    path = tmp_path / "sub" / "f.bin"
    atomic_write(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    os.chmod(path, 0o640)
    atomic_write(path, "héllo")  # text: UTF-8; the replaced file's mode is kept
    assert path.read_text(encoding="utf-8") == "héllo"
    assert os.stat(path).st_mode & 0o777 == 0o640
    atomic_write(tmp_path / "new.txt", "x")
    assert os.stat(tmp_path / "new.txt").st_mode & 0o777 == 0o644

@pytest.mark.parametrize("run_name", ["../escape", "/abs/run", "a/b", "..", ".", ""])
@pytest.mark.parametrize("writer_class", [LogWriter, TensorBoardWriter])
def test_run_name_must_be_one_directory_name(tmp_path, run_name, writer_class) -> None:
    message = rf"run_name must be a plain directory name .* got '{re.escape(run_name)}'"
    with pytest.raises(ValueError, match=message):
        writer_class(log_dir=str(tmp_path / "logs"), run_name=run_name)
    with pytest.raises(ValueError, match=message):
        make_log_writer("json", {"log_dir": str(tmp_path / "logs"), "run_name": run_name})
    assert not os.path.exists(tmp_path / "abs") and not os.path.exists(tmp_path / "escape")


def test_continue_log_keeps_points_up_to_the_checkpoint(tmp_path) -> None:
    first = LogWriter(log_dir=str(tmp_path), run_name="first")
    for step in (10, 20, 30):
        first.add_scalar("loss", step / 100, step)
    first.add_scalar("late_only", 1.0, 30)
    first.cleanup()
    for run_name in ("first", "second"):  # the same run directory, or another one
        writer = LogWriter(log_dir=str(tmp_path), run_name=run_name)
        writer.continue_log(str(tmp_path / "first"), up_to_step=20)
        assert dict(writer.run_log) == {"loss": [[10, 0.1], [20, 0.2]]}
        writer.add_scalar("loss", 0.35, 30)
        writer.cleanup()
        assert _read_json(tmp_path / run_name / "log.json") == {
            "loss": [[10, 0.1], [20, 0.2], [30, 0.35]]}
    fresh = LogWriter(log_dir=str(tmp_path), run_name="third")
    fresh.add_scalar("x", 1.0, 1)
    fresh.continue_log(None, 5)  # the resumed run had no log
    assert dict(fresh.run_log) == {}
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "log.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"bad/log.json: not a jaxmtl JSON log"):
        fresh.continue_log(str(tmp_path / "bad"), 5)
    fresh.cleanup()


def test_tensorboard_continue_log_purges_points_after_the_checkpoint(tmp_path) -> None:
    with TensorBoardWriter(log_dir=str(tmp_path), run_name="first") as first:
        for step in (10, 20, 30):
            first.add_scalar("loss", step / 100, step)
    with TensorBoardWriter(log_dir=str(tmp_path), run_name="second") as second:
        second.continue_log(str(tmp_path / "first"), up_to_step=20)
        second.add_scalar("loss", 0.35, 30)
    files = sorted(glob.glob(str(tmp_path / "second" / "events.out.tfevents.*")))
    assert len(files) == 2  # the copy of the first run's and the new one
    events = [event for path in files for event in read_events(path)]
    scalars = [(e.step, round(v.simple_value, 6)) for e in events for v in e.summary.value]
    assert sorted(scalars) == [(10, 0.1), (20, 0.2), (30, 0.3), (30, 0.35)]
    # TensorBoard hides the old points at steps >= 21 when it reads the START at step 21.
    starts = [e.step for e in events if e.HasField("session_log")
              and e.session_log.status == event_pb2.SessionLog.START]
    assert starts == [21]


def test_a_new_run_replaces_an_earlier_runs_event_files_and_a_resumed_one_keeps_them(
        tmp_path) -> None:
    # TensorBoard shows every event file of a directory as one run: two runs' curves
    # overlaid, had the second run of a run_name kept the first's files.
    with TensorBoardWriter(log_dir=str(tmp_path), run_name="r") as first:
        first.add_scalar("loss", 0.9, 10)
    with TensorBoardWriter(log_dir=str(tmp_path), run_name="r") as second:
        assert len(glob.glob(str(tmp_path / "r" / "events.out.tfevents.*"))) == 2
        second.write_config({"seed": 1})  # its first write: the first run's file goes
        second.add_scalar("loss", 0.5, 10)
    files = glob.glob(str(tmp_path / "r" / "events.out.tfevents.*"))
    assert len(files) == 1
    assert _scalars(str(tmp_path / "r"))["loss"] == [(10, 0.5)]
    with TensorBoardWriter(log_dir=str(tmp_path), run_name="r") as resumed:
        resumed.continue_log(str(tmp_path / "r"), up_to_step=10)
        resumed.add_scalar("loss", 0.4, 20)
    files = sorted(glob.glob(str(tmp_path / "r" / "events.out.tfevents.*")))
    assert len(files) == 2  # the second run's, continued by the resumed one's
    scalars = [(e.step, round(v.simple_value, 6)) for path in files
               for e in read_events(path) for v in e.summary.value if v.tag == "loss"]
    assert sorted(scalars) == [(10, 0.5), (20, 0.4)]


def test_log_dir_held_by_a_live_process_fails_fast(tmp_path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "r").mkdir()
        (tmp_path / "r" / ".jaxmtl-log.lock").write_text(
            json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(DirectoryLockedError,
                           match=rf"log directory {tmp_path}/r is in use by another run "
                                 rf"\(pid {sleeper.pid} on host"):
            LogWriter(log_dir=str(tmp_path), run_name="r")
    finally:
        sleeper.kill()
        sleeper.wait()
    writer = LogWriter(log_dir=str(tmp_path), run_name="r")  # now stale: taken over
    writer.cleanup()
    assert not (tmp_path / "r" / ".jaxmtl-log.lock").exists()
