"""Weights: HF safetensors directories <-> params (streamed, placed with their sharding), GGUF -> params.

Loading never materialises the whole model on a host: every parameter is built with
`jax.make_array_from_callback`, whose callback reads only the slice a device needs straight from the
memory-mapped safetensors file (so on a pod each host reads only its own shards).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ropd_jax import model as model_lib
from ropd_jax.model import ModelConfig

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt",
                   "LICENSE", "LICENCE")


class WeightsError(ValueError):
  """A checkpoint that does not match the model config (names the tensor and the fix)."""


# -- HF name <-> our path ----------------------------------------------------------------------------------
# (our leaf name, HF suffix inside model.layers.{i}., transpose?)
_LAYER_MAP = (
    ("attn_norm", "input_layernorm.weight", False),
    ("q", "self_attn.q_proj.weight", True),
    ("k", "self_attn.k_proj.weight", True),
    ("v", "self_attn.v_proj.weight", True),
    ("o", "self_attn.o_proj.weight", True),
    ("q_bias", "self_attn.q_proj.bias", False),
    ("k_bias", "self_attn.k_proj.bias", False),
    ("v_bias", "self_attn.v_proj.bias", False),
    ("o_bias", "self_attn.o_proj.bias", False),
    ("q_norm", "self_attn.q_norm.weight", False),
    ("k_norm", "self_attn.k_norm.weight", False),
    ("mlp_norm", "post_attention_layernorm.weight", False),
    ("gate", "mlp.gate_proj.weight", True),
    ("up", "mlp.up_proj.weight", True),
    ("down", "mlp.down_proj.weight", True),
)
_TOP_MAP = (("embed", "model.embed_tokens.weight", False),
            ("final_norm", "model.norm.weight", False),
            ("lm_head", "lm_head.weight", True))


def hf_tensor_plan(cfg: ModelConfig) -> dict[str, tuple[list[str], bool]]:
  """Our param path -> (HF tensor names, one per layer for stacked params; transpose?)."""
  shapes = model_lib.flatten_params(model_lib.param_shapes(cfg))
  plan = {}
  for ours, hf, transpose in _TOP_MAP:
    if ours in shapes:
      plan[ours] = ([hf], transpose)
  for ours, hf, transpose in _LAYER_MAP:
    if f"layers/{ours}" in shapes:
      plan[f"layers/{ours}"] = ([f"model.layers.{i}.{hf}" for i in range(cfg.num_layers)], transpose)
  return plan


# -- safetensors, read lazily --------------------------------------------------------------------------------
class _SafetensorsFile:
  """Memory-mapped safetensors file: tensors are numpy views, read from disk only when sliced."""

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      (n,) = struct.unpack("<Q", f.read(8))
      header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    self._header = header
    self._offset = 8 + n
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r")

  def names(self):
    return self._header.keys()

  def info(self, name):
    h = self._header[name]
    return h["dtype"], tuple(h["shape"])

  def get(self, name) -> np.ndarray:
    h = self._header[name]
    if h["dtype"] not in _ST_DTYPES:
      raise WeightsError(f"{self.path}: tensor {name} has dtype {h['dtype']}, which is not supported "
                         f"(supported: {', '.join(_ST_DTYPES)}).")
    start, end = h["data_offsets"]
    raw = self._mmap[self._offset + start:self._offset + end]
    return raw.view(_ST_DTYPES[h["dtype"]]).reshape(h["shape"])


def _open_checkpoint(model_dir: str) -> dict[str, _SafetensorsFile]:
  """HF tensor name -> the open file holding it (single file or sharded index)."""
  index = os.path.join(model_dir, "model.safetensors.index.json")
  single = os.path.join(model_dir, "model.safetensors")
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    files = {}
    for fname in sorted(set(weight_map.values())):
      path = os.path.join(model_dir, fname)
      if not os.path.exists(path):
        raise WeightsError(f"{index} names shard {fname}, but {path} does not exist; re-download or "
                           "re-export the checkpoint.")
      files[fname] = _SafetensorsFile(path)
    return {name: files[fname] for name, fname in weight_map.items()}
  if os.path.exists(single):
    f = _SafetensorsFile(single)
    return {name: f for name in f.names()}
  raise WeightsError(f"No weights in {model_dir}: expected model.safetensors or "
                     "model.safetensors.index.json (PyTorch .bin checkpoints are not supported; convert "
                     "them with transformers' save_pretrained(safe_serialization=True)).")


def load_config(model_dir: str, **overrides) -> ModelConfig:
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: model_dir must be an HF checkpoint directory with "
                            "config.json and model.safetensors.")
  with open(path) as f:
    return ModelConfig.from_hf(json.load(f), **overrides)


def _no_sharding(shape):
  del shape
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def load_hf(model_dir: str, cfg: ModelConfig | None = None,
            sharding_fn: Callable[[str, tuple[int, ...]], jax.sharding.Sharding] | None = None,
            **cfg_overrides):
  """Loads (cfg, params) from an HF directory. `sharding_fn(path, shape)` gives each param's sharding."""
  cfg = cfg or load_config(model_dir, **cfg_overrides)
  tensors = _open_checkpoint(model_dir)
  expected = model_lib.flatten_params(model_lib.param_shapes(cfg))
  plan = hf_tensor_plan(cfg)
  used = set()
  flat = {}
  for path, shape in expected.items():
    names, transpose = plan[path]
    stacked = path.startswith("layers/")
    per_tensor_shape = shape[1:] if stacked else shape
    hf_shape = tuple(reversed(per_tensor_shape)) if transpose else per_tensor_shape
    for name in names:
      if name not in tensors:
        raise WeightsError(f"Missing tensor {name} in {model_dir} (needed for {path}, expected shape "
                           f"{hf_shape}); the checkpoint does not match config.json.")
      dtype, found = tensors[name].info(name)
      if found != hf_shape:
        raise WeightsError(f"Tensor {name} in {model_dir} has shape {found}, expected {hf_shape} from "
                           "config.json; the checkpoint and config.json disagree.")
      if dtype not in _ST_DTYPES:
        raise WeightsError(f"Tensor {name} in {model_dir} has dtype {dtype}; supported: "
                           f"{', '.join(_ST_DTYPES)}.")
      used.add(name)
    sharding = (sharding_fn or (lambda p, s: _no_sharding(s)))(path, shape)
    flat[path] = _make_array(tensors, names, transpose, stacked, shape, cfg.storage_dtype, sharding)
  unexpected = sorted(set(tensors) - used)
  if cfg.tie_word_embeddings and "lm_head.weight" in unexpected:
    unexpected.remove("lm_head.weight")  # some exporters write the tied copy too
  unexpected = [n for n in unexpected if not n.endswith("rotary_emb.inv_freq")]
  if unexpected:
    raise WeightsError(f"Unexpected tensors in {model_dir}: {unexpected[:5]}"
                       f"{' ...' if len(unexpected) > 5 else ''}; the checkpoint holds weights this "
                       f"{cfg.model_type} config does not use (wrong model_type or extra modules).")
  return cfg, model_lib.unflatten_params(flat)


