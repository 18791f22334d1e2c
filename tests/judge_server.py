"""A local fake LLM server on 127.0.0.1 for judge tests and benchmarks.

Speaks the two wire formats our backends use:
  Gemini REST    POST /v1/models/{model}:generateContent  (and /v1beta/...)
  OpenAI chat    POST /v1/chat/completions                (and /chat/completions)
and answers like a well-behaved judge (scripted below), with optional per-request latency and fault
injection. It measures what a client cannot fake: concurrent requests in flight and arrival times.

Scripted judge:
  rubricator -> a rubric with `rubric_points` (default [5, 5, 4, 5, 3]);
  verifier   -> for every fenced answer, the judgement written in the answer as `VERDICT:10111`
                (or all true if it contains "CORRECT", else all false); final_score = recomputed sum
                (+ `misreport` to play a judge that mis-adds);
  teacher    -> a deterministic answer per (prompt, seed).

Faults (FaultPlan): each logical request is keyed by its fence tag (teacher: prompt text); on its FIRST
attempt it fails with probability `rate`, with one kind chosen by hash; a prompt containing
`[[PERSIST:<stage>:<kind>]]` fails that way on EVERY attempt of that stage. Kinds: rate_limited (429 + Retry-After),
server_error (500), hang (sleeps past any client timeout), truncated (half a JSON), wrong_length,
nan_score, reordered (verifier only).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import json
import re
import threading
import time

TRANSPORT_FAULTS = ("rate_limited", "server_error", "hang")
RUBRIC_FAULTS = TRANSPORT_FAULTS + ("truncated",)
VERIFIER_FAULTS = RUBRIC_FAULTS + ("wrong_length", "nan_score", "reordered")
# What our client should call each injected fault.
CLIENT_KIND = {"rate_limited": "rate_limited", "server_error": "server_error", "hang": "timeout",
               "truncated": "parse_error", "wrong_length": "validation_error",
               "nan_score": "validation_error", "reordered": "validation_error"}

_ANSWER_RE = re.compile(r"<<<BEGIN Answer (\d+) \[(F[0-9a-f]+)\](?: \([^)]*\))?>>>\n(.*?)\n<<<END Answer \1 \[\2\]>>>",
                        re.DOTALL)
_TAG_RE = re.compile(r"\[(F[0-9a-f]{20})\]")


@dataclasses.dataclass
class FaultPlan:
  rate: float = 0.0
  seed: int = 0
  retry_after: str = "1"
  hang_s: float = 30.0

  def _u(self, *parts) -> float:
    h = hashlib.sha256("|".join(map(str, (self.seed,) + parts)).encode()).hexdigest()
    return int(h[:12], 16) / 16**12

  def choose(self, stage: str, key: str, attempt: int, prompt: str) -> str | None:
    for m in re.finditer(r"\[\[PERSIST:(\w+):(\w+)\]\]", prompt):
      if m.group(1) == stage:
        return m.group(2)
    if attempt > 0 or self._u("p", key) >= self.rate:
      return None
    kinds = VERIFIER_FAULTS if stage == "verifier" else (RUBRIC_FAULTS if stage == "rubricator"
                                                          else TRANSPORT_FAULTS)
    return kinds[int(self._u("k", key) * len(kinds))]


def stage_of(prompt: str) -> str:
  if prompt.startswith("You design a grading rubric"):
    return "rubricator"
  if prompt.startswith("You grade "):
    return "verifier"
  return "teacher"


class ScriptedJudge:
  """The 'LLM' behind the server; replace methods in tests for other behaviour."""

  def __init__(self, rubric_points=(5, 5, 4, 5, 3), misreport: float = 0.0):
    self.rubric_points = list(rubric_points)
    self.misreport = misreport

  def rubric(self, prompt: str) -> dict:
    return {"schema_version": "ropd.rubric.v1",
            "rubrics": [{"criterion_id": f"c{i + 1}", "category": "Task Fulfillment and Requirement Compliance",
                         "criterion": f"criterion {i + 1}", "points": p}
                        for i, p in enumerate(self.rubric_points)],
            "maximum_score": sum(self.rubric_points)}

  @staticmethod
  def answers(prompt: str) -> list[str]:
    return [m.group(3) for m in _ANSWER_RE.finditer(prompt)]

  @staticmethod
  def rubric_points_in(prompt: str) -> list[int]:
    block = prompt.split("criteria, maximum score", 1)[1].split("):\n", 1)[1].split("\n\nRESPONSES", 1)[0]
    return [c["points"] for c in json.loads(block)]

  def judgement(self, answer: str, k: int) -> list[bool]:
    m = re.search(r"VERDICT:([01]+)", answer)
    if m and len(m.group(1)) == k:
      return [c == "1" for c in m.group(1)]
    return [("CORRECT" in answer)] * k

  def verdicts(self, prompt: str) -> dict:
    points = self.rubric_points_in(prompt)
    out = []
    for i, ans in enumerate(self.answers(prompt), start=1):
      j = self.judgement(ans, len(points))
      out.append({"answer_index": i, "judgement": j,
                  "final_score": sum(p for p, v in zip(points, j) if v) + self.misreport})
    return {"schema_version": "ropd.batch_verifier.v2", "answers": out}

  def teacher(self, prompt: str, seed) -> str:
    h = int(hashlib.sha256(f"{prompt}|{seed}".encode()).hexdigest()[:6], 16)
    return f"Worked solution (sample {seed}) to: {prompt[:60]}\nSo the result is {h % 1000}.\n#### {h % 1000}"

  def reply(self, stage: str, prompt: str, seed) -> str:
    if stage == "rubricator":
      return json.dumps(self.rubric(prompt))
    if stage == "verifier":
      return json.dumps(self.verdicts(prompt))
    return self.teacher(prompt, seed)


def _corrupt(kind: str, text: str) -> str:
  if kind == "truncated":
    return text[: len(text) // 2]
  obj = json.loads(text)
  if kind == "wrong_length":
    obj["answers"][0]["judgement"] = obj["answers"][0]["judgement"][:-1]
  elif kind == "nan_score":
    return re.sub(r'"final_score": [-0-9.eE+]+', '"final_score": NaN', json.dumps(obj), count=1)
  elif kind == "reordered":
    if len(obj["answers"]) >= 2:
      obj["answers"][0], obj["answers"][1] = obj["answers"][1], obj["answers"][0]
    else:
      obj["answers"][0]["answer_index"] = 2
  return json.dumps(obj)


@dataclasses.dataclass
class Record:
  api: str
  stage: str
  model: str
  start: float
  end: float = 0.0
  fault: str | None = None
  body: dict = dataclasses.field(default_factory=dict)


class JudgeServer:
  """Start with `with JudgeServer(...) as srv:`; `srv.url` is http://127.0.0.1:PORT."""

  def __init__(self, judge: ScriptedJudge | None = None, latency: float = 0.0,
               faults: FaultPlan | None = None):
    self.judge = judge or ScriptedJudge()
    self.latency = latency
    self.faults = faults or FaultPlan()
    self.records: list[Record] = []
    self.injected = collections.Counter()
    self.in_flight = 0
    self.max_in_flight = 0
    self._attempts = collections.Counter()
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
    self._server = None
    self._tasks: set[asyncio.Task] = set()
    self.port = 0

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.port}"

  def __enter__(self) -> "JudgeServer":
    self._thread.start()
    fut = asyncio.run_coroutine_threadsafe(
        asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=512), self._loop)
    self._server = fut.result(10)
    self.port = self._server.sockets[0].getsockname()[1]
    return self

  def __exit__(self, *exc) -> None:
    async def stop():
      self._server.close()
      for t in list(self._tasks):
        t.cancel()
      await asyncio.sleep(0)

    asyncio.run_coroutine_threadsafe(stop(), self._loop).result(10)
    self._loop.call_soon_threadsafe(self._loop.stop)
    self._thread.join(10)

  def stage_counts(self) -> collections.Counter:
    return collections.Counter(r.stage for r in self.records)

  # ------------------------------------------------------------------------------------------------ HTTP

  async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    task = asyncio.current_task()
    self._tasks.add(task)
    try:
      while True:
        line = await reader.readline()
        if not line:
          break
        method, path, _ = line.decode().split(" ", 2)
        headers = {}
        while True:
          h = await reader.readline()
          if h in (b"\r\n", b"\n", b""):
            break
          k, v = h.decode().split(":", 1)
          headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        status, extra, payload = await self._dispatch(method, path, body)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        head = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'ERR'}", "Content-Type: application/json",
                f"Content-Length: {len(data)}", "Connection: keep-alive"]
        head += [f"{k}: {v}" for k, v in extra.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError, ValueError):
      pass
    finally:
      self._tasks.discard(task)
      writer.close()

  async def _dispatch(self, method: str, path: str, body: bytes):
    if method != "POST":
      return 404, {}, {"error": {"code": 404, "message": "not found"}}
    req = json.loads(body or b"{}")
    m = re.match(r"^/v1(?:beta)?/models/([^:]+):generateContent", path)
    if m:
      api, model = "gemini", m.group(1)
      prompt = "\n".join(p.get("text", "") for c in req.get("contents", []) for p in c.get("parts", []))
      seed = (req.get("generationConfig") or {}).get("seed")
    elif path.rstrip("/").endswith("/chat/completions"):
      api, model = "openai", req.get("model", "")
      prompt = "\n".join(str(msg.get("content", "")) for msg in req.get("messages", []) if msg.get("role") != "system")
      seed = req.get("seed")
    else:
      return 404, {}, {"error": {"code": 404, "message": f"unknown path {path}"}}
    stage = stage_of(prompt)
    tag = _TAG_RE.search(prompt)
    key = tag.group(1) if tag else hashlib.sha256(f"{prompt}|{seed}".encode()).hexdigest()
    attempt = self._attempts[key]
    self._attempts[key] += 1
    fault = self.faults.choose(stage, key, attempt, prompt)
    rec = Record(api, stage, model, time.monotonic(), fault=fault, body=req)
    self.records.append(rec)
    self.in_flight += 1
    self.max_in_flight = max(self.max_in_flight, self.in_flight)
    try:
      if fault:
        self.injected[fault] += 1
      if fault == "hang":
        await asyncio.sleep(self.faults.hang_s)
      elif self.latency:
        await asyncio.sleep(self.latency)
      if fault == "rate_limited":
        return 429, {"Retry-After": self.faults.retry_after}, {
            "error": {"code": 429, "message": "quota exceeded", "status": "RESOURCE_EXHAUSTED"}}
      if fault == "server_error":
        return 500, {}, {"error": {"code": 500, "message": "internal", "status": "INTERNAL"}}
      text = self.judge.reply(stage, prompt, seed)
      if fault in ("truncated", "wrong_length", "nan_score", "reordered"):
        text = _corrupt(fault, text)
      return 200, {}, self._ok(api, prompt, text)
    finally:
      self.in_flight -= 1
      rec.end = time.monotonic()

  @staticmethod
  def _ok(api: str, prompt: str, text: str) -> dict:
    p_tok, c_tok = max(1, len(prompt) // 4), max(1, len(text) // 4)
    if api == "gemini":
      return {"candidates": [{"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": "STOP",
                              "index": 0}],
              "usageMetadata": {"promptTokenCount": p_tok, "candidatesTokenCount": c_tok,
                                "totalTokenCount": p_tok + c_tok}}
    return {"id": "chatcmpl-local", "object": "chat.completion", "model": "local",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok}}


class ScriptedBackend:
  """The scripted judge as an in-process backend (no HTTP): for tests that only need the logic.

  Use as `Judge(cfg, backend_factory=ScriptedBackend.factory(ScriptedJudge()))`; `requests` records
  every Request sent."""

  name = "scripted"

  def __init__(self, role, rc, judge: ScriptedJudge, requests: list):
    self.role, self.rc, self.judge, self.requests = role, rc, judge, requests

  @classmethod
  def factory(cls, judge: ScriptedJudge | None = None, requests: list | None = None):
    judge = judge or ScriptedJudge()
    requests = requests if requests is not None else []

    def make(role, rc):
      return cls(role, rc, judge, requests)

    make.requests = requests
    return make

  @property
  def model_id(self) -> str:
    return "scripted"

  @property
  def endpoint_key(self) -> tuple:
    return ("scripted", self.role)

  async def generate(self, request):
    from ropd_jax.judge import backends  # pylint: disable=import-outside-toplevel
    self.requests.append(request)
    prompt = request.messages[-1]["content"]
    text = self.judge.reply(stage_of(prompt), prompt, request.seed)
    return backends.Reply(text=text, input_tokens=len(prompt) // 4, output_tokens=len(text) // 4)

  async def aclose(self):
    pass
