"""Judge output parsing (light repair) and strict validation; the worked scoring example."""
import json

import pytest

from ropd_jax.judge import schema

RUBRIC = {"schema_version": "ropd.rubric.v1", "maximum_score": 99,   # wrong on purpose: recomputed
          "rubrics": [{"criterion_id": f"c{i + 1}", "category": "Task Fulfillment and Requirement Compliance",
                       "criterion": f"criterion {i + 1}", "points": p} for i, p in enumerate([5, 5, 4, 5, 3])]}


def verdicts(rows, version="ropd.batch_verifier.v2"):
  return {"schema_version": version,
          "answers": [{"answer_index": i + 1, "judgement": j, "final_score": s} for i, (j, s) in enumerate(rows)]}


def test_worked_example_17_of_22_and_5_of_22():
  rubric = schema.validate_rubric(RUBRIC)
  assert rubric.points == [5, 5, 4, 5, 3] and rubric.maximum_score == 22
  assert schema.score((True, False, True, True, True), rubric.points) == 17
  assert schema.reward((True, False, True, True, True), rubric.points) == pytest.approx(17 / 22)
  assert schema.reward((True, False, False, False, False), rubric.points) == pytest.approx(5 / 22)
  assert schema.validate_rubric(RUBRIC).to_json()["maximum_score"] == 22


@pytest.mark.parametrize("text", [
    json.dumps(RUBRIC),
    "```json\n" + json.dumps(RUBRIC) + "\n```",
    "```\n" + json.dumps(RUBRIC) + "\n```",
    "Here is the rubric:\n" + json.dumps(RUBRIC, indent=2) + "\nHope this helps {really}.",
])
def test_parse_repairs_fences_and_prose(text):
  assert schema.parse_json_object(text)["rubrics"][0]["points"] == 5


@pytest.mark.parametrize("text, kind", [
    ("", "parse_error"),
    (json.dumps(RUBRIC)[:80], "parse_error"),           # truncated
    ("[1, 2]", "schema_error"),
    ('{"final_score": NaN}', "validation_error"),
    ('{"final_score": -Infinity}', "validation_error"),
])
def test_parse_errors(text, kind):
  with pytest.raises(schema.OutputError) as err:
    schema.parse_json_object(text)
  assert err.value.kind == kind


def _rubric_with(**changes):
  obj = json.loads(json.dumps(RUBRIC))
  for key, value in changes.items():
    if key == "items":
      obj["rubrics"] = value
    else:
      obj[key] = value
  return obj


@pytest.mark.parametrize("obj, kind, fragment", [
    (_rubric_with(schema_version="ropd.rubric.v0"), "validation_error", "schema_version"),
    (_rubric_with(items=RUBRIC["rubrics"][:3]), "validation_error", "3 criteria"),
    (_rubric_with(items=RUBRIC["rubrics"] * 3), "validation_error", "15 criteria"),
    (_rubric_with(items=[dict(RUBRIC["rubrics"][0], points=6)] + RUBRIC["rubrics"][1:]), "validation_error", "points=6"),
    (_rubric_with(items=[dict(RUBRIC["rubrics"][0], points=2.5)] + RUBRIC["rubrics"][1:]), "schema_error", "2.5"),
    (_rubric_with(items=[dict(RUBRIC["rubrics"][0], points=True)] + RUBRIC["rubrics"][1:]), "schema_error", "boolean"),
    (_rubric_with(items=[dict(RUBRIC["rubrics"][0], criterion_id="c1a")] + RUBRIC["rubrics"][1:]), "validation_error", "c<digits>"),
    (_rubric_with(items=[dict(RUBRIC["rubrics"][1], criterion_id="c1")] + RUBRIC["rubrics"][:1] + RUBRIC["rubrics"][2:]), "validation_error", "duplicate"),
    (_rubric_with(items=[dict(RUBRIC["rubrics"][0], criterion=" ")] + RUBRIC["rubrics"][1:]), "schema_error", "non-empty"),
    (_rubric_with(extra=1), "schema_error", "unknown keys"),
])
def test_rubric_validation_errors(obj, kind, fragment):
  with pytest.raises(schema.OutputError) as err:
    schema.validate_rubric(obj)
  assert err.value.kind == kind and fragment in str(err.value)


def test_rubric_light_normalisation():
  items = [dict(RUBRIC["rubrics"][0], criterion_id=" C7 ", points="3")] + RUBRIC["rubrics"][1:]
  rubric = schema.validate_rubric(_rubric_with(items=items))
  assert rubric.criteria[0].criterion_id == "c7" and rubric.points[0] == 3


def test_verdicts_valid_and_reported_score_kept():
  out = schema.validate_verdicts(verdicts([([True, False], 5), ([False, False], 0.0)]), 2, 2)
  assert [v.judgement for v in out] == [(True, False), (False, False)]
  assert [v.reported_score for v in out] == [5.0, 0.0]


@pytest.mark.parametrize("obj, fragment", [
    (verdicts([([True, False], 5)]), "1 answers judged, expected 2"),
    (verdicts([([True, False], 5), ([True], 5)]), "1 entries, expected 2"),
    (verdicts([([True, False], 5), ([True, True], 1e999)]), "not finite"),
    (verdicts([([True, False], 5), ([True, True], 7)], version="v1"), "schema_version"),
    ({"schema_version": "ropd.batch_verifier.v2", "answers": [
        {"answer_index": 2, "judgement": [True, True], "final_score": 1},
        {"answer_index": 1, "judgement": [True, True], "final_score": 1}]}, "expected 1"),
])
def test_verdict_validation_errors(obj, fragment):
  with pytest.raises(schema.OutputError) as err:
    schema.validate_verdicts(obj, 2, 2)
  assert err.value.kind == "validation_error" and fragment in str(err.value)


def test_verdict_schema_errors():
  bad = verdicts([([True, "yes"], 5), ([True, True], 2)])
  with pytest.raises(schema.OutputError, match="list of booleans") as err:
    schema.validate_verdicts(bad, 2, 2)
  assert err.value.kind == "schema_error"


def test_rubric_hash_is_stable_and_content_sensitive():
  a = schema.validate_rubric(RUBRIC)
  b = schema.validate_rubric(_rubric_with(maximum_score=1))
  c = schema.validate_rubric(_rubric_with(items=[dict(RUBRIC["rubrics"][0], points=4)] + RUBRIC["rubrics"][1:]))
  assert a.hash() == b.hash() != c.hash()
