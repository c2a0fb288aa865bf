"""Directory locks: one run at a time in a checkpoint or log directory.

A lock is a small JSON file ``{"pid", "host", "token"}`` created with ``O_EXCL`` in the
directory. A second run that finds it fails at once with the owner's pid and host, instead
of interleaving its files with the first run's (or failing later inside Orbax). A lock
left by a dead process on this host (a crash, a SIGKILL) is stale and taken over; so is one
left by this very process (a run that failed before it could close), since one process
trains one run at a time.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import uuid

logger = logging.getLogger(__name__)


class DirectoryLockedError(RuntimeError):
    """Another live run holds the directory."""


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, Linux); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22; the command name (field 2) may hold spaces, so split after its ")".
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_owner(path: str) -> dict | None:
    try:
        with open(path) as f:
            owner = json.load(f)
        return owner if isinstance(owner, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half-written: treated as held by an unknown owner


class DirectoryLock:
    """An exclusive lock on ``directory`` through the file ``directory/name``.

    Args:
      directory: the directory to lock (created if missing).
      name: the lock file's name (different services may lock one directory).
      purpose: what the directory is, for the error message (e.g. "checkpoint_dir").

    Raises:
      DirectoryLockedError: (from ``acquire``) if a live process, or any process on
        another host, holds the lock.
    """

    def __init__(self, directory: str, name: str, purpose: str = "directory") -> None:
        self.directory = directory
        self.path = os.path.join(directory, name)
        self.purpose = purpose
        self.token = uuid.uuid4().hex
        self.held = False

    def acquire(self) -> DirectoryLock:
        """Takes the lock (taking over a stale one); returns ``self``."""
        os.makedirs(self.directory, exist_ok=True)
        owner_record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                   "start": _start_time(os.getpid()), "token": self.token})
        for _ in range(3):  # a stale lock removed between our reads may race once or twice
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read_owner(self.path)
                if owner is None:  # released meanwhile
                    continue
                self._take_over_if_stale(owner)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(owner_record)
            self.held = True
            return self
        raise DirectoryLockedError(f"{self.purpose} {self.directory}: could not take the lock "
                                   f"{self.path} (it keeps changing hands)")

    def _take_over_if_stale(self, owner: dict) -> None:
        pid, host = owner.get("pid"), owner.get("host")
        here = socket.gethostname()
        if isinstance(pid, int) and host == here and pid == os.getpid():
            reason = "left by this process"
        elif isinstance(pid, int) and host == here and not _pid_alive(pid):
            reason = "its process has exited"
        elif isinstance(pid, int) and host == here and owner.get("start") is not None \
                and _start_time(pid) not in (None, owner["start"]):
            reason = "its pid now belongs to another process"
        else:
            reason = None
        if reason is not None:
            logger.warning("Taking over the stale lock %s of pid %s (%s)", self.path, pid,
                           reason)
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
            return
        raise DirectoryLockedError(
            f"{self.purpose} {self.directory} is in use by another run (pid {pid} on host "
            f"{host}; lock file {self.path}). Wait for that run to finish, or give this run "
            f"another {self.purpose}; delete the lock file only if that process is gone."
        )

    def release(self) -> None:
        """Removes the lock file if this lock still owns it (safe to call more than once)."""
        if not self.held:
            return
        self.held = False
        owner = _read_owner(self.path)
        if owner and owner.get("token") == self.token:
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
