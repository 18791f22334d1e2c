"""The trainer end to end on configs/tiny.py: determinism, exact resume after SIGTERM, async judge, the
quality gate against a fault-injecting judge server, and bad input failing before any compute."""
import json
import os
import signal
import subprocess
import sys

import pytest

from configs import tiny
from ropd_jax import metrics as metrics_lib
from ropd_jax import train as train_lib
from ropd_jax.judge import config as judge_config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**overrides):
  cfg = tiny.get_config()
  cfg.data.tfds_dir = os.path.join(os.environ.get("PYTEST_TMP_TFDS", "/tmp"), "ropd_tfds_tests")
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def _rows(workdir):
  return metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))


def _uids(workdir, step):
  with open(os.path.join(workdir, "artifacts", f"step_{step:06d}.jsonl")) as f:
    return [json.loads(line)["uid"] for line in f]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ref"))
  summary = train_lib.train(_cfg(), workdir)
  return workdir, summary


def test_tiny_run_writes_every_metric(reference_run):
  workdir, summary = reference_run
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [0, 1, 2, 3] and summary["steps"] == 4
  required = ["reward/mean", "reward/std", "loss", "kl_to_old", "clip_fraction", "entropy",
              "response_length/mean", "judge/fallback_rate", "judge/latency_s", "judge/input_tokens",
              "judge/output_tokens", "judge/cost_usd", "rubric/num_criteria", "teacher_score/mean",
              "time/sample_s", "time/judge_s", "time/update_s", "throughput/tokens_per_s", "accuracy/mean"]
  for r in rows:
    missing = [k for k in required if k not in r]
    assert not missing, missing
    assert 0.0 <= r["reward/mean"] <= 1.0 and r["judge/fallback_rate"] == 0.0
    assert 4 <= r["rubric/num_criteria"] <= 12
  # A random model at lr 1e-3 moves: the policy at step 3 is not the policy of step 0.
  assert rows[-1]["entropy"] != rows[0]["entropy"]
  art = [json.loads(line) for line in open(os.path.join(workdir, "artifacts", "step_000000.jsonl"))]
  assert len(art) == 4 and all(a["rubric"]["schema_version"] == "ropd.rubric.v1" for a in art)
  assert all(len(a["student_answers"]) == 4 and len(a["verdicts"]) == 5 for a in art)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_sigterm_then_resume_reproduces_the_uninterrupted_run(reference_run, tmp_path, monkeypatch):
  ref_dir, _ = reference_run
  workdir = str(tmp_path / "interrupted")
  real_write = metrics_lib.MetricWriter.write

  def write_then_preempt(self, step, metrics):
    real_write(self, step, metrics)
    if step == 0:  # TPU preemption right after the first step, between checkpoints
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(metrics_lib.MetricWriter, "write", write_then_preempt)
  train_lib.train(_cfg(), workdir)
  assert [r["step"] for r in _rows(workdir)] == [0]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
  monkeypatch.setattr(metrics_lib.MetricWriter, "write", real_write)
  train_lib.train(_cfg(), workdir)
  # Same config and seed: identical metrics apart from wall-clock keys, row for row.
  assert metrics_lib.strip_wall_clock(_rows(workdir)) == metrics_lib.strip_wall_clock(_rows(ref_dir))
  for step in range(4):  # every step saw the same prompts: none twice, none skipped
    assert _uids(workdir, step) == _uids(ref_dir, step)


def test_async_judge_overlaps_and_completes(tmp_path):
  workdir = str(tmp_path)
  train_lib.train(_cfg(async_judge=True, total_steps=3, checkpoint_every=10), workdir)
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [0, 1, 2]
  assert all(r["gate/skipped"] == 0 and "loss" in r for r in rows)


def _judge_via_server(cfg, url):
  for role in ("rubricator", "verifier"):
    rc = cfg.judge[role]
    rc.backend, rc.model, rc.base_url = "openai", "fake-judge", url + "/v1"
    rc.timeout_s, rc.retries, rc.quality_retries = 0.5, 3, 2
  cfg.judge.backoff_initial_s = 0.01
  cfg.judge.backoff_max_s = 0.05
  cfg.judge.retry_after_cap_s = 0.05
  cfg.judge.cache_dir = ""
  return cfg


def test_fault_injecting_judge_server_transient_faults_are_retried(tmp_path):
  from tests.judge_server import FaultPlan, JudgeServer
  with JudgeServer(faults=FaultPlan(rate=0.3, seed=1, hang_s=3.0)) as srv:
    cfg = _judge_via_server(_cfg(total_steps=2, checkpoint_every=10), srv.url)
    train_lib.train(cfg, str(tmp_path))
    injected = sum(srv.injected.values())
  rows = _rows(str(tmp_path))
  assert len(rows) == 2 and all(r["judge/fallback_rate"] == 0.0 for r in rows)
  assert injected > 0
  assert sum(r["judge/retries"] for r in rows) == injected  # each transient fault cost one retry


def test_quality_gate_skips_then_stops(tmp_path):
  from tests.judge_server import JudgeServer
  with JudgeServer() as srv:
    # Every verifier request for these prompts fails, so every group fails even after the gate's retry.
    cfg = _judge_via_server(_cfg(total_steps=1, checkpoint_every=10), srv.url)
    cfg.chat.instruction = "[[PERSIST:verifier:server_error]]"
    cfg.judge.verifier.retries = 1
    train_lib.train(cfg, str(tmp_path / "skip"))
    rows = _rows(str(tmp_path / "skip"))
    assert rows[0]["gate/skipped"] == 1 and rows[0]["judge/fallback_rate"] == 1.0
    assert "loss" not in rows[0]  # no update
    cfg.on_gate = "stop"
    with pytest.raises(train_lib.GateStop, match="quality gate: 4/4 groups failed at step 0"):
      train_lib.train(cfg, str(tmp_path / "stop"))
  report = json.load(open(tmp_path / "stop" / "gate_report.json"))
  assert report["step"] == 0 and len(report["failed_groups"]) == 4
  assert report["failed_groups"][0]["stage"] == "verifier"
  assert os.listdir(tmp_path / "stop" / "checkpoints") == ["0"]  # resume redoes step 0


