"""Data parallelism: one small object that knows how a step runs over devices.

Three modes run the same pure functions:

- ``"single"``: ``jax.jit`` on one device.
- ``"pmap"`` (the default with several local devices): ``jax.pmap`` over the devices; the
  state is replicated (a leading device axis), each batch is split along a new leading
  device axis, and the step reduces across devices with ``lax.psum`` (global masked means,
  summed gradients), so results equal the single-device ones up to float reordering.
- ``"sharded"``: ``jax.jit`` with a ``NamedSharding`` mesh: the batch is sharded over the
  devices, the state replicated, and XLA inserts the reductions (the modern equivalent of
  pmap, which is in maintenance mode upstream).

A batch whose size does not divide by the device count is padded with masked rows (label
-1, mask False), so the loss and the metrics are unchanged. Host-to-device transfers go
straight to their devices with ``jax.device_put`` and a sharding (``device_put_sharded``
and ``device_put_replicated`` were removed in JAX 0.10).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DEVICE_AXIS = "devices"
PARALLEL_MODES = ("auto", "pmap", "sharded", "single")

PyTree = Any


def pad_rows(tree: Mapping[str, np.ndarray], size: int, fill: Any) -> dict[str, np.ndarray]:
    """Pads every array's leading axis to ``size`` rows filled with ``fill``."""
    out = {}
    for key, value in tree.items():
        value = np.asarray(value)
        missing = size - value.shape[0]
        if missing:
            pad = np.full((missing, *value.shape[1:]), fill, dtype=value.dtype)
            value = np.concatenate([value, pad])
        out[key] = value
    return out


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """How arrays are placed and steps compiled for ``mode`` over ``devices``.

    Attributes:
      mode: "single", "pmap" or "sharded".
      devices: the devices used (one for "single").
    """

    mode: str
    devices: tuple[Any, ...]

    @property
    def n_devices(self) -> int:
        """Number of devices a batch is split over."""
        return len(self.devices)

    @property
    def axis_name(self) -> str | None:
        """The pmap axis name the step reduces over (None outside pmap)."""
        return DEVICE_AXIS if self.mode == "pmap" else None

    @property
    def mesh(self) -> Mesh:
        """A one-axis mesh over ``devices``."""
        return Mesh(np.array(self.devices), (DEVICE_AXIS,))

    def compile(self, fn: Callable, donate_argnums: tuple[int, ...] = ()) -> Callable:
        """``fn`` compiled for this mode: ``jax.pmap`` (with ``axis_name``) or ``jax.jit``."""
        if self.mode == "pmap":
            return jax.pmap(fn, axis_name=DEVICE_AXIS, devices=self.devices,
                            donate_argnums=donate_argnums)
        return jax.jit(fn, donate_argnums=donate_argnums)

    def padded_size(self, batch_size: int) -> int:
        """The batch size rounded up to a multiple of the device count."""
        return -(-batch_size // self.n_devices) * self.n_devices

    def put_batch(self, X_dict: Mapping[str, np.ndarray], Y_dict: Mapping[str, np.ndarray],
                  mask: np.ndarray) -> tuple[dict, dict, jax.Array]:
        """Pads a batch to a multiple of the device count and sends it to the devices.

        Padded rows get mask False and label -1, so they count nowhere.
        """
        size = self.padded_size(len(mask))
        X_dict = pad_rows(X_dict, size, 0)
        Y_dict = pad_rows(Y_dict, size, -1)
        mask = pad_rows({"mask": mask}, size, False)["mask"]
        return self.shard((X_dict, Y_dict, mask))

    def shard(self, tree: PyTree) -> PyTree:
        """Splits leading axes over the devices ([B, ...] -> [n, B/n, ...] under pmap)."""
        if self.mode == "single":
            return jax.device_put(tree, self.devices[0])
        sharding = NamedSharding(self.mesh, P(DEVICE_AXIS))
        if self.mode == "pmap":
            tree = jax.tree.map(
                lambda x: np.reshape(x, (self.n_devices, -1, *np.shape(x)[1:])), tree)
        return jax.device_put(tree, sharding)

    def replicate(self, tree: PyTree) -> PyTree:
        """One copy per device (a leading device axis under pmap)."""
        if self.mode == "single":
            return jax.device_put(tree, self.devices[0])
        if self.mode == "sharded":
            return jax.device_put(tree, NamedSharding(self.mesh, P()))
        stacked = jax.tree.map(
            lambda x: np.broadcast_to(np.asarray(x), (self.n_devices, *np.shape(x))), tree)
        return jax.device_put(stacked, NamedSharding(self.mesh, P(DEVICE_AXIS)))

    def unreplicate(self, tree: PyTree) -> PyTree:
        """The first device's copy of a replicated tree (no cross-device gather)."""
        if self.mode != "pmap":
            return tree
        return jax.tree.map(lambda x: x.addressable_data(0)[0], tree)

    def per_device(self, value: Any) -> Any:
        """A host value given to every device (a leading device axis under pmap)."""
        if self.mode != "pmap":
            return value
        return np.broadcast_to(np.asarray(value), (self.n_devices, *np.shape(value)))

    def gather_rows(self, array: jax.Array) -> jax.Array:
        """Undoes ``shard`` for an output: [n, b, ...] -> [n * b, ...] under pmap."""
        if self.mode != "pmap":
            return array
        return array.reshape(-1, *array.shape[2:])


def choose_parallel(mode: str = "auto", dataparallel: bool = True,
                    devices: Iterable[Any] | None = None) -> DataParallel:
    """Picks the data-parallel mode.

    Args:
      mode: "auto" (pmap when there are several devices), "pmap", "sharded" or "single".
      dataparallel: the model's flag; False always gives "single".
      devices: devices to use; defaults to ``jax.local_devices()``.

    Raises:
      ValueError: for an unknown mode.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(
            f"Unrecognized parallel mode '{mode}'; expected one of {list(PARALLEL_MODES)}"
        )
    devices = tuple(devices) if devices is not None else tuple(jax.local_devices())
    if not dataparallel or mode == "single" or len(devices) == 1:
        return DataParallel("single", devices[:1])
    return DataParallel("pmap" if mode == "auto" else mode, devices)


def prefetch(iterator: Iterable[Any], put: Callable[[Any], Any], size: int = 1
             ) -> Iterator[Any]:
    """Yields ``put(item)`` for each item, keeping ``size`` items' transfers in flight.

    ``jax.device_put`` is asynchronous, so starting the next batch's transfer before the
    current step is consumed overlaps host-to-device copies with compute.
    """
    queue: collections.deque = collections.deque()
    for item in iterator:
        queue.append(put(item))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
