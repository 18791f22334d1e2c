"""`python -m ropd_jax.judge score`: output rows, resume after an interruption, exit codes."""
import json
import os
import pathlib
import subprocess
import sys

from judge_server import JudgeServer

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "judge_gsm8k.jsonl"
CONFIG = '''
import ml_collections
from ropd_jax.judge.config import judge_config


def get_config():
  c = ml_collections.ConfigDict()
  c.judge = judge_config()
  return c
'''


def run_cli(tmp_path, *args, env=None):
  cfg = tmp_path / "cfg.py"
  cfg.write_text(CONFIG)
  full_env = dict(os.environ, **(env or {}))
  for key in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
    if key not in (env or {}):
      full_env.pop(key, None)
  return subprocess.run([sys.executable, "-m", "ropd_jax.judge", "score", f"--config={cfg}", "--noprogress",
                         f"--workdir={tmp_path}", *args], capture_output=True, text=True, env=full_env, timeout=120)


def rows_in(tmp_path, extra=()):
  rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()[:3]]
  rows += list(extra)
  path = tmp_path / "groups.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path, rows


def read(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def test_score_writes_rows_and_resumes(tmp_path):
  bad = {"question": "Q?", "student_answers": ["a"]}                # no teacher answers: a failed row, not fatal
  inp, rows = rows_in(tmp_path, [bad])
  out = tmp_path / "scored.jsonl"
  proc = run_cli(tmp_path, f"--input={inp}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr
  scored = read(out)
  assert [r["row_index"] for r in scored] == [0, 1, 2, 3]
  for src, r in zip(rows, scored):
    assert all(r[k] == v for k, v in src.items())                    # input fields kept
    assert len(r["student_rewards"]) == len(src["student_answers"])
  for r in scored[:3]:
    assert r["error"] is None and r["rubric"]["schema_version"] == "ropd.rubric.v1"
    assert len(r["verdicts"]) == len(r["teacher_answers"]) + len(r["student_answers"])
    assert r["usage"]["total"]["calls"] == 2 and r["teacher_scores"] == [1.0, 1.0]
  assert scored[3]["error"]["stage"] == "input" and scored[3]["error"]["type"] == "bad_group"

  # Interrupted run: two finished rows (marked, so we can tell they are not recomputed) and a torn line.
  first_two = [dict(r, marker="kept") for r in scored[:2]]
  out.write_text("".join(json.dumps(r) + "\n" for r in first_two) + '{"row_index": 2, "rubr')
  proc = run_cli(tmp_path, f"--input={inp}", f"--output={out}")
  assert proc.returncode == 0, proc.stderr
  assert '"scored_now": 2' in proc.stderr
  resumed = read(out)
  assert [r.get("marker") for r in resumed] == ["kept", "kept", None, None]
  assert [r["student_rewards"] for r in resumed] == [r["student_rewards"] for r in scored]


def test_score_against_a_server_with_overrides(tmp_path):
  inp, _ = rows_in(tmp_path)
  rows = read(inp)
  for r in rows:                                                     # scripted judge reads VERDICT markers
    r["student_answers"] = [f"{s} VERDICT:10111" for s in r["student_answers"]]
  inp.write_text("".join(json.dumps(r) + "\n" for r in rows))
  out = tmp_path / "scored.jsonl"
  with JudgeServer() as srv:
    proc = run_cli(tmp_path, f"--input={inp}", f"--output={out}", "--config.judge.cache_dir=",
                   "--config.judge.rubricator.backend=gemini", "--config.judge.verifier.backend=openai",
                   f"--config.judge.verifier.base_url={srv.url}/v1", "--config.judge.verifier.model=local",
                   env={"GEMINI_API_KEY": "k", "GOOGLE_GEMINI_BASE_URL": srv.url})
    assert proc.returncode == 0, proc.stderr
    assert srv.stage_counts() == {"rubricator": 3, "verifier": 3}
  for r in read(out):
    assert r["student_rewards"] == [17 / 22] * len(r["student_answers"])


def test_fatal_problems_exit_nonzero_with_a_message(tmp_path):
  inp, _ = rows_in(tmp_path)
  out = tmp_path / "o.jsonl"
  proc = run_cli(tmp_path, f"--input={tmp_path / 'missing.jsonl'}", f"--output={out}")
  assert proc.returncode == 2 and "cannot read --input" in proc.stderr
  proc = run_cli(tmp_path, f"--input={inp}", f"--output={out}", "--config.judge.rubricator.backend=gemini")
  assert proc.returncode == 2 and "judge.rubricator" in proc.stderr and "GEMINI_API_KEY" in proc.stderr
  (tmp_path / "broken.jsonl").write_text('{"question": "q"}\nnot json\n')
  proc = run_cli(tmp_path, f"--input={tmp_path / 'broken.jsonl'}", f"--output={out}")
  assert proc.returncode == 2 and "broken.jsonl:2 is not valid JSON" in proc.stderr
