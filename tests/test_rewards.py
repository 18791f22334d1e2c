"""Group scoring: recomputed rewards, shuffle/unshuffle, chunking, failures as typed errors, runners."""
import json

import pytest

from judge_server import ScriptedBackend, ScriptedJudge
from ropd_jax import rewards
from ropd_jax.judge import client, config


def make_judge(scripted=None, **overrides):
  cfg = config.judge_config()
  cfg.cache_dir = ""
  for key, value in overrides.items():
    node = cfg
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return client.Judge(cfg, backend_factory=ScriptedBackend.factory(scripted))


def test_strip_reasoning():
  assert rewards.strip_reasoning("<think>a</think>b</think>  final ") == "final"
  assert rewards.strip_reasoning("<think>only thoughts</think>  ") == "<think>only thoughts</think>  "
  assert rewards.strip_reasoning("no tags at all ") == "no tags at all "


def test_cap_text_keeps_head_and_tail():
  text = "H" * 500 + "M" * 1000 + "T" * 500
  capped, was = rewards.cap_text(text, 1000)
  assert was and capped.startswith("H" * 400) and capped.endswith("T" * 500 + "M" * 0)
  assert "[... 1000 characters omitted ...]" in capped
  assert rewards.cap_text("short", 1000) == ("short", False)


def test_worked_example_through_the_pipeline():
  judge = make_judge()
  group = rewards.Group("Q?", ["ref VERDICT:11111"], ["a VERDICT:10111", "b VERDICT:10000", "c"])
  (r,) = rewards.score_groups_sync([group], judge)
  assert r.error is None
  assert [c["points"] for c in r.rubric["rubrics"]] == [5, 5, 4, 5, 3]
  assert r.student_rewards == pytest.approx([17 / 22, 5 / 22, 0.0])
  assert r.student_points == [17, 5, 0] and r.teacher_points == [22] and r.teacher_scores == [1.0]
  assert r.final_score_mismatches == 0
  assert r.usage["total"]["calls"] == 2 and r.usage["rubricator"]["requests"] == 1


def test_misreporting_judge_is_overruled_and_counted():
  judge = make_judge(ScriptedJudge(misreport=3))   # every final_score is off by +3
  group = rewards.Group("Q?", ["ref VERDICT:11111"], ["a VERDICT:10111", "b VERDICT:10000"])
  (r,) = rewards.score_groups_sync([group], judge)
  assert r.student_rewards == pytest.approx([17 / 22, 5 / 22])     # not (17+3)/22
  assert r.final_score_mismatches == 3                              # all 3 pooled answers disagreed
  assert [v["reported_score"] - v["score"] for v in r.verdicts] == [3, 3, 3]
  assert max(r.teacher_scores) <= 1.0


def test_shuffle_then_unshuffle_restores_each_score():
  judge = make_judge()
  bits = ["11111", "10111", "10000", "00000", "01010", "11100", "00111", "10101"]
  students = [f"student {i} VERDICT:{b}" for i, b in enumerate(bits)]
  teachers = ["t0 VERDICT:11111", "t1 VERDICT:11110", "t2 VERDICT:11011", "t3 VERDICT:01111"]
  (r,) = rewards.score_groups_sync([rewards.Group("Q?", teachers, students)], judge)
  points = [5, 5, 4, 5, 3]
  expect = [sum(p for p, c in zip(points, b) if c == "1") / 22 for b in bits]
  assert r.student_rewards == pytest.approx(expect)
  assert r.teacher_points == [22, 19, 18, 17]
  # The verifier saw them in the shuffled order recorded in `order`, not in input order.
  assert r.order != [["teacher", i] for i in range(4)] + [["student", j] for j in range(8)]
  for v in r.verdicts:
    text = (teachers if v["source"] == "teacher" else students)[v["source_index"]]
    assert v["judgement"] == [c == "1" for c in text.split("VERDICT:")[1]]


def test_pool_order_is_deterministic_and_salted():
  a = rewards.pool_order("q", ["t1", "t2"], ["s1", "s2", "s3"], "salt")
  assert a == rewards.pool_order("q", ["t1", "t2"], ["s1", "s2", "s3"], "salt")
  assert sorted(a) == [("student", 0), ("student", 1), ("student", 2), ("teacher", 0), ("teacher", 1)]
  others = {tuple(rewards.pool_order("q", ["t1", "t2"], ["s1", "s2", "s3"], f"salt{i}")) for i in range(20)}
  assert len(others) > 5


