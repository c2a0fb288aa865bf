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

A batch whose size does not divide by the device count: under pmap it is padded with
repeats of its own rows (label -1, mask False), as ``DictDataLoader`` pads a partial batch,
so the loss and the metrics are unchanged and BatchNorm's per-device statistics see real
rows, never zeros; the sharded mode does not pad it but places it whole on every device
(computed replicated, so BatchNorm statistics and dropout masks are the single-device
ones, at the cost of the speed-up).

Several processes (hosts) run pmap over all their devices together: every process iterates
the same global batches (same seeds) and feeds only its own slice of each to its local
devices; see ``multihost.initialize_multihost``. Host-to-device transfers go
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

from . import registry
from .multihost import (  # noqa: F401  (re-exported: jaxmtl.parallel.initialize_multihost)
    DISTRIBUTED_TIMEOUTS,
    distributed_arguments,
    initialize_multihost,
)

DEVICE_AXIS = "devices"
PARALLEL_MODES = registry.PARALLEL_MODES.names

PyTree = Any


def pad_rows(tree: Mapping[str, np.ndarray], size: int, fill: Any = None
             ) -> dict[str, np.ndarray]:
    """Pads every array's leading axis to ``size`` rows.

    Args:
      tree: name -> [n, ...] arrays, all with the same n >= 1.
      size: the rows wanted, >= n.
      fill: the value of the added rows; None repeats the arrays' own rows cyclically
        (rows 0, 1, ... of the batch), as ``DictDataLoader`` pads its last batch.

    Returns:
      name -> [size, ...] arrays.
    """
    out = {}
    for key, value in tree.items():
        value = np.asarray(value)
        missing = size - value.shape[0]
        if missing < 0:
            raise ValueError(f"pad_rows: '{key}' has {value.shape[0]} rows, more than the "
                             f"size {size} to pad to")
        if missing:
            if fill is None:
                if value.shape[0] == 0:
                    raise ValueError(f"pad_rows: '{key}' has no rows to repeat")
                pad = np.take(value, np.arange(missing) % value.shape[0], axis=0)
            else:
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
        """Number of devices a batch is split over (over all processes)."""
        return len(self.devices)

    @property
    def multiprocess(self) -> bool:
        """Whether the devices span several processes."""
        return len({d.process_index for d in self.devices}) > 1

    @property
    def local_devices(self) -> tuple[Any, ...]:
        """The devices of this process."""
        here = jax.process_index()
        return tuple(d for d in self.devices if d.process_index == here)

    @property
    def n_local(self) -> int:
        """Number of this process's devices."""
        return len(self.local_devices)

    @property
    def axis_name(self) -> str | None:
        """The pmap axis name the step reduces over (None outside pmap)."""
        return DEVICE_AXIS if self.mode == "pmap" else None

    @property
    def mesh(self) -> Mesh:
        """A one-axis mesh over ``devices``."""
        return Mesh(np.array(self.devices), (DEVICE_AXIS,))

    def compile(self, fn: Callable, donate_argnums: tuple[int, ...] = ()) -> Callable:
        """``fn`` compiled for this mode: ``jax.pmap`` (with ``axis_name``) or ``jax.jit``;
        either has ``_cache_size()``, the number of programs it compiled."""
        if self.mode == "pmap":
            return CountedPmap(jax.pmap(fn, axis_name=DEVICE_AXIS, devices=self.devices,
                                        donate_argnums=donate_argnums))
        return jax.jit(fn, donate_argnums=donate_argnums)

    def padded_size(self, batch_size: int) -> int:
        """The batch size rounded up to a multiple of the device count."""
        return -(-batch_size // self.n_devices) * self.n_devices

    def put_batch(self, X_dict: Mapping[str, np.ndarray], Y_dict: Mapping[str, np.ndarray],
                  mask: np.ndarray) -> tuple[dict, dict, jax.Array]:
        """Sends a batch to the devices, padded to a multiple of the device count if need be.

        Padded rows repeat the batch's own rows and get mask False and label -1, so they
        count in no loss, gradient or metric, and BatchNorm's batch statistics (per device
        under pmap) see in-distribution rows, as for ``DictDataLoader``'s last batch. The
        sharded mode does not pad: a batch that does not divide goes whole to every device
        (``replicate``), so its statistics and dropout masks are those of one device. On
        one device the numpy arrays go to the jitted call as they are: its C++ dispatch
        copies them to the device more cheaply than a Python-level ``jax.device_put``.
        """
        if self.mode == "single":
            return dict(X_dict), dict(Y_dict), mask
        if self.mode == "sharded" and len(mask) % self.n_devices:
            return self.replicate((dict(X_dict), dict(Y_dict), mask))
        size = self.padded_size(len(mask))
        X_dict = pad_rows(X_dict, size)
        Y_dict = pad_rows(Y_dict, size, -1)
        mask = pad_rows({"mask": mask}, size, False)["mask"]
        return self.shard((X_dict, Y_dict, mask))

    def shard(self, tree: PyTree) -> PyTree:
        """Splits leading axes over the devices ([B, ...] -> [n, B/n, ...] under pmap).

        With several processes, this process keeps its slice of the rows only.
        """
        if self.mode == "single":
            return jax.device_put(tree, self.devices[0])
        if self.multiprocess:
            # pmap takes each process's [n_local, ...] host arrays and places them itself.
            process, rows = jax.process_index(), None

            def local_slice(x: np.ndarray) -> np.ndarray:
                nonlocal rows
                rows = np.shape(x)[0] // jax.process_count()
                x = np.asarray(x)[process * rows: (process + 1) * rows]
                return np.reshape(x, (self.n_local, -1, *np.shape(x)[1:]))

            return jax.tree.map(local_slice, tree)
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
            lambda x: np.broadcast_to(np.asarray(x), (self.n_local, *np.shape(x))), tree)
        if self.multiprocess:
            return stacked
        return jax.device_put(stacked, NamedSharding(self.mesh, P(DEVICE_AXIS)))

    def unreplicate(self, tree: PyTree) -> PyTree:
        """The first device's copy of a replicated tree (no cross-device gather)."""
        if self.mode != "pmap":
            return tree
        return jax.tree.map(
            lambda x: x[0] if isinstance(x, np.ndarray) else x.addressable_data(0)[0], tree)

    def per_device(self, value: Any) -> Any:
        """A host value given to every device (a leading device axis under pmap)."""
        if self.mode != "pmap":
            return value
        return np.broadcast_to(np.asarray(value), (self.n_local, *np.shape(value)))

    def gather_rows(self, array: jax.Array) -> jax.Array:
        """Undoes ``shard`` for an output: [n, b, ...] -> [n * b, ...] under pmap."""
        if self.mode != "pmap":
            return array
        return array.reshape(-1, *array.shape[2:])


