"""Async judge backends: Gemini (google-genai), any OpenAI-compatible chat endpoint, and the offline judge.

A backend turns one `Request` into one `Reply` or raises `TransportError`; it never retries (the client
does, with its own deadlines and accounting). Replies are raw text: parsing and validation happen above,
identically for every backend, so the offline judge exercises the same path as a real LLM.
"""
from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import os
import re
import time
from typing import Any

from ropd_jax.judge import config as config_lib

RETRIABLE = frozenset({"timeout", "rate_limited", "server_error", "connection"})


@dataclasses.dataclass(frozen=True)
class Request:
  role: str                           # teacher | rubricator | verifier
  messages: tuple[dict, ...]          # [{"role": "system"|"user"|"assistant", "content": str}]
  json_schema: dict | None = None     # None: free text (teacher)
  schema_name: str = "reply"
  seed: int | None = None             # distinguishes the m teacher samples of one prompt
  payload: Any = None                 # structured inputs for the offline judge (ignored by LLM backends)


@dataclasses.dataclass(frozen=True)
class Reply:
  text: str
  input_tokens: int
  output_tokens: int
  finish: str = "stop"                # stop | length | blocked | other


class TransportError(Exception):
  """The request did not produce a reply. kind: timeout | rate_limited | server_error | connection |
  auth_error | bad_request | http_error | unsupported."""

  def __init__(self, kind: str, message: str, retry_after: float | None = None):
    super().__init__(f"{kind}: {message}")
    self.kind, self.message, self.retry_after = kind, message, retry_after

  @property
  def retriable(self) -> bool:
    return self.kind in RETRIABLE


