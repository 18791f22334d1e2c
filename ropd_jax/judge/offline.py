"""The offline judge: a deterministic, programmatic STAND-IN for an LLM rubricator and verifier.

It exists so the demo and the tests run with no network and no key. It is not an LLM and it understands
nothing beyond what is written here; for real distillation use a Gemini or OpenAI-compatible judge.

It follows the method's shape on problems with a checkable numeric answer (GSM8K-style):
  rubricate  extract candidate criteria from the teacher answers (the final answer they agree on, stated in
             the form they use, one committed answer, intermediate quantities several teachers compute,
             shown arithmetic, no degenerate repetition, a complete ending), score each candidate on every
             teacher and student answer, keep those that separate teachers from students, weight them by
             how strongly they separate, and emit a normal `ropd.rubric.v1` rubric;
  verify     decide each criterion for each answer programmatically by re-reading the criterion text
             (which comes from the fixed templates below), and emit a normal `ropd.batch_verifier.v2` reply.

Weighting: the core criterion (correct final answer) always has 5 points, the required answer form 1 and
"commits to one final answer" 1-2. The criteria a correct answer need not meet (intermediate quantities,
shown work, no repetition, complete ending) share at most 3 points. So any correct answer that commits to
its value outscores every wrong answer (5 + w_single > 1 + w_single + 3), a correct one in the required
form most of all, while the remaining criteria still rank answers within each class by how much they
look like the teachers' work.
Problems without a numeric consensus answer get generic criteria (key terms the teachers share, no
repetition, complete ending), weighted by separation.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from fractions import Fraction
from typing import Callable

from ropd_jax import math_answer
from ropd_jax.judge import schema

OFFLINE_MODEL = "offline-judge-v1"   # name used in cache keys, prices and logs

TASK = "Task Fulfillment and Requirement Compliance"
QUALITY = "Observable Response Quality"
REASONING = "General Reasoning Quality"

_REST_BUDGET = 3          # points shared by criteria a correct answer may miss (keeps correct > wrong)
_MAX_INTERMEDIATE = 3
_MAX_TERMS = 4
_STOPWORDS = frozenset(
    "about above after again against because before being below between could does doing during each "
    "other their there these those through under until which while would should since where whose with "
    "without your yours this that then than they them what when will have from into also more most some "
    "such only very just answer response question".split())


@dataclasses.dataclass(frozen=True)
class Template:
  kind: str
  category: str
  text: str                                   # format string; {v} is the parameter
  pattern: re.Pattern                         # parses the parameter back from the criterion text
  check: Callable[[str, str], bool]           # (response, parameter text) -> bool


def _value(param: str) -> Fraction | None:
  return math_answer.parse_number(param)


def _has_number(response: str, value: Fraction) -> bool:
  return any(math_answer.answers_match(v, value) for v in math_answer.numbers_in(response))


def _check_final(response: str, param: str) -> bool:
  ans = math_answer.extract_final_answer(response)
  return ans is not None and math_answer.answers_match(ans.value, _value(param))


def _last_line(response: str) -> str:
  lines = [ln.strip() for ln in response.strip().splitlines() if ln.strip()]
  return lines[-1] if lines else ""


def _check_form_hash(response: str, _: str) -> bool:
  return re.fullmatch(r"####\s*\S.*", _last_line(response)) is not None and \
      math_answer.parse_number(_last_line(response)[4:]) is not None


def _check_form_boxed(response: str, _: str) -> bool:
  ans = math_answer.extract_final_answer(response)
  return ans is not None and ans.form == "boxed" and ans.value is not None


def _check_form_phrase(response: str, _: str) -> bool:
  ans = math_answer.extract_final_answer(response)
  return ans is not None and ans.form in ("hash", "boxed", "phrase") and ans.value is not None


def _check_single(response: str, _: str) -> bool:
  """An answer is identifiable and every explicitly stated final value agrees with it."""
  ans = math_answer.extract_final_answer(response)
  if ans is None or ans.value is None:
    return False
  stated = math_answer.final_answers_stated(response)
  return all(math_answer.answers_match(v, ans.value) for v in stated)


# An operation and its result on one line: "6 inches * 2 = 12", "<<6*2=12>>", "3 x $4 = $12".
_STEP_RE = re.compile(r"\d[^=\n]{0,60}?(?:[-+*/×÷]|\sx\s)[^=\n]{0,60}?=\s*\(?\$?-?\d")


def _check_work(response: str, _: str) -> bool:
  return _STEP_RE.search(response) is not None


def _units(response: str) -> list[str]:
  parts = re.split(r"(?<=[.!?])\s+|\n+", response)
  return [re.sub(r"\s+", " ", p.strip().lower()) for p in parts if len(p.strip()) >= 8]


def _check_no_repeat(response: str, _: str) -> bool:
  counts = collections.Counter(_units(response))
  return bool(response.strip()) and (not counts or max(counts.values()) < 3)


def _check_complete(response: str, _: str) -> bool:
  text = response.rstrip()
  return bool(text) and (re.search(r"[.!?)\]}$%*\d]$", text) is not None or text.endswith("**"))


def _check_term(response: str, param: str) -> bool:
  return re.search(rf"\b{re.escape(param.lower())}\b", response.lower()) is not None


def _template(kind, category, text, check):
  escaped = re.escape(text).replace(r"\{v\}", "(.+?)")
  return Template(kind, category, text, re.compile(f"^{escaped}$", re.DOTALL), check)


TEMPLATES = (
    _template("final", TASK, "The response's final answer is {v} (any equivalent numeric form counts).",
              _check_final),
    _template("form_hash", TASK, "The response ends with its final answer on a last line of the form "
              "'#### <number>'.", _check_form_hash),
    _template("form_boxed", TASK, r"The response gives its final answer inside \boxed{...}.",
              _check_form_boxed),
    _template("form_phrase", TASK, "The response states its final answer explicitly (for example "
              "'The answer is ...').", _check_form_phrase),
    _template("single", TASK, "The response commits to one final answer and does not state conflicting "
              "final values.", _check_single),
    _template("intermediate", QUALITY, "The response computes the intermediate quantity {v}.",
              lambda r, p: _has_number(r, _value(p))),
    _template("work", REASONING, "The response shows at least one explicit arithmetic step together with "
              "its result.", _check_work),
    _template("no_repeat", QUALITY, "The response does not repeat the same sentence or line three or more "
              "times.", _check_no_repeat),
    _template("complete", QUALITY, "The response ends cleanly, not in the middle of a sentence or a "
              "calculation.", _check_complete),
    _template("term", QUALITY, "The response addresses '{v}'.", _check_term),
)
_BY_KIND = {t.kind: t for t in TEMPLATES}
_FORM_KINDS = ("form_hash", "form_boxed", "form_phrase")


@dataclasses.dataclass
class _Candidate:
  kind: str
  param: str = ""
  separation: float = 0.0
  weight: int = 1

  @property
  def text(self) -> str:
    return _BY_KIND[self.kind].text.replace("{v}", self.param)

  def passes(self, response: str) -> bool:
    return bool(_BY_KIND[self.kind].check(response, self.param))


def parse_criterion(text: str) -> tuple[Template, str] | None:
  """The template and parameter a criterion text was written from, or None for foreign text."""
  for t in TEMPLATES:
    m = t.pattern.match(text.strip())
    if m:
      return t, (m.group(1) if m.groups() else "")
  return None


# -------------------------------------------------------------------------------------------- rubricate

def _consensus_final(references: list[str], reference_answer: str | None) -> Fraction | None:
  if reference_answer:
    value = math_answer.reference_value(reference_answer)
    if value is not None:
      return value
  votes = collections.Counter()
  first = {}
  for i, ref in enumerate(references):
    ans = math_answer.extract_final_answer(ref)
    if ans is not None and ans.value is not None and ans.form != "last_number":
      votes[ans.value] += 1
      first.setdefault(ans.value, i)
  if not votes:
    return None
  return max(votes, key=lambda v: (votes[v], -first[v]))


_RESULT_RE = re.compile(r"=\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)|<<[^<>]*=\s*(-?\d[\d,]*(?:\.\d+)?)>>")


def _results(text: str) -> list[Fraction]:
  """Values the text computes ("= 24", "<<48/2=24>>"), each once, in order of appearance."""
  out = {}
  for m in _RESULT_RE.finditer(text):
    value = math_answer.parse_number(m.group(1) or m.group(2))
    if value is not None:
      out.setdefault(value, None)
  return list(out)


def _intermediates(question: str, references: list[str], final: Fraction) -> list[str]:
  given = set(math_answer.numbers_in(question))
  counts = collections.Counter()
  order = {}
  for ref in references:
    for v in _results(ref):
      # 0 and +-1 appear in almost any text, so they are no evidence of a computed quantity.
      if v != final and v not in given and abs(v) > 1:
        counts[v] += 1
        order.setdefault(v, len(order))
  need = max(1, math.ceil(len(references) / 2))
  keep = [v for v in counts if counts[v] >= need]
  keep.sort(key=lambda v: (-counts[v], order[v]))
  return [math_answer.format_number(v) for v in keep]


def _required_form(question: str, references: list[str]) -> str:
  if "####" in question:
    return "form_hash"
  if "boxed" in question:
    return "form_boxed"
  forms = collections.Counter()
  for ref in references:
    ans = math_answer.extract_final_answer(ref)
    if ans is not None:
      forms[{"hash": "form_hash", "boxed": "form_boxed"}.get(ans.form, "form_phrase")] += 1
  return max(_FORM_KINDS, key=lambda k: (forms[k], -_FORM_KINDS.index(k))) if forms else "form_phrase"


def _key_terms(question: str, references: list[str]) -> list[str]:
  q_words = set(re.findall(r"[a-z]{5,}", question.lower()))
  counts = collections.Counter()
  order = {}
  for ref in references:
    for w in dict.fromkeys(re.findall(r"[a-z]{5,}", ref.lower())):   # first-appearance order: deterministic
      if w not in _STOPWORDS and w not in q_words:
        counts[w] += 1
        order.setdefault(w, len(order))
  need = max(1, math.ceil(len(references) / 2))
  keep = sorted((w for w in counts if counts[w] >= need), key=lambda w: (-counts[w], order[w]))
  return keep[:_MAX_TERMS * 3]


def _separation(c: _Candidate, references: list[str], students: list[str]) -> float:
  t = sum(c.passes(r) for r in references) / max(1, len(references))
  s = sum(c.passes(r) for r in students) / max(1, len(students))
  return t - s


def _by_separation(cands: list[_Candidate]) -> list[_Candidate]:
  return sorted(cands, key=lambda c: -c.separation)  # stable: ties keep template order


def rubricate(question: str, references: list[str], students: list[str],
              reference_answer: str | None = None) -> dict:
  """A `ropd.rubric.v1` object induced by contrasting teacher (reference) and student answers."""
  final = _consensus_final(references, reference_answer)
  chosen = _math_rubric(question, references, students, final) if final is not None else \
      _generic_rubric(question, references, students)
  return {"schema_version": schema.RUBRIC_VERSION,
          "rubrics": [{"criterion_id": f"c{i + 1}", "category": _BY_KIND[c.kind].category,
                       "criterion": c.text, "points": c.weight} for i, c in enumerate(chosen)],
          "maximum_score": sum(c.weight for c in chosen)}


def _weight(sep: float, cap: int) -> int:
  return int(min(cap, max(1, 1 + round(3 * sep))))


def _math_rubric(question, references, students, final) -> list[_Candidate]:
  core = _Candidate("final", math_answer.format_number(final), weight=5)
  form = _Candidate(_required_form(question, references), weight=1)   # formatting is worth at most 1
  single = _Candidate("single")
  single.separation = _separation(single, references, students)
  single.weight = _weight(single.separation, 2)
  rest = [_Candidate("intermediate", v) for v in _intermediates(question, references, final)]
  rest += [_Candidate("work"), _Candidate("no_repeat"), _Candidate("complete")]
  for c in rest:
    c.separation = _separation(c, references, students)
  inter = [c for c in _by_separation([c for c in rest if c.kind == "intermediate"])][:_MAX_INTERMEDIATE]
  rest = _by_separation([c for c in rest if c.kind != "intermediate"] + inter)
  picked, budget = [], _REST_BUDGET
  for c in rest:
    if c.separation > 0 and budget > 0:
      c.weight = min(budget, _weight(c.separation, 2))   # 2 = supporting merit
      budget -= c.weight
      picked.append(c)
  # At least 4 criteria: fill with the best remaining (non-separating) candidates at 1 point.
  for c in rest:
    if len(picked) + 3 >= 4 or budget <= 0:
      break
    if c not in picked:
      c.weight = 1
      budget -= 1
      picked.append(c)
  order = {id(c): i for i, c in enumerate(rest)}
  picked.sort(key=lambda c: order[id(c)])
  return [core, form, single] + picked


def _generic_rubric(question, references, students) -> list[_Candidate]:
  cands = [_Candidate("term", w) for w in _key_terms(question, references)]
  for c in cands:
    c.separation = _separation(c, references, students)
  terms = _by_separation(cands)[:_MAX_TERMS]
  base = [_Candidate("no_repeat"), _Candidate("complete"), _Candidate("work")]
  for c in base:
    c.separation = _separation(c, references, students)
  chosen = terms + base
  for c in chosen:
    c.weight = _weight(c.separation, 5 if c.kind == "term" else 3)
  chosen = [c for c in chosen if c.separation > 0] or chosen
  if len(chosen) < 4:
    chosen += [c for c in terms + base if c not in chosen][:4 - len(chosen)]
  if len(chosen) < 4:
    fillers = [_Candidate(k) for k in ("single", "form_phrase") if all(c.kind != k for c in chosen)]
    chosen += fillers[:4 - len(chosen)]
  return chosen[:12]


# ----------------------------------------------------------------------------------------------- verify

def judge_answer(criteria: list[dict], response: str) -> list[bool]:
  """Each criterion decided programmatically; criteria not written from our templates are false."""
  out = []
  for item in criteria:
    parsed = parse_criterion(item["criterion"])
    out.append(bool(parsed is not None and parsed[0].check(response, parsed[1])))
  return out


def verify(question: str, rubric: dict, answers: list[str]) -> dict:
  """A `ropd.batch_verifier.v2` object for `answers` (in order) under `rubric`."""
  del question  # every criterion is self-contained
  criteria = rubric["rubrics"]
  points = [int(c["points"]) for c in criteria]
  out = []
  for i, response in enumerate(answers, start=1):
    judgement = judge_answer(criteria, response)
    out.append({"answer_index": i, "judgement": judgement,
                "final_score": sum(p for p, v in zip(points, judgement) if v)})
  return {"schema_version": schema.VERDICT_VERSION, "answers": out}
