"""Atomic file writes: readers see the old file or the new one, never a torn one.

``atomic_write(path, data)`` writes to a unique temporary file in ``path``'s directory
(``tempfile.mkstemp``), flushes and ``fsync``s it, then ``os.replace``s it onto ``path``.
Each writer has its own temporary file, so concurrent writers to one path never share a
half-written file (the last ``os.replace`` wins, and it is a whole file); on any error the
temporary file is removed and ``path`` is left as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import IO, Any


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[Any]], Any],
                 *, text: bool | None = None) -> None:
    """Writes ``data`` to ``path`` atomically (temp file in the same directory + rename).

    Args:
      path: the destination; its directory is created if needed.
      data: the bytes or text to write, or a function ``write(f)`` that writes to the open
        temporary file (e.g. ``lambda f: json.dump(obj, f)``); an exception it raises
        propagates, and ``path`` is left untouched.
      text: open the temporary file in text mode (UTF-8); defaults to ``isinstance(data,
        str)``, and must be given as True for a function that writes text.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    text = isinstance(data, str) if text is None else text
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                                    suffix=".tmp")
    try:
        with (open(fd, "w", encoding="utf-8") if text else open(fd, "wb")) as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file 0600: keep the mode of the file replaced, else 0644
        # (reading the umask would mean setting it, which is not thread-safe).
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    except BaseException:
        try:
            os.unlink(tmp_path)
        except FileNotFoundError:
            pass
        raise
