"""`python -m ropd_jax.judge score --config=... --input=groups.jsonl --output=scored.jsonl`

Scores {question, teacher_answers, student_answers[, reference_answer, truncated]} rows with the configured
judge, without loading any model. Each output row keeps the input fields and adds rubric, verdicts,
student_rewards, teacher_scores, error and usage (plus row_index, order, points and mismatch counts).
Rows are appended as they finish, so an interrupted run resumes where it stopped; when every row is done
the file is rewritten in input order. Exit 0 once every row is processed (failed rows carry `error`);
exit 2 for a bad config or an unreadable input.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys


class FatalError(Exception):
  pass


def read_rows(path: str) -> list[dict]:
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().split("\n")
  except OSError as exc:
    raise FatalError(f"cannot read --input={path}: {exc}") from exc
  rows = []
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as exc:
      raise FatalError(f"--input={path}:{i + 1} is not valid JSON ({exc})") from exc
    if not isinstance(row, dict):
      raise FatalError(f"--input={path}:{i + 1} is not a JSON object")
    rows.append(row)
  return rows


def read_done(path: str) -> dict[int, dict]:
  """Rows already scored by an earlier (possibly interrupted) run, by row_index; a torn last line is dropped."""
  if not os.path.exists(path):
    return {}
  done = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and isinstance(row.get("row_index"), int):
        done[row["row_index"]] = row
  return done


def _write_rows(path: str, rows: list[dict]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def output_row(row: dict, index: int, result) -> dict:
  out = dict(row)
  out.update(row_index=index, rubric=result.rubric, verdicts=result.verdicts,
             student_rewards=result.student_rewards, teacher_scores=result.teacher_scores,
             error=result.error, usage=result.usage, order=result.order, student_points=result.student_points,
             teacher_points=result.teacher_points, final_score_mismatches=result.final_score_mismatches,
             capped=result.capped)
  return out


async def score_file(judge, input_path: str, output_path: str, *, limit: int | None = None,
                     progress: bool = True) -> dict:
  from ropd_jax import rewards  # pylint: disable=import-outside-toplevel
  rows = read_rows(input_path)
  if limit is not None:
    rows = rows[:limit]
  done = {i: r for i, r in read_done(output_path).items() if i < len(rows)}
  # Rewrite what survived (drops a torn line) before appending, so the file stays valid JSONL.
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  _write_rows(output_path, [done[i] for i in sorted(done)])
  todo = [i for i in range(len(rows)) if i not in done]
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="judge score", unit="group")
  sem = asyncio.Semaphore(judge.cfg.max_groups_in_flight)
  with open(output_path, "a", encoding="utf-8") as out:
    async def one(i):
      async with sem:
        (result,) = await rewards.score_groups([rows[i]], judge)
      row = output_row(rows[i], i, result)
      done[i] = row
      out.write(json.dumps(row, ensure_ascii=False) + "\n")
      out.flush()
      if bar is not None:
        bar.update(1)

    await asyncio.gather(*(one(i) for i in todo))
  if bar is not None:
    bar.close()
  await judge.aclose()
  _write_rows(output_path, [done[i] for i in range(len(rows))])
  results = [done[i] for i in range(len(rows))]
  return {"rows": len(rows), "scored_now": len(todo), "failed": sum(r["error"] is not None for r in results),
          "usage": judge.totals.to_dict()}


def main(argv=None) -> int:
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, "Config file whose get_config() has a `judge` section.")
  flags.DEFINE_string("input", None, "JSONL of {question, teacher_answers, student_answers} rows.")
  flags.DEFINE_string("output", None, "JSONL to write (appended while running; resumable).")
  flags.DEFINE_string("workdir", ".", "Directory holding the judge cache (judge.cache_dir is relative to it).")
  flags.DEFINE_integer("limit", None, "Only the first N rows.")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")
  FLAGS = flags.FLAGS

  def run(args) -> int:
    from ropd_jax.judge import client as client_lib  # pylint: disable=import-outside-toplevel
    from ropd_jax.judge import config as config_lib  # pylint: disable=import-outside-toplevel
    if len(args) != 2 or args[1] != "score":
      print("usage: python -m ropd_jax.judge score --config=CFG.py --input=IN.jsonl --output=OUT.jsonl",
            file=sys.stderr)
      return 2
    try:
      if FLAGS.config is None or "judge" not in FLAGS.config:
        raise FatalError("--config must name a config file whose get_config() has a `judge` section")
      if not FLAGS.input or not FLAGS.output:
        raise FatalError("--input and --output are required")
      config_lib.validate_judge_config(FLAGS.config, roles=("rubricator", "verifier"))
      judge = client_lib.Judge(FLAGS.config, workdir=FLAGS.workdir)
      stats = asyncio.run(score_file(judge, FLAGS.input, FLAGS.output, limit=FLAGS.limit,
                                     progress=FLAGS.progress))
    except (FatalError, config_lib.JudgeConfigError) as exc:
      print(f"error: {exc}", file=sys.stderr)
      return 2
    print(json.dumps(stats), file=sys.stderr)
    return 0

  try:
    app.run(lambda a: sys.exit(run(a)), argv=argv)
  except SystemExit as exc:
    return int(exc.code or 0)
  return 0


if __name__ == "__main__":
  sys.exit(main())
