"""Compiling the steps of the batch shapes still to come, while the first ones train.

A loader with length buckets (``DictDataLoader.bucket_shapes``) gives one batch shape,
hence one compiled step, per bucket: known before the first step, but met one by one as
the epoch goes. Compiled in the order met, every compile stalls the loop; compiled in a
background thread (XLA releases the GIL while it compiles), they overlap with training
and with each other. ``jax.jit`` keeps the result in its own cache, so the loop's call
finds it (or waits for the compile in flight: JAX compiles a program once).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import jax

logger = logging.getLogger(__name__)


def abstract(tree: Any, sharding: jax.sharding.Sharding | None = None) -> Any:
    """``tree`` with every array replaced by its ``jax.ShapeDtypeStruct`` (sharding kept).

    Lowering reads only shapes, dtypes and placement; the specs let a background thread
    lower a step whose state buffers the loop donates meanwhile. A spec already in
    ``tree`` without a placement gets ``sharding``: the placement of the arrays the call
    will pass (a program lowered for another placement would be compiled again).
    """
    def spec(leaf: Any) -> Any:
        if isinstance(leaf, jax.Array):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding,
                                        weak_type=leaf.aval.weak_type)
        if (isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is None
                and sharding is not None):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding,
                                        weak_type=leaf.weak_type)
        return leaf
    return jax.tree.map(spec, tree)


def _compile(after: threading.Event | None, program: Any, args: tuple,
             kwargs: dict | None = None) -> None:
    try:
        lowered = program.lower(*args, **(kwargs or {}))
        if after is not None:
            after.wait()
        lowered.compile()
    except Exception:  # the loop's own call reports the error, where it belongs
        logger.debug("compiling a step ahead failed", exc_info=True)


def compile_in_background(jobs: Sequence[tuple[Any, tuple]], max_workers: int | None = None,
                          after: threading.Event | None = None
                          ) -> concurrent.futures.Executor | None:
    """Starts ``program.lower(*args, **kwargs).compile()`` for each ``(program, args)`` or
    ``(program, args, kwargs)`` of ``jobs``.

    Args:
      jobs: jitted programs and the (abstract) arguments of the calls to come.
      max_workers: compile threads; default one fewer than the CPU cores (at least one).
        Two compiles at once on two cores finished no sooner than one after the other on
        the reference workload and raised the peak memory by ~95 MiB (LLVM's working set).
      after: when given, each job is traced and lowered at once but compiled only once
        the event is set (by the caller, whatever happens: a thread waits for it), e.g.
        after another compile of the caller's, for the same peak-memory reason.

    Returns:
      The executor (already shut down for new work; its threads end with the last
      compile), or None when there is nothing to compile.
    """
    if not jobs:
        return None
    workers = max_workers or max(1, (os.cpu_count() or 2) - 1)
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=min(workers, len(jobs)), thread_name_prefix="jaxmtl-compile-ahead")
    for job in jobs:
        executor.submit(_compile, after, *job)
    executor.shutdown(wait=False)
    return executor

