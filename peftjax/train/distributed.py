"""Multi-process training on JAX's distributed runtime (one process per host, a global mesh).

JAX runs a multi-host job as one Python process per host (or per GPU), all running the same
program: :func:`initialize` starts the runtime (``jax.distributed.initialize``) from arguments,
from the environment, or by JAX's cluster auto-detection (TPU pod slices, SLURM, Open MPI,
Kubernetes). After it, ``jax.devices()`` lists every process's devices, and
:func:`peftjax.train.train` builds its mesh over all of them: the parameters and optimizer state
are global arrays (replicated for ``sharding="dp"``, split by
:mod:`peftjax.models.sharding`'s rules for ``"fsdp"``), each process feeds only its own rows of
every global batch (``jax.make_array_from_process_local_data``), the metrics are those of the
global batch, and only process 0 writes logs, metrics files and the progress bar. Checkpoints
(:class:`peftjax.train.checkpoint.TrainCheckpointer`, :func:`peftjax.io.checkpoint.save_adapter`)
are written by all processes together, each its own shards.

On CPU, collectives between processes need gloo (``jax_cpu_collectives_implementation``), which
:func:`initialize` selects. See ``docs/distributed.md`` for launching on a TPU pod slice, on
several GPU hosts, and locally for testing.

Example (two processes on this machine, each with its own devices)::

  # shell 1                                    # shell 2
  JAX_COORDINATOR_ADDRESS=127.0.0.1:8476 \\     JAX_COORDINATOR_ADDRESS=127.0.0.1:8476 \\
  JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 \\       JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 \\
  python train.py                              python train.py

  # train.py
  from peftjax.train import distributed
  distributed.initialize()          # before any other JAX call
  ...
  train(loss, tuned, loader, TrainConfig(sharding="fsdp"))
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

__all__ = ["ENV", "initialize", "is_main", "multi_process", "process_rows", "global_batch",
           "replicate", "gather", "sync"]

#: The environment variables :func:`initialize` reads for arguments it is not given.
#: ``JAX_COORDINATOR_ADDRESS`` is JAX's own; the other two are read by peftjax.
ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}


def _env_int(name: str) -> Optional[int]:
  v = os.environ.get(name)
  if v is None or v == "":
    return None
  try:
    return int(v)
  except ValueError:
    raise ValueError(f"{name}={v!r} is not an integer") from None


def requested(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
              process_id: Optional[int] = None) -> bool:
  """Whether arguments or the environment ask for a multi-process run (:func:`initialize`)."""
  return any(v is not None for v in (coordinator, num_processes, process_id)) or \
      any(os.environ.get(v) for v in ENV.values())


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *,
               local_device_ids: Optional[Sequence[int]] = None,
               timeout_s: int = 300) -> tuple[int, int]:
  """Starts JAX's distributed runtime; returns ``(process_index, process_count)``.

  Call it once, at the start of every process, before any other JAX computation. Arguments
  left out are read from :data:`ENV` (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
  ``JAX_PROCESS_ID``); whatever is still missing JAX detects on the clusters it knows (a TPU pod
  slice, SLURM, Open MPI, Kubernetes). ``coordinator="auto"`` forces that detection. Selects
  gloo for CPU collectives (needed for CPU devices of several processes to talk). Calling it
  again once the runtime is up returns the same pair.

  Args:
    coordinator: ``host:port`` of process 0's coordinator service (every process gives the
      same), or ``"auto"``.
    num_processes: how many processes take part.
    process_id: this process's index, ``0 .. num_processes - 1``.
    local_device_ids: restrict this process to these local devices (e.g. one GPU per process).
    timeout_s: how long to wait for every process to join.

  Raises:
    ValueError: a bad process count or id, or a non-integer in the environment; JAX's error
      (``RuntimeError``) when JAX was already used or the coordinator is unreachable.
  """
  if jax.distributed.is_initialized():
    return jax.process_index(), jax.process_count()
  if coordinator == "auto":
    coordinator = None
  else:
    coordinator = coordinator or os.environ.get(ENV["coordinator"]) or None
  if num_processes is None:
    num_processes = _env_int(ENV["num_processes"])
  if process_id is None:
    process_id = _env_int(ENV["process_id"])
  if num_processes is not None and (isinstance(num_processes, bool) or num_processes < 1):
    raise ValueError(f"num_processes must be a positive integer, got {num_processes!r}")
  if process_id is not None and num_processes is not None and \
      not 0 <= process_id < num_processes:
    raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id!r}")
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):  # pragma: no cover - a JAX without the option
    pass
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, local_device_ids=local_device_ids,
                             initialization_timeout=timeout_s)
  return jax.process_index(), jax.process_count()


def multi_process() -> bool:
  """Whether this is one process of several (``jax.process_count() > 1``)."""
  return jax.process_count() > 1


def is_main() -> bool:
  """Whether this is process 0, the one that logs, prints and writes run files."""
  return jax.process_index() == 0


def process_rows(batch, index: Optional[int] = None, count: Optional[int] = None):
  """This process's rows of a global batch: rows ``[i * n, (i + 1) * n)`` with
  ``n = batch_size / count``, of every array (leading batch axis).

  Raises:
    ValueError: the batch size is not divisible by the number of processes.
  """
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if count == 1:
    return batch

  def rows(x):
    n = np.shape(x)[0]
    if n % count:
      raise ValueError(f"the global batch size {n} is not divisible by the {count} processes")
    k = n // count
    return np.asarray(x)[index * k:(index + 1) * k]
  return jax.tree.map(rows, batch)


def global_batch(local, sharding):
  """The global batch (``jax.Array`` sharded by ``sharding``) made of every process's rows
  ``local`` (``jax.make_array_from_process_local_data``); one process: ``device_put``."""
  if sharding.is_fully_addressable:
    return jax.device_put(local, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local)


def _global_mesh(tree):
  """The mesh of the first array of ``tree`` that spans other processes, or None."""
  for x in jax.tree.leaves(tree):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and \
        isinstance(x.sharding, jax.sharding.NamedSharding):
      return x.sharding.mesh
  return None


def replicate(tree, mesh=None):
  """``tree`` with every array that is not yet on ``mesh`` replicated over it (every process
  passes the same values); arrays already on it are kept. ``mesh``: default, the mesh of the
  first array of ``tree`` that spans processes, else one over all devices. One process: the
  tree unchanged."""
  if not multi_process():
    return tree
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from peftjax.models.sharding import put_global
  mesh = mesh or _global_mesh(tree) or Mesh(np.asarray(jax.devices()), ("all",))
  rep = NamedSharding(mesh, P())

  def one(x):
    if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and \
        x.sharding.mesh == mesh:
      return x
    if not hasattr(x, "shape"):
      return x
    return put_global(x, rep)
  return jax.tree.map(one, tree)


def gather(tree):
  """Host (NumPy) copies of every array of ``tree``, whole even where they are split over
  several processes' devices (a collective: every process calls it)."""
  def one(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x) if hasattr(x, "shape") else x
  return jax.tree.map(one, tree)


def agreed_signal(signum: Optional[int]) -> Optional[int]:
  """The stop signal of a multi-process run, the same on every process: the largest signal
  number any process received (``signum``: this process's, or None), or None if none did.

  Every process must call it at the same points (it is a collective): a signal that reached one
  process only (a ``kill`` of one PID, a scheduler's preemption of one host) then stops all of
  them at the same step, where they save their checkpoint together, instead of the others
  waiting forever in the next step's collectives. With one process: ``signum``.
  """
  if not multi_process():
    return signum
  from jax.experimental import multihost_utils
  got = int(np.max(multihost_utils.process_allgather(np.asarray(signum or 0, np.int32))))
  return got or None


def sync(name: str):
  """Waits until every process reached ``sync(name)`` (no-op with one process)."""
  if multi_process():
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
