"""Tokenizer and chat formatting for the student.

A transformers fast tokenizer (no torch) loaded from a local directory (`tokenizer.json` + config) or built
from a GGUF file's metadata; chat templates with Qwen3's `enable_thinking` switch; batch encoding padded to a
few bucketed lengths (so jitted code sees few shapes); decoding that stops at the end of a turn.

    tok = load_tokenizer(assets.smollm2_gguf_path())        # or an HF tokenizer directory
    prompt = tok.apply_chat(("You are terse.", "What is 7*8?"))
    ids_bt, lengths_b = tok.encode_batch([prompt, ...], side="left")
    texts = tok.decode_batch(response_ids_bt)                 # each stops at <|im_end|>
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

DEFAULT_BUCKETS = (32, 64, 128, 256, 512, 1024, 2048, 4096)

# End-of-turn / end-of-text tokens of common chat formats; generation stops at any that the tokenizer
# registers as special, besides its eos (a ChatML model may close a turn with <|endoftext|>).
_STOP_TOKEN_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
                     "<end_of_turn>", "</s>")

try:  # rewards.py owns the reasoning-stripping rule; reuse it so judge and tokenizer never disagree.
  from ropd_jax.rewards import strip_reasoning  # noqa: F401
except ModuleNotFoundError as e:
  if e.name != "ropd_jax.rewards":
    raise

  def strip_reasoning(text: str) -> str:
    """The text after the last `</think>`, stripped; the whole text when there is none or nothing follows."""
    _, sep, after = text.rpartition("</think>")
    return after.strip() if sep and after.strip() else text


text_after_think = strip_reasoning


# ---------------------------------------------------------------------------------------------- padding


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n; ValueError when n exceeds the largest."""
  fitting = [b for b in sorted(buckets) if b >= n]
  if not fitting:
    raise ValueError(f"sequence of {n} tokens exceeds the largest bucket {max(buckets)}; raise the "
                     f"buckets or pass truncate=True")
  return fitting[0]


