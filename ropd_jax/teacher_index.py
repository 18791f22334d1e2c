"""Teacher-answer index: m teacher answers per training prompt, generated once, looked up by prompt hash.

File format (JSONL): a header line
  {"kind": "header", "schema_version": "ropd_jax.teacher_index.v1", "fingerprint": {...}, "m": 4}
then one line per prompt
  {"prompt_hash": "<sha256>", "answers": ["...", ...], "prompt": <as given>, "uid": <optional>}

The fingerprint covers what determines the answers (backend, model, decoding settings, prompt version,
extra instructions), not timeouts or URLs. `load` refuses an index whose fingerprint differs from the
config's, and `answers(prompt)` fails loudly on a missing prompt.

CLI:
  python -m ropd_jax.teacher_index build  --config=configs/qwen.py [--prompts=prompts.jsonl] [--limit=N]
  python -m ropd_jax.teacher_index import --config=configs/demo.py --prompts=rows_with_references.jsonl
`build` is resumable: finished prompts are appended to `<path>.partial` as they complete; a rerun after a
crash or Ctrl-C skips them; the final file is written in prompt order, so an interrupted-and-resumed build
gives the same file as an uninterrupted one (for a deterministic teacher).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import sys
from typing import Any, Iterable

SCHEMA_VERSION = "ropd_jax.teacher_index.v1"
REFERENCE_KEYS = ("reference", "reference_answer", "solution", "answer")


class TeacherIndexError(RuntimeError):
  """The index cannot be used as configured; the message names the file and the fix."""


class TeacherIndexMiss(KeyError):
  """A prompt has no entry in the index."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else "teacher index miss"


# ---------------------------------------------------------------------------------------- prompt hashing

def canonical_messages(prompt: Any) -> list[dict]:
  """A prompt as a chat message list: a string is one user message; dict rows use 'prompt'/'messages'."""
  if isinstance(prompt, dict):
    for key in ("prompt", "messages", "question"):
      if key in prompt:
        return canonical_messages(prompt[key])
    raise TeacherIndexError(f"prompt row has none of 'prompt', 'messages', 'question': keys {sorted(prompt)}")
  if isinstance(prompt, str):
    return [{"role": "user", "content": prompt}]
  if hasattr(prompt, "tolist"):
    prompt = prompt.tolist()
  if isinstance(prompt, (list, tuple)):
    out = []
    for msg in prompt:
      content = msg.get("content", "")
      if isinstance(content, list):   # content parts: keep their text, in order
        content = "\n".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
      out.append({"role": str(msg.get("role", "user")), "content": str(content)})
    return out
  raise TeacherIndexError(f"cannot read a prompt of type {type(prompt).__name__}")