# -- bad input: clear errors before any compute ----------------------------------------------------------------
def test_missing_model_path(tmp_path):
  cfg = _cfg()
  cfg.model.source, cfg.model.path = "hf", str(tmp_path / "no_model")
  with pytest.raises(train_lib.policy_lib.PolicyConfigError, match="model.path=.*no_model.*config.json"):
    train_lib.preflight(cfg, str(tmp_path / "run"))


def test_missing_gemini_key(tmp_path, monkeypatch):
  for env in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
    monkeypatch.delenv(env, raising=False)
  cfg = _cfg()
  cfg.judge.verifier.backend = "gemini"
  cfg.judge.rubricator.backend = "gemini"
  with pytest.raises(judge_config_lib.JudgeConfigError, match="judge.rubricator.*GEMINI_API_KEY"):
    train_lib.preflight(cfg, str(tmp_path / "run"))


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(train_lib.ConfigError, match="workdir .*file/run.* is not writable"):
    train_lib.preflight(_cfg(), str(blocker / "run"))


def test_teacher_index_for_another_config(tmp_path):
  from ropd_jax import teacher_index
  cfg = _cfg()
  cfg.teacher_index.source = "teacher"
  cfg.teacher_index.path = str(tmp_path / "index.jsonl")
  other = _cfg()
  other.teacher_index.source = "teacher"
  other.judge.teacher.model = "another-teacher"
  other.judge.teacher.backend = "openai"
  header = {"kind": "header", "schema_version": teacher_index.SCHEMA_VERSION,
            "fingerprint": teacher_index.teacher_fingerprint(other), "m": 4}
  (tmp_path / "index.jsonl").write_text(json.dumps(header) + "\n")
  with pytest.raises(teacher_index.TeacherIndexError, match="fingerprint|another-teacher"):
    train_lib.preflight(cfg, str(tmp_path / "run"))


def test_bad_structure_errors(tmp_path):
  with pytest.raises(train_lib.ConfigError, match="sampling.n=1"):
    train_lib.preflight(_cfg(**{"sampling.n": 1}), str(tmp_path))
  with pytest.raises(train_lib.ConfigError, match="rl.num_minibatches=3"):
    train_lib.preflight(_cfg(**{"rl.num_minibatches": 3}), str(tmp_path))
  with pytest.raises(train_lib.ConfigError, match="config.sampling: .*cache_grow_from=-1"):
    train_lib.preflight(_cfg(**{"sampling.cache_grow_from": -1}), str(tmp_path))
  with pytest.raises(train_lib.ConfigError, match="config.sampling: .*top_p=1.5"):
    train_lib.preflight(_cfg(**{"sampling.top_p": 1.5}), str(tmp_path))


def test_cli_unknown_config_key_is_a_clear_error(tmp_path):
  out = subprocess.run([sys.executable, "-m", "ropd_jax.train", "--config=configs/tiny.py",
                        f"--workdir={tmp_path}", "--config.rl.learning_rate=1e-3"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "learning_rate" in out.stderr
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_cli_bad_input_exits_nonzero_with_message(tmp_path):
  out = subprocess.run([sys.executable, "-m", "ropd_jax.train", "--config=configs/tiny.py",
                        f"--workdir={tmp_path}", "--config.model.source=hf",
                        "--config.model.path=/nonexistent/model"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert "error: model.path='/nonexistent/model'" in out.stderr


def test_export_writes_a_loadable_hf_directory(reference_run, tmp_path):
  import numpy as np
  from ropd_jax import export, model, weights
  workdir, _ = reference_run
  out = export.export(workdir, str(tmp_path / "hf"), dtype="float32")
  _, model_cfg, params = export.restore_params(workdir)
  cfg2, params2 = weights.load_hf(out)
  assert cfg2.num_layers == model_cfg.num_layers and cfg2.qk_norm
  for path, value in model.flatten_params(params).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(model.flatten_params(params2)[path]))
  assert os.path.exists(os.path.join(out, "tokenizer.json"))


def test_export_cli_needs_a_run(tmp_path):
  out = subprocess.run([sys.executable, "-m", "ropd_jax.export", f"--workdir={tmp_path}",
                        f"--out={tmp_path / 'hf'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2 and "config.json does not exist" in out.stderr


def test_checkpoint_from_8_devices_resumes_on_4(reference_run, tmp_path):
  """Saved on an 8-device mesh, restored onto a 4-device mesh: training continues with the same metrics."""
  ref_dir, _ = reference_run
  workdir = str(tmp_path)
  train_lib.train(_cfg(total_steps=2), workdir)            # 8 devices, checkpoint at step 2
  train_lib.train(_cfg(**{"mesh.num_devices": 4}), workdir)  # steps 2..3 on 4 devices
  ours, ref = metrics_lib.strip_wall_clock(_rows(workdir)), metrics_lib.strip_wall_clock(_rows(ref_dir))
  assert [r["step"] for r in ours] == [0, 1, 2, 3]
  for a, b in zip(ours, ref):
    assert a.keys() == b.keys()
    for k in a:
      if isinstance(a[k], float):
        assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (a["step"], k)
      else:
        assert a[k] == b[k], (a["step"], k)
