"""Default `judge` and `teacher_index` config sections, and their validation.

The offline judge is the default so the demo runs with no key and no network. Switch a role to a real LLM
with e.g. `--config.judge.rubricator.backend=gemini --config.judge.rubricator.model=gemini-2.5-flash`.
API keys come only from the environment (never from configs).
"""
from __future__ import annotations

import os

import ml_collections

ROLES = ("teacher", "rubricator", "verifier")
BACKENDS = ("offline", "gemini", "openai")
GEMINI_KEY_ENVS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")

# USD per million tokens (input, output). Estimates for the cost column only; check your provider's price
# list. A model matches the longest entry that prefixes its name; unknown models cost 0 and are counted.
DEFAULT_PRICES = (
    ("offline", 0.0, 0.0),
    ("gemini-2.5-flash-lite", 0.10, 0.40),
    ("gemini-2.5-flash", 0.30, 2.50),
    ("gemini-2.5-pro", 1.25, 10.00),
    ("gemini-2.0-flash", 0.10, 0.40),
    ("gpt-4.1-mini", 0.40, 1.60),
    ("gpt-4.1", 2.00, 8.00),
    ("gpt-4o-mini", 0.15, 0.60),
    ("gpt-4o", 2.50, 10.00),
)


def role_config(*, temperature: float, max_output_tokens: int, timeout_s: float) -> ml_collections.ConfigDict:
  """Settings of one judge role (teacher, rubricator or verifier)."""
  c = ml_collections.ConfigDict()
  c.backend = "offline"          # offline | gemini | openai (any OpenAI-compatible chat endpoint)
  c.model = "gemini-2.5-flash"   # model name sent to the backend (the offline judge ignores it)
  c.temperature = temperature    # sampling temperature; the teacher needs > 0 to get m distinct answers
  c.top_p = 1.0                  # nucleus sampling mass sent to the backend
  c.max_output_tokens = max_output_tokens  # output budget per call; a reply cut at it is an `incomplete` error
  c.thinking_budget = -1         # Gemini thinking tokens (-1: model default, 0: off)
  c.reasoning_effort = ""        # OpenAI-style reasoning effort ("", low, medium, high); "" sends nothing
  c.timeout_s = timeout_s        # deadline of one HTTP attempt
  c.retries = 3                  # transport retries per call (429, 5xx, timeouts, connection errors)
  c.quality_retries = 2          # retries per call after parse/schema/validation errors, with a corrective note
  c.concurrency = 32             # max requests in flight to this role's endpoint
  c.rpm = 1000                   # requests per minute to this role's endpoint (see judge.limits_burst_s)
  c.tpm = 4_000_000              # tokens per minute (prompt chars/4 + max_output_tokens, corrected by usage)
  c.base_url = ""                # endpoint override; "" = SDK default (Gemini also honours GOOGLE_GEMINI_BASE_URL)
  c.api_key_env = ""             # env var holding the key; "" = GEMINI_API_KEY/GOOGLE_API_KEY or OPENAI_API_KEY
  c.response_format = "json_schema"  # openai: json_schema | json_object (for servers without schema support)
  c.vertexai = False             # gemini: use Vertex AI (application default credentials) instead of an API key
  c.vertex_project = ""          # gemini + vertexai: GCP project ("" = GOOGLE_CLOUD_PROJECT)
  c.vertex_location = ""         # gemini + vertexai: region ("" = GOOGLE_CLOUD_LOCATION or us-central1)
  c.extra_instructions = ""      # appended to this role's prompt (task-specific guidance)
  return c


def judge_config() -> ml_collections.ConfigDict:
  """The `judge` section: three roles, the cache, limits policy, scoring and accounting settings."""
  c = ml_collections.ConfigDict()
  c.teacher = role_config(temperature=0.8, max_output_tokens=8192, timeout_s=480.0)
  c.rubricator = role_config(temperature=0.0, max_output_tokens=8192, timeout_s=120.0)
  c.verifier = role_config(temperature=0.0, max_output_tokens=4096, timeout_s=90.0)

  c.cache_dir = "judge_cache"     # persistent request cache, relative to the workdir ("" disables; absolute ok)
  c.cache_offline = True          # also cache the offline judge (cheap, but makes replays byte-exact)
  c.prices = DEFAULT_PRICES       # (model prefix, USD per 1M input tokens, USD per 1M output tokens)

  c.max_answer_chars = 16000      # per-answer cap before judging; longer answers keep head and tail
  c.verifier_chunk_size = 0       # answers per verifier call; 0 = all in one call unless context_tokens forces split
  c.context_tokens = 128000       # judge context window used to decide automatic verifier chunking
  c.max_groups_in_flight = 256    # groups scored concurrently by one score_groups call
  c.verifier_first = True         # queued verifier requests go before new rubric requests (finishes groups first)
  c.call_deadline_s = 900.0       # hard deadline of one logical call (queueing + all retries)
  c.limits_burst_s = 5.0          # rpm/tpm buckets allow this many seconds of quota at once and refill the
                                  # rest evenly, so no 60 s window exceeds rpm/tpm (steady rate: (60-b)/60 of it);
                                  # tokens are estimated as prompt chars/4 + max_output_tokens, then corrected

  c.backoff_initial_s = 1.0       # first transport-retry delay (doubles each retry, +-50% jitter)
  c.backoff_max_s = 30.0          # cap of one retry delay
  c.retry_after_cap_s = 60.0      # cap on a server's Retry-After (or Gemini RetryInfo) delay

  c.breaker_consecutive = 8       # circuit opens after this many consecutive transport errors on an endpoint...
  c.breaker_window = 40           # ...or when the last `breaker_window` outcomes...
  c.breaker_error_rate = 0.6      # ...hold at least this error fraction
  c.breaker_cooldown_s = 20.0     # open -> half-open after this long; calls wait (within their deadline)

  c.fence_key = "ropd-fence-v1"   # key of the keyed hash that makes answer boundaries; not a secret
  c.shuffle_salt = "ropd-pool-v1"  # salt of the deterministic verifier-pool shuffle
  return c


