"""Shared fixtures: small synthetic data and task builders (compiles are the cost)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile

# jaxmtl's own cache switch stays off (each Trainer would otherwise turn JAX's persistent
# compilation cache on in ~/.cache); test_compilation_cache.py turns it on in a temporary
# directory where it tests it.
os.environ["JAXMTL_COMPILATION_CACHE"] = "0"

import flax.linen as nn
import jax
import numpy as np
import pytest
from hypothesis import settings

import jaxmtl

# XLA:CPU's fusion emitters (the MLIR code generator for fused loops) are most of a small
# program's compile time: with the legacy emitters the suite's ~2,600 compiles take about
# half as long (tests/test_balancers.py: 59 s -> 29 s), and its programs run for
# milliseconds, so their slower code (one core per fused loop) costs nothing. Same HLO,
# same ops; only the machine code differs, which comparisons allow for as for
# JAX_DISABLE_MOST_OPTIMIZATIONS below. Not a library setting: a user's steady steps
# would pay for it (README "Start-up"). Newer XLA builds no longer have the flag and
# abort on an unknown one, so the controller asks a short child process once; the
# workers and subprocess tests inherit the answer through the environment.
FAST_COMPILE_FLAG = "--xla_cpu_use_fusion_emitters=false"
_FAST_COMPILE_VAR = "JAXMTL_TEST_FAST_COMPILE_FLAG"


def _xla_accepts(flag: str) -> bool:
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip(),
               JAX_PLATFORMS="cpu")
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                           capture_output=True, timeout=120)
    return probe.returncode == 0


if _FAST_COMPILE_VAR not in os.environ:
    os.environ[_FAST_COMPILE_VAR] = FAST_COMPILE_FLAG if _xla_accepts(FAST_COMPILE_FLAG) else ""


#: Whether this run compiles with the legacy emitters: two *different* programs that
#: compute the same values (e.g. a step with and without extra outputs) may then round
#: differently in the last bit, so a bit-identity test between them allows float noise
#: (the newest-versions CI leg, without the flag, checks the bits).
LEGACY_CPU_EMITTERS = bool(os.environ[_FAST_COMPILE_VAR])


def xla_flags(n_devices: int | None = None) -> str:
    """``XLA_FLAGS`` for a test's child process: the suite's compile flag, and
    ``n_devices`` forced host devices if given."""
    flags = [os.environ[_FAST_COMPILE_VAR]]
    if n_devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={n_devices}")
    return " ".join(flag for flag in flags if flag)


if os.environ[_FAST_COMPILE_VAR] and \
        os.environ[_FAST_COMPILE_VAR] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags()}".strip()

# Property tests draw the same examples on every run (a CI run must not fail on a new
# random draw) and have no per-example deadline (compiles make timings noisy).
settings.register_profile("jaxmtl", derandomize=True, deadline=None)
settings.load_profile("jaxmtl")


# XLA compiles are most of the suite's time, and many tests build the same programs (the
# same small model and step). The run shares one persistent cache in a fresh directory,
# never the user's: the xdist controller (or the single process) makes it, the workers and
# subprocess tests inherit it through the environment, and it is removed at the end. A
# program loaded from it is the program a compile would give (JAX keys it by the HLO, the
# compile options and the devices); `count_compiles` counts loads too.
_SHARED_CACHE_VAR = "JAXMTL_TEST_XLA_CACHE"
_owned_cache_dir: str | None = None

# The tests' programs are tiny and run for milliseconds, so XLA's optimisation (LLVM -O2
# on CPU) costs far more than it saves: JAX's own switch for that case,
# JAX_DISABLE_MOST_OPTIMIZATIONS (backend optimisation level 0, no expensive LLVM passes),
# is on for the run, its workers and subprocess tests (e.g. a CGC module's init: 0.7 s to
# compile instead of 4.4 s). Results are computed by the same HLO programs; float sums may
# round differently from an optimised build, which every comparison's tolerance (or
# bit-identity between two runs of the same build) allows for. Run with
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 to test the optimised build; test_compilation_cache.py
# removes the switch where it measures real compile times.
_NO_OPTIMIZATION_VAR = "JAX_DISABLE_MOST_OPTIMIZATIONS"


def pytest_configure(config):
    global _owned_cache_dir
    if _SHARED_CACHE_VAR not in os.environ:
        _owned_cache_dir = tempfile.mkdtemp(prefix="jaxmtl-test-xla-")
        os.environ[_SHARED_CACHE_VAR] = _owned_cache_dir
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_SHARED_CACHE_VAR]
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    jax.config.update("jax_compilation_cache_dir", os.environ[_SHARED_CACHE_VAR])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    os.environ.setdefault(_NO_OPTIMIZATION_VAR, "1")
    jax.config.update("jax_disable_most_optimizations",
                      os.environ[_NO_OPTIMIZATION_VAR].strip().lower() in ("1", "true", "yes",
                                                                           "on", "y", "t"))


def pytest_unconfigure(config):
    if _owned_cache_dir is not None:
        shutil.rmtree(_owned_cache_dir, ignore_errors=True)


def make_task(name: str, suffixes: tuple[str, str] = ("A", "B"), n_classes: int = 2,
              input_key: str = "data", hidden: int = 10, **task_kwargs) -> jaxmtl.Task:
    """Two-layer task: linear1{s0} -> relu -> linear2{s1}, as Snorkel's test tasks."""
    first, second = f"linear1{suffixes[0]}", f"linear2{suffixes[1]}"
    module_pool = {first: nn.Dense(hidden), "relu": nn.relu, second: nn.Dense(n_classes)}
    op_sequence = [
        jaxmtl.Operation(first, [("_input_", input_key)], name=f"op1{suffixes[0]}"),
        jaxmtl.Operation("relu", [f"op1{suffixes[0]}"], name=f"relu{suffixes[0]}"),
        jaxmtl.Operation(second, [f"relu{suffixes[0]}"], name=f"op2{name}"),
    ]
    return jaxmtl.Task(name=name, module_pool=module_pool, op_sequence=op_sequence,
                       **task_kwargs)