def test_chunked_verification_equals_single_call():
  bits = ["10111", "10000", "00000", "11111", "01010", "11100", "00111", "10101"]
  group = rewards.Group("Q?", ["t VERDICT:11111", "u VERDICT:11010"], [f"s{i} VERDICT:{b}" for i, b in enumerate(bits)])
  (whole,) = rewards.score_groups_sync([group], make_judge())
  chunked_judge = make_judge(verifier_chunk_size=3)
  (chunked,) = rewards.score_groups_sync([group], chunked_judge)
  assert chunked.student_rewards == whole.student_rewards and chunked.order == whole.order
  assert chunked.usage["verifier"]["calls"] == 4                    # ceil(10 / 3)
  auto_judge = make_judge(context_tokens=4096 + 700)                # budget ~700 tokens forces a split
  (auto,) = rewards.score_groups_sync([group], auto_judge)
  assert auto.student_rewards == whole.student_rewards and auto.usage["verifier"]["calls"] >= 2
  assert rewards.chunk_sizes(10, 100, make_judge(verifier_chunk_size=4).cfg) == [4, 4, 2]


class BadRubricJudge(ScriptedJudge):
  def rubric(self, prompt):
    obj = super().rubric(prompt)
    obj["rubrics"] = obj["rubrics"][:3]                            # too few criteria, every time
    return obj


def test_persistent_bad_rubric_is_a_typed_failure_after_quality_retries():
  judge = make_judge(BadRubricJudge())
  (r,) = rewards.score_groups_sync([rewards.Group("Q?", ["t"], ["s1", "s2"])], judge)
  assert r.error["stage"] == "rubricator" and r.error["type"] == "validation_error"
  assert "3 criteria" in r.error["message"]
  assert r.student_rewards == [0.0, 0.0]
  assert r.usage["rubricator"]["requests"] == 3 and r.usage["rubricator"]["quality_retries"] == 2
  retried = [q for q in judge._backend_factory.requests if q.role == "rubricator"][1]
  assert "your previous reply could not be used" in retried.messages[0]["content"]


def test_missing_teacher_and_bad_rows_fail_without_raising():
  judge = make_judge()
  results = rewards.score_groups_sync(
      [rewards.Group("Q?", ["", "  "], ["s"]), {"question": "Q?", "student_answers": ["a", "b"]},
       rewards.Group("Q?", ["t VERDICT:11111"], ["s VERDICT:11111"], truncated=[True, False])], judge)
  assert results[0].error["stage"] == "teacher" and results[0].error["type"] == "missing_teacher_answers"
  assert results[1].error == {"stage": "input", "type": "bad_group", "message": results[1].error["message"]}
  assert "teacher_answers" in results[1].error["message"] and results[1].student_rewards == [0.0, 0.0]
  assert results[2].error["type"] == "bad_group" and "2 truncated flags" in results[2].error["message"]


def test_reasoning_stripped_empty_marked_and_truncation_noted():
  judge = make_judge()
  group = rewards.Group("Q?", ["<think>plan</think>t VERDICT:11111", "t VERDICT:11111"],
                        ["<think>x</think>s VERDICT:10111", ""], truncated=[False, True])
  (r,) = rewards.score_groups_sync([group], judge)
  assert r.error is None and r.teacher_points == [22]               # both teachers strip to one answer
  assert r.student_rewards == pytest.approx([17 / 22, 0.0])
  ver = [q for q in judge._backend_factory.requests if q.role == "verifier"][0].messages[0]["content"]
  assert "<think>" not in ver and "(empty response)" in ver and "(cut off at the length limit)" in ver
  assert r.truncated == [False, True]


def test_runner_overlaps_and_summarize():
  judge = make_judge()
  groups = [rewards.Group(f"Q{i}?", ["t VERDICT:11111"], ["a VERDICT:10111", "b VERDICT:10000"]) for i in range(5)]
  with rewards.JudgeRunner(judge) as runner:
    fut = runner.submit(groups)                                     # returns at once; scored in background
    results = fut.result(timeout=30)
  summary = rewards.summarize(results + [rewards.GroupResult([0.0], [], error={"stage": "verifier",
                                                                              "type": "timeout", "message": ""})])
  assert summary["groups"] == 6 and summary["failed_groups"] == 1
  assert summary["failures"] == {"verifier/timeout": 1}
  assert summary["student_reward_mean"] == pytest.approx((17 / 22 + 5 / 22) / 2)
  assert summary["usage"]["calls"] == 10
  json.dumps([r.to_dict() for r in results])                        # artifacts are JSON-serialisable
