"""Teacher index: canonical hashing, reference import, fingerprints, loud misses, and a build that is
interrupted with Ctrl-C and resumed to the same file as an uninterrupted build."""
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from judge_server import JudgeServer, ScriptedJudge
from ropd_jax import teacher_index as ti
from ropd_jax.judge import config

CONFIG = '''
import ml_collections
from ropd_jax.judge.config import judge_config, teacher_index_config


def get_config():
  c = ml_collections.ConfigDict()
  c.judge = judge_config()
  c.teacher_index = teacher_index_config()
  c.judge.teacher.backend = "openai"
  c.judge.teacher.model = "teacher-model"
  c.judge.cache_dir = ""
  c.teacher_index.m = 3
  c.teacher_index.concurrency = 2
  return c
'''


def full_config(source="teacher", m=3):
  c = ml_collections.ConfigDict()
  c.judge = config.judge_config()
  c.teacher_index = config.teacher_index_config()
  c.judge.teacher.backend, c.judge.teacher.model, c.judge.cache_dir = "openai", "teacher-model", ""
  c.teacher_index.source, c.teacher_index.m = source, m
  return c


def test_prompt_hash_is_canonical():
  expect = hashlib.sha256(b'[{"content":"hi","role":"user"}]').hexdigest()
  assert ti.prompt_hash("hi") == expect
  assert ti.prompt_hash([{"role": "user", "content": "hi"}]) == expect
  assert ti.prompt_hash({"prompt": "hi", "reference": "x", "uid": 3}) == expect
  assert ti.prompt_hash([{"content": [{"type": "text", "text": "hi"}], "role": "user"}]) == expect
  assert ti.prompt_hash([{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]) != expect
  assert ti.prompt_hash("hi ") != expect                              # exact text, no silent trimming


def test_import_references_and_load(tmp_path):
  rows = [{"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}, {"question": "2 + 2?", "solution": "#### 4"},
          {"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}]           # duplicate row collapses
  path = tmp_path / "refs.jsonl"
  index = ti.import_references(rows, str(path))
  assert len(index) == 2 and index.answers("1 + 1?") == ["1 + 1 = 2\n#### 2"]
  loaded = ti.load(str(path), full_config("references"))
  assert loaded.answers({"question": "2 + 2?"}) == ["#### 4"]
  with pytest.raises(ti.TeacherIndexMiss, match="no answers for prompt .*3 \\+ 3"):
    loaded.answers("3 + 3?")
  with pytest.raises(ti.TeacherIndexError, match="built with teacher settings .*source.*references"):
    ti.load(str(path), full_config("teacher"))
  with pytest.raises(ti.TeacherIndexError, match="no reference solution"):
    ti.import_references([{"question": "q"}])


def test_load_errors_are_loud(tmp_path):
  with pytest.raises(ti.TeacherIndexError, match="does not exist"):
    ti.load(str(tmp_path / "none.jsonl"), full_config())
  (tmp_path / "p.jsonl.partial").write_text("")
  with pytest.raises(ti.TeacherIndexError, match="interrupted"):
    ti.load(str(tmp_path / "p.jsonl"), full_config())
  cfg = full_config()
  header = {"kind": "header", "schema_version": ti.SCHEMA_VERSION, "fingerprint": ti.teacher_fingerprint(cfg), "m": 2}
  (tmp_path / "small.jsonl").write_text(json.dumps(header) + "\n")
  with pytest.raises(ti.TeacherIndexError, match="m=2 answers per prompt but teacher_index.m=3"):
    ti.load(str(tmp_path / "small.jsonl"), cfg)
  # Timeouts and URLs are not part of the fingerprint; the model is.
  other = full_config()
  other.judge.teacher.timeout_s, other.judge.teacher.base_url = 1.0, "http://elsewhere/v1"
  assert ti.teacher_fingerprint(other) == ti.teacher_fingerprint(cfg)
  other.judge.teacher.model = "other"
  assert ti.teacher_fingerprint(other) != ti.teacher_fingerprint(cfg)


class RepeatingTeacher(ScriptedJudge):
  """Gives the same answer for seeds 0 and 1, so the build must ask again to get m distinct answers."""

  def teacher(self, prompt, seed):
    return super().teacher(prompt, 0 if seed == 1 else seed)


def test_build_dedupes_and_resumes_in_process(tmp_path, monkeypatch):
  monkeypatch.setenv("OPENAI_API_KEY", "k")
  prompts = [{"prompt": f"Problem {i}: what is {i} + {i}?", "uid": i} for i in range(4)]
  with JudgeServer(judge=RepeatingTeacher()) as srv:
    cfg = full_config()
    cfg.judge.teacher.base_url = srv.url + "/v1"
    path = str(tmp_path / "index.jsonl")
    stats = ti.build(cfg, prompts, path=path, limit=2)
    assert (stats["built"], stats["failed"], stats["short"]) == (2, 0, 0)
    assert len(srv.records) == 2 * 4                                 # 3 seeds + 1 extra for the duplicate
    stats = ti.build(cfg, prompts, path=path)                        # only the 2 new prompts are asked
    assert (stats["already_done"], stats["built"]) == (2, 2) and len(srv.records) == 16
  index = ti.load(path, cfg)
  answers = index.answers(prompts[3]["prompt"])
  assert len(answers) == 3 and len(set(answers)) == 3 and "(sample 2)" in answers[1]
  assert [json.loads(line).get("uid") for line in pathlib.Path(path).read_text().splitlines()[1:]] == [0, 1, 2, 3]
  assert not os.path.exists(path + ".partial")


def _cli(tmp_path, out, srv, prompts_file):
  cfg = tmp_path / "cfg.py"
  cfg.write_text(CONFIG)
  return [sys.executable, "-m", "ropd_jax.teacher_index", "build", f"--config={cfg}", f"--prompts={prompts_file}",
          f"--output={out}", f"--config.judge.teacher.base_url={srv.url}/v1", f"--workdir={tmp_path}"]


def test_cli_build_interrupted_and_resumed_equals_uninterrupted(tmp_path):
  prompts_file = tmp_path / "prompts.jsonl"
  prompts_file.write_text("".join(json.dumps({"prompt": f"Question {i}?", "uid": i}) + "\n" for i in range(10)))
  env = dict(os.environ, OPENAI_API_KEY="k")
  with JudgeServer(latency=0.25) as srv:
    full = tmp_path / "full.jsonl"
    proc = subprocess.run(_cli(tmp_path, full, srv, prompts_file), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    calls_full = len(srv.records)
    assert calls_full == 30

    resumed = tmp_path / "resumed.jsonl"
    partial = pathlib.Path(str(resumed) + ".partial")
    child = subprocess.Popen(_cli(tmp_path, resumed, srv, prompts_file), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
      if partial.exists() and len(partial.read_text().splitlines()) >= 1 + 3:
        break
      time.sleep(0.02)
    child.send_signal(signal.SIGINT)                                 # Ctrl-C mid-build
    child.communicate(timeout=60)
    assert child.returncode != 0 and not resumed.exists()
    done = len(partial.read_text().splitlines()) - 1
    assert 3 <= done < 10
    before = len(srv.records)
    proc = subprocess.run(_cli(tmp_path, resumed, srv, prompts_file), env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(srv.records) - before == (10 - done) * 3                # finished prompts were not asked again
  assert resumed.read_bytes() == full.read_bytes()
  assert not partial.exists()