def linear_data(n: int, seed: int, dim: int = 2, bias: float = 0.0):
    """Linearly separable 2-class data: label = x0 + x1 > bias."""
    rng = np.random.default_rng(seed)
    X = rng.uniform(-1, 1, size=(n, dim)).astype(np.float32)
    Y = (X[:, 0] + X[:, 1] > bias).astype(np.int64)
    return X, Y


@pytest.fixture(scope="session")
def two_task_loaders():
    """Train/valid loaders for tasks 'task1' (hard labels) and 'task2' (soft labels)."""
    loaders = []
    for split, seed, n in [("train", 0, 600), ("valid", 1, 200)]:
        X1, Y1 = linear_data(n, seed)
        X2, Y2 = linear_data(n, seed + 10, bias=0.3)
        soft = np.stack([1.0 - Y2, Y2], axis=1) * 0.9 + 0.05
        ds1 = jaxmtl.DictDataset("d1", split, {"data": X1}, {"task1": Y1})
        ds2 = jaxmtl.DictDataset("d2", split, {"data": X2}, {"task2": soft})
        loaders += [jaxmtl.DictDataLoader(ds1, batch_size=32, shuffle=split == "train", seed=3),
                    jaxmtl.DictDataLoader(ds2, batch_size=32, shuffle=split == "train", seed=4)]
    return loaders


def count_compiles(fn) -> int:
    """How many XLA programs ``fn()`` compiles (backend-compile events)."""
    events = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(events)


def _masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C."""
    from tensorboardX.crc32c import crc32c

    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path) -> list:
    """Parses a TFRecord event file: [len u64][crc(len) u32][data][crc(data) u32]...

    Every record's two checksums are checked; returns the tensorboardX ``Event`` protos.
    """
    from tensorboardX.proto import event_pb2

    events = []
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            assert struct.unpack("<I", header[8:])[0] == _masked_crc(header[:8]), path
            data = f.read(length)
            assert struct.unpack("<I", f.read(4))[0] == _masked_crc(data), path
            events.append(event_pb2.Event.FromString(data))
    return events
