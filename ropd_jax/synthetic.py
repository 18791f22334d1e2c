"""A synthetic arithmetic task for the tiny config and tests: checkable answers, worked teacher solutions.

Rows look like the GSM8K rows of the demo (prompt, answer, solution ending in `#### N`), so the same data
path, offline judge and answer checker serve both.
"""
from __future__ import annotations

import numpy as np

_OPS = (("+", lambda a, b: a + b, "add"), ("-", lambda a, b: a - b, "subtract"),
        ("*", lambda a, b: a * b, "multiply"))


def arithmetic_rows(num_rows: int, seed: int = 0, max_operand: int = 20) -> list[dict]:
  """`num_rows` two-step problems "a op b op c", deterministic in `seed`."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(num_rows):
    a, b, c = (int(x) for x in rng.integers(1, max_operand + 1, size=3))
    (s1, f1, w1), (s2, f2, w2) = (_OPS[int(j)] for j in rng.integers(0, len(_OPS), size=2))
    first = f1(a, b)
    answer = f2(first, c)
    prompt = f"Compute ({a} {s1} {b}) {s2} {c}. End with the final answer after '####'."
    solution = (f"First we {w1} {a} and {b}: {a} {s1} {b} = {first}.\n"
                f"Then we {w2} {c}: {first} {s2} {c} = {answer}.\n#### {answer}")
    rows.append({"id": f"arith-{seed}-{i}", "prompt": prompt, "answer": str(answer),
                 "solution": solution})
  return rows
