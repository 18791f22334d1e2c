"""The judge client: one logical call = cache lookup, admission, bounded retries, validation, accounting.

Retry layers (each call):
  transport  timeout / 429 / 5xx / connection: up to `retries` more attempts, exponential backoff with
             +-50% jitter, a server's Retry-After (or Gemini RetryInfo) honoured up to `retry_after_cap_s`;
  quality    empty / cut-off / unparsable / schema / validation errors: up to `quality_retries` more attempts,
             each with a corrective note naming the problem.
Every attempt has `timeout_s`; the whole call (queueing included) has `call_deadline_s`. Failures leave as
`JudgeError(stage, kind, message)` carrying the usage spent so far; nothing else escapes.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import random
import time
from typing import Callable, TypeVar

from ropd_jax.judge import backends as backends_lib
from ropd_jax.judge import cache as cache_lib
from ropd_jax.judge import config as config_lib
from ropd_jax.judge import limits
from ropd_jax.judge import prompts
from ropd_jax.judge import schema

T = TypeVar("T")


class JudgeError(Exception):
  """A call that failed for good. stage: teacher | rubricator | verifier; kind: the error type."""

  def __init__(self, stage: str, kind: str, message: str, usage: "Usage | None" = None):
    super().__init__(f"{stage}/{kind}: {message}")
    self.stage, self.kind, self.message = stage, kind, message
    self.usage = usage or Usage()

  def to_dict(self) -> dict:
    return {"stage": self.stage, "type": self.kind, "message": self.message[:500]}


@dataclasses.dataclass
class Usage:
  """Accounting for one call, or the sum over many (`+`)."""
  calls: int = 0              # logical calls
  requests: int = 0           # backend requests actually sent
  cache_hits: int = 0
  latency_s: float = 0.0      # wall time of the calls (summed when added)
  input_tokens: int = 0
  output_tokens: int = 0
  transport_retries: int = 0
  quality_retries: int = 0
  errors: dict = dataclasses.field(default_factory=dict)   # error kind -> count (including retried ones)
  cost_usd: float = 0.0
  unpriced_requests: int = 0  # requests to models missing from the price table

  @property
  def retries(self) -> int:
    return self.transport_retries + self.quality_retries

  def __add__(self, other: "Usage") -> "Usage":
    errors = collections.Counter(self.errors)
    errors.update(other.errors)
    fields = {f.name: getattr(self, f.name) + getattr(other, f.name)
              for f in dataclasses.fields(self) if f.name != "errors"}
    return Usage(errors=dict(errors), **fields)

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out["retries"] = self.retries
    out["latency_s"] = round(self.latency_s, 4)
    out["cost_usd"] = round(self.cost_usd, 8)
    return out


class Judge:
  """Holds the backends, gates, cache and accounting of one judge config. Use from one event loop at a
  time (JudgeRunner gives it a private one); moving to a new loop rebuilds the loop-bound parts."""

  def __init__(self, judge_cfg, *, workdir: str | None = None, backend_factory=backends_lib.make_backend,
               clock: Callable[[], float] = time.monotonic):
    self.cfg = judge_cfg.judge if "judge" in judge_cfg else judge_cfg
    self._backend_factory = backend_factory
    self.clock = clock
    self.cache = None
    if self.cfg.cache_dir:
      path = self.cfg.cache_dir
      if workdir is not None and not os.path.isabs(path) and "://" not in path:
        path = os.path.join(workdir, path)
      self.cache = cache_lib.Cache(path)
    self._loop = None
    self._backends: dict[str, backends_lib.Backend] = {}
    self._gates: dict[tuple, limits.EndpointGate] = {}
    self.totals = Usage()
    self._rng = random.Random()

  # ----------------------------------------------------------------------------------- loop-bound parts

  def _bind_loop(self) -> None:
    loop = asyncio.get_running_loop()
    if loop is self._loop:
      return
    self._loop = loop
    self._backends = {}
    self._gates = {}

  def backend(self, role: str) -> backends_lib.Backend:
    self._bind_loop()
    if role not in self._backends:
      self._backends[role] = self._backend_factory(role, self.cfg[role])
    return self._backends[role]

  def gate(self, role: str) -> limits.EndpointGate:
    """Roles that talk to the same (backend, url, model) share one gate; the strictest limits win,
    because a provider's quota is per endpoint and model, not per role."""
    key = self.backend(role).endpoint_key
    if key not in self._gates:
      sharing = [r for r in config_lib.ROLES if r in self.cfg and self.backend(r).endpoint_key == key]
      rcs = [self.cfg[r] for r in sharing]
      c = self.cfg
      breaker = limits.CircuitBreaker(c.breaker_consecutive, c.breaker_window, c.breaker_error_rate,
                                      c.breaker_cooldown_s)
      self._gates[key] = limits.EndpointGate(
          concurrency=min(rc.concurrency for rc in rcs), rpm=min(rc.rpm for rc in rcs),
          tpm=min(rc.tpm for rc in rcs), breaker=breaker, burst_s=c.limits_burst_s, clock=self.clock)
    return self._gates[key]

  async def aclose(self) -> None:
    for b in self._backends.values():
      await b.aclose()
    self._backends = {}

  # --------------------------------------------------------------------------------------------- calls

  def cache_parts(self, request: backends_lib.Request) -> dict:
    rc = self.cfg[request.role]
    backend = self.backend(request.role)
    return {"v": prompts.PROMPT_VERSION, "role": request.role, "backend": backend.name,
            "model": backend.model_id, "temperature": rc.temperature, "top_p": rc.top_p,
            "max_output_tokens": rc.max_output_tokens, "thinking_budget": rc.thinking_budget,
            "reasoning_effort": rc.reasoning_effort, "response_format": rc.response_format,
            "messages": list(request.messages), "schema": request.json_schema, "seed": request.seed}

  def _cost(self, model: str, in_tok: int, out_tok: int, usage: Usage) -> None:
    price = config_lib.price_per_mtok(self.cfg.prices, model)
    if price is None:
      usage.unpriced_requests += 1
      return
    usage.cost_usd += (in_tok * price[0] + out_tok * price[1]) / 1e6

  def _backoff(self, attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
      return min(retry_after, self.cfg.retry_after_cap_s) * self._rng.uniform(1.0, 1.1)
    base = min(self.cfg.backoff_max_s, self.cfg.backoff_initial_s * (2 ** attempt))
    return base * self._rng.uniform(0.5, 1.5)

  async def call(self, request: backends_lib.Request, validate: Callable[[str], T]) -> tuple[T, Usage]:
    """Run one logical call; returns (validated value, usage) or raises JudgeError (never anything else
    except cancellation)."""
    usage = Usage(calls=1)
    t0 = time.monotonic()
    try:
      value = await asyncio.wait_for(self._call(request, validate, usage), self.cfg.call_deadline_s)
    except JudgeError as err:
      err.usage = usage
      raise
    except (asyncio.TimeoutError, TimeoutError):
      gate = self.gate(request.role)
      kind = "circuit_open" if gate.breaker.state != "closed" else "deadline_exceeded"
      usage.errors[kind] = usage.errors.get(kind, 0) + 1
      raise JudgeError(request.role, kind, f"no valid reply within call_deadline_s={self.cfg.call_deadline_s}",
                       usage) from None
    except asyncio.CancelledError:
      raise
    except Exception as exc:  # pylint: disable=broad-except
      usage.errors["internal_error"] = usage.errors.get("internal_error", 0) + 1
      raise JudgeError(request.role, "internal_error", f"{type(exc).__name__}: {exc}", usage) from exc
    finally:
      usage.latency_s = time.monotonic() - t0
      self.totals = self.totals + usage
    return value, usage

  async def _call(self, request, validate, usage: Usage):
    rc = self.cfg[request.role]
    if self.backend(request.role).name == "offline" and not self.cfg.cache_offline:
      key = None
    else:
      key = cache_lib.request_key(self.cache_parts(request)) if self.cache is not None else None
    if key is not None:
      record = await self.cache.get(key)
      if record is not None:
        try:
          value = validate(record["text"])
        except (schema.OutputError, KeyError):
          value = None  # an entry written by an older validator: ignore it and ask again
        if value is not None:
          usage.cache_hits += 1
          return value
    transport_left, quality_left = rc.retries, rc.quality_retries
    attempt_request = request
    while True:
      reply = await self._attempt(attempt_request, usage)
      if isinstance(reply, backends_lib.TransportError):
        if not reply.retriable or transport_left == 0:
          raise JudgeError(request.role, reply.kind, reply.message)
        await asyncio.sleep(self._backoff(rc.retries - transport_left, reply.retry_after))
        transport_left -= 1
        usage.transport_retries += 1
        continue
      try:
        value = self._check(reply, validate)
      except schema.OutputError as err:
        usage.errors[err.kind] = usage.errors.get(err.kind, 0) + 1
        if quality_left == 0:
          raise JudgeError(request.role, err.kind, str(err)) from None
        quality_left -= 1
        usage.quality_retries += 1
        attempt_request = dataclasses.replace(request, messages=_with_note(request.messages, str(err)))
        continue
      if key is not None:
        await self.cache.put(key, {"role": request.role, "model": self.backend(request.role).model_id,
                                   "text": reply.text, "input_tokens": reply.input_tokens,
                                   "output_tokens": reply.output_tokens})
      return value

  @staticmethod
  def _check(reply: backends_lib.Reply, validate):
    if reply.finish == "length":
      raise schema.OutputError("incomplete", "the reply was cut off at max_output_tokens")
    if reply.finish == "blocked":
      raise schema.OutputError("empty_response", "the reply was blocked (safety/content filter)")
    if not reply.text.strip():
      raise schema.OutputError("empty_response", "the reply was empty")
    return validate(reply.text)

  async def _attempt(self, request, usage: Usage):
    """One admitted request; returns a Reply or a TransportError (recorded in usage)."""
    rc = self.cfg[request.role]
    backend = self.backend(request.role)
    gate = self.gate(request.role)
    prompt_chars = sum(len(m["content"]) for m in request.messages)
    estimate = prompt_chars / 4 + rc.max_output_tokens
    priority = limits.PRIORITY[request.role] if self.cfg.verifier_first else 1
    if hasattr(backend, "ready"):
      await backend.ready()
    await gate.acquire(priority, estimate)
    outcome, correction = None, 0.0
    try:
      usage.requests += 1
      try:
        reply = await asyncio.wait_for(backend.generate(request), rc.timeout_s)
      except (asyncio.TimeoutError, TimeoutError):
        reply = backends_lib.TransportError("timeout", f"no reply within timeout_s={rc.timeout_s}")
      except backends_lib.TransportError as err:
        reply = err
      if isinstance(reply, backends_lib.TransportError):
        usage.errors[reply.kind] = usage.errors.get(reply.kind, 0) + 1
        outcome = not reply.retriable   # only transport-level trouble counts against the endpoint
        return reply
      outcome = True
      usage.input_tokens += reply.input_tokens
      usage.output_tokens += reply.output_tokens
      self._cost(backend.model_id, reply.input_tokens, reply.output_tokens, usage)
      if reply.input_tokens or reply.output_tokens:
        correction = estimate - (reply.input_tokens + reply.output_tokens)
      return reply
    finally:
      gate.release(outcome, correction)


def _with_note(messages: tuple[dict, ...], problem: str) -> tuple[dict, ...]:
  last = dict(messages[-1])
  last["content"] = prompts.corrective(last["content"], problem)
  return tuple(messages[:-1]) + (last,)