def _make_array(tensors, names, transpose, stacked, shape, dtype, sharding):
  def read(index):
    if stacked:
      layer_idx = range(len(names))[index[0]]
      rest = index[1:]
    else:
      layer_idx, rest = [None], index
    out = []
    for i in layer_idx:
      name = names[0] if i is None else names[i]
      t = tensors[name].get(name)
      if transpose:
        t = t[tuple(reversed(rest))].T
      else:
        t = t[rest]
      out.append(np.asarray(t, dtype=np.float32).astype(dtype))
    return out[0] if not stacked else np.stack(out)
  return jax.make_array_from_callback(shape, sharding, read)


# -- HF export --------------------------------------------------------------------------------------------------
def _gather(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def to_hf_tensors(params, cfg: ModelConfig):
  """Yields (HF name, numpy array) one tensor at a time."""
  flat = model_lib.flatten_params(params)
  for path, (names, transpose) in hf_tensor_plan(cfg).items():
    arr = _gather(flat[path])
    if path.startswith("layers/"):
      for i, name in enumerate(names):
        yield name, np.ascontiguousarray(arr[i].T if transpose else arr[i])
    else:
      yield names[0], np.ascontiguousarray(arr.T if transpose else arr)


def _write_safetensors(path, tensors: list[tuple[str, np.ndarray]]):
  header, offset = {}, 0
  for name, arr in tensors:
    nbytes = arr.nbytes
    header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for _, arr in tensors:
      f.write(arr.tobytes())


def save_hf(params, cfg: ModelConfig, out_dir: str, tokenizer_dir: str | None = None,
            max_shard_bytes: int = 2 * 1024 ** 3, dtype: str | None = None):
  """Writes config.json, (sharded) model.safetensors and the tokenizer files: an HF directory that
  transformers' from_pretrained and vLLM load unchanged. Only process 0 writes; every process must call it."""
  np_dtype = np.dtype(model_lib._DTYPES[dtype or cfg.param_dtype])
  write = jax.process_index() == 0
  if write:
    os.makedirs(out_dir, exist_ok=True)
    for stale in _written(out_dir):
      os.remove(os.path.join(out_dir, stale))
  current, size, n_shards = [], 0, 0

  def flush():  # at most one shard is ever held in host memory
    nonlocal current, size, n_shards
    if current and write:
      _write_safetensors(os.path.join(out_dir, f".shard{n_shards}.tmp"), current)
    n_shards += bool(current)
    current, size = [], 0

  for name, arr in to_hf_tensors(params, cfg):  # every process takes part in the gathers
    arr = arr.astype(np_dtype)
    if current and size + arr.nbytes > max_shard_bytes:
      flush()
    current.append((name, arr))
    size += arr.nbytes
  flush()
  if not write:
    return
  _finalize_shards(out_dir)
  hf_cfg = cfg.replace(param_dtype=dtype or cfg.param_dtype).to_hf()
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2, sort_keys=True)
  if tokenizer_dir:
    for fname in TOKENIZER_FILES:
      src = os.path.join(tokenizer_dir, fname)
      if os.path.exists(src):
        shutil.copy(src, os.path.join(out_dir, fname))