def pad_batch(seqs: Sequence[Sequence[int]], buckets: Sequence[int], pad_id: int, side: str = "right",
              truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Pads token lists to one bucketed length: `(ids_bt int32, lengths_b int32)`.

  `side="left"` puts the padding first so every prompt ends at the same position. With `truncate=True`
  a sequence longer than the largest bucket keeps its last tokens (where a chat prompt's question and
  generation prompt are) instead of raising.
  """
  if side not in ("left", "right"):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")
  if not buckets or min(buckets) <= 0:
    raise ValueError(f"buckets must be positive lengths, got {tuple(buckets)!r}")
  if truncate:
    seqs = [list(s)[-max(buckets):] for s in seqs]
  lengths_b = np.array([len(s) for s in seqs], np.int32)
  t = bucket_length(int(lengths_b.max(initial=0)), buckets)
  ids_bt = np.full((len(seqs), t), pad_id, np.int32)
  for i, s in enumerate(seqs):
    if side == "right":
      ids_bt[i, :len(s)] = s
    elif len(s):
      ids_bt[i, t - len(s):] = s
  return ids_bt, lengths_b


# ---------------------------------------------------------------------------------------------- tokenizer


class Tokenizer:
  """A transformers fast tokenizer plus the ids and helpers the trainer needs.

  `bos_id`, `eos_id`, `unk_id` may be None; `pad_id` falls back to `eos_id`; `stop_ids` are the ids that
  end a generated turn (eos, end-of-turn tokens, and `generation_config.json`'s eos ids when present).
  """

  def __init__(self, hf_tokenizer: Any, source: str = "", extra_stop_ids: Sequence[int] = ()):
    from transformers import PreTrainedTokenizerFast
    if not isinstance(hf_tokenizer, PreTrainedTokenizerFast):
      raise TypeError(f"expected a transformers fast tokenizer (tokenizer.json), got "
                      f"{type(hf_tokenizer).__name__} from {source!r}")
    self.hf = hf_tokenizer
    self.source = source
    self.bos_id: int | None = hf_tokenizer.bos_token_id
    self.eos_id: int | None = hf_tokenizer.eos_token_id
    self.unk_id: int | None = hf_tokenizer.unk_token_id
    self.pad_id: int | None = (hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None
                               else self.eos_id)
    special = set(hf_tokenizer.all_special_ids) | {
        i for i, t in hf_tokenizer.added_tokens_decoder.items() if t.special}
    vocab = hf_tokenizer.get_vocab()
    named = {vocab[n] for n in _STOP_TOKEN_NAMES if n in vocab}
    stops = (named & special) | set(extra_stop_ids) | ({self.eos_id} - {None})
    self.stop_ids: tuple[int, ...] = tuple(sorted(stops))
    self.vocab_size: int = len(hf_tokenizer)

  def __repr__(self) -> str:
    return (f"Tokenizer({self.source!r}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, "
            f"pad={self.pad_id}, stop={self.stop_ids})")

  @property
  def chat_template(self) -> str | None:
    return self.hf.chat_template

  # -- encoding

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`. No BOS by default: chat templates write their own special tokens."""
    return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

  def encode_batch(self, texts: Sequence[str], buckets: Sequence[int] = DEFAULT_BUCKETS,
                   pad_id: int | None = None, side: str = "right", truncate: bool = False,
                   add_special_tokens: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """`(ids_bt int32 [B, T], lengths_b int32 [B])`, T the smallest bucket that fits the longest text."""
    pad_id = self.pad_id if pad_id is None else pad_id
    if pad_id is None:
      raise ValueError(f"tokenizer {self.source!r} has neither a pad nor an eos token; pass pad_id=")
    seqs = self.hf(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    return pad_batch(seqs, buckets, pad_id, side=side, truncate=truncate)

  # -- decoding

  def cut(self, ids: Any, length: int | None = None, stop: bool = True) -> list[int]:
    """The ids up to `length` and (with `stop`) before the first stop token."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)[:length]]
    if stop:
      stops = set(self.stop_ids)
      ids = ids[:next((k for k, i in enumerate(ids) if i in stops), len(ids))]
    return ids

  def decode(self, ids: Any, skip_special_tokens: bool = True, length: int | None = None,
             stop: bool = True) -> str:
    """Text of `ids[:length]`, ended before the first stop token (eos / end of turn) unless stop=False."""
    return self.hf.decode(self.cut(ids, length, stop), skip_special_tokens=skip_special_tokens,
                          clean_up_tokenization_spaces=False)

  def decode_batch(self, ids_bt: Any, lengths_b: Any = None, skip_special_tokens: bool = True,
                   stop: bool = True, side: str = "right") -> list[str]:
    """`decode` of each row. `lengths_b` (optional) are the real lengths; `side` where the padding is."""
    ids_bt = np.asarray(ids_bt)
    if lengths_b is None:
      return [self.decode(row, skip_special_tokens, None, stop) for row in ids_bt]
    if side not in ("left", "right"):
      raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    rows = [row[:n] if side == "right" else row[len(row) - n:]
            for row, n in zip(ids_bt, (int(n) for n in np.asarray(lengths_b)))]
    return [self.decode(row, skip_special_tokens, None, stop) for row in rows]

  # -- chat

  def apply_chat(self, messages: Any, add_generation_prompt: bool = True, enable_thinking: bool | None = None,
                 tokenize: bool = False, **template_kwargs: Any) -> str | list[int]:
    """Renders a conversation with the tokenizer's own chat template.

    `messages`: a list of `{"role", "content"}` dicts, a `(system, user)` pair (system None or "" to
    omit it), or a single user string. `enable_thinking` is passed to the template only when set, so
    templates that test `enable_thinking is defined` (Qwen3) keep their default otherwise.
    Returns the text, or its ids with `tokenize=True`.
    """
    if not self.chat_template:
      raise ValueError(f"tokenizer {self.source!r} has no chat template; load a directory whose "
                       f"tokenizer_config.json or chat_template.jinja has one")
    if enable_thinking is not None:
      template_kwargs["enable_thinking"] = bool(enable_thinking)
    text = self.hf.apply_chat_template(as_messages(messages), tokenize=False,
                                       add_generation_prompt=add_generation_prompt, **template_kwargs)
    return self.encode(text) if tokenize else text

  def save(self, directory: str) -> None:
    """Writes tokenizer.json, tokenizer_config.json and chat_template.jinja, loadable offline.

    The config names the class `PreTrainedTokenizerFast` (transformers 5's `TokenizersBackend` does not
    exist in transformers 4, which vLLM may bring) and repeats the chat template inline for readers
    that predate chat_template.jinja.
    """
    import json
    self.hf.save_pretrained(directory)
    config_path = os.path.join(directory, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
      config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if self.chat_template and "chat_template" not in config:
      config["chat_template"] = self.chat_template
    with open(config_path, "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)


def as_messages(messages: Any) -> list[dict[str, str]]:
  """Normalises a user string, a `(system, user)` pair, or a list of role/content dicts."""
  if isinstance(messages, str):
    return [{"role": "user", "content": messages}]
  if isinstance(messages, tuple) and len(messages) == 2 and all(
      m is None or isinstance(m, str) for m in messages):
    system, user = messages
    if user is None:
      raise ValueError("the (system, user) pair needs a user message, got None")
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": "user", "content": user}]
  out = []
  for k, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise ValueError(f"messages[{k}] must be a dict with string 'role' and 'content', got {m!r}")
    out.append(dict(m))
  if not out:
    raise ValueError("messages is empty")
  return out


# ---------------------------------------------------------------------------------------------- loading


def load_tokenizer(path: str) -> Tokenizer:
  """A tokenizer from an HF directory (`tokenizer.json`), a `.gguf` file, or a directory with one GGUF."""
  path = os.fspath(path)
  if os.path.isfile(path) and path.endswith(".gguf"):
    return tokenizer_from_gguf(path)
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
      return _tokenizer_from_dir(path)
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(ggufs) == 1:
      return tokenizer_from_gguf(os.path.join(path, ggufs[0]))
  raise FileNotFoundError(f"no tokenizer at {path!r}: expected a directory with tokenizer.json "
                          f"(+ tokenizer_config.json), or a .gguf file")


def _tokenizer_from_dir(directory: str) -> Tokenizer:
  import json

  from transformers import AutoTokenizer
  hf = AutoTokenizer.from_pretrained(directory, local_files_only=True)
  extra = []
  gen_path = os.path.join(directory, "generation_config.json")
  if os.path.isfile(gen_path):
    with open(gen_path) as f:
      eos = json.load(f).get("eos_token_id")
    extra = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
  return Tokenizer(hf, source=directory, extra_stop_ids=extra)


# llama.cpp names the pre-tokenizer (`tokenizer.ggml.pre`); these are the HF pre-tokenizers the models were
# trained with. GPT-2's regex after isolating each digit (HF `Digits(individual_digits=True)`):
_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "codeshell"})
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_REGEX = {"qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
                "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT}
_NFC = frozenset({"qwen2", "deepseek-r1-qwen"})  # Qwen's tokenizer.json NFC-normalises; llama.cpp does not
_GPT2 = frozenset({"gpt-2", "gpt2"})
SUPPORTED_GGUF_PRE = tuple(sorted(_DIGITS_THEN_GPT2 | set(_SPLIT_REGEX) | _GPT2))

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types

_GGUF_KEYS = {
    "model": "tokenizer.ggml.model", "pre": "tokenizer.ggml.pre", "tokens": "tokenizer.ggml.tokens",
    "token_type": "tokenizer.ggml.token_type", "merges": "tokenizer.ggml.merges",
    "bos_id": "tokenizer.ggml.bos_token_id", "eos_id": "tokenizer.ggml.eos_token_id",
    "unk_id": "tokenizer.ggml.unknown_token_id", "pad_id": "tokenizer.ggml.padding_token_id",
    "add_bos": "tokenizer.ggml.add_bos_token", "add_eos": "tokenizer.ggml.add_eos_token",
    "eot_id": "tokenizer.ggml.eot_token_id", "chat_template": "tokenizer.chat_template",
}


def read_gguf_tokenizer_metadata(path: str) -> dict[str, Any]:
  """The tokenizer fields of a GGUF file, under short names (see `_GGUF_KEYS`); absent ones omitted."""
  kv = read_gguf_kv(path)
  return {name: kv[key] for name, key in _GGUF_KEYS.items() if key in kv}


# GGUF value types -> struct format (little-endian); 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
                 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_kv(path: str) -> dict[str, Any]:
  """All metadata key/values of a GGUF (v2/v3, little-endian) file, without touching its tensors.

  Why not `gguf.GGUFReader`: it also indexes every tensor and wraps each of the ~100k vocabulary
  strings in numpy views, which takes seconds; this reads the header alone in a fraction of that.
  Arrays of numbers come back as lists, strings decoded as UTF-8.
  """
  import mmap
  import struct

  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
    pos = 0

    def take(fmt: str):
      nonlocal pos
      (value,) = struct.unpack_from(fmt, buf, pos)
      pos += struct.calcsize(fmt)
      return value

    def string() -> str:
      nonlocal pos
      n = take("<Q")
      pos += n
      return buf[pos - n:pos].decode("utf-8", errors="replace")

    def value(kind: int):
      nonlocal pos
      if kind == _GGUF_STRING:
        return string()
      if kind in _GGUF_SCALARS:
        return take(_GGUF_SCALARS[kind])
      if kind != _GGUF_ARRAY:
        raise ValueError(f"{path}: unknown GGUF value type {kind} at byte {pos}")
      elem, n = take("<I"), take("<Q")
      if elem in _GGUF_SCALARS:
        fmt = _GGUF_SCALARS[elem]
        out = list(struct.unpack_from(f"<{n}{fmt[1]}", buf, pos))
        pos += n * struct.calcsize(fmt)
        return out
      return [value(elem) for _ in range(n)]

    if buf[:4] != b"GGUF":
      raise ValueError(f"{path} is not a GGUF file (magic {bytes(buf[:4])!r})")
    pos = 4
    version = take("<I")
    if version not in (2, 3):
      raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
    take("<Q")  # tensor count
    n_kv = take("<Q")
    kv = {}
    for _ in range(n_kv):
      key = string()
      kv[key] = value(take("<I"))
    return kv


def build_gguf_backend(meta: dict[str, Any]):
  """A `tokenizers.Tokenizer` (byte-level BPE) from GGUF tokenizer metadata."""
  from tokenizers import AddedToken, Regex, Tokenizer as Backend, decoders, models, normalizers
  from tokenizers import pre_tokenizers as pt

  kind, pre = meta.get("model"), meta.get("pre", "")
  if kind != "gpt2":
    raise ValueError(f"GGUF tokenizer.ggml.model={kind!r}: only byte-level BPE ('gpt2') is built from "
                     f"GGUF metadata; point load_tokenizer at the model's HF tokenizer directory instead")
  if pre not in SUPPORTED_GGUF_PRE:
    raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; supported: "
                     f"{', '.join(SUPPORTED_GGUF_PRE)}. Point load_tokenizer at the model's HF tokenizer "
                     f"directory instead")
  for key in ("tokens", "merges"):
    if not meta.get(key):
      raise ValueError(f"GGUF has no tokenizer.ggml.{key}; cannot build its tokenizer")

  tokens = list(meta["tokens"])
  merges = []
  for k, m in enumerate(meta["merges"]):
    pair = m.split(" ")
    if len(pair) != 2:
      raise ValueError(f"GGUF tokenizer.ggml.merges[{k}]={m!r} is not two symbols separated by a space")
    merges.append((pair[0], pair[1]))
  vocab = {t: i for i, t in enumerate(tokens)}
  # unk_token=None: a byte missing from a restricted alphabet is dropped, as HF's own tokenizer.json does.
  backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                               byte_fallback=False))
  if pre in _DIGITS_THEN_GPT2:
    backend.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True),
                                         pt.ByteLevel(add_prefix_space=False, use_regex=True)])
  elif pre in _SPLIT_REGEX:
    backend.pre_tokenizer = pt.Sequence([pt.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated"),
                                         pt.ByteLevel(add_prefix_space=False, use_regex=False)])
  else:
    backend.pre_tokenizer = pt.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _NFC:
    backend.normalizer = normalizers.NFC()
  backend.decoder = decoders.ByteLevel()

  # Control tokens (<|im_end|>) match whole and are special; user-defined ones (<think>) match whole
  # but are ordinary text, so decoding without special tokens keeps them.
  types = list(meta.get("token_type") or [])
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                              for t, ty in zip(tokens, types) if ty == _CONTROL])
  backend.add_tokens([AddedToken(t, special=False, normalized=False)
                      for t, ty in zip(tokens, types) if ty == _USER_DEFINED])
  return backend


def tokenizer_from_gguf(path: str) -> Tokenizer:
  """Builds the tokenizer described by a GGUF file's metadata, offline and without torch."""
  from transformers import PreTrainedTokenizerFast
  meta = read_gguf_tokenizer_metadata(path)
  tokens = meta.get("tokens") or []

  def token(name: str) -> str | None:
    i = meta.get(name)
    if i is None:
      return None
    if not 0 <= int(i) < len(tokens):
      raise ValueError(f"GGUF tokenizer.ggml.{name} = {i} is outside the vocabulary of {len(tokens)}")
    return tokens[int(i)]

  hf = PreTrainedTokenizerFast(
      tokenizer_object=build_gguf_backend(meta),
      bos_token=token("bos_id"), eos_token=token("eos_id"), unk_token=token("unk_id"),
      pad_token=token("pad_id"), chat_template=meta.get("chat_template"),
      add_bos_token=bool(meta.get("add_bos", False)), add_eos_token=bool(meta.get("add_eos", False)),
      clean_up_tokenization_spaces=False)
  eot = [int(meta["eot_id"])] if meta.get("eot_id") is not None else []
  return Tokenizer(hf, source=path, extra_stop_ids=eot)