def call_signature(args: Any) -> tuple:
    """What a jitted program is compiled for: the tree structure and each leaf's spec
    (a Python scalar counts by its type: jit traces it as a weak-typed array)."""
    leaves, treedef = jax.tree.flatten(args)
    # The dtype object, not str(dtype): str costs ~8 us a leaf, and a pmapped step
    # computes this signature on every call (CountedPmap).
    return treedef, tuple(
        (leaf.shape, leaf.dtype, getattr(leaf, "weak_type", False))
        if hasattr(leaf, "shape") else type(leaf) for leaf in leaves)


class CountedPmap:
    """A ``jax.pmap`` function that counts the programs it compiled (``_cache_size``, as
    a jitted function has): one per call signature. Other attributes are pmap's."""

    def __init__(self, pmapped: Callable) -> None:
        self._pmapped = pmapped
        self._signatures: set[tuple] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._signatures.add(call_signature((args, kwargs)))
        return self._pmapped(*args, **kwargs)

    def _cache_size(self) -> int:
        return len(self._signatures)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pmapped, name)


def choose_parallel(mode: str = "auto", dataparallel: bool = True,
                    devices: Iterable[Any] | None = None) -> DataParallel:
    """Picks the data-parallel mode.

    Args:
      mode: "auto" (pmap when there are several devices), "pmap", "sharded" or "single".
      dataparallel: the model's flag; False always gives "single".
      devices: devices to use; defaults to all devices of all processes
        (``jax.devices()``), which is ``jax.local_devices()`` in a single process.

    Raises:
      ValueError: for an unknown mode, or "sharded"/"single" across several processes.
    """
    registry.PARALLEL_MODES.check(mode, "choose_parallel(mode)")
    devices = tuple(devices) if devices is not None else tuple(jax.devices())
    if len({d.process_index for d in devices}) > 1:
        if mode not in ("auto", "pmap") or not dataparallel:
            raise ValueError(
                f"parallel mode '{mode}' (dataparallel={dataparallel}) is not supported "
                f"across {jax.process_count()} processes; use 'pmap' (or 'auto')"
            )
        return DataParallel("pmap", devices)
    if not dataparallel or mode == "single" or len(devices) == 1:
        return DataParallel("single", devices[:1])
    return DataParallel("pmap" if mode == "auto" else mode, devices)


