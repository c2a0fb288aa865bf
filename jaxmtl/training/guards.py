"""What keeps a run's model usable when a run goes wrong: interrupts and divergence.

- ``InterruptGuard``: a Ctrl-C (SIGINT, a notebook's stop button) that arrives while a
  step that donates its input buffers is being called is held until the call has returned
  and its outputs are stored, so the model never ends up holding deleted arrays.
- ``DivergenceMonitor``: checks the on-device loss accumulator (and, before a checkpoint,
  the parameters) whenever they are read anyway, and stops a run whose loss became NaN or
  infinite instead of training on and saving it as the best model.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

NONFINITE_MODES = ("raise", "warn")


def where(position: tuple[int, int]) -> str:
    """"epoch E, batch B" for messages (B counts from 1: the batches done)."""
    return f"epoch {position[0]}, batch {position[1]}"


class InterruptGuard:
    """Defers SIGINT during critical sections; elsewhere it acts as the usual handler.

    Use as a context manager around a whole loop, and ``critical()`` around each call
    that must not be cut in half. Outside the main thread (where Python cannot install
    signal handlers) it does nothing.
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False
        self._depth = 0
        self._pending = False
        # A KeyboardInterrupt raised for a SIGINT and still not seen by the loop: Python
        # ignores an exception raised inside a weakref callback or ``__del__`` (a signal
        # handler runs wherever the interpreter is, garbage collection included), so the
        # next critical section raises it again.
        self._raised = False

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self._depth:
            self._pending = True
            return
        self._forward(signum, frame)

    def _forward(self, signum: int, frame: Any) -> None:
        if callable(self._previous):
            # Only Python's own handler raises; a user's handler may stop gracefully.
            self._raised = self._previous is signal.default_int_handler
            self._previous(signum, frame)
        elif self._previous != signal.SIG_IGN:
            self._raised = True
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self) -> Iterator[None]:
        """A section that a SIGINT does not cut: it is delivered when the section ends.

        Raises:
          KeyboardInterrupt: an interrupt raised earlier was lost (ignored by Python in a
            weakref callback or ``__del__``): it is raised here, before the section.
        """
        if self._raised:
            self._raised = False
            raise KeyboardInterrupt
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if not self._depth and self._pending:
            self._pending = False
            self._forward(signal.SIGINT, None)


@jax.jit
def _leaves_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _on_cpu(leaf: Any) -> bool:
    return not isinstance(leaf, jax.Array) or all(
        device.platform == "cpu" for device in leaf.devices())


def all_finite(tree: Any) -> bool:
    """Whether every float leaf of ``tree`` is finite.

    Arrays on the CPU are read in place (no copy, no compiled program); arrays on an
    accelerator are checked there by one program over all leaves, and one bool comes back.
    """
    leaves = [x for x in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return True
    if all(_on_cpu(x) for x in leaves):
        return all(bool(np.isfinite(np.asarray(x)).all()) for x in leaves)
    return bool(_leaves_finite(leaves))


class DivergenceMonitor:
    """Tracks where the last finite check was, and reacts to a non-finite one.

    Args:
      mode: "raise" (stop with ``FloatingPointError``) or "warn" (log and go on; a
        non-finite model is still never checkpointed).
    """

    def __init__(self, mode: str = "raise") -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"Unrecognized on_nonfinite '{mode}'; expected one of "
                             f"{list(NONFINITE_MODES)}")
        self.mode = mode
        self.last_finite = "the start of training"
        self.last_checkpoint: str | None = None

    def check(self, finite: bool, position: str, what: str = "the train loss") -> bool:
        """Reacts to one check at ``position`` (e.g. "epoch 2, batch 10"); returns ``finite``.

        Raises:
          FloatingPointError: when not ``finite`` and the mode is "raise".
        """
        if finite:
            self.last_finite = position
            return True
        checkpoint = (f"the last checkpoint written before it is {self.last_checkpoint}"
                      if self.last_checkpoint else "no checkpoint was written before it")
        message = (f"Training diverged: {what} became NaN or infinite between "
                   f"{self.last_finite} and {position}; {checkpoint}. Lower the learning "
                   f"rate or clip gradients (grad_clip); on_nonfinite='warn' trains on.")
        if self.mode == "raise":
            raise FloatingPointError(message)
        logger.warning(message)
        return False

    def check_losses(self, loss_sums: Any, position: str) -> bool:
        """Checks the host copy of the accumulated loss sums."""
        return self.check(bool(np.all(np.isfinite(np.asarray(loss_sums)))), position)