def prompt_hash(prompt: Any) -> str:
  """sha256 of the compact, key-sorted JSON of the canonical message list (str == one user message)."""
  blob = json.dumps(canonical_messages(prompt), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
  return hashlib.sha256(blob.encode()).hexdigest()


def prompt_text(prompt: Any) -> str:
  """The question as text: the user messages' contents (what the judge shows as QUESTION)."""
  msgs = canonical_messages(prompt)
  users = [m["content"] for m in msgs if m["role"] == "user"]
  return "\n\n".join(users) if users else "\n\n".join(m["content"] for m in msgs)


# ------------------------------------------------------------------------------------------ fingerprints

def _sections(cfg):
  judge = cfg.judge if "judge" in cfg else None
  index = cfg.teacher_index if "teacher_index" in cfg else None
  if index is None:
    from ropd_jax.judge import config as config_lib  # pylint: disable=import-outside-toplevel
    index = config_lib.teacher_index_config()
  return judge, index


def teacher_fingerprint(cfg) -> dict:
  """What determines the teacher's answers; timeouts, URLs and limits deliberately excluded."""
  from ropd_jax.judge import prompts  # pylint: disable=import-outside-toplevel
  judge, index = _sections(cfg)
  if index.source == "references":
    return {"source": "references"}
  if judge is None:
    raise TeacherIndexError("config has no `judge` section to fingerprint the teacher; add judge_config()")
  rc = judge.teacher
  return {"source": "teacher", "backend": rc.backend, "model": rc.model, "temperature": rc.temperature,
          "top_p": rc.top_p, "max_output_tokens": rc.max_output_tokens, "thinking_budget": rc.thinking_budget,
          "reasoning_effort": rc.reasoning_effort, "extra_instructions": rc.extra_instructions,
          "prompt_version": prompts.PROMPT_VERSION}


def _header(fingerprint: dict, m: int) -> dict:
  return {"kind": "header", "schema_version": SCHEMA_VERSION, "fingerprint": fingerprint, "m": m}


# ------------------------------------------------------------------------------------------------ index

@dataclasses.dataclass
class TeacherIndex:
  header: dict
  rows: dict          # prompt_hash -> row dict
  m: int              # answers returned per prompt

  def __len__(self) -> int:
    return len(self.rows)

  def __contains__(self, prompt) -> bool:
    return prompt_hash(prompt) in self.rows

  def answers(self, prompt) -> list[str]:
    """The first m stored answers for `prompt` (fewer only if the teacher gave fewer distinct ones)."""
    key = prompt_hash(prompt)
    row = self.rows.get(key)
    if row is None:
      raise TeacherIndexMiss(
          f"teacher index has no answers for prompt {key[:12]}... ({prompt_text(prompt)[:80]!r}); build it "
          "with `python -m ropd_jax.teacher_index build --config=...` over the same prompts")
    return list(row["answers"][: self.m])

  def save(self, path: str) -> None:
    _write_atomic(path, self.header, list(self.rows.values()))


def _read_jsonl(path: str) -> tuple[dict | None, list[dict], bool]:
  """(header, rows, clean). A torn last line (crash mid-write) is dropped and reported as not clean."""
  header, rows, clean = None, [], True
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as exc:
      if i >= len(lines) - 2:
        clean = False
        continue
      raise TeacherIndexError(f"{path}:{i + 1} is not valid JSON ({exc}); the file is damaged") from exc
    if obj.get("kind") == "header":
      header = obj
    else:
      rows.append(obj)
  return header, rows, clean


def _write_atomic(path: str, header: dict, rows: list[dict]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(json.dumps(header, ensure_ascii=False, sort_keys=True) + "\n")
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
  os.replace(tmp, path)


def _check_header(header: dict | None, expected: dict, path: str) -> None:
  if header is None or header.get("schema_version") != SCHEMA_VERSION:
    raise TeacherIndexError(f"{path} has no {SCHEMA_VERSION} header; it is not a teacher index of this project")
  if header.get("fingerprint") != expected:
    raise TeacherIndexError(
        f"{path} was built with teacher settings {header.get('fingerprint')} but the config says {expected}; "
        "rebuild the index (or point teacher_index.path at the matching one)")


def load(path: str, cfg) -> TeacherIndex:
  """Open an index, checking its fingerprint against `cfg` (a config with judge/teacher_index sections)."""
  _, index_cfg = _sections(cfg)
  if not os.path.exists(path):
    hint = (" (a build was interrupted: rerun the same build command to finish it)"
            if os.path.exists(path + ".partial") else "")
    raise TeacherIndexError(f"teacher index {path} does not exist{hint}; build it with "
                            "`python -m ropd_jax.teacher_index build --config=...`")
  header, rows, _ = _read_jsonl(path)
  _check_header(header, teacher_fingerprint(cfg), path)
  if header.get("m", 0) < index_cfg.m and header["fingerprint"].get("source") == "teacher":
    raise TeacherIndexError(f"{path} holds m={header.get('m')} answers per prompt but teacher_index.m="
                            f"{index_cfg.m}; rebuild with the larger m or lower teacher_index.m")
  by_hash = {}
  for row in rows:
    if row["prompt_hash"] in by_hash:
      raise TeacherIndexError(f"{path} has two rows for prompt {row['prompt_hash'][:12]}...")
    if not row.get("answers") or not all(isinstance(a, str) and a.strip() for a in row["answers"]):
      raise TeacherIndexError(f"{path}: prompt {row['prompt_hash'][:12]}... has an empty answer list or answer")
    by_hash[row["prompt_hash"]] = row
  return TeacherIndex(header, by_hash, index_cfg.m)


# ----------------------------------------------------------------------------------------- references

def reference_of(row: dict) -> str | None:
  for key in REFERENCE_KEYS:
    value = row.get(key)
    if isinstance(value, str) and value.strip():
      return value.strip()
  return None


def import_references(rows: Iterable[dict], path: str | None = None) -> TeacherIndex:
  """An index whose answers are the dataset's own reference solutions (GSM8K-style `#### N` worked answers),
  one per prompt, fingerprinted {"source": "references"}. Written to `path` when given."""
  by_hash = {}
  for i, row in enumerate(rows):
    ref = reference_of(row)
    if ref is None:
      raise TeacherIndexError(f"row {i} has no reference solution under any of {REFERENCE_KEYS}")
    key = prompt_hash(row)
    entry = by_hash.setdefault(key, {"prompt_hash": key, "prompt": _prompt_field(row), "answers": []})
    if ref not in entry["answers"]:
      entry["answers"].append(ref)
    uid = row.get("uid", row.get("id"))
    if uid is not None:
      entry["uid"] = uid
  index = TeacherIndex(_header({"source": "references"}, 1), by_hash, m=1)
  index.m = max((len(r["answers"]) for r in by_hash.values()), default=1)
  if path:
    index.save(path)
  return index


def _prompt_field(row: Any) -> Any:
  if isinstance(row, dict):
    for key in ("prompt", "messages", "question"):
      if key in row:
        return row[key]
  return row


# ---------------------------------------------------------------------------------------------- build

def _teacher_messages(prompt: Any, extra: str) -> tuple[dict, ...]:
  msgs = canonical_messages(prompt)
  if extra and extra.strip():
    msgs = [{"role": "system", "content": extra.strip()}] + msgs
  return tuple(msgs)


async def _collect(judge, prompt, m: int, max_samples: int, extra: str) -> tuple[list[str], list[dict]]:
  """Ask the teacher until m distinct answers or max_samples requests; seeds make samples distinct keys."""
  from ropd_jax.judge import backends  # pylint: disable=import-outside-toplevel
  from ropd_jax.judge import client as client_lib  # pylint: disable=import-outside-toplevel

  def check(text: str) -> str:
    return text.strip()

  answers, errors, seed = [], [], 0
  messages = _teacher_messages(prompt, extra)
  while len(answers) < m and seed < max_samples:
    batch = range(seed, min(max_samples, seed + m - len(answers)))
    seed = batch.stop
    outs = await asyncio.gather(*(judge.call(backends.Request(role="teacher", messages=messages, seed=s), check)
                                  for s in batch), return_exceptions=True)
    for out in outs:
      if isinstance(out, client_lib.JudgeError):
        errors.append(out.to_dict())
      elif isinstance(out, BaseException):
        raise out
      elif out[0] not in answers:
        answers.append(out[0])
  return answers[:m], errors


def normalize_prompts(prompts: Iterable[Any]) -> list[Any]:
  """Prompt rows as given (str, message list or dict rows), de-duplicated by hash, order kept."""
  seen, out = set(), []
  for p in prompts:
    key = prompt_hash(p)
    if key not in seen:
      seen.add(key)
      out.append(p)
  return out


async def build_async(cfg, prompts: Iterable[Any], *, judge=None, limit: int | None = None,
                      path: str | None = None, workdir: str | None = None, progress: bool = False) -> dict:
  from ropd_jax.judge import client as client_lib  # pylint: disable=import-outside-toplevel
  from ropd_jax.judge import config as config_lib  # pylint: disable=import-outside-toplevel
  judge_cfg, index_cfg = _sections(cfg)
  if index_cfg.source != "teacher":
    raise TeacherIndexError("teacher_index.source is 'references': use `import`, not `build`")
  if judge is None:
    config_lib.validate_judge_config(judge_cfg, roles=("teacher",))
    if judge_cfg.teacher.backend == "offline":
      raise TeacherIndexError("judge.teacher.backend=offline cannot write answers; set it to gemini or openai, "
                              "or import dataset references (teacher_index.source=references)")
    judge = client_lib.Judge(judge_cfg, workdir=workdir)
  if judge.cfg.teacher.temperature <= 0:
    raise TeacherIndexError("judge.teacher.temperature must be > 0 to sample m distinct answers")
  path = path or index_cfg.path
  m = index_cfg.m
  rows = normalize_prompts(prompts)
  if limit is not None:
    rows = rows[:limit]
  expected = teacher_fingerprint(cfg)
  done: dict[str, dict] = {}
  partial = path + ".partial"
  for p in (path, partial):
    if os.path.exists(p):
      header, old_rows, clean = _read_jsonl(p)
      _check_header(header, expected, p)
      if header.get("m", 0) < m:
        raise TeacherIndexError(f"{p} was built with m={header.get('m')}, config asks m={m}; use a new path")
      for r in old_rows:
        done.setdefault(r["prompt_hash"], r)
      if p == partial and not clean:   # drop the torn last line before appending
        _write_atomic(partial, header, old_rows)
  todo = [p for p in rows if prompt_hash(p) not in done]
  stats = {"prompts": len(rows), "already_done": len(rows) - len(todo), "built": 0, "failed": 0,
           "short": 0, "errors": []}
  if not os.path.exists(partial):
    _write_atomic(partial, _header(expected, m), [])
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=len(todo), desc="teacher index", unit="prompt")
  limit_sem = asyncio.Semaphore(index_cfg.concurrency)
  max_samples = max(m, m * index_cfg.max_samples_factor)
  extra = judge.cfg.teacher.extra_instructions

  with open(partial, "a", encoding="utf-8") as out:
    async def one(prompt):
      async with limit_sem:
        answers, errors = await _collect(judge, prompt, m, max_samples, extra)
      if not answers:
        stats["failed"] += 1
        stats["errors"].append({"prompt_hash": prompt_hash(prompt), "errors": errors[-1:]})
      else:
        row = {"prompt_hash": prompt_hash(prompt), "prompt": _prompt_field(prompt), "answers": answers}
        uid = prompt.get("uid", prompt.get("id")) if isinstance(prompt, dict) else None
        if uid is not None:
          row["uid"] = uid
        out.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        out.flush()
        done[row["prompt_hash"]] = row
        stats["built"] += 1
        stats["short"] += len(answers) < m
      if bar is not None:
        bar.update(1)

    await asyncio.gather(*(one(p) for p in todo))
  if bar is not None:
    bar.close()
  await judge.aclose()
  if stats["failed"] == 0:
    order = [prompt_hash(p) for p in rows]
    ordered = [done[h] for h in order] + [r for h, r in done.items() if h not in set(order)]
    _write_atomic(path, _header(expected, m), ordered)
    os.remove(partial)
  stats["path"] = path
  stats["usage"] = judge.totals.to_dict()
  return stats


def build(cfg, prompts: Iterable[Any], **kwargs) -> dict:
  """Blocking build; see build_async. Returns counts, usage and the path written."""
  return asyncio.run(build_async(cfg, prompts, **kwargs))


# ------------------------------------------------------------------------------------------------- CLI

def read_prompt_file(path: str) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
          raise TeacherIndexError(f"{path}:{i + 1} is not valid JSON ({exc})") from exc
  return rows


def prompts_from_config(cfg) -> list[Any]:
  """Training prompts via ropd_jax.data.load_prompts(cfg), when that module provides it."""
  try:
    from ropd_jax import data  # pylint: disable=import-outside-toplevel
  except ImportError as exc:
    raise TeacherIndexError("ropd_jax.data is unavailable; pass --prompts=FILE.jsonl of {prompt, ...} rows") from exc
  if not hasattr(data, "load_prompts"):
    raise TeacherIndexError("ropd_jax.data has no load_prompts(cfg); pass --prompts=FILE.jsonl instead")
  return list(data.load_prompts(cfg))


def main(argv=None) -> int:
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  config_flags.DEFINE_config_file("config", None, "Config file whose get_config() has judge + teacher_index.")
  flags.DEFINE_string("prompts", None, "JSONL of {prompt|question|messages, [reference], [uid]} rows; "
                      "default: ropd_jax.data.load_prompts(config).")
  flags.DEFINE_integer("limit", None, "Only the first N prompts.")
  flags.DEFINE_string("output", None, "Index path (default: config.teacher_index.path).")
  flags.DEFINE_string("workdir", ".", "Directory holding the judge cache (judge.cache_dir is relative to it).")
  FLAGS = flags.FLAGS

  def run(args):
    if len(args) != 2 or args[1] not in ("build", "import"):
      print("usage: python -m ropd_jax.teacher_index {build|import} --config=... [--prompts=F] [--limit=N]",
            file=sys.stderr)
      return 2
    from ropd_jax.judge import config as config_lib  # pylint: disable=import-outside-toplevel
    cfg = FLAGS.config
    if cfg is None:
      print("error: --config is required", file=sys.stderr)
      return 2
    try:
      prompts = read_prompt_file(FLAGS.prompts) if FLAGS.prompts else prompts_from_config(cfg)
      if FLAGS.limit is not None:
        prompts = prompts[:FLAGS.limit]
      _, index_cfg = _sections(cfg)
      path = FLAGS.output or index_cfg.path
      if args[1] == "import":
        index = import_references(prompts, path)
        print(f"imported {len(index)} prompts with reference answers -> {path}")
        return 0
      stats = build(cfg, prompts, path=path, workdir=FLAGS.workdir, progress=True)
    except (TeacherIndexError, config_lib.JudgeConfigError, OSError) as exc:
      print(f"error: {exc}", file=sys.stderr)
      return 2
    print(json.dumps({k: v for k, v in stats.items() if k != "errors"}, indent=1))
    if stats["failed"]:
      print(f"{stats['failed']} prompts got no teacher answer (first error: {stats['errors'][0]}); "
            "rerun the same command to retry them", file=sys.stderr)
      return 1
    return 0

  try:
    app.run(lambda a: sys.exit(run(a)), argv=argv)
  except SystemExit as exc:
    return int(exc.code or 0)
  return 0


if __name__ == "__main__":
  sys.exit(main())
