"""Multi-host code paths, simulated by parameterising the process index and count (one real process)."""
import json
import os

import jax
import pytest

import numpy as np

from ropd_jax import data as data_lib
from ropd_jax import hosts
from ropd_jax import sharding
from ropd_jax import metrics as metrics_lib


@pytest.mark.parametrize("process_index", [0, 1])
def test_only_process_zero_writes_metrics_and_artifacts(tmp_path, monkeypatch, process_index):
  monkeypatch.setattr(jax, "process_index", lambda: process_index)
  writer = metrics_lib.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write(0, {"reward/mean": 0.5})
  writer.write_artifacts(0, [{"uid": "a"}])
  writer.close()
  wrote = os.path.exists(tmp_path / "metrics.jsonl")
  assert wrote == (process_index == 0)
  assert os.path.exists(tmp_path / "artifacts" / "step_000000.jsonl") == (process_index == 0)
  if wrote:
    assert json.loads(open(tmp_path / "metrics.jsonl").read()) == {"step": 0, "reward/mean": 0.5}


def test_hosts_read_disjoint_shards_and_resume_from_one_state(tmp_path):
  rows = [{"id": str(i), "prompt": f"q{i}", "answer": "", "solution": "", "index": i} for i in range(32)]
  cfg = {"prompts_per_step": 8, "seed": 3, "shuffle": True, "num_epochs": 1}
  hosts = [data_lib.PromptLoader(rows, cfg, shard_index=h, shard_count=2) for h in range(2)]
  first = [[r["id"] for r in next(loader)] for loader in hosts]
  assert len(first[0]) == len(first[1]) == 4 and not set(first[0]) & set(first[1])
  state = hosts[0].get_state()   # the checkpoint holds one state for every host
  expected = [[r["id"] for r in next(loader)] for loader in hosts]
  resumed = [data_lib.PromptLoader(rows, cfg, shard_index=h, shard_count=2) for h in range(2)]
  for loader in resumed:
    loader.set_state(state)
  assert [[r["id"] for r in next(loader)] for loader in resumed] == expected


def test_multislice_mesh_needs_one_granule_per_dcn_shard_and_no_tensor_over_dcn():
  # One process, one slice: a data axis over 2 slices cannot be built, and tensor never crosses slices.
  with pytest.raises(sharding.ShardingError, match="need 2 processes, but the devices form 1"):
    sharding.make_mesh({"data": -1, "dcn_data": 2})
  with pytest.raises(sharding.ShardingError, match="keep tensor inside a slice"):
    sharding.make_mesh({"data": -1, "dcn_tensor": 2})
  # dcn sizes of 1 are the plain mesh
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "dcn_data": 1, "dcn_fsdp": 1})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}


def test_one_host_holds_the_whole_batch():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert hosts.batch_block(mesh) == (0, 1)
  x = np.arange(16).reshape(8, 2)
  g = hosts.to_global(x, sharding.batch_sharding(mesh, 2))
  np.testing.assert_array_equal(hosts.to_local(g), x)
  assert hosts.gather({"a": 1}) == [{"a": 1}] and hosts.all_max(3) == 3
