"""Persistent request cache: one small JSON file per validated reply, keyed by a hash of the request.

The key covers everything that determines the reply (role, backend, model, decoding settings, prompt
version, messages, schema, seed) and nothing that does not (timeouts, URLs, limits), so a rerun or a resumed
run never pays twice and replays exactly. Only replies that passed validation are stored. Files are written
atomically (temp + rename), so a crash leaves either the whole entry or none; concurrent writers of the
same key write the same content. Remote paths (gs://...) go through etils.epath.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import uuid


def request_key(parts: dict) -> str:
  blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
  return hashlib.sha256(blob.encode()).hexdigest()


class Cache:

  def __init__(self, directory: str):
    self.directory = str(directory)
    self._remote = "://" in self.directory
    self.hits = self.misses = self.writes = 0

  def _path(self, key: str) -> str:
    return f"{self.directory.rstrip('/')}/{key[:2]}/{key}.json"

  def _read(self, key: str) -> dict | None:
    path = self._path(key)
    try:
      if self._remote:
        from etils import epath  # pylint: disable=import-outside-toplevel
        p = epath.Path(path)
        if not p.exists():
          return None
        text = p.read_text()
      else:
        with open(path, encoding="utf-8") as f:
          text = f.read()
      record = json.loads(text)
    except FileNotFoundError:
      return None
    except (ValueError, OSError):
      return None  # unreadable entry: treat as a miss; it is rewritten on success
    return record if isinstance(record, dict) and record.get("key") == key else None

  def _write(self, key: str, record: dict) -> None:
    path = self._path(key)
    text = json.dumps(dict(record, key=key), ensure_ascii=False)
    if self._remote:
      from etils import epath  # pylint: disable=import-outside-toplevel
      p = epath.Path(path)
      p.parent.mkdir(parents=True, exist_ok=True)
      p.write_text(text)
      return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)

  async def get(self, key: str) -> dict | None:
    record = await asyncio.to_thread(self._read, key)
    if record is None:
      self.misses += 1
    else:
      self.hits += 1
    return record

  async def put(self, key: str, record: dict) -> None:
    await asyncio.to_thread(self._write, key, record)
    self.writes += 1
