"""Every Python block of README.md runs, and prints what README shows after it.

A ```python block followed (after blank lines only) by a ```text block must print that
text; other Python blocks must run without error. A block whose first line is
``# not run: <reason>`` is skipped (e.g. one that needs several hosts). The blocks run in one
subprocess (tests/readme_run.py), each in a fresh namespace and directory.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)


def readme_blocks() -> list[tuple[int, str, str | None]]:
    """(line number, code, expected output or None) for each Python block."""
    text = (ROOT / "README.md").read_text()
    matches = list(BLOCK.finditer(text))
    blocks = []
    for i, match in enumerate(matches):
        if match.group(1) != "python":
            continue
        expected = None
        if i + 1 < len(matches) and matches[i + 1].group(1) == "text" and \
                not text[match.end():matches[i + 1].start()].strip():
            expected = matches[i + 1].group(2)
        blocks.append((text[:match.start()].count("\n") + 1, match.group(2), expected))
    return blocks


BLOCKS = readme_blocks()


def test_readme_has_checked_blocks():
    assert sum(expected is not None for _, _, expected in BLOCKS) >= 3


RUNNER = Path(__file__).with_name("readme_run.py")


@pytest.fixture(scope="module")
def block_results(tmp_path_factory):
    """Every runnable block's output, from ONE subprocess (tests/readme_run.py): each block
    still runs in a fresh namespace and directory, but the Python + JAX import (2-3 s) is
    paid once, not per block."""
    lines = [str(line) for line, code, _ in BLOCKS if not code.startswith("# not run:")]
    work = tmp_path_factory.mktemp("readme")
    out = work / "results.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(RUNNER), str(out), str(work), *lines],
                            cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"tests/readme_run.py failed:\n{result.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("line, code, expected", BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_readme_block(line, code, expected, block_results):
    if code.startswith("# not run:"):
        pytest.skip(code.splitlines()[0])
    result = block_results[str(line)]
    assert result["error"] is None, f"README block at line {line} failed:\n{result['error']}"
    if expected is not None:
        assert result["stdout"] == expected, f"README block at line {line} printed:\n{result['stdout']}"
