"""Real multi-controller runs: the trainer as 2 processes x 4 CPU devices joined by `jax.distributed` on
localhost (gloo collectives), against the same run as 1 process x 8 devices.

Each host samples, judges and batches only its own block of every step; the metrics, artifacts and
checkpoints must be those of the one-process run, and a run saved on 2 hosts must resume on 1.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

from ropd_jax import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 400
# Every run grows its KV cache (room 4, 8, 16 new tokens), so growth is exercised across hosts and on
# resume. Not against a full-cache run: on a random model's near-uniform 49k-token distribution a 1e-6
# difference in attention sums can flip one sampled token (test_sampling checks growth == full cache).
GROW = "--config.sampling.cache_grow_from=4"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _train(workdir, processes: int, *flags, cli: bool = False) -> list[subprocess.CompletedProcess]:
  """`python -m ropd_jax.train` on configs/tiny.py as `processes` hosts sharing 8 CPU devices, joined
  through the JAX_* environment variables, or with `cli` through the trainer's own flags."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}")
  address = f"127.0.0.1:{_free_port()}"
  cmd = [sys.executable, "-m", "ropd_jax.train", "--config=configs/tiny.py", f"--workdir={workdir}", *flags]
  cmds, envs = [cmd] * processes, [env] * processes
  if processes > 1 and cli:
    cmds = [cmd + [f"--coordinator_address={address}", f"--num_processes={processes}", f"--process_id={i}"]
            for i in range(processes)]
  elif processes > 1:
    envs = [dict(env, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i))
            for i in range(processes)]
  procs = [subprocess.Popen(c, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for c, e in zip(cmds, envs)]
  done = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    done.append(subprocess.CompletedProcess(cmd, p.returncode, out, err))
  return done


def _ok(runs):
  for i, r in enumerate(runs):
    assert r.returncode == 0, f"process {i} exited {r.returncode}:\n{r.stderr[-3000:]}"


def _metrics(workdir):
  return metrics_lib.strip_wall_clock(metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl")))


def _same_metrics(got, want):
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for g, w in zip(got, want):
    assert set(g) == set(w)
    for key, value in w.items():
      if isinstance(value, float):
        assert g[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (w["step"], key)
      else:
        assert g[key] == value, (w["step"], key)


def _artifact_answers(workdir, step):
  with open(os.path.join(workdir, "artifacts", f"step_{step:06d}.jsonl")) as f:
    return [(row["uid"], row["student_answers"], row["student_rewards"]) for row in map(json.loads, f)]


@pytest.fixture(scope="module")
def one_host(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("one_host"))
  _ok(_train(workdir, 1, GROW))
  return workdir


def test_two_hosts_train_like_one_and_resume_on_one(one_host, tmp_path):
  # Steps 0-1 on two hosts (a checkpoint after step 1), then steps 2-3 resumed on one host. The two
  # hosts form a multislice mesh, one process per slice (data = 2 over DCN x 4 within a host).
  workdir = str(tmp_path / "run")
  runs = _train(workdir, 2, "--config.total_steps=2", "--config.mesh.dcn_data=2", GROW)
  _ok(runs)
  assert os.path.getsize(os.path.join(workdir, "metrics.jsonl")) > 0
  want = _metrics(one_host)
  _same_metrics(_metrics(workdir), want[:2])
  # Every host sampled its own block: together the rollouts, in order, are the one-host run's.
  for step in (0, 1):
    assert _artifact_answers(workdir, step) == _artifact_answers(one_host, step)
  # Both hosts ran the same steps and print the same summary.
  assert all('"steps": 2' in r.stdout for r in runs)

  _ok(_train(workdir, 1, GROW))   # same command, one host: resumes at step 2
  _same_metrics(_metrics(workdir), want)
  for step in (2, 3):
    assert _artifact_answers(workdir, step) == _artifact_answers(one_host, step)


def test_a_mesh_that_splits_no_rows_across_hosts_is_refused(tmp_path):
  # tensor over all 8 devices spans both hosts, so both would need every row: a clear error, exit 2.
  runs = _train(str(tmp_path / "bad"), 2, "--config.mesh.data=1", "--config.mesh.tensor=-1", cli=True)
  for r in runs:
    assert r.returncode == 2, r.stderr[-2000:]
    assert "each of the 2 hosts must hold its own contiguous" in r.stderr
    assert "keep the tensor axis within a host" in r.stderr
