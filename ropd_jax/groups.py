"""Between the sampler and the update: rollouts -> judge groups -> rewards -> train batch, artifacts, metrics.

Host-side glue, kept out of train.py so the loop reads as a recipe.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from ropd_jax import math_answer
from ropd_jax import rewards as rewards_lib
from ropd_jax import rl
from ropd_jax import sampling
from ropd_jax import teacher_index as teacher_index_lib


@dataclasses.dataclass
class StepRollouts:
  """One step's prompts and their n rollouts each, decoded."""
  step: int
  rows: list[dict]                 # this host's data rows (prompt, answer, solution, id, text)
  rollouts: sampling.Rollouts      # host (numpy) arrays, B*n rows of this host
  texts: list[str]                 # decoded responses, B*n
  truncated: list[bool]            # cut at max_new_tokens
  sample_s: float


def question_of(row: dict, instruction: str = "") -> str:
  """The problem as the judge sees it: the user prompt (plus the configured instruction)."""
  prompt = teacher_index_lib.prompt_text(row["prompt"])
  return f"{prompt}\n\n{instruction}".strip() if instruction else prompt


def make_groups(sr: StepRollouts, n: int, index, instruction: str = "") -> list[rewards_lib.Group]:
  groups = []
  for i, row in enumerate(sr.rows):
    groups.append(rewards_lib.Group(
        question=question_of(row, instruction),
        teacher_answers=index.answers(row["prompt"]),
        student_answers=sr.texts[i * n:(i + 1) * n],
        reference_answer=row.get("answer") or None,
        truncated=sr.truncated[i * n:(i + 1) * n],
        uid=str(row.get("id", i))))
  return groups


def answer_correct(answer: str, reference: str) -> bool:
  """The math checker on the answer part of a rollout (text after any reasoning)."""
  return math_answer.is_correct(rewards_lib.strip_reasoning(answer), reference)


def correctness_results(groups: Sequence[rewards_lib.Group]) -> list[rewards_lib.GroupResult]:
  """The RLVR control: reward 1 for a correct final answer, 0 otherwise (needs reference answers)."""
  out = []
  for g in groups:
    if not g.reference_answer:
      out.append(rewards_lib.GroupResult(
          student_rewards=[0.0] * len(g.student_answers), teacher_scores=[],
          error={"stage": "input", "type": "no_reference",
                 "message": "reward=correctness needs an answer field in every data row"}))
      continue
    scores = [float(answer_correct(a, g.reference_answer)) for a in g.student_answers]
    out.append(rewards_lib.GroupResult(student_rewards=scores, teacher_scores=[]))
  return out


def accuracy(groups: Sequence[rewards_lib.Group]) -> float | None:
  """Fraction of rollouts whose final answer is right; None when no prompt carries a reference answer."""
  hits = [answer_correct(a, g.reference_answer)
          for g in groups if g.reference_answer for a in g.student_answers]
  return float(np.mean(hits)) if hits else None


def seq_bucket(n: int, multiple: int = 64) -> int:
  """Sequence lengths rounded up to a multiple (few distinct shapes, so few recompiles)."""
  return max(multiple, -(-n // multiple) * multiple)


def longest_sequence(ro: sampling.Rollouts) -> int:
  """Prompt + response tokens of the longest row (the update's padded width follows it)."""
  return int(np.max(np.asarray(ro.prompt_lengths_b) + np.asarray(ro.lengths_b)))


def train_batch(ro: sampling.Rollouts, results: Sequence[rewards_lib.GroupResult], n: int,
                normalize_std: bool, longest: int, rows: slice | None = None) -> tuple[dict, dict]:
  """The update's batch (advantages, masks, PPO old logprobs) for the rollouts `ro`, and reward stats.

  `results` are the groups of the whole step (every host's, in global order); `rows` picks the rows of
  `ro` among them (this host's block; all when None), so advantages and stats are the global ones.
  `longest` is the longest prompt + response over the whole step: every host pads to the same width.
  """
  # The PPO "old" policy is the full-vocabulary softmax at the sampling temperature: the same quantity the
  # update recomputes, so the ratio is exactly 1 on-policy (top-p/top-k only shape what was drawn).
  ro = ro._replace(logprobs_bt=ro.policy_logprobs_bt)
  seq_len = min(seq_bucket(longest), ro.prompt_ids.shape[1] + ro.tokens_bt.shape[1])
  full = sampling.train_batch(ro, seq_len=seq_len)
  valid_g = np.array([r.ok for r in results])
  rewards_b = np.concatenate([np.asarray(r.student_rewards, np.float32) for r in results])
  advantages_b = np.asarray(rl.group_advantages(rewards_b, n, valid_g, normalize_std=normalize_std))
  sample_valid_b = np.asarray(rl.group_row_mask(valid_g, n))
  rows = rows or slice(0, len(rewards_b))
  batch = {"tokens_bt": full["tokens_bt"], "valid_bt": full["valid_bt"],
           "loss_mask_bt": full["response_mask_bt"][:, 1:], "old_logprobs_bt": full["old_logprobs_bt"][:, 1:],
           "advantages_b": advantages_b[rows], "sample_valid_b": sample_valid_b[rows]}
  ok_rewards = rewards_b[sample_valid_b]
  stats = {"reward/mean": float(ok_rewards.mean()) if ok_rewards.size else None,
           "reward/std": float(ok_rewards.std()) if ok_rewards.size else None,
           "advantage/abs_mean": float(np.abs(advantages_b).mean())}
  return {k: np.asarray(v) for k, v in batch.items()}, stats


def judge_metrics(results: Sequence[rewards_lib.GroupResult]) -> dict[str, Any]:
  s = rewards_lib.summarize(results)
  usage = s["usage"]
  ok = [r for r in results if r.ok and r.rubric]
  criteria = [len(r.rubric["rubrics"]) for r in ok]
  out = {"judge/fallback_rate": s["fallback_rate"], "judge/failed_groups": s["failed_groups"],
         "judge/latency_s": s["group_latency_max_s"], "judge/input_tokens": usage["input_tokens"],
         "judge/output_tokens": usage["output_tokens"], "judge/cost_usd": usage["cost_usd"],
         "judge/requests": usage["requests"], "judge/cache_hits": usage["cache_hits"],
         "judge/retries": usage["retries"], "judge/final_score_mismatches": s["final_score_mismatches"],
         "rubric/num_criteria": float(np.mean(criteria)) if criteria else None,
         "teacher_score/mean": s["teacher_score_mean"] if ok else None}
  for key, count in sorted(s["failures"].items()):
    out[f"judge/failures/{key}"] = count
  return out


def artifact_rows(step: int, groups: Sequence[rewards_lib.Group],
                  results: Sequence[rewards_lib.GroupResult]) -> list[dict]:
  """One JSON row per group: what the judge saw and decided, for inspection after the run."""
  rows = []
  for g, r in zip(groups, results):
    rows.append({"step": step, "uid": g.uid, "prompt_hash": teacher_index_lib.prompt_hash(g.question),
                 "question": g.question, "student_answers": g.student_answers,
                 "reference_answer": g.reference_answer, "rubric": r.rubric, "order": r.order,
                 "verdicts": r.verdicts, "student_rewards": r.student_rewards,
                 "teacher_scores": r.teacher_scores, "truncated": g.truncated, "error": r.error,
                 "usage": r.usage.get("total", {})})
  return rows


def merge_retry(results: list, retried: list, failed_idx: Sequence[int]) -> list:
  out = list(results)
  for i, r in zip(failed_idx, retried):
    out[i] = r
  return out
