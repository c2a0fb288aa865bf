"""Joining a multi-process (multi-host) JAX run: ``initialize_multihost``.

Every process then runs pmap over all processes' devices (``parallel.choose_parallel``);
this module only starts ``jax.distributed`` with checked arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from typing import Any

import jax

DISTRIBUTED_TIMEOUTS = ("initialization_timeout", "heartbeat_timeout_seconds",
                        "shutdown_timeout_seconds")


def distributed_arguments(coordinator_address: str, num_processes: int, process_id: int,
                          local_device_ids: Sequence[int] | None = None,
                          accepted: Iterable[str] | None = None,
                          **timeouts: int | None) -> dict[str, Any]:
    """The keyword arguments ``initialize_multihost`` gives ``jax.distributed.initialize``.

    Args:
      coordinator_address, num_processes, process_id, local_device_ids: as
        ``initialize_multihost``.
      accepted: the parameter names ``jax.distributed.initialize`` takes; defaults to its
        signature in the installed JAX.
      **timeouts: ``DISTRIBUTED_TIMEOUTS`` names -> seconds; None leaves JAX's default.

    Raises:
      ValueError: for a timeout that is not a positive int, or that the installed JAX
        does not take.
    """
    if accepted is None:
        parameters = inspect.signature(jax.distributed.initialize).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        accepted = DISTRIBUTED_TIMEOUTS if takes_any else parameters
    accepted = set(accepted)
    arguments: dict[str, Any] = {"num_processes": num_processes, "process_id": process_id,
                                 "local_device_ids": local_device_ids}
    for name, seconds in timeouts.items():
        if name not in DISTRIBUTED_TIMEOUTS:
            raise ValueError(f"initialize_multihost: unknown timeout '{name}'; expected one "
                             f"of {list(DISTRIBUTED_TIMEOUTS)}")
        if seconds is None:
            continue
        if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds <= 0:
            raise ValueError(f"initialize_multihost: {name}={seconds!r}; expected a "
                             f"positive int (seconds)")
        if name not in accepted:
            raise ValueError(f"initialize_multihost: {name}={seconds} is not supported by "
                             f"jax.distributed.initialize in JAX {jax.__version__}; it takes "
                             f"{sorted(accepted)}")
        arguments[name] = seconds
    return {"coordinator_address": coordinator_address, **arguments}


def initialize_multihost(coordinator_address: str, num_processes: int, process_id: int,
                         local_device_ids: Sequence[int] | None = None, *,
                         initialization_timeout: int | None = None,
                         heartbeat_timeout_seconds: int | None = None,
                         shutdown_timeout_seconds: int | None = None) -> None:
    """Joins a multi-process JAX run (``jax.distributed.initialize``).

    Call it in every process before any other JAX call. On CPU it selects the gloo
    collectives, which cross-process ``psum`` needs.

    What a peer's death does (measured on CPU, gloo collectives, JAX 0.10.2; other
    backends may differ): if process 0, which hosts JAX's coordination service, dies, the
    others are terminated at once. If another process dies, a survivor inside a
    cross-process collective (a train step) gets a Python exception at once ("Gloo
    all-reduce failed ... Connection reset by peer"), so ``fit`` flushes its logs and
    finishes pending checkpoint writes; a survivor elsewhere (evaluating, compiling, in a
    barrier) notices nothing until ``heartbeat_timeout_seconds`` (JAX's default: 100 s)
    have passed without the peer's heartbeat. Then the coordination service terminates
    every survivor with a fatal error from its C++ runtime (exit status 134, SIGABRT): no
    Python exception, no ``finally`` or ``atexit`` code, and a process that had caught the
    exception is ended too (at that moment or when it exits). Checkpoints already
    finished are intact (Orbax writes atomically): restart all the processes and resume
    from the latest. A shorter heartbeat timeout ends the wait sooner, but also ends
    healthy runs whose heartbeats (sent by a background thread) are delayed that long,
    e.g. by an overloaded host or a network hiccup.

    Args:
      coordinator_address: "host:port" of process 0, e.g. "127.0.0.1:12355".
      num_processes: number of processes.
      process_id: this process's index, 0 .. num_processes - 1.
      local_device_ids: optional devices this process uses.
      initialization_timeout: seconds to wait for all processes to join (JAX's default
        if None).
      heartbeat_timeout_seconds: seconds without a heartbeat after which a process counts
        as dead and the run is ended (JAX's default if None).
      shutdown_timeout_seconds: seconds ``jax.distributed.shutdown`` waits for the others
        at exit (JAX's default if None).

    Raises:
      ValueError: for a timeout that is not a positive int, or one that the installed
        JAX's ``jax.distributed.initialize`` does not take.
    """
    arguments = distributed_arguments(
        coordinator_address, num_processes, process_id, local_device_ids,
        initialization_timeout=initialization_timeout,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        shutdown_timeout_seconds=shutdown_timeout_seconds)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**arguments)