def _written(out_dir):
  return sorted(f for f in os.listdir(out_dir) if re.fullmatch(r"\.shard\d+\.tmp", f))


def _finalize_shards(out_dir):
  tmp = sorted(_written(out_dir), key=lambda f: int(f[6:-4]))
  for stale in ("model.safetensors", "model.safetensors.index.json"):
    if os.path.exists(os.path.join(out_dir, stale)):
      os.remove(os.path.join(out_dir, stale))
  for f in os.listdir(out_dir):
    if re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f):
      os.remove(os.path.join(out_dir, f))
  if len(tmp) == 1:
    os.replace(os.path.join(out_dir, tmp[0]), os.path.join(out_dir, "model.safetensors"))
    return
  weight_map, total = {}, 0
  for i, f in enumerate(tmp):
    final = f"model-{i + 1:05d}-of-{len(tmp):05d}.safetensors"
    os.replace(os.path.join(out_dir, f), os.path.join(out_dir, final))
    st = _SafetensorsFile(os.path.join(out_dir, final))
    for name in st.names():
      weight_map[name] = final
      dtype, shape = st.info(name)
      total += int(np.prod(shape)) * np.dtype(_ST_DTYPES[dtype]).itemsize
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# -- GGUF ------------------------------------------------------------------------------------------------------
_GGUF_ARCHS = ("llama", "qwen2", "qwen3")
_GGUF_LAYER = {"attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
               "q_bias": "attn_q.bias", "k_bias": "attn_k.bias", "v_bias": "attn_v.bias",
               "q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "mlp_norm": "ffn_norm",
               "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}


def _gguf_field(reader, key, default=None):
  field = reader.fields.get(key)
  if field is None:
    return default
  value = field.contents()
  return value


def gguf_config(reader, path: str = "", **overrides) -> ModelConfig:
  arch = _gguf_field(reader, "general.architecture")
  if arch not in _GGUF_ARCHS:
    raise WeightsError(f"GGUF {path}: general.architecture={arch!r} is not supported; supported: "
                       f"{', '.join(_GGUF_ARCHS)}.")
  g = lambda key, default=None: _gguf_field(reader, f"{arch}.{key}", default)  # noqa: E731
  heads = int(g("attention.head_count"))
  hidden = int(g("embedding_length"))
  names = {t.name for t in reader.tensors}
  vocab = len(_gguf_field(reader, "tokenizer.ggml.tokens"))
  eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
  bos = _gguf_field(reader, "tokenizer.ggml.bos_token_id")
  hf = {"model_type": arch, "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")), "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos)}
  if arch == "llama":
    hf["attention_bias"] = "blk.0.attn_q.bias" in names
  return ModelConfig.from_hf(hf, **overrides)


