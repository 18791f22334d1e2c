"""Final-answer extraction and numeric checking, against hand-written cases."""
from fractions import Fraction

import pytest

from ropd_jax import math_answer as ma


@pytest.mark.parametrize("text, form, value", [
    ("48/2 = 24 clips in May.\n48 + 24 = 72\n#### 72", "hash", Fraction(72)),
    ("#### 1,234", "hash", Fraction(1234)),
    ("So she earns $18 per day.\n#### $18.00", "hash", Fraction(18)),
    (r"Thus the answer is $\boxed{\frac{3}{4}}$.", "boxed", Fraction(3, 4)),
    (r"\boxed{ \dfrac{10}{4} } hmm", "boxed", Fraction(5, 2)),
    ("The final answer is 25%.", "phrase", Fraction(25)),
    ("answer: -7 degrees", "phrase", Fraction(-7)),
    ("The answer is 18 dollars per day, for 2 days.", "phrase", Fraction(18)),
    ("She has 3 apples and buys 4 more, so 7 apples", "last_number", Fraction(7)),
    ("Pay 0.5 of 12", "last_number", Fraction(12)),
])
def test_extract_final_answer(text, form, value):
  ans = ma.extract_final_answer(text)
  assert ans is not None
  assert (ans.form, ans.value) == (form, value)


def test_no_answer_and_connector_required():
  assert ma.extract_final_answer("no numbers here") is None
  # "answer" without is/:/= is not an answer statement; falls back to the last number.
  ans = ma.extract_final_answer("To answer this we need 5 apples and 6 pears")
  assert (ans.form, ans.value) == ("last_number", Fraction(6))


@pytest.mark.parametrize("span, value", [
    ("$1,000,000", Fraction(10**6)), ("5.00", Fraction(5)), ("3/4", Fraction(3, 4)),
    (r"\frac{7}{20}", Fraction(7, 20)), ("12 apples", Fraction(12)), ("−3", Fraction(-3)),
    ("5 hours and 30 minutes", None), ("", None), ("1/0", None),
])
def test_parse_number(span, value):
  assert ma.parse_number(span) == value


def test_numbers_in_treats_slashes_as_two_numbers():
  assert ma.numbers_in("48/2 = 24 and 1,200 more") == [48, 2, 24, 1200]


def test_is_correct_and_accuracy():
  ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72"
  assert ma.reference_value(ref) == 72
  assert ma.reference_value("1,000") == 1000
  assert ma.is_correct("so 72 in total.\n#### 72.0", ref)
  assert not ma.is_correct("#### 71", ref)
  assert ma.is_correct("she sold 72", ref)                          # lenient: last number
  assert not ma.is_correct("she sold 72", ref, require_explicit=True)
  assert ma.answers_match(Fraction(1, 3), Fraction(333333333, 10**9))   # within 1e-6 relative
  assert not ma.answers_match(Fraction(1, 3), Fraction(33, 100))
  assert ma.accuracy(["#### 72", "#### 5", "x"], [ref, "5", "3"]) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="2 responses but 1 references"):
    ma.accuracy(["a", "b"], ["c"])


def test_final_answers_stated_detects_hedging():
  assert ma.final_answers_stated("The answer is 98.\nThe answer is 58.\n#### 80") == [80, 98, 58]


def test_format_number():
  assert [ma.format_number(v) for v in (Fraction(72), Fraction(5, 2), Fraction(-1, 8), Fraction(1, 3))] == \
      ["72", "2.5", "-0.125", "1/3"]