def check_balancer_parallel(balancer: Any, balancer_config: Mapping[str, Any],
                            mode: str, devices: Iterable[Any] | None = None) -> None:
    """Refuses a balancer that cannot run in the data-parallel mode ``mode`` would pick.

    A balancer on representation gradients (``balancer_config={"upper_bound": True}``:
    MGDA-UB, IMTL-UB, Aligned-MTL-UB; or any ``Balancer`` with ``representation_grads``) solves on the gradients with respect to
    the whole batch's shared representation, which a pmapped step holds only per device;
    the sharded mode (and one device) runs it. The Trainer calls this at construction, so
    the error comes before any data is read or step compiled. Devices are looked up only
    for MGDA-UB. A model with ``dataparallel=False`` would run on one device, but the
    config alone decides here: such a model needs ``parallel='single'``.

    Args:
      balancer: ``TrainerConfig.balancer`` (a name or a ``Balancer``).
      balancer_config: ``TrainerConfig.balancer_config``.
      mode: ``TrainerConfig.parallel``.
      devices: as ``choose_parallel`` (default: all devices of all processes).

    Raises:
      ValueError: for representation gradients when ``mode`` resolves to pmap.
    """
    if isinstance(balancer, str):
        upper_bound = bool((balancer_config or {}).get("upper_bound"))
        what = (f"balancer={balancer!r} with balancer_config upper_bound=True "
                f"({'MGDA-UB' if balancer == 'mgda' else 'representation gradients'})")
    else:
        upper_bound = bool(getattr(balancer, "representation_grads", False))
        what = "a balancer with representation_grads=True (MGDA-UB)"
    if not upper_bound:
        return
    devices = tuple(devices) if devices is not None else tuple(jax.devices())
    n_processes = len({d.process_index for d in devices})
    if n_processes > 1:
        raise ValueError(
            f"{what} does not run across {n_processes} processes (only parallel='pmap' "
            f"spans processes, got parallel='{mode}'); run it in one process with "
            f"parallel='sharded', or use mgda without upper_bound")
    if choose_parallel(mode, True, devices).mode == "pmap":
        raise ValueError(
            f"{what} does not run under pmap, which parallel='{mode}' selects over "
            f"{len(devices)} devices; use parallel='sharded' (same result as one device) "
            f"or parallel='single'")


def local_parallel(dataparallel: bool = True) -> DataParallel:
    """Data parallelism over this process's devices only (no cross-process collectives)."""
    return choose_parallel("auto", dataparallel, jax.local_devices())


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
