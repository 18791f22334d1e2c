"""The ROPD judge: rubricator + blind verifier (and the teacher role) over Gemini, OpenAI-compatible
servers, or the offline stand-in, with a persistent cache, limits, retries and accounting.

Entry points: `make_judge(cfg, workdir)`, `ropd_jax.rewards.score_groups`, and the CLI
`python -m ropd_jax.judge score --config=... --input=groups.jsonl --output=scored.jsonl`.
"""
from ropd_jax.judge.client import Judge, JudgeError, Usage
from ropd_jax.judge.config import JudgeConfigError, judge_config, teacher_index_config, validate_judge_config


def make_judge(cfg, workdir: str | None = None, roles=("rubricator", "verifier")) -> Judge:
  """Validate the roles a caller will use (fails fast, naming the field) and build the judge."""
  validate_judge_config(cfg, roles)
  return Judge(cfg, workdir=workdir)


__all__ = ["Judge", "JudgeError", "Usage", "JudgeConfigError", "judge_config", "teacher_index_config",
           "validate_judge_config", "make_judge"]