def estimate_tokens(text: str) -> int:
  return max(1, (len(text) + 3) // 4)


def kind_for_status(status: int) -> str:
  if status == 429:
    return "rate_limited"
  if status == 408:
    return "timeout"
  if status >= 500:
    return "server_error"
  if status in (401, 403):
    return "auth_error"
  if status in (400, 404, 413, 422):
    return "bad_request"
  return "http_error"


def parse_retry_after(value: str | None) -> float | None:
  """Retry-After as seconds (delta or HTTP date); None when absent or unreadable."""
  if not value:
    return None
  value = value.strip()
  try:
    return max(0.0, float(value))
  except ValueError:
    pass
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  return max(0.0, when.timestamp() - time.time())


def _gemini_retry_delay(details: Any) -> float | None:
  """Gemini puts the wait in google.rpc.RetryInfo {"retryDelay": "12s"} inside the error details."""
  try:
    items = details.get("error", details).get("details", []) or []
  except AttributeError:
    return None
  for item in items:
    delay = item.get("retryDelay") if isinstance(item, dict) else None
    m = re.fullmatch(r"([0-9.]+)s", str(delay or ""))
    if m:
      return float(m.group(1))
  return None


def _without_keys(schema: Any, drop: set[str]) -> Any:
  """The schema without keywords some Gemini endpoints reject; our own validator enforces them anyway."""
  if isinstance(schema, dict):
    return {k: _without_keys(v, drop) for k, v in schema.items() if k not in drop}
  if isinstance(schema, list):
    return [_without_keys(v, drop) for v in schema]
  return schema


def _http_client_module():
  """httpx, or its drop-in fork httpx2 that recent google-genai releases depend on."""
  try:
    import httpx  # pylint: disable=import-outside-toplevel
    return httpx
  except ImportError:
    import httpx2  # pylint: disable=import-outside-toplevel
    return httpx2


def _network_error(exc: BaseException) -> TransportError | None:
  """Map httpx/httpx2/aiohttp/OS network exceptions by name, so no specific client library is required."""
  name = type(exc).__name__
  if "Timeout" in name:
    return TransportError("timeout", f"{name}: {exc}")
  if isinstance(exc, (ConnectionError, OSError)) or any(
      s in name for s in ("Connect", "Network", "RemoteProtocol", "ReadError", "WriteError", "Disconnected")):
    return TransportError("connection", f"{name}: {exc}")
  return None


class Backend:
  """One role's endpoint. Clients are created lazily inside the running event loop."""

  name = "base"

  def __init__(self, role: str, rc):
    self.role, self.rc = role, rc

  @property
  def model_id(self) -> str:
    return self.rc.model

  @property
  def endpoint_key(self) -> tuple:
    return (self.name, self.rc.base_url, self.model_id)

  async def ready(self) -> None:
    """Build clients before a request is admitted, so slow SDK start-up never bunches admitted requests."""

  async def generate(self, request: Request) -> Reply:
    raise NotImplementedError

  async def aclose(self) -> None:
    pass


class GeminiBackend(Backend):
  """google-genai `client.aio.models.generate_content` with `response_json_schema`."""

  name = "gemini"

  def __init__(self, role: str, rc):
    super().__init__(role, rc)
    self._client = None
    self._client_lock = None

  async def ready(self) -> None:
    if self._client is not None:
      return
    if self._client_lock is None:
      self._client_lock = asyncio.Lock()
    async with self._client_lock:
      if self._client is None:
        # The SDK's import and client set-up take ~1 s: keep them off the event loop.
        self._client = await asyncio.to_thread(self._make_client)

  @property
  def endpoint_key(self) -> tuple:
    base = self.rc.base_url or os.environ.get("GOOGLE_GEMINI_BASE_URL", "")
    return (self.name, base, self.rc.vertexai, self.rc.vertex_project, self.rc.model)

  def _make_client(self):
    from google import genai  # pylint: disable=import-outside-toplevel
    from google.genai import types  # pylint: disable=import-outside-toplevel
    # The SDK's own timeout is a backstop just past ours; our asyncio deadline is the one that fires.
    http = types.HttpOptions(base_url=self.rc.base_url or None, timeout=int((self.rc.timeout_s + 5) * 1000))
    if self.rc.vertexai:
      return genai.Client(
          vertexai=True, http_options=http,
          project=self.rc.vertex_project or os.environ.get("GOOGLE_CLOUD_PROJECT"),
          location=self.rc.vertex_location or os.environ.get("GOOGLE_CLOUD_LOCATION", "us-central1"))
    return genai.Client(api_key=config_lib.resolve_api_key(self.rc), http_options=http)

  def _gen_config(self, request: Request):
    from google.genai import types  # pylint: disable=import-outside-toplevel
    system = "\n\n".join(m["content"] for m in request.messages if m["role"] == "system")
    kwargs = dict(temperature=self.rc.temperature, top_p=self.rc.top_p,
                  max_output_tokens=self.rc.max_output_tokens, seed=request.seed,
                  system_instruction=system or None)
    if request.json_schema is not None:
      kwargs.update(response_mime_type="application/json",
                    response_json_schema=_without_keys(request.json_schema, {"additionalProperties"}))
    if self.rc.thinking_budget >= 0:
      kwargs["thinking_config"] = types.ThinkingConfig(thinking_budget=self.rc.thinking_budget)
    return types.GenerateContentConfig(**kwargs)

  async def generate(self, request: Request) -> Reply:
    from google.genai import errors  # pylint: disable=import-outside-toplevel
    await self.ready()
    contents = [{"role": "model" if m["role"] == "assistant" else "user", "parts": [{"text": m["content"]}]}
                for m in request.messages if m["role"] != "system"]
    try:
      resp = await self._client.aio.models.generate_content(
          model=self.rc.model, contents=contents, config=self._gen_config(request))
    except errors.APIError as exc:
      retry_after = None
      headers = getattr(getattr(exc, "response", None), "headers", None)
      if headers is not None:
        retry_after = parse_retry_after(headers.get("retry-after"))
      if retry_after is None:
        retry_after = _gemini_retry_delay(exc.details)
      raise TransportError(kind_for_status(int(exc.code or 0)), str(exc)[:500], retry_after) from exc
    except asyncio.CancelledError:
      raise
    except Exception as exc:  # pylint: disable=broad-except
      mapped = _network_error(exc)
      if mapped is None:
        raise
      raise mapped from exc
    return self._reply(resp)

  @staticmethod
  def _reply(resp) -> Reply:
    usage = resp.usage_metadata
    in_tok = (usage.prompt_token_count or 0) if usage else 0
    out_tok = ((usage.candidates_token_count or 0) + (usage.thoughts_token_count or 0)) if usage else 0
    cand = resp.candidates[0] if resp.candidates else None
    reason = str(getattr(cand, "finish_reason", "") or "").upper()
    finish = ("length" if "MAX_TOKENS" in reason else "stop" if (not reason or "STOP" in reason)
              else "blocked")
    text = ""
    if cand is not None and cand.content is not None and cand.content.parts:
      text = "".join(p.text or "" for p in cand.content.parts if not getattr(p, "thought", False))
    return Reply(text=text, input_tokens=in_tok, output_tokens=out_tok, finish=finish)

  async def aclose(self) -> None:
    if self._client is not None:
      try:
        await self._client.aio.aclose()
      except Exception:  # pylint: disable=broad-except
        pass
      self._client = None


class OpenAIBackend(Backend):
  """POST {base_url}/chat/completions: vLLM, SGLang, llama.cpp server, OpenAI, or any compatible gateway."""

  name = "openai"

  def __init__(self, role: str, rc):
    super().__init__(role, rc)
    self._http = None

  @property
  def base_url(self) -> str:
    return (self.rc.base_url or os.environ.get("OPENAI_BASE_URL", "")).rstrip("/")

  @property
  def endpoint_key(self) -> tuple:
    return (self.name, self.base_url, self.rc.model)

  def body(self, request: Request) -> dict:
    body: dict = {"model": self.rc.model, "messages": [dict(m) for m in request.messages]}
    if self.rc.reasoning_effort:
      # Reasoning models reject temperature/top_p and count thinking in max_completion_tokens.
      body.update(reasoning_effort=self.rc.reasoning_effort, max_completion_tokens=self.rc.max_output_tokens)
    else:
      body.update(temperature=self.rc.temperature, top_p=self.rc.top_p, max_tokens=self.rc.max_output_tokens)
    if request.seed is not None:
      body["seed"] = request.seed
    if request.json_schema is not None:
      if self.rc.response_format == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": request.schema_name, "schema": request.json_schema, "strict": False}}
      else:
        body["response_format"] = {"type": "json_object"}
    return body

  async def ready(self) -> None:
    if self._http is None:
      httpx = _http_client_module()
      self._http = httpx.AsyncClient(timeout=self.rc.timeout_s + 5, limits=httpx.Limits(
          max_connections=self.rc.concurrency, max_keepalive_connections=self.rc.concurrency))

  async def generate(self, request: Request) -> Reply:
    await self.ready()
    headers = {"Content-Type": "application/json"}
    key = config_lib.resolve_api_key(self.rc)
    if key:
      headers["Authorization"] = f"Bearer {key}"
    try:
      resp = await self._http.post(f"{self.base_url}/chat/completions", json=self.body(request), headers=headers)
    except asyncio.CancelledError:
      raise
    except Exception as exc:  # pylint: disable=broad-except
      mapped = _network_error(exc)
      if mapped is None:
        raise
      raise mapped from exc
    if resp.status_code != 200:
      raise TransportError(kind_for_status(resp.status_code), f"HTTP {resp.status_code}: {resp.text[:300]}",
                           parse_retry_after(resp.headers.get("retry-after")))
    try:
      data = resp.json()
      choice = data["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError) as exc:
      raise TransportError("server_error", f"malformed chat completion body: {resp.text[:200]}") from exc
    usage = data.get("usage") or {}
    text = (choice.get("message") or {}).get("content") or ""
    reason = choice.get("finish_reason") or "stop"
    finish = {"stop": "stop", "length": "length", "content_filter": "blocked"}.get(reason, "other")
    return Reply(text=text, input_tokens=int(usage.get("prompt_tokens") or 0),
                 output_tokens=int(usage.get("completion_tokens") or 0), finish=finish)

  async def aclose(self) -> None:
    if self._http is not None:
      await self._http.aclose()
      self._http = None


class OfflineBackend(Backend):
  """The deterministic programmatic judge (ropd_jax.judge.offline); no network, no key."""

  name = "offline"

  @property
  def model_id(self) -> str:
    from ropd_jax.judge import offline  # pylint: disable=import-outside-toplevel
    return offline.OFFLINE_MODEL

  @property
  def endpoint_key(self) -> tuple:
    return (self.name, self.role)

  async def generate(self, request: Request) -> Reply:
    from ropd_jax.judge import offline  # pylint: disable=import-outside-toplevel
    if request.role == "teacher":
      raise TransportError(
          "unsupported", "the offline backend cannot write teacher answers; import dataset reference "
          "solutions (teacher_index.source=references) or set judge.teacher.backend to gemini/openai")
    if request.role == "rubricator":
      obj = offline.rubricate(**request.payload)
    else:
      obj = offline.verify(**request.payload)
    text = json.dumps(obj, ensure_ascii=False)
    prompt = "".join(m["content"] for m in request.messages)
    return Reply(text=text, input_tokens=estimate_tokens(prompt), output_tokens=estimate_tokens(text))


def make_backend(role: str, rc) -> Backend:
  cls = {"gemini": GeminiBackend, "openai": OpenAIBackend, "offline": OfflineBackend}.get(rc.backend)
  if cls is None:
    raise config_lib.JudgeConfigError(f"judge.{role}.backend={rc.backend!r} is not one of {config_lib.BACKENDS}")
  return cls(role, rc)
