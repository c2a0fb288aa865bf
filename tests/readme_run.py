"""Runs README.md's Python blocks in one process (a subprocess of test_readme.py).

Usage: python readme_run.py OUT_JSON WORK_DIR LINE [LINE ...]
Each block (by its first line number in README.md) runs in a fresh namespace, in its own
empty directory under WORK_DIR, with its stdout captured; OUT_JSON maps each line number
to {"stdout": ..., "error": traceback or null, "seconds": ...}. One Python + JAX import for all blocks
instead of one per block; a block that fails does not stop the others.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_readme import readme_blocks  # noqa: E402


def main() -> None:
    out, work_dir, lines = Path(sys.argv[1]), Path(sys.argv[2]), {int(a) for a in sys.argv[3:]}
    results = {}
    for line, code, _ in readme_blocks():
        if line not in lines:
            continue
        block_dir = work_dir / f"line{line}"
        block_dir.mkdir(parents=True)
        os.chdir(block_dir)
        stdout, error, start = io.StringIO(), None, time.perf_counter()
        try:
            with contextlib.redirect_stdout(stdout):
                exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "__main__"})
        except BaseException:  # noqa: BLE001 - reported to the test, which fails on it
            error = traceback.format_exc()
        results[str(line)] = {"stdout": stdout.getvalue(), "error": error,
                              "seconds": round(time.perf_counter() - start, 2)}
    out.write_text(json.dumps(results))


main()
