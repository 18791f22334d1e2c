"""Final-answer extraction and checking for math responses (GSM8K-style and competition-style).

Used by the offline judge (to verify criteria programmatically) and by the trainer (`accuracy/mean`).
Pure Python, no JAX.

Answer forms, from most to least explicit:
  "hash"        a GSM8K line `#### 42`
  "boxed"       LaTeX `\\boxed{42}` (balanced braces, nested ok)
  "phrase"      "the (final) answer is 42", "Answer: 42"
  "last_number" nothing explicit: the last number in the text (a weak guess, never "well-formed")
"""
from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

_HASH_RE = re.compile(r"####\s*([^\n]*)")
# The connector ("is", ":", "=") is required so "to answer this, we need 5" is not read as an answer.
_PHRASE_RE = re.compile(r"\banswer\s*(?:is\s*:?|:|=)\s*([^\n]*)", re.IGNORECASE)
# A number as people write it: optional sign, digits with thousands commas, decimals.
_PLAIN_NUMBER = r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|-?\d+(?:\.\d+)?|-?\.\d+"
_PLAIN_NUMBER_RE = re.compile(_PLAIN_NUMBER)
# Inside a short answer span a simple fraction "3/4" is one number.
_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?\s*/\s*\d+(?:\.\d+)?|" + _PLAIN_NUMBER)
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_NOISE_RE = re.compile(r"\\(?:text|mathrm|mbox|textbf)\s*\{[^{}]*\}|\\[,;!: ]|\\left|\\right|\$")
_MAX_DENOMINATOR = 10**9


@dataclasses.dataclass(frozen=True)
class FinalAnswer:
  text: str      # the raw answer span as written
  form: str      # "hash" | "boxed" | "phrase" | "last_number"
  value: Fraction | None  # numeric value when the span holds exactly one number


def _boxed_contents(text: str) -> list[str]:
  """Contents of every `\\boxed{...}` / `\\fbox{...}`, honouring nested braces."""
  out = []
  for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
    depth, start = 1, m.end()
    for i in range(start, len(text)):
      if text[i] == "{":
        depth += 1
      elif text[i] == "}":
        depth -= 1
        if depth == 0:
          out.append(text[start:i])
          break
  return out


def parse_number(span: str) -> Fraction | None:
  """The single number a short answer span denotes, or None when it holds none or several.

  Handles "$1,234.50", "12 apples", "25%", "3/4", "\\frac{3}{4}", "-7", "5.00" (== 5), "1 1/2" is not
  supported (ambiguous). Units and currency symbols are ignored; percent keeps the written number.
  """
  nums = _NUMBER_RE.findall(_clean_span(span))
  if len(nums) != 1:
    return None
  return _to_fraction(nums[0])


def _clean_span(span: str) -> str:
  """LaTeX fractions to a/b, LaTeX text/spacing/dollar signs dropped, unicode minus to '-'."""
  s = _FRAC_RE.sub(lambda m: f"{m.group(1).strip()}/{m.group(2).strip()}", span)
  s = _LATEX_NOISE_RE.sub(" ", s)
  return s.replace("−", "-").strip().rstrip(".").strip()


def _to_fraction(tok: str) -> Fraction | None:
  tok = tok.replace(",", "").replace(" ", "")
  try:
    if "/" in tok:
      num, den = tok.split("/", 1)
      if Fraction(den) == 0:
        return None
      return Fraction(num) / Fraction(den)
    return Fraction(tok)
  except (ValueError, ZeroDivisionError):
    return None


def numbers_in(text: str) -> list[Fraction]:
  """Every number written in `text` (thousands commas, decimals; "48/2" is two numbers), in order."""
  out = []
  for tok in _PLAIN_NUMBER_RE.findall(text):
    val = _to_fraction(tok)
    if val is not None:
      out.append(val)
  return out


def extract_final_answer(text: str) -> FinalAnswer | None:
  """The response's final answer in its most explicit form (the last occurrence of that form)."""
  hashes = [m.group(1).strip() for m in _HASH_RE.finditer(text) if m.group(1).strip()]
  if hashes:
    return FinalAnswer(hashes[-1], "hash", parse_number(hashes[-1]))
  boxes = [b.strip() for b in _boxed_contents(text) if b.strip()]
  if boxes:
    return FinalAnswer(boxes[-1], "boxed", parse_number(boxes[-1]))
  phrases = [m.group(1).strip() for m in _PHRASE_RE.finditer(text) if m.group(1).strip()]
  for span in reversed(phrases):
    value = _leading_number(span)
    if value is not None:
      return FinalAnswer(span, "phrase", value)
  nums = _PLAIN_NUMBER_RE.findall(text)
  if nums:
    return FinalAnswer(nums[-1], "last_number", _to_fraction(nums[-1]))
  return None


def _leading_number(span: str) -> Fraction | None:
  """First number of a phrase answer ("$18 per day." -> 18); None when the phrase has no number."""
  whole = parse_number(span)
  if whole is not None:
    return whole
  m = _NUMBER_RE.search(_clean_span(span))
  return _to_fraction(m.group(0)) if m else None


def final_answers_stated(text: str) -> list[Fraction]:
  """Every explicit final answer the text states (hash, boxed and phrase forms), to detect hedging."""
  spans = [m.group(1) for m in _HASH_RE.finditer(text)] + _boxed_contents(text)
  spans += [m.group(1) for m in _PHRASE_RE.finditer(text)]
  vals = [v for v in (_leading_number(s) for s in spans if s.strip()) if v is not None]
  return vals


def reference_value(reference: str) -> Fraction | None:
  """Numeric value of a reference: a bare number ("72", "1,000") or a worked solution ending in `#### 72`."""
  direct = parse_number(reference)
  if direct is not None and "####" not in reference and "boxed" not in reference:
    return direct
  ans = extract_final_answer(reference)
  return ans.value if ans is not None else None


def answers_match(a: Fraction | None, b: Fraction | None, rel_tol: float = 1e-6) -> bool:
  """Numeric equality with a tiny relative tolerance (so 0.333333 matches 1/3 only when written that precisely)."""
  if a is None or b is None:
    return False
  if a == b:
    return True
  scale = max(abs(a), abs(b), Fraction(1))
  return abs(a - b) <= Fraction(rel_tol) * scale


def is_correct(response: str, reference: str, *, require_explicit: bool = False) -> bool:
  """Whether the response's final answer equals the reference's value.

  require_explicit: when True, a bare trailing number ("last_number") does not count; the answer must be
  stated (####, \\boxed, or "the answer is").
  """
  ref = reference_value(reference)
  ans = extract_final_answer(response)
  if ans is None or (require_explicit and ans.form == "last_number"):
    return False
  return answers_match(ans.value, ref)


def accuracy(responses: list[str], references: list[str]) -> float:
  """Mean correctness (lenient extraction) over aligned responses and references; 0.0 for empty input."""
  if len(responses) != len(references):
    raise ValueError(f"accuracy: {len(responses)} responses but {len(references)} references")
  if not responses:
    return 0.0
  return sum(is_correct(r, ref) for r, ref in zip(responses, references)) / len(responses)


def format_number(value: Fraction) -> str:
  """Canonical short text for a value: integers plainly, other rationals as decimals when exact, else p/q."""
  if value.denominator == 1:
    return str(value.numerator)
  den = value.denominator
  while den % 2 == 0:
    den //= 2
  while den % 5 == 0:
    den //= 5
  if den == 1:
    return format(float(value), "f").rstrip("0").rstrip(".") if abs(value) < 10**15 else str(value)
  return f"{value.numerator}/{value.denominator}"
