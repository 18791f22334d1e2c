"""The judge's JSON interfaces: schemas sent to the backends, lenient parsing, strict validation.

Rubric    {"schema_version": "ropd.rubric.v1", "rubrics": [{criterion_id, category, criterion, points}],
           "maximum_score": int}
Verdicts  {"schema_version": "ropd.batch_verifier.v2",
           "answers": [{"answer_index": 1.., "judgement": [bool]*K, "final_score": number}]}

Parsing repairs only what an honest model gets wrong around the JSON (code fences, prose before/after);
validation never repairs content: a wrong count, order, length or a non-finite number is an error so the
call is retried with a corrective note (the official code silently scored such groups 0).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re

RUBRIC_VERSION = "ropd.rubric.v1"
VERDICT_VERSION = "ropd.batch_verifier.v2"
MIN_CRITERIA, MAX_CRITERIA = 4, 12
MIN_POINTS, MAX_POINTS = 1, 5
_ID_RE = re.compile(r"^c\d+$")

RUBRIC_SCHEMA = {
    "type": "object",
    "properties": {
        "schema_version": {"type": "string", "enum": [RUBRIC_VERSION]},
        "rubrics": {
            "type": "array", "minItems": MIN_CRITERIA, "maxItems": MAX_CRITERIA,
            "items": {
                "type": "object",
                "properties": {
                    "criterion_id": {"type": "string"},
                    "category": {"type": "string"},
                    "criterion": {"type": "string"},
                    "points": {"type": "integer", "minimum": MIN_POINTS, "maximum": MAX_POINTS},
                },
                "required": ["criterion_id", "category", "criterion", "points"],
                "additionalProperties": False,
            },
        },
        "maximum_score": {"type": "integer"},
    },
    "required": ["schema_version", "rubrics", "maximum_score"],
    "additionalProperties": False,
}

VERDICT_SCHEMA = {
    "type": "object",
    "properties": {
        "schema_version": {"type": "string", "enum": [VERDICT_VERSION]},
        "answers": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "answer_index": {"type": "integer", "minimum": 1},
                    "judgement": {"type": "array", "items": {"type": "boolean"}},
                    "final_score": {"type": "number"},
                },
                "required": ["answer_index", "judgement", "final_score"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["schema_version", "answers"],
    "additionalProperties": False,
}


class OutputError(ValueError):
  """A judge reply that cannot be used. `kind` is parse_error | schema_error | validation_error."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


@dataclasses.dataclass(frozen=True)
class Criterion:
  criterion_id: str
  category: str
  criterion: str
  points: int


@dataclasses.dataclass(frozen=True)
class Rubric:
  criteria: tuple[Criterion, ...]

  @property
  def points(self) -> list[int]:
    return [c.points for c in self.criteria]

  @property
  def maximum_score(self) -> int:
    return sum(self.points)

  def to_json(self) -> dict:
    return {"schema_version": RUBRIC_VERSION,
            "rubrics": [dataclasses.asdict(c) for c in self.criteria],
            "maximum_score": self.maximum_score}

  def hash(self) -> str:
    blob = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class AnswerVerdict:
  judgement: tuple[bool, ...]
  reported_score: float | None   # the judge's own final_score: compared, never used as the reward


# ----------------------------------------------------------------------------------------------- parsing

def _reject_constant(name: str):
  raise OutputError("validation_error", f"non-finite number {name} in judge output")


def parse_json_object(text: str) -> dict:
  """The JSON object in a reply, tolerating code fences and prose around it; NaN/Infinity are rejected."""
  if not text or not text.strip():
    raise OutputError("parse_error", "empty reply")
  body = text.strip()
  fence = re.match(r"^```[a-zA-Z0-9_-]*\s*\n?(.*?)\n?```\s*$", body, re.DOTALL)
  if fence:
    body = fence.group(1).strip()
  for candidate in _object_candidates(body):
    try:
      value = json.loads(candidate, parse_constant=_reject_constant)
    except json.JSONDecodeError:
      continue
    if not isinstance(value, dict):
      raise OutputError("schema_error", f"top level is {type(value).__name__}, expected an object")
    return value
  raise OutputError("parse_error", f"no JSON object could be parsed from the reply ({len(text)} chars)")


def _object_candidates(body: str):
  """The whole body first, then the span from the first '{' to each '}' from the last one backwards."""
  yield body
  start = body.find("{")
  if start < 0:
    return
  ends = [i for i, ch in enumerate(body) if ch == "}"]
  for end in reversed(ends[-8:]):
    if end > start:
      yield body[start:end + 1]


# -------------------------------------------------------------------------------------------- validation

def _int_value(value, field: str) -> int:
  """An integer written as 3, 3.0 or "3"; booleans and 3.5 are schema errors."""
  if isinstance(value, bool):
    raise OutputError("schema_error", f"{field} is a boolean, expected an integer")
  if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
    return int(value)
  if isinstance(value, int):
    return value
  if isinstance(value, float) and math.isfinite(value) and value.is_integer():
    return int(value)
  raise OutputError("schema_error", f"{field}={value!r} is not an integer")


