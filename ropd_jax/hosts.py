"""Multi-controller glue: every host runs the same program on its own block of the global batch.

JAX's multi-controller runtime runs one process per host; XLA shards each jitted step over the whole mesh.
What stays on the host side is which rows of a step are this host's: it reads those prompts, samples
their rollouts, has them judged and turns them into its part of the update's batch, which
`jax.make_array_from_process_local_data` stitches into one global array. A host's rows are one contiguous
block of the global batch, at the position its devices hold along the mesh's batch axes (`batch_block`),
so the global batch, and everything seeded by a row's global index, is the same for any host count.

With one process every function here is the identity or a no-op, so single-host runs take the same path.
"""
from __future__ import annotations

import os
import pickle
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ropd_jax import sharding


class HostLayoutError(ValueError):
  """A mesh on which hosts would not each hold their own rows of the batch."""


def initialize_from_env(coordinator_address: str | None = None, num_processes: int | None = None,
                        process_id: int | None = None) -> None:
  """`jax.distributed.initialize` when this is one of several processes; call before any JAX compute.

  Cloud TPU pods: detected from TPU_WORKER_HOSTNAMES, JAX finds its peers itself. GPU / CPU clusters (or
  several processes on one machine): the arguments (the trainer's --coordinator_address, --num_processes,
  --process_id flags), else JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID, set
  per process by the launcher (Slurm, a JobSet, a test).
  """
  if jax.distributed.is_initialized():
    return
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    count = num_processes if num_processes is not None else os.environ.get("JAX_NUM_PROCESSES")
    index = process_id if process_id is not None else os.environ.get("JAX_PROCESS_ID")
    if count is None or index is None:
      raise HostLayoutError(f"coordinator address {address} is set but the process count / id are not; give "
                            "every process --num_processes and --process_id (or JAX_NUM_PROCESSES and "
                            "JAX_PROCESS_ID), or drop the address on a single host.")
    jax.distributed.initialize(coordinator_address=address, num_processes=int(count), process_id=int(index))
  elif "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()


def batch_block(mesh: Mesh) -> tuple[int, int]:
  """(index, count): this host's block of the batch rows, and how many blocks the hosts split it into.

  Derived from where this process's devices sit along the batch axes (`data`, `fsdp`), so it holds on a
  TPU pod whose device order is not the process order. Raises when a host would hold no rows or rows it
  shares with another host (the batch axes must be split evenly across hosts: keep `tensor` inside a host).
  """
  count = jax.process_count()
  if count == 1:
    return 0, 1
  axes = sharding.batch_axes(mesh)
  shards = int(np.prod([mesh.shape[a] for a in axes]))
  index_map = NamedSharding(mesh, P(axes)).devices_indices_map((shards,))
  rows: dict[int, set[int]] = {}
  for device, (sl,) in index_map.items():
    rows.setdefault(device.process_index, set()).add(sl.start or 0)
  per_host = shards // count
  blocks = {}
  for process, held in rows.items():
    start = min(held)
    if len(held) != per_host or held != set(range(start, start + per_host)) or start % per_host:
      raise HostLayoutError(
          f"mesh {dict(mesh.shape)}: host {process} holds batch shards {sorted(held)} of {shards}; each of "
          f"the {count} hosts must hold its own contiguous {per_host}. Make data x fsdp a multiple of the "
          "host count and keep the tensor axis within a host (mesh.tensor <= devices per host).")
    blocks[process] = start // per_host
  if sorted(blocks.values()) != list(range(count)):
    raise HostLayoutError(f"mesh {dict(mesh.shape)}: hosts share batch blocks {blocks}; make data x fsdp "
                          f"a multiple of the {count} hosts.")
  return blocks[jax.process_index()], count


def to_global(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """The global array whose rows, on this host, are `local` (this host's block of the leading axis)."""
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(sharding, np.asarray(local))


def to_local(x) -> np.ndarray:
  """This host's rows of an array split over its leading axis (all of it on one host), on the host."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  by_start: dict[int, Any] = {}
  for shard in x.addressable_shards:   # replicas over tensor share a start: keep one
    by_start.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(by_start[k]) for k in sorted(by_start)])


def gather(obj: Any) -> list[Any]:
  """Every host's `obj`, in process order, on every host (picklable; the hosts run the same program)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  blob = np.frombuffer(pickle.dumps(obj), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([blob.size], np.int64))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  blobs = np.asarray(multihost_utils.process_allgather(padded))
  return [pickle.loads(blobs[i, :sizes[i]].tobytes()) for i in range(len(sizes))]


def all_max(value: int) -> int:
  """The largest `value` over hosts (e.g. a padded width every host must use)."""
  return int(max(gather(int(value))))
