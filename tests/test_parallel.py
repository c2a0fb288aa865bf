"""Same results on 1, 2, 4 and 8 devices (forced CPU devices, one subprocess each)."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxmtl.parallel import choose_parallel, pad_rows

SCRIPT = Path(__file__).with_name("multidevice_run.py")


def run(tmp_path, n_devices, parallel):
    out = tmp_path / f"{parallel}_{n_devices}"
    result = subprocess.run([sys.executable, str(SCRIPT), str(n_devices), parallel, str(out)],
                            cwd=SCRIPT.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(str(out) + ".npz")), json.loads(Path(str(out) + ".json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(tmp_path_factory.mktemp("single"), 1, "single")


def assert_same_run(got, expected):
    arrays, scores = got
    want_arrays, want_scores = expected
    assert sorted(arrays) == sorted(want_arrays)
    for name in want_arrays:
        np.testing.assert_allclose(arrays[name], want_arrays[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert scores == pytest.approx(want_scores)


@pytest.mark.parametrize("n_devices", [2, 4])
def test_pmap_matches_single_device(tmp_path, reference, n_devices):
    assert_same_run(run(tmp_path, n_devices, "auto"), reference)


def test_sharded_matches_single_device(tmp_path, reference):
    assert_same_run(run(tmp_path, 4, "sharded"), reference)


@pytest.mark.slow
def test_pmap_on_8_devices_matches_single_device(tmp_path, reference):
    assert_same_run(run(tmp_path, 8, "pmap"), reference)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_match_single_process(tmp_path, reference):
    """Two JAX processes (2 devices each, CPU collectives over localhost) = one process."""
    out, port = tmp_path / "multi", free_port()
    processes = [
        subprocess.Popen([sys.executable, str(SCRIPT), "2", "pmap", str(out), str(pid), "2",
                          str(port)], cwd=SCRIPT.parent, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for pid in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
    got = dict(np.load(str(out) + ".npz")), json.loads(Path(str(out) + ".json").read_text())
    assert_same_run(got, reference)
    # Checkpoints were written once, by process 0.
    assert sorted(p.name for p in Path(str(out) + "_checkpoints").iterdir()) == [
        "best_model_model_all_train_loss"]


def test_reference_run_is_nontrivial(reference):
    arrays, scores = reference
    assert len(arrays["losses"]) == 3 * 10 // 2 and arrays["losses"][-1] < arrays["losses"][0]
    assert int(arrays["count"]) == 90 and arrays["probs"].shape == (90, 2)
    assert scores["task1/d_task1/valid/accuracy"] > 0.8


def test_choose_parallel_and_padding():
    assert choose_parallel("auto").mode == "single"  # one CPU device in this process
    assert choose_parallel("pmap", dataparallel=False).mode == "single"
    with pytest.raises(ValueError, match="Unrecognized parallel mode 'gpu'"):
        choose_parallel("gpu")
    padded = pad_rows({"y": np.array([1, 2, 3])}, 4, -1)
    np.testing.assert_array_equal(padded["y"], [1, 2, 3, -1])


def test_fused_mode_runs_on_one_device_only():
    import jax

    from jaxmtl.parallel import DataParallel
    from jaxmtl.training.runners import FusedRunner

    two = DataParallel("pmap", (jax.devices()[0], jax.devices()[0]))
    with pytest.raises(ValueError, match="steps_per_call=8 runs on one device; got parallel "
                                         "mode 'pmap' over 2 devices"):
        FusedRunner(None, two, None, None, [], steps_per_call=8)


LONG_RUN = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import flax.linen as nn, numpy as np, jaxmtl
from conftest import linear_data
body = nn.Sequential([nn.Dense(256), nn.relu, nn.Dense(256), nn.relu])
loaders, tasks = [], []
for task, seed in [("a", 0), ("b", 1)]:
    X, Y = linear_data(10_000, seed, dim=128)
    ds = jaxmtl.DictDataset(task, "train", {"x": X}, {task: Y})
    loaders.append(jaxmtl.DictDataLoader(ds, batch_size=64, shuffle=True, seed=seed))
    tasks.append(jaxmtl.Task(task, {"body": body, "head_" + task: nn.Dense(2)},
                             [jaxmtl.Operation("body", [("_input_", "x")]),
                              jaxmtl.Operation("head_" + task, ["body"])]))
trainer = jaxmtl.Trainer(n_epochs=3, lr=1e-3, progress_bar=False, seed=0, parallel="{mode}")
trainer.fit(jaxmtl.MultitaskClassifier(tasks), loaders)
print(int(trainer.state.step))
"""


@pytest.mark.parametrize("mode", ["pmap", "sharded"])
def test_many_queued_steps_on_cpu_devices_do_not_deadlock(mode):
    # 942 steps with no host sync in between: XLA:CPU collectives of queued steps used to
    # hold every pool thread and time out in the all-reduce rendezvous.
    result = subprocess.run([sys.executable, "-c", LONG_RUN.replace("{mode}", mode)],
                            cwd=SCRIPT.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "942"
