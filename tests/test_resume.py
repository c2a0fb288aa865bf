"""A training process killed mid-epoch resumes to bit-identical parameters."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).with_name("resume_run.py")


def run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=SCRIPT.parent,
                          capture_output=True, text=True, timeout=300)


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    full = run("full", tmp_path / "full_ck", tmp_path / "full")
    assert full.returncode == 0, full.stderr
    # 19 + 19 batches per epoch; batch 50 is drawn in epoch 1, after checkpoints every 5.
    crash = run("crash", tmp_path / "ck", tmp_path / "crash", 50)
    assert crash.returncode == -signal.SIGKILL, crash.stderr
    assert not (tmp_path / "crash.npz").exists()
    steps = sorted(int(s) for s in os.listdir(tmp_path / "ck" / "checkpoints") if s.isdigit())
    meta = json.loads((tmp_path / "ck" / "checkpoints" / str(steps[-1]) / "meta" /
                       "metadata").read_text())
    assert meta["trainer"]["epoch"] == 1 and meta["trainer"]["batch_in_epoch"] > 0

    resumed = run("resume", tmp_path / "ck", tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr
    expected, got = np.load(tmp_path / "full.npz"), np.load(tmp_path / "resumed.npz")
    assert sorted(expected.files) == sorted(got.files)
    for name in expected.files:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert (tmp_path / "full.msgpack").read_bytes() == (tmp_path / "resumed.msgpack").read_bytes()