def _unpermute(w, heads):
  """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> HF rotate-half halves)."""
  rows, cols = w.shape
  return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def load_gguf(path: str, sharding_fn=None, **cfg_overrides):
  """Loads (cfg, params) from a GGUF file, dequantised to float32 then cast to cfg.param_dtype."""
  import gguf  # only needed for GGUF files

  if not os.path.exists(path):
    raise FileNotFoundError(f"GGUF file {path} does not exist.")
  reader = gguf.GGUFReader(path)
  cfg = gguf_config(reader, path, **cfg_overrides)
  by_name = {t.name: t for t in reader.tensors}

  def tensor(name):
    if name not in by_name:
      raise WeightsError(f"GGUF {path}: missing tensor {name}.")
    t = by_name[name]
    arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    return arr.reshape(tuple(int(d) for d in reversed(t.shape)))

  expected = model_lib.flatten_params(model_lib.param_shapes(cfg))
  permute = cfg.model_type == "llama"
  flat = {}
  for ours, shape in expected.items():
    if ours == "embed":
      arr = tensor("token_embd.weight")
    elif ours == "final_norm":
      arr = tensor("output_norm.weight")
    elif ours == "lm_head":
      arr = tensor("output.weight").T
    else:
      leaf = ours.split("/")[1]
      gname = _GGUF_LAYER[leaf]
      suffix = "" if gname.endswith(".bias") else ".weight"
      layers = []
      for i in range(cfg.num_layers):
        w = tensor(f"blk.{i}.{gname}{suffix}")
        if permute and leaf in ("q", "k"):
          w = _unpermute(w, cfg.num_heads if leaf == "q" else cfg.num_kv_heads)
        layers.append(w.T if leaf in ("q", "k", "v", "o", "gate", "up", "down") else w)
      arr = np.stack(layers)
    if tuple(arr.shape) != tuple(shape):
      raise WeightsError(f"GGUF {path}: {ours} has shape {arr.shape}, expected {shape}.")
    sharding = (sharding_fn or (lambda p, s: _no_sharding(s)))(ours, shape)
    flat[ours] = jax.device_put(arr.astype(cfg.storage_dtype), sharding)
  return cfg, model_lib.unflatten_params(flat)


def load_model(model_dir: str | None = None, gguf_file: str | None = None, sharding_fn=None,
               **cfg_overrides):
  """One entry point: an HF directory or a GGUF file."""
  if bool(model_dir) == bool(gguf_file):
    raise ValueError("Give exactly one of model_dir (an HF checkpoint directory) or gguf_file.")
  if gguf_file:
    return load_gguf(gguf_file, sharding_fn=sharding_fn, **cfg_overrides)
  return load_hf(model_dir, sharding_fn=sharding_fn, **cfg_overrides)


def abstract_params(cfg: ModelConfig) -> Mapping[str, Any]:
  shapes = model_lib.param_shapes(cfg)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, cfg.storage_dtype), shapes,
                      is_leaf=lambda x: isinstance(x, tuple))


def gguf_config_from_file(path: str, **overrides) -> ModelConfig:
  """The ModelConfig of a GGUF file, without dequantising its tensors."""
  import gguf

  if not os.path.exists(path):
    raise FileNotFoundError(f"GGUF file {path} does not exist.")
  return gguf_config(gguf.GGUFReader(path), path, **overrides)