def _text_field(item: dict, field: str, where: str) -> str:
  value = item.get(field)
  if not isinstance(value, str) or not value.strip():
    raise OutputError("schema_error", f"{where}.{field} must be a non-empty string")
  return value.strip()


def validate_rubric(obj: dict) -> Rubric:
  """Check a rubric object: version, 4-12 criteria, ids c<digits> unique, points integer 1-5."""
  if not isinstance(obj.get("rubrics"), list):
    raise OutputError("schema_error", "rubric has no 'rubrics' list")
  unknown = set(obj) - {"schema_version", "rubrics", "maximum_score"}
  if unknown:
    raise OutputError("schema_error", f"rubric has unknown keys {sorted(unknown)}")
  if obj.get("schema_version") != RUBRIC_VERSION:
    raise OutputError("validation_error",
                      f"schema_version={obj.get('schema_version')!r}, expected {RUBRIC_VERSION!r}")
  criteria = []
  for i, item in enumerate(obj["rubrics"]):
    where = f"rubrics[{i}]"
    if not isinstance(item, dict):
      raise OutputError("schema_error", f"{where} is not an object")
    extra = set(item) - {"criterion_id", "category", "criterion", "points"}
    if extra:
      raise OutputError("schema_error", f"{where} has unknown keys {sorted(extra)}")
    cid = _text_field(item, "criterion_id", where).lower()
    if not _ID_RE.match(cid):
      raise OutputError("validation_error", f"{where}.criterion_id={cid!r} is not c<digits>")
    points = _int_value(item.get("points"), f"{where}.points")
    if not MIN_POINTS <= points <= MAX_POINTS:
      raise OutputError("validation_error", f"{where}.points={points} outside {MIN_POINTS}..{MAX_POINTS}")
    criteria.append(Criterion(cid, _text_field(item, "category", where),
                              _text_field(item, "criterion", where), points))
  if not MIN_CRITERIA <= len(criteria) <= MAX_CRITERIA:
    raise OutputError("validation_error",
                      f"rubric has {len(criteria)} criteria; it needs {MIN_CRITERIA} to {MAX_CRITERIA}")
  ids = [c.criterion_id for c in criteria]
  if len(set(ids)) != len(ids):
    raise OutputError("validation_error", f"duplicate criterion ids in {ids}")
  # maximum_score is recomputed (Rubric.maximum_score), whatever the judge wrote.
  return Rubric(tuple(criteria))


def validate_verdicts(obj: dict, n_answers: int, n_criteria: int) -> list[AnswerVerdict]:
  """Check a verifier object: version, exactly n answers indexed 1..n in order, K booleans each, finite scores."""
  unknown = set(obj) - {"schema_version", "answers"}
  if unknown:
    raise OutputError("schema_error", f"verdicts have unknown keys {sorted(unknown)}")
  answers = obj.get("answers")
  if not isinstance(answers, list):
    raise OutputError("schema_error", "verdicts have no 'answers' list")
  if obj.get("schema_version") != VERDICT_VERSION:
    raise OutputError("validation_error",
                      f"schema_version={obj.get('schema_version')!r}, expected {VERDICT_VERSION!r}")
  if len(answers) != n_answers:
    raise OutputError("validation_error", f"{len(answers)} answers judged, expected {n_answers}")
  out = []
  for pos, item in enumerate(answers, start=1):
    where = f"answers[{pos - 1}]"
    if not isinstance(item, dict):
      raise OutputError("schema_error", f"{where} is not an object")
    extra = set(item) - {"answer_index", "judgement", "final_score"}
    if extra:
      raise OutputError("schema_error", f"{where} has unknown keys {sorted(extra)}")
    index = _int_value(item.get("answer_index"), f"{where}.answer_index")
    if index != pos:
      raise OutputError("validation_error",
                        f"{where}.answer_index={index}, expected {pos} (answers must keep the input order)")
    judgement = item.get("judgement")
    if not isinstance(judgement, list) or not all(isinstance(v, bool) for v in judgement):
      raise OutputError("schema_error", f"{where}.judgement must be a list of booleans")
    if len(judgement) != n_criteria:
      raise OutputError("validation_error",
                        f"{where}.judgement has {len(judgement)} entries, expected {n_criteria} (one per criterion)")
    out.append(AnswerVerdict(tuple(judgement), _finite_or_none(item.get("final_score"), f"{where}.final_score")))
  return out


def _finite_or_none(value, field: str) -> float | None:
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise OutputError("schema_error", f"{field}={value!r} is not a number")
  if not math.isfinite(value):
    raise OutputError("validation_error", f"{field}={value!r} is not finite")
  return float(value)


def score(judgement: tuple[bool, ...], points: list[int]) -> int:
  """Sum of the points of the criteria judged true (the reward numerator)."""
  if len(judgement) != len(points):
    raise ValueError(f"judgement has {len(judgement)} entries for {len(points)} criteria")
  return sum(p for v, p in zip(judgement, points) if v)


def reward(judgement: tuple[bool, ...], points: list[int]) -> float:
  """Weighted pass rate sum_k w_k v_k / sum_k w_k, in [0, 1]."""
  total = sum(points)
  if total <= 0:
    raise ValueError("rubric has no points")
  return min(1.0, max(0.0, score(judgement, points) / total))
