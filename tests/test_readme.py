"""Every Python block of README.md runs, and prints what README shows after it.

A ```python block followed (after blank lines only) by a ```text block must print that
text; other Python blocks must run without error. A block whose first line is
``# not run: <reason>`` is skipped (e.g. one that needs several hosts).
"""

from __future__ import annotations

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


@pytest.mark.parametrize("line, code, expected", BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_readme_block(line, code, expected, tmp_path):
    if code.startswith("# not run:"):
        pytest.skip(code.splitlines()[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"README block at line {line} failed:\n{result.stderr}"
    if expected is not None:
        assert result.stdout == expected, f"README block at line {line} printed:\n{result.stdout}"
