"""Orbax checkpoints: train state (params, optimizer, step, RNG), data-iterator state, run metadata.

Async, keep-N, multi-host safe (every process calls save/restore; Orbax writes each array's shards from the
hosts that own them). Restore goes into an abstract state carrying the *current* shardings, so a checkpoint
saved on one mesh restores onto another. SIGTERM (TPU preemption) sets a flag the loop polls: it saves and
exits cleanly.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper over an Orbax CheckpointManager with the three items a ROPD run needs."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = directory
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self._manager = ocp.CheckpointManager(directory, options=options,
                                          item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict, force: bool = False) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(_jsonable(data_state)),
                              meta=ocp.args.JsonSave(_jsonable(meta)))
    return self._manager.save(step, args=args, force=force)

  def restore(self, abstract_state: Any, step: int | None = None):
    """Returns (state, data_state, meta) of `step` (default: the latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
    out = self._manager.restore(step, args=args)
    return out["state"], out["data"], out["meta"]

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state: Any) -> Any:
  """ShapeDtypeStructs with the shardings of `state` (the restore target on the current mesh)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state)


def _jsonable(obj):
  if isinstance(obj, dict):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_jsonable(v) for v in obj]
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (np.floating,)):
    return float(obj)
  if isinstance(obj, bytes):
    return obj.decode("latin-1")
  return obj


class PreemptionGuard:
  """Turns SIGTERM (and optionally SIGINT) into a flag the training loop checks between steps."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self.requested = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    self.requested.set()

  @property
  def stop(self) -> bool:
    # Every host must agree, or one host would save while the others train on: take the max over hosts.
    local = np.array([int(self.requested.is_set())])
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      local = multihost_utils.process_allgather(local)
    return bool(np.max(local))

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def is_writable(path: str) -> bool:
  """True when `path` (local) can be created and written; gs:// paths are left to Orbax."""
  if "://" in path:
    return True
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_probe.{os.getpid()}")   # hosts of one run may share the folder
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
    return True
  except OSError:
    return False