def teacher_index_config() -> ml_collections.ConfigDict:
  """The `teacher_index` section: where the m teacher answers per prompt live and how they were made."""
  c = ml_collections.ConfigDict()
  c.path = "teacher_index.jsonl"  # index file (JSONL with a fingerprint header); relative to the CWD
  c.m = 4                         # teacher answers used per prompt
  c.source = "teacher"            # teacher: built by asking judge.teacher | references: imported dataset solutions
  c.max_samples_factor = 2        # build asks up to m * factor times per prompt to collect m distinct answers
  c.concurrency = 64              # prompts built concurrently (HTTP limits are judge.teacher's)
  return c


class JudgeConfigError(ValueError):
  """A judge setting is unusable; the message names the field and the fix."""


def _judge_section(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return cfg.judge if "judge" in cfg else cfg


def validate_judge_config(cfg: ml_collections.ConfigDict, roles: tuple[str, ...] = ROLES) -> None:
  """Raise JudgeConfigError before any compute if a role cannot run (missing key, bad backend, bad limits).

  `cfg` is the whole config (with a `judge` field) or the judge section itself. `roles` limits the check to
  the roles a command will use (training does not call the teacher when an index exists).
  """
  judge = _judge_section(cfg)
  for role in roles:
    if role not in judge:
      raise JudgeConfigError(f"judge.{role} is missing; start from ropd_jax.judge.config.judge_config()")
    _validate_role(role, judge[role])
  if "verifier" in roles and judge.verifier.backend == "offline" and judge.rubricator.backend != "offline":
    raise JudgeConfigError(
        "judge.verifier.backend=offline can only check rubrics written by the offline rubricator; set "
        "judge.rubricator.backend=offline too, or use an LLM verifier")
  if judge.max_answer_chars < 200:
    raise JudgeConfigError(f"judge.max_answer_chars={judge.max_answer_chars} is too small (>= 200)")
  if not 0 < judge.limits_burst_s < 60:
    raise JudgeConfigError(f"judge.limits_burst_s={judge.limits_burst_s} must be in (0, 60) seconds")
  if judge.verifier_chunk_size < 0:
    raise JudgeConfigError("judge.verifier_chunk_size must be >= 0 (0 = automatic)")


def _validate_role(role: str, rc: ml_collections.ConfigDict) -> None:
  name = f"judge.{role}"
  if rc.backend not in BACKENDS:
    raise JudgeConfigError(f"{name}.backend={rc.backend!r}; choose one of {BACKENDS}")
  for field in ("timeout_s", "concurrency", "rpm", "tpm", "max_output_tokens"):
    if not rc[field] or rc[field] <= 0:
      raise JudgeConfigError(f"{name}.{field}={rc[field]!r} must be > 0")
  for field in ("retries", "quality_retries"):
    if rc[field] < 0:
      raise JudgeConfigError(f"{name}.{field}={rc[field]!r} must be >= 0")
  if rc.backend == "offline":
    return
  if not rc.model:
    raise JudgeConfigError(f"{name}.model is empty; name the {rc.backend} model (e.g. gemini-2.5-flash)")
  if rc.backend == "gemini" and not rc.vertexai and not resolve_api_key(rc):
    envs = (rc.api_key_env,) if rc.api_key_env else GEMINI_KEY_ENVS
    raise JudgeConfigError(
        f"{name} uses the Gemini API but {' / '.join(envs)} is not set: export {envs[0]}=<your key>, "
        f"or set {name}.vertexai=True for Vertex AI, or {name}.backend=offline")
  if rc.backend == "openai":
    if not rc.base_url and not os.environ.get("OPENAI_BASE_URL"):
      raise JudgeConfigError(
          f"{name}.base_url is empty and OPENAI_BASE_URL is unset; set it to the server's /v1 URL "
          "(e.g. http://127.0.0.1:8000/v1 for vLLM or https://api.openai.com/v1)")
    if rc.response_format not in ("json_schema", "json_object"):
      raise JudgeConfigError(f"{name}.response_format={rc.response_format!r}; use json_schema or json_object")


def resolve_api_key(rc: ml_collections.ConfigDict) -> str:
  """The role's API key from the environment ("" if none; local OpenAI-compatible servers need none)."""
  if rc.api_key_env:
    return os.environ.get(rc.api_key_env, "")
  envs = GEMINI_KEY_ENVS if rc.backend == "gemini" else ("OPENAI_API_KEY",)
  for env in envs:
    if os.environ.get(env):
      return os.environ[env]
  return ""


def price_per_mtok(prices, model: str) -> tuple[float, float] | None:
  """(input, output) USD per million tokens for `model` by longest matching prefix, or None if unknown."""
  best = None
  for entry in prices:
    prefix, p_in, p_out = entry
    if model.startswith(prefix) and (best is None or len(prefix) > len(best[0])):
      best = (prefix, float(p_in), float(p_out))
  return None if best is None else best[1:]
