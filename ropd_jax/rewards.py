"""ROPD group scoring: teacher answers + student rollouts -> rubric -> blind verification -> rewards.

Per group (one prompt): strip reasoning, cap lengths, rubricate ONCE with all m teacher and n student
answers, verify ONCE on the deterministically shuffled, unlabelled pool of m + n answers (optionally in
chunks), map verdicts back, and RECOMPUTE every score as sum_k w_k v_ik / sum_k w_k in [0, 1]. The judge's
own `final_score` is only compared (`final_score_mismatches`). Teacher scores are a diagnostic, not rewards.

Nothing raises into the trainer: a failed group has `error = {stage, type, message}` and zero rewards,
and must be masked out of the loss (see ropd_jax.rl / train).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import math
import threading
import weakref
from typing import Any, Iterable, Sequence

from ropd_jax.judge import backends
from ropd_jax.judge import client as client_lib
from ropd_jax.judge import prompts
from ropd_jax.judge import schema

THINK_END = "</think>"


def strip_reasoning(text: str) -> str:
  """The text after the last `</think>` (stripped); the whole text if there is none or nothing follows it."""
  cut = text.rfind(THINK_END)
  if cut < 0:
    return text
  rest = text[cut + len(THINK_END):].strip()
  return rest if rest else text


def cap_text(text: str, max_chars: int) -> tuple[str, bool]:
  """Cap an answer at ~max_chars keeping its head and its tail (where final answers live)."""
  if len(text) <= max_chars:
    return text, False
  head = max_chars * 2 // 5
  tail = max_chars - head
  omitted = len(text) - head - tail
  return f"{text[:head]}\n[... {omitted} characters omitted ...]\n{text[-tail:]}", True


@dataclasses.dataclass
class Group:
  question: str
  teacher_answers: list[str]
  student_answers: list[str]
  reference_answer: str | None = None       # dataset ground truth, if any (offline judge may use it)
  truncated: list[bool] | None = None       # per student: the rollout hit the max generation length
  uid: str | None = None

  @classmethod
  def from_dict(cls, row: dict) -> "Group":
    missing = [k for k in ("question", "teacher_answers", "student_answers") if k not in row]
    if missing:
      raise ValueError(f"group row lacks {missing}; it needs question, teacher_answers, student_answers")
    return cls(question=row["question"], teacher_answers=list(row["teacher_answers"]),
               student_answers=list(row["student_answers"]), reference_answer=row.get("reference_answer"),
               truncated=row.get("truncated"), uid=row.get("uid"))


@dataclasses.dataclass
class GroupResult:
  student_rewards: list[float]              # aligned with student_answers, in [0, 1]; zeros when error
  teacher_scores: list[float]               # reward scale, aligned with the de-duplicated teacher answers
  rubric: dict | None = None                # ropd.rubric.v1 (maximum_score recomputed)
  verdicts: list[dict] = dataclasses.field(default_factory=list)   # pool order (what the verifier saw)
  order: list[list] = dataclasses.field(default_factory=list)      # pool order as [source, index]
  student_points: list[int] = dataclasses.field(default_factory=list)
  teacher_points: list[int] = dataclasses.field(default_factory=list)
  final_score_mismatches: int = 0           # answers whose reported final_score disagreed (overruled)
  capped: list[bool] = dataclasses.field(default_factory=list)     # per student: length cap applied
  truncated: list[bool] = dataclasses.field(default_factory=list)  # per student: hit max generation length
  error: dict | None = None                 # None, or {stage, type, message}
  usage: dict = dataclasses.field(default_factory=dict)  # {"rubricator": {...}, "verifier": {...}, "total"}

  @property
  def ok(self) -> bool:
    return self.error is None

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _dedupe(texts: Iterable[str]) -> list[str]:
  return list(dict.fromkeys(t for t in texts if t.strip()))


def pool_order(question: str, teachers: Sequence[str], students: Sequence[str], salt: str) -> list[tuple[str, int]]:
  """Deterministic shuffle of the verifier pool: sort by a salted hash of (question, source, index, text)."""
  entries = [("teacher", i, t) for i, t in enumerate(teachers)] + [("student", j, s) for j, s in enumerate(students)]

  def key(e):
    blob = "\x1f".join([salt, question, e[0], str(e[1]), e[2]]).encode()
    return hashlib.sha256(blob).hexdigest()

  return [(src, idx) for src, idx, _ in sorted(entries, key=key)]


def chunk_sizes(n_answers: int, prompt_tokens: int, judge_cfg) -> list[int]:
  """How to split the pool across verifier calls: a fixed chunk size, or enough chunks for the context."""
  if judge_cfg.verifier_chunk_size > 0:
    size = judge_cfg.verifier_chunk_size
  else:
    budget = judge_cfg.context_tokens - judge_cfg.verifier.max_output_tokens
    parts = max(1, math.ceil(prompt_tokens / max(1, budget)))
    size = math.ceil(n_answers / parts)
  return [min(size, n_answers - s) for s in range(0, n_answers, size)]


class _Scorer:
  """Scores one group; keeps usage of every call, including failed ones."""

  def __init__(self, judge: client_lib.Judge, group: Group):
    self.judge, self.cfg, self.group = judge, judge.cfg, group
    self.usage = {"rubricator": client_lib.Usage(), "verifier": client_lib.Usage()}

  async def _call(self, request, validate):
    try:
      value, usage = await self.judge.call(request, validate)
    except client_lib.JudgeError as err:
      self.usage[request.role] = self.usage[request.role] + err.usage
      raise
    self.usage[request.role] = self.usage[request.role] + usage
    return value

  def _prepare(self, texts: list[str]) -> tuple[list[str], list[bool]]:
    out = [cap_text(strip_reasoning(t), self.cfg.max_answer_chars) for t in texts]
    return [t if t.strip() else "(empty response)" for t, _ in out], [c for _, c in out]

  async def rubric(self, teachers, students, truncated) -> schema.Rubric:
    refs = [prompts.Fenced(f"Reference answer R{i + 1}", t) for i, t in enumerate(teachers)]
    stus = [prompts.Fenced(f"Student answer S{j + 1}", s, "cut off at the length limit" if truncated[j] else "")
            for j, s in enumerate(students)]
    text = prompts.rubricator_prompt(self.group.question, refs, stus, fence_key=self.cfg.fence_key,
                                     extra_instructions=self.cfg.rubricator.extra_instructions)
    request = backends.Request(
        role="rubricator", messages=({"role": "user", "content": text},), json_schema=schema.RUBRIC_SCHEMA,
        schema_name="ropd_rubric",
        payload={"question": self.group.question, "references": teachers, "students": students,
                 "reference_answer": self.group.reference_answer})
    return await self._call(request, lambda raw: schema.validate_rubric(schema.parse_json_object(raw)))

  async def verify(self, rubric: schema.Rubric, pool: list[str], notes: list[str]) -> list[schema.AnswerVerdict]:
    def build(lo, hi):
      answers = [prompts.Fenced(f"Answer {i + 1}", pool[lo + i], notes[lo + i]) for i in range(hi - lo)]
      return prompts.verifier_prompt(self.group.question, rubric, answers, fence_key=self.cfg.fence_key,
                                     extra_instructions=self.cfg.verifier.extra_instructions)

    sizes = chunk_sizes(len(pool), backends.estimate_tokens(build(0, len(pool))), self.cfg)
    bounds, lo = [], 0
    for size in sizes:
      bounds.append((lo, lo + size))
      lo += size
    k = len(rubric.criteria)
    rubric_json = rubric.to_json()

    async def one(lo, hi):
      n = hi - lo
      request = backends.Request(
          role="verifier", messages=({"role": "user", "content": build(lo, hi)},),
          json_schema=schema.VERDICT_SCHEMA, schema_name="ropd_verdicts",
          payload={"question": self.group.question, "rubric": rubric_json, "answers": pool[lo:hi]})
      return await self._call(request, lambda raw: schema.validate_verdicts(schema.parse_json_object(raw), n, k))

    parts = await asyncio.gather(*(one(lo, hi) for lo, hi in bounds), return_exceptions=True)
    for part in parts:
      if isinstance(part, BaseException):
        raise part
    return [v for part in parts for v in part]

  async def run(self) -> GroupResult:
    g = self.group
    students, capped = self._prepare(g.student_answers)
    truncated = list(g.truncated) if g.truncated is not None else [False] * len(students)
    result = GroupResult(student_rewards=[0.0] * len(students), teacher_scores=[], capped=capped,
                         truncated=truncated)
    stage = "input"
    try:
      if len(truncated) != len(students):
        raise client_lib.JudgeError("input", "bad_group", f"{len(truncated)} truncated flags for "
                                    f"{len(students)} student answers")
      if not students:
        raise client_lib.JudgeError("input", "bad_group", "the group has no student answers")
      teachers, _ = self._prepare(_dedupe(strip_reasoning(t) for t in g.teacher_answers))
      if not teachers:
        raise client_lib.JudgeError("teacher", "missing_teacher_answers", "no teacher answers for this prompt")
      stage = "rubricator"
      rubric = await self.rubric(teachers, students, truncated)
      result.rubric = rubric.to_json()
      stage = "verifier"
      order = pool_order(g.question, teachers, students, self.cfg.shuffle_salt)
      texts = {"teacher": teachers, "student": students}
      pool = [texts[src][i] for src, i in order]
      notes = ["cut off at the length limit" if src == "student" and truncated[i] else "" for src, i in order]
      verdicts = await self.verify(rubric, pool, notes)
      self._fill(result, rubric, order, verdicts, len(teachers), len(students))
    except client_lib.JudgeError as err:
      result.error = err.to_dict()
    except asyncio.CancelledError:
      raise
    except Exception as exc:  # pylint: disable=broad-except
      result.error = {"stage": stage, "type": "internal_error", "message": f"{type(exc).__name__}: {exc}"[:500]}
    if result.error is not None:
      result.student_rewards = [0.0] * len(students)
    total = self.usage["rubricator"] + self.usage["verifier"]
    result.usage = {"rubricator": self.usage["rubricator"].to_dict(),
                    "verifier": self.usage["verifier"].to_dict(), "total": total.to_dict()}
    return result

  @staticmethod
  def _fill(result, rubric, order, verdicts, n_teachers, n_students) -> None:
    points = rubric.points
    t_points, s_points = [0] * n_teachers, [0] * n_students
    result.verdicts, result.order = [], []
    for pos, ((src, idx), v) in enumerate(zip(order, verdicts), start=1):
      pts = schema.score(v.judgement, points)
      if v.reported_score is not None and abs(v.reported_score - pts) > 1e-6:
        result.final_score_mismatches += 1
      (t_points if src == "teacher" else s_points)[idx] = pts
      result.order.append([src, idx])
      result.verdicts.append({"answer_index": pos, "source": src, "source_index": idx,
                              "judgement": list(v.judgement), "score": pts, "reported_score": v.reported_score})
    total = rubric.maximum_score
    result.teacher_points, result.student_points = t_points, s_points
    result.teacher_scores = [p / total for p in t_points]
    result.student_rewards = [min(1.0, max(0.0, p / total)) for p in s_points]


async def score_group(group: Group | dict, judge: client_lib.Judge) -> GroupResult:
  if isinstance(group, dict):
    group = Group.from_dict(group)
  return await _Scorer(judge, group).run()


async def score_groups(groups: Sequence[Group | dict], judge: client_lib.Judge,
                       max_in_flight: int | None = None) -> list[GroupResult]:
  """Score every group concurrently (bounded); results in input order; never raises for a bad group."""
  limit = asyncio.Semaphore(max_in_flight or judge.cfg.max_groups_in_flight)

  async def one(group):
    async with limit:
      try:
        return await score_group(group, judge)
      except (ValueError, TypeError, KeyError) as exc:   # malformed group rows
        n = len(group.get("student_answers", [])) if isinstance(group, dict) else len(group.student_answers)
        return GroupResult(student_rewards=[0.0] * n, teacher_scores=[],
                           error={"stage": "input", "type": "bad_group", "message": str(exc)[:500]})

  return list(await asyncio.gather(*(one(g) for g in groups)))


def summarize(results: Sequence[GroupResult]) -> dict[str, Any]:
  """Step-level accounting: failures by stage/type, calls, retries, tokens, cost, latency, agreement."""
  usage = client_lib.Usage()
  failures = collections.Counter()
  for r in results:
    usage = usage + client_lib.Usage(**{**_usage_fields(r.usage.get("total", {}))})
    if r.error is not None:
      failures[f"{r.error['stage']}/{r.error['type']}"] += 1
  ok = [r for r in results if r.ok]
  rewards = [x for r in ok for x in r.student_rewards]
  teacher = [x for r in ok for x in r.teacher_scores]
  latencies = [r.usage.get("total", {}).get("latency_s", 0.0) for r in results]
  return {
      "groups": len(results), "failed_groups": len(results) - len(ok),
      "fallback_rate": (len(results) - len(ok)) / max(1, len(results)),
      "failures": dict(failures), "usage": usage.to_dict(),
      "final_score_mismatches": sum(r.final_score_mismatches for r in ok),
      "student_reward_mean": sum(rewards) / len(rewards) if rewards else 0.0,
      "teacher_score_mean": sum(teacher) / len(teacher) if teacher else 0.0,
      "group_latency_max_s": max(latencies) if latencies else 0.0,
  }


def _usage_fields(d: dict) -> dict:
  names = {f.name for f in dataclasses.fields(client_lib.Usage)}
  return {k: v for k, v in d.items() if k in names}


class JudgeRunner:
  """A private event loop in a daemon thread, so the trainer can score batch t while sampling batch t+1.

  `submit(groups)` returns a concurrent.futures.Future of list[GroupResult]. Rate-limit state and HTTP
  connections persist across submissions (one loop for the runner's life)."""

  def __init__(self, judge: client_lib.Judge):
    self.judge = judge
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._loop.run_forever, name="ropd-judge", daemon=True)
    self._thread.start()

  def submit(self, groups: Sequence[Group | dict], max_in_flight: int | None = None) -> concurrent.futures.Future:
    if self._loop.is_closed():
      raise RuntimeError("JudgeRunner is closed")
    return asyncio.run_coroutine_threadsafe(score_groups(list(groups), self.judge, max_in_flight), self._loop)

  def run(self, coro) -> concurrent.futures.Future:
    """Run any judge coroutine on the runner's loop (e.g. teacher calls)."""
    return asyncio.run_coroutine_threadsafe(coro, self._loop)

  def close(self) -> None:
    if self._loop.is_closed():
      return
    asyncio.run_coroutine_threadsafe(self.judge.aclose(), self._loop).result(timeout=30)
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(timeout=30)
    self._loop.close()

  def __enter__(self) -> "JudgeRunner":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


_RUNNER_LOCK = threading.Lock()


def runner_for(judge: client_lib.Judge) -> JudgeRunner:
  """The judge's own long-lived runner (created on first use; its loop stops when the judge is collected)."""
  with _RUNNER_LOCK:
    runner = getattr(judge, "_runner", None)
    if runner is None:
      runner = JudgeRunner(judge)
      judge._runner = runner  # pylint: disable=protected-access
      loop = runner._loop  # pylint: disable=protected-access
      weakref.finalize(judge, loop.call_soon_threadsafe, loop.stop)
    return runner


def score_groups_sync(groups: Sequence[Group | dict], judge: client_lib.Judge,
                      max_in_flight: int | None = None) -> list[GroupResult]:
  """Blocking wrapper over score_groups, on the judge's runner (limits and connections persist across steps)."""
  return runner_for(judge).submit(groups, max_in_flight).result()
