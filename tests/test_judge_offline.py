"""The offline stand-in judge: a hand-computed rubric, determinism, and a committed GSM8K-style set where
correct, well-formed answers must outscore wrong and malformed ones."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from ropd_jax import rewards
from ropd_jax.judge import client, config, offline, schema

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "judge_gsm8k.jsonl"
QUESTION = "A juggler can juggle 16 balls. Half of the balls are golf balls, and half of the golf balls are blue. How many blue golf balls are there?"
TEACHERS = ["Golf balls: 16 / 2 = 8.\nBlue: 8 / 2 = 4.\n#### 4", "16/2 = 8 golf balls, 8/2 = 4 blue.\n#### 4"]


def offline_judge(tmp_path=None):
  cfg = config.judge_config()
  cfg.cache_dir = str(tmp_path / "cache") if tmp_path else ""
  return client.Judge(cfg)


def test_hand_computed_rubric_and_scores():
  students = ["16 / 2 = 8\n#### 8", "The answer is 4."]
  rubric = offline.rubricate(QUESTION, TEACHERS, students)
  parsed = schema.validate_rubric(rubric)                            # a normal, valid rubric
  kinds = [offline.parse_criterion(c.criterion)[0].kind for c in parsed.criteria]
  # final=4 (5 pts); required form "####" (1); single answer: every answer commits -> no separation (1);
  # shown work: teachers 2/2, students 1/2 -> separation 0.5 -> 2 pts; intermediate 8: same separation,
  # gets the 1 point left of the 3-point budget.
  assert kinds == ["final", "form_hash", "single", "work", "intermediate"]
  assert parsed.points == [5, 1, 1, 2, 1]
  assert "final answer is 4 " in parsed.criteria[0].criterion and parsed.criteria[4].criterion.endswith("quantity 8.")
  verdicts = offline.verify(QUESTION, rubric, TEACHERS + students)
  got = [(a["judgement"], a["final_score"]) for a in verdicts["answers"]]
  assert got == [([True] * 5, 10), ([True] * 5, 10),
                 ([False, True, True, True, True], 5),               # wrong: everything but the answer
                 ([True, False, True, False, False], 6)]             # correct, informal, no work


def test_criteria_round_trip_and_foreign_text_is_false():
  for t in offline.TEMPLATES:
    text = t.text.replace("{v}", "12.5")
    parsed = offline.parse_criterion(text)
    assert parsed is not None and parsed[0].kind == t.kind and parsed[1] == ("12.5" if "{v}" in t.text else "")
  assert offline.parse_criterion("The response is insightful.") is None
  assert offline.judge_answer([{"criterion": "The response is insightful."}], "anything") == [False]


def test_generic_rubric_for_questions_without_numeric_answer():
  q = "Explain why the sky is blue."
  teachers = ["Sunlight is scattered by air molecules; shorter blue wavelengths scatter most (Rayleigh scattering).",
              "Because of Rayleigh scattering: molecules scatter short wavelengths like blue far more than red."]
  students = ["The sky is blue because it reflects the ocean.", "blue blue blue"]
  rubric = schema.validate_rubric(offline.rubricate(q, teachers, students))
  assert 4 <= len(rubric.criteria) <= 12
  assert any("'rayleigh'" in c.criterion for c in rubric.criteria)
  scores = [schema.score(tuple(a["judgement"]), rubric.points)
            for a in offline.verify(q, rubric.to_json(), teachers + students)["answers"]]
  assert min(scores[:2]) > max(scores[2:])


def test_gsm8k_set_correct_wellformed_beats_wrong(tmp_path):
  rows = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
  assert len(rows) == 6
  results = rewards.score_groups_sync(rows, offline_judge())
  by_label = {"correct_wellformed": [], "correct_informal": [], "wrong": [], "malformed": []}
  for row, r in zip(rows, results):
    assert r.error is None
    assert r.teacher_scores == [1.0, 1.0]
    rw = dict(zip(range(len(row["labels"])), r.student_rewards))
    good = [rw[i] for i, lab in enumerate(row["labels"]) if lab == "correct_wellformed"]
    bad = [rw[i] for i, lab in enumerate(row["labels"]) if lab in ("wrong", "malformed")]
    assert min(good) > max(bad), row["source"]
    for i, lab in enumerate(row["labels"]):
      by_label[lab].append(rw[i])
  mean = {k: sum(v) / len(v) for k, v in by_label.items()}
  assert mean["correct_wellformed"] > mean["correct_informal"] > mean["wrong"] > mean["malformed"]


def test_offline_judge_is_deterministic_and_cached(tmp_path):
  rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()[:2]]
  a = rewards.score_groups_sync(rows, offline_judge(tmp_path))
  b = rewards.score_groups_sync(rows, offline_judge(tmp_path))
  c = rewards.score_groups_sync(rows, offline_judge())
  for x, y, z in zip(a, b, c):
    assert x.rubric == y.rubric == z.rubric and x.verdicts == y.verdicts == z.verdicts
    assert y.usage["total"]["cache_hits"] == 2 and y.usage["total"]["requests"] == 0


def test_offline_judge_is_identical_across_processes():
  """No set/hash iteration order may leak into rubrics (PYTHONHASHSEED differs between processes)."""
  code = ("import json, sys; from ropd_jax.judge import offline; rows = [json.loads(l) for l in open(sys.argv[1])]; "
          "print(json.dumps([offline.rubricate(r['question'], r['teacher_answers'], r['student_answers']) "
          "for r in rows] + [offline.rubricate('Explain why the sky is blue.', ['Rayleigh scattering by air "
          "molecules favours short blue wavelengths.', 'Air molecules scatter blue light: Rayleigh scattering.'], "
          "['It reflects the sea.'])]))")
  outs = {subprocess.run([sys.executable, "-c", code, str(FIXTURE)], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONHASHSEED=str(seed))).stdout for seed in (1, 2, 3)}
  assert len(outs) == 1


def test_teacher_role_offline_is_a_typed_error():
  from ropd_jax.judge import backends
  judge = offline_judge()
  import asyncio
  with pytest.raises(client.JudgeError) as err:
    asyncio.run(judge.call(backends.Request(role="teacher", messages=({"role": "user", "content": "q"},)), str))
  assert err.value.kind == "unsupported" and "import dataset reference" in err.value.message
