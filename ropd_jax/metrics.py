"""Metric and artifact writers: WORKDIR/metrics.jsonl, TensorBoard, optional W&B, per-step artifacts.

Only process 0 writes. Resuming truncates metrics.jsonl to the restored step, so a resumed run's file is the
same as an uninterrupted run's.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable

import jax
import numpy as np

# Keys that measure wall-clock time: they differ between otherwise identical runs.
WALL_CLOCK_PREFIXES = ("time/", "throughput/", "judge/latency_s")


def _clean(v):
  if isinstance(v, (np.generic, jax.Array)):
    v = np.asarray(v).item()
  if isinstance(v, float) and not math.isfinite(v):
    return None
  return v


class MetricWriter:
  def __init__(self, workdir: str, tensorboard: bool = True, wandb_project: str | None = None,
               config: dict | None = None):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.artifacts_dir = os.path.join(workdir, "artifacts")
    self._tb = self._wandb = None
    if not self.enabled:
      return
    os.makedirs(self.artifacts_dir, exist_ok=True)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        self._tb = None
    if wandb_project:
      try:
        import wandb
        self._wandb = wandb.init(project=wandb_project, config=config, dir=workdir, resume="allow")
      except ImportError as e:
        raise ImportError("config.wandb_project is set but wandb is not installed: pip install wandb, "
                          "or set --config.wandb_project=''.") from e

  def truncate_after(self, step: int):
    """Drops rows of steps > `step` (written after the checkpoint we resume from)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    rows = [r for r in read_metrics(self.path) if r["step"] <= step]
    with open(self.path, "w") as f:
      for r in rows:
        f.write(json.dumps(r, sort_keys=True) + "\n")

  def write(self, step: int, metrics: dict[str, Any]):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(scalars, step=step)

  def write_artifacts(self, step: int, rows: Iterable[dict]):
    if not self.enabled:
      return
    path = os.path.join(self.artifacts_dir, f"step_{step:06d}.jsonl")
    with open(path, "w") as f:
      for r in rows:
        f.write(json.dumps(r, sort_keys=True, default=_clean) + "\n")

  def close(self):
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()


def read_metrics(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def strip_wall_clock(rows: list[dict]) -> list[dict]:
  """Rows without the wall-clock keys, for run-to-run comparisons."""
  return [{k: v for k, v in r.items() if not k.startswith(WALL_CLOCK_PREFIXES)} for r in rows]
