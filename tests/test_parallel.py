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


def load_run(out):
    return dict(np.load(str(out) + ".npz")), json.loads(Path(str(out) + ".json").read_text())


def run(tmp_path, n_devices, parallel):
    """One subprocess with ``n_devices`` CPU devices; ``parallel`` may list several modes
    ("single,auto"), run one after the other in that process: {mode: (arrays, scores)}."""
    out = tmp_path / f"{parallel.replace(',', '+')}_{n_devices}"
    result = subprocess.run([sys.executable, str(SCRIPT), str(n_devices), parallel, str(out)],
                            cwd=SCRIPT.parent, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    modes = parallel.split(",")
    if len(modes) == 1:
        return {parallel: load_run(out)}
    return {mode: load_run(f"{out}_{mode}") for mode in modes}


@pytest.fixture(scope="module")
def two_device_runs(tmp_path_factory):
    """The one-device reference and the 2-device "auto" (pmap) run, in ONE 2-device
    process: "single" trains on the first device only, as a 1-device process does."""
    return run(tmp_path_factory.mktemp("two"), 2, "single,auto")


@pytest.fixture(scope="module")
def reference(two_device_runs):
    return two_device_runs["single"]


def assert_same_run(got, expected):
    arrays, scores = got
    want_arrays, want_scores = expected
    assert sorted(arrays) == sorted(want_arrays)
    for name in want_arrays:
        np.testing.assert_allclose(arrays[name], want_arrays[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    assert scores == pytest.approx(want_scores)


# The default run keeps one multi-device equality test (pmap, 2 devices); the sharded mode
# is checked against one device by the layers_run tests below. The rest: -m slow.
def test_pmap_on_2_devices_matches_single_device(two_device_runs, reference):
    assert_same_run(two_device_runs["auto"], reference)
    # trainer.compiled_programs() under pmap (it raised AttributeError: pmap's function
    # has no _cache_size): the same count as one device's jit.
    assert int(two_device_runs["auto"][0]["programs"]) == int(reference[0]["programs"]) >= 1


@pytest.mark.slow
def test_pmap_on_4_devices_matches_single_device(tmp_path, reference):
    assert_same_run(run(tmp_path, 4, "auto")["auto"], reference)


@pytest.mark.slow
def test_one_device_process_matches_the_reference(tmp_path, reference):
    """The reference ("single" in a 2-device process) = a 1-device process's run."""
    assert_same_run(run(tmp_path, 1, "single")["single"], reference)


@pytest.mark.slow
def test_sharded_matches_single_device(tmp_path, reference):
    assert_same_run(run(tmp_path, 4, "sharded")["sharded"], reference)


@pytest.mark.slow
def test_pmap_on_8_devices_matches_single_device(tmp_path, reference):
    assert_same_run(run(tmp_path, 8, "pmap")["pmap"], reference)


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
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
    assert_same_run(load_run(out), reference)
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
    # Without a fill, the batch's own rows repeat (as DictDataLoader pads its last batch).
    padded = pad_rows({"x": np.array([[1.0, 2.0], [3.0, 4.0]])}, 5)
    np.testing.assert_array_equal(padded["x"], [[1, 2], [3, 4], [1, 2], [3, 4], [1, 2]])
    with pytest.raises(ValueError, match="pad_rows: 'x' has 3 rows, more than the size 2"):
        pad_rows({"x": np.zeros(3)}, 2)


def test_fused_mode_runs_on_one_device_only():
    import jax

    from jaxmtl.parallel import DataParallel
    from jaxmtl.training.runners import FusedRunner

    two = DataParallel("pmap", (jax.devices()[0], jax.devices()[0]))
    with pytest.raises(ValueError, match="steps_per_call=8 runs on one device; got parallel "
                                         "mode 'pmap' over 2 devices"):
        FusedRunner(None, two, None, [], steps_per_call=8)


# 282 steps with no host sync in between (far more than the CPU's pool threads): XLA:CPU
# collectives of queued steps used to hold every pool thread and time out in the all-reduce
# rendezvous. Each mode in its own 4-device process: -m slow (~10-20 s each on 2 cores).
QUEUED_STEPS = """
body = nn.Sequential([nn.Dense(256), nn.relu, nn.Dense(256), nn.relu])
loaders, tasks = [], []
for task, seed in [("a", 0), ("b", 1)]:
    X, Y = linear_data(3_000, seed, dim=128)
    ds = jaxmtl.DictDataset(task, "train", {"x": X}, {task: Y})
    loaders.append(jaxmtl.DictDataLoader(ds, batch_size=64, shuffle=True, seed=seed))
    tasks.append(jaxmtl.Task(task, {"body": body, "head_" + task: nn.Dense(2)},
                             [jaxmtl.Operation("body", [("_input_", "x")]),
                              jaxmtl.Operation("head_" + task, ["body"])]))
trainer = jaxmtl.Trainer(n_epochs=3, lr=1e-3, progress_bar=False, seed=0, parallel="{mode}")
trainer.fit(jaxmtl.MultitaskClassifier(tasks), loaders)
"""

LONG_RUN = """
import os
os.environ["XLA_FLAGS"] = os.environ.get("JAXMTL_TEST_FAST_COMPILE_FLAG", "") + " --xla_force_host_platform_device_count=4"
import flax.linen as nn, numpy as np, jaxmtl
from conftest import linear_data
""" + QUEUED_STEPS + """
print(int(trainer.state.step))
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["pmap", "sharded"])
def test_many_queued_steps_on_cpu_devices_do_not_deadlock(mode):
    result = subprocess.run([sys.executable, "-c", LONG_RUN.replace("{mode}", mode)],
                            cwd=SCRIPT.parent, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "282"


LAYERS_RUN = """
import json, os
os.environ["XLA_FLAGS"] = os.environ.get("JAXMTL_TEST_FAST_COMPILE_FLAG", "") + " --xla_force_host_platform_device_count=4"
import flax.linen as nn, jax, numpy as np, jaxmtl
from conftest import linear_data
from jaxmtl.parallel import choose_parallel

class Body(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Dense(8)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.5)(x))
        return nn.Dropout(0.3, deterministic=not train)(x)

def fit(parallel, batch_size=30, **config):
    loaders, tasks = [], []
    for task, seed in [("a", 0), ("b", 1)]:
        X, Y = linear_data(60, seed, dim=4)
        ds = jaxmtl.DictDataset(task, "train", {"x": X + 2.0}, {task: Y})
        loaders.append(jaxmtl.DictDataLoader(ds, batch_size=batch_size, shuffle=True,
                                           seed=seed))
        tasks.append(jaxmtl.Task(task, {"body": Body(), "head_" + task: nn.Dense(2)},
                                 [jaxmtl.Operation("body", [("_input_", "x")]),
                                  jaxmtl.Operation("head_" + task, ["body"])]))
    model = jaxmtl.MultitaskClassifier(tasks)
    jaxmtl.Trainer(n_epochs=2, lr=0.05, optimizer="sgd", seed=0, progress_bar=False,
                   parallel=parallel, **config).fit(model, loaders)
    return jax.tree.map(np.asarray, model.variables)

def max_diff(got, want):
    return max(float(np.max(np.abs(a - b))) for a, b in
               zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))

out = {}
# Global batch 30 on 4 devices: 30 rows do not divide by 4.
out["batchnorm_sharded_30"] = max_diff(fit("sharded"), fit("single"))
upper_bound = {"balancer": "mgda", "balancer_config": {"upper_bound": True},
               "batch_scheduler": "mixed"}
for mode in ("auto", "pmap"):
    try:
        jaxmtl.Trainer(parallel=mode, **upper_bound)
        out["mgda_ub_" + mode] = None
    except ValueError as error:
        out["mgda_ub_" + mode] = str(error)
# Batch 32 divides by 4: sharded for real, not computed replicated.
out["mgda_ub_sharded"] = max_diff(fit("sharded", 32, **upper_bound),
                                  fit("single", 32, **upper_bound))

X = {"x": np.arange(60, dtype=np.float32).reshape(30, 2)}
Y = {"a": np.ones(30, np.int64)}
x, y, mask = choose_parallel("pmap").put_batch(X, Y, np.ones(30, bool))
out["pmap_x"] = np.asarray(x["x"]).reshape(-1, 2).tolist()
out["pmap_y"] = np.asarray(y["a"]).reshape(-1).tolist()
out["pmap_mask"] = np.asarray(mask).reshape(-1).tolist()
x, _, _ = choose_parallel("sharded").put_batch(X, Y, np.ones(30, bool))
out["sharded_30_shape"] = list(x["x"].shape)
out["sharded_30_replicated"] = x["x"].sharding.is_fully_replicated
x, _, _ = choose_parallel("sharded").put_batch({"x": np.zeros((32, 2), np.float32)},
                                               {"a": np.ones(32, np.int64)}, np.ones(32, bool))
out["sharded_32_shards"] = [list(shard.data.shape) for shard in x["x"].addressable_shards]
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def layers_run():
    """One 4-device subprocess: BatchNorm + dropout and MGDA-UB runs, put_batch's padding."""
    result = subprocess.run([sys.executable, "-c", LAYERS_RUN], cwd=SCRIPT.parent,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_sharded_batchnorm_with_indivisible_batch_matches_single_device(layers_run):
    # Padded zero rows used to enter the batch statistics (0.64 off here, inputs around 2)
    # and changed the dropout masks' shape; the sharded mode now computes a batch that
    # does not divide replicated: observed difference 0.0.
    assert layers_run["batchnorm_sharded_30"] <= 1e-5
    assert layers_run["sharded_30_shape"] == [30, 2] and layers_run["sharded_30_replicated"]
    assert layers_run["sharded_32_shards"] == [[8, 2]] * 4  # a divisible batch is split


def test_pmap_pads_with_repeats_of_real_rows(layers_run):
    # 30 rows on 4 devices: 2 padded rows, copies of rows 0 and 1 (never zero rows, which
    # would enter the last device's BatchNorm statistics), masked and unlabelled.
    rows = np.arange(60, dtype=np.float32).reshape(30, 2)
    np.testing.assert_array_equal(layers_run["pmap_x"], np.concatenate([rows, rows[:2]]))
    assert layers_run["pmap_y"] == [1] * 30 + [-1, -1]
    assert layers_run["pmap_mask"] == [True] * 30 + [False, False]


def test_mgda_upper_bound_is_refused_under_pmap_at_construction(layers_run):
    for mode in ("auto", "pmap"):
        assert layers_run["mgda_ub_" + mode] == (
            "balancer='mgda' with balancer_config upper_bound=True (MGDA-UB) does not run "
            f"under pmap, which parallel='{mode}' selects over 4 devices; use "
            "parallel='sharded' (same result as one device) or parallel='single'")


def test_mgda_upper_bound_runs_sharded_as_on_one_device(layers_run):
    # Batch 32 split over 4 devices, with BatchNorm and dropout in the body: statistics
    # over the global batch, dropout masks drawn for the global batch from one key
    # (partitionable threefry), as on one device. Observed: 9.8e-7 (max abs).
    assert layers_run["mgda_ub_sharded"] <= 1e-5


class _Device:
    """Stands in for a jax Device: the check reads only ``process_index``."""

    def __init__(self, process_index):
        self.process_index = process_index


def test_mgda_upper_bound_check_on_fake_devices():
    from jaxmtl.parallel import check_balancer_parallel

    two = [_Device(0), _Device(0)]
    check_balancer_parallel("mgda", {}, "pmap", two)  # plain MGDA runs under pmap
    check_balancer_parallel("mgda", {"upper_bound": True}, "sharded", two)
    check_balancer_parallel("mgda", {"upper_bound": True}, "single", two)
    check_balancer_parallel("mgda", {"upper_bound": True}, "auto", two[:1])  # one device
    with pytest.raises(ValueError, match="parallel='auto' selects over 2 devices; use "
                                         "parallel='sharded'"):
        check_balancer_parallel("mgda", {"upper_bound": True}, "auto", two)


def test_mgda_upper_bound_is_refused_across_processes():
    from jaxmtl.parallel import check_balancer_parallel
    from jaxmtl.training.balancers import make_balancer

    devices = [_Device(0), _Device(1)]
    with pytest.raises(ValueError, match=r"^a balancer with representation_grads=True "
                                         r"\(MGDA-UB\) does not run across 2 processes"):
        check_balancer_parallel(make_balancer("mgda", upper_bound=True), {},
                                "auto", devices)


def test_initialize_multihost_forwards_timeouts(monkeypatch):
    import jax

    import jaxmtl.parallel

    calls = []

    def initialize(coordinator_address=None, num_processes=None, process_id=None,
                   local_device_ids=None, initialization_timeout=300,
                   heartbeat_timeout_seconds=100):  # a JAX without shutdown_timeout_seconds
        calls.append({"coordinator_address": coordinator_address,
                      "num_processes": num_processes, "process_id": process_id,
                      "local_device_ids": local_device_ids,
                      "initialization_timeout": initialization_timeout,
                      "heartbeat_timeout_seconds": heartbeat_timeout_seconds})

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    monkeypatch.setattr(jax.config, "update", lambda *args: calls.append(args))
    jaxmtl.parallel.initialize_multihost("127.0.0.1:1234", 2, 1, heartbeat_timeout_seconds=10,
                                         initialization_timeout=60)
    assert calls == [
        ("jax_cpu_collectives_implementation", "gloo"),
        {"coordinator_address": "127.0.0.1:1234", "num_processes": 2, "process_id": 1,
         "local_device_ids": None, "heartbeat_timeout_seconds": 10,
         "initialization_timeout": 60},
    ]
    calls.clear()  # unset timeouts keep JAX's defaults
    jaxmtl.parallel.initialize_multihost("127.0.0.1:1234", 2, 0)
    assert calls[1]["heartbeat_timeout_seconds"] == 100
    calls.clear()  # one the installed JAX does not take: refused before anything runs
    with pytest.raises(ValueError, match=r"^initialize_multihost: shutdown_timeout_seconds=5 "
                                         r"is not supported by jax.distributed.initialize in "
                                         r"JAX \S+; it takes \['coordinator_address', "):
        jaxmtl.parallel.initialize_multihost("127.0.0.1:1234", 2, 0, shutdown_timeout_seconds=5)
    assert calls == []


def test_installed_jax_takes_every_timeout():
    import inspect

    import jax

    from jaxmtl.parallel import DISTRIBUTED_TIMEOUTS

    assert set(DISTRIBUTED_TIMEOUTS) <= set(inspect.signature(jax.distributed.initialize)
                                            .parameters)


def test_initialize_multihost_refuses_bad_or_unsupported_timeouts():
    from jaxmtl.parallel import distributed_arguments

    with pytest.raises(ValueError, match=r"heartbeat_timeout_seconds=0; expected a positive "
                                         r"int \(seconds\)"):
        distributed_arguments("h:1", 2, 0, heartbeat_timeout_seconds=0)
    with pytest.raises(ValueError, match=r"shutdown_timeout_seconds=5 is not supported by "
                                         r"jax.distributed.initialize in JAX .*; it takes "
                                         r"\['num_processes'\]"):
        distributed_arguments("h:1", 2, 0, accepted=["num_processes"],
                              shutdown_timeout_seconds=5)
    with pytest.raises(ValueError, match="unknown timeout 'heartbeat'"):
        distributed_arguments("h:1", 2, 0, heartbeat=5)
