"""The student: a decoder-only LM (Llama / Qwen2 / Qwen3) as pure functions of a params pytree.

One `forward` serves training (full sequences, no cache) and sampling (prefill and decode with a static KV
cache). Layers are stacked on a leading axis and run with `lax.scan`, so compile time does not grow with depth.

Params layout (L = layers, D = hidden, H = query heads, K = kv heads, E = head_dim, F = mlp, V = vocab):
  embed [V, D]; final_norm [D]; lm_head [D, V] (absent when tied)
  layers/attn_norm [L, D]; layers/q [L, D, H*E]; layers/k, layers/v [L, D, K*E]; layers/o [L, H*E, D]
  layers/q_bias [L, H*E], layers/k_bias, layers/v_bias [L, K*E]   (Qwen2, or Llama with attention_bias)
  layers/q_norm, layers/k_norm [L, E]                             (Qwen3)
  layers/mlp_norm [L, D]; layers/gate, layers/up [L, D, F]; layers/down [L, F, D]
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture plus numerics. Hashable, so it can be a static jit argument."""
  model_type: str = "llama"
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # Llama-3 style frequency scaling: (factor, low_freq_factor, high_freq_factor, original_max_position).
  rope_llama3: tuple[float, float, float, int] | None = None
  rope_linear_factor: float = 1.0
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  qk_norm: bool = False
  bos_token_id: int | None = None
  eos_token_ids: tuple[int, ...] = ()
  param_dtype: str = "float32"   # storage dtype of the params pytree
  dtype: str = "float32"         # compute dtype of matmuls; norms, softmax and logits stay float32
  remat: bool = False            # recompute each layer in the backward pass (saves activation memory)
  extra_hf: tuple[tuple[str, Any], ...] = ()   # HF config fields we do not model, kept for export

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def storage_dtype(self):
    return _DTYPES[self.param_dtype]

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # -- HF config.json <-> ModelConfig -------------------------------------------------------------------
  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(
          f"config.json model_type={model_type!r} is not supported; supported model types: "
          f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
    if hf.get("use_sliding_window"):
      raise ValueError("config.json use_sliding_window=true is not supported; set it to false "
                       "(full attention) or use a model without sliding-window layers.")
    num_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // num_heads
    rope_llama3, rope_linear = None, 1.0
    scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
    rope_theta = hf.get("rope_theta", scaling.get("rope_theta", 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "llama3":
      rope_llama3 = (float(scaling["factor"]), float(scaling["low_freq_factor"]),
                     float(scaling["high_freq_factor"]),
                     int(scaling["original_max_position_embeddings"]))
    elif rope_type == "linear":
      rope_linear = float(scaling["factor"])
    elif rope_type != "default":
      raise ValueError(f"config.json rope_scaling type {rope_type!r} is not supported; supported: "
                       "default, linear, llama3.")
    eos = hf.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    if model_type == "qwen2":
      qkv_bias = True
    else:
      qkv_bias = bool(hf.get("attention_bias", False))
    known = {"model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
             "rope_scaling", "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
             "bos_token_id", "eos_token_id"}
    extra = tuple(sorted((k, _freeze(v)) for k, v in hf.items() if k not in known))
    cfg = cls(
        model_type=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta),
        rope_llama3=rope_llama3,
        rope_linear_factor=rope_linear,
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=model_type == "llama" and qkv_bias,
        qk_norm=model_type == "qwen3",
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        extra_hf=extra,
    )
    return cfg.replace(**overrides)

  def to_hf(self) -> dict[str, Any]:
    hf = {k: _thaw(v) for k, v in self.extra_hf}
    hf.update(
        model_type=self.model_type,
        architectures=[{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                        "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}[self.model_type]],
        vocab_size=self.vocab_size,
        hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size,
        num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads,
        num_key_value_heads=self.num_kv_heads,
        head_dim=self.head_dim,
        rms_norm_eps=self.rms_norm_eps,
        rope_theta=self.rope_theta,
        max_position_embeddings=self.max_position_embeddings,
        tie_word_embeddings=self.tie_word_embeddings,
        hidden_act="silu",
        dtype=self.param_dtype,
    )
    if self.model_type in ("llama", "qwen3", "mistral"):
      hf["attention_bias"] = self.qkv_bias
    # transformers 5 reads `rope_parameters`; older readers (vLLM, transformers 4) read `rope_scaling`.
    rope = {"rope_type": "default"}
    if self.rope_llama3 is not None:
      f, lo, hi, orig = self.rope_llama3
      rope = {"rope_type": "llama3", "factor": f, "low_freq_factor": lo, "high_freq_factor": hi,
              "original_max_position_embeddings": orig}
    elif self.rope_linear_factor != 1.0:
      rope = {"rope_type": "linear", "factor": self.rope_linear_factor}
    hf["rope_parameters"] = dict(rope, rope_theta=self.rope_theta)
    if rope["rope_type"] != "default":
      hf["rope_scaling"] = rope
    if self.bos_token_id is not None:
      hf["bos_token_id"] = self.bos_token_id
    if self.eos_token_ids:
      hf["eos_token_id"] = (self.eos_token_ids[0] if len(self.eos_token_ids) == 1
                            else list(self.eos_token_ids))
    return hf


def _freeze(v):
  if isinstance(v, dict):
    return ("__dict__", tuple(sorted((k, _freeze(x)) for k, x in v.items())))
  if isinstance(v, list):
    return ("__list__", tuple(_freeze(x) for x in v))
  return v


def _thaw(v):
  if isinstance(v, tuple) and len(v) == 2 and v[0] == "__dict__":
    return {k: _thaw(x) for k, x in v[1]}
  if isinstance(v, tuple) and len(v) == 2 and v[0] == "__list__":
    return [_thaw(x) for x in v[1]]
  return v


# -- params ----------------------------------------------------------------------------------------------
def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
  """The expected shape of every parameter, as a nested dict mirroring the params pytree."""
  L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  q_dim, kv_dim = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  layers = {"attn_norm": (L, D), "q": (L, D, q_dim), "k": (L, D, kv_dim), "v": (L, D, kv_dim),
            "o": (L, q_dim, D), "mlp_norm": (L, D), "gate": (L, D, F), "up": (L, D, F),
            "down": (L, F, D)}
  if cfg.qkv_bias:
    layers.update(q_bias=(L, q_dim), k_bias=(L, kv_dim), v_bias=(L, kv_dim))
  if cfg.o_bias:
    layers.update(o_bias=(L, D))
  if cfg.qk_norm:
    layers.update(q_norm=(L, cfg.head_dim), k_norm=(L, cfg.head_dim))
  shapes = {"embed": (V, D), "final_norm": (D,), "layers": layers}
  if not cfg.tie_word_embeddings:
    shapes["lm_head"] = (D, V)
  return shapes


def init_params(cfg: ModelConfig, rng: jax.Array, scale: float = 0.02) -> dict[str, Any]:
  """Random params for tests and benchmarks: normal(scale) matrices, zero biases, unit norms."""
  shapes = param_shapes(cfg)
  flat = _flatten(shapes)
  keys = jax.random.split(rng, len(flat))
  out = {}
  for key, (path, shape) in zip(keys, sorted(flat.items())):
    name = path.split("/")[-1]
    if name.endswith("norm"):
      value = jnp.ones(shape, jnp.float32)
    elif name.endswith("bias"):
      value = scale * jax.random.normal(key, shape, jnp.float32)
    else:
      value = scale * jax.random.normal(key, shape, jnp.float32)
    out[path] = value.astype(cfg.storage_dtype)
  return _unflatten(out)


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, path + "/"))
    else:
      out[path] = v
  return out


def _unflatten(flat):
  tree: dict[str, Any] = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


flatten_params = _flatten
unflatten_params = _unflatten


# -- building blocks -------------------------------------------------------------------------------------
def rms_norm(x, weight, eps):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  """Inverse frequencies [E/2] in float64 numpy, with Llama-3 / linear scaling applied."""
  e = cfg.head_dim
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
  if cfg.rope_llama3 is not None:
    factor, lo, hi, orig = cfg.rope_llama3
    wavelen = 2 * math.pi / inv
    lo_wavelen, hi_wavelen = orig / lo, orig / hi
    smooth = (orig / wavelen - lo) / (hi - lo)
    scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
    mid = (wavelen <= lo_wavelen) & (wavelen >= hi_wavelen)
    inv = np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
  return inv / cfg.rope_linear_factor


def apply_rope(x_bthe, positions_bt, inv_freq_e2):
  """Rotary embedding in HF's rotate-half layout (first half / second half of each head)."""
  angles_bte2 = positions_bt[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_e2, jnp.float32)
  cos = jnp.cos(angles_bte2)[:, :, None, :]
  sin = jnp.sin(angles_bte2)[:, :, None, :]
  x32 = x_bthe.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bthe.dtype)


class KVCache(NamedTuple):
  """Static KV cache. Slot s of a row holds the key/value of the token at position s of that row.

  Heads-major ([.., K, S, E]) so that each kv head's slots are contiguous: the decode attention dots
  then need no transpose of the cache (3x faster on CPU than [.., S, K, E])."""
  k: jax.Array  # [L, B, K, S, E]
  v: jax.Array  # [L, B, K, S, E]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
  dtype = dtype or cfg.compute_dtype
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def _attention(q_bthe, k_bske, v_bske, mask_bts, cfg: ModelConfig, heads_major: bool = False):
  """`heads_major`: keys / values come as [B, K, S, E] (the cache layout) instead of [B, S, K, E]."""
  b, t, h, e = q_bthe.shape
  kv = cfg.num_kv_heads
  q_btkge = q_bthe.reshape(b, t, kv, h // kv, e)
  kv_spec = "bkse" if heads_major else "bske"
  scores = jnp.einsum(f"btkge,{kv_spec}->bkgts", q_btkge, k_bske,
                      preferred_element_type=jnp.float32) / math.sqrt(e)
  scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v_bske.dtype)
  if heads_major:  # batched dot in canonical (b, k | g t, s | s, e) order, then a small transpose
    out = jnp.einsum("bkgts,bkse->bkgte", probs, v_bske, preferred_element_type=jnp.float32)
    out = out.transpose(0, 3, 1, 2, 4)
  else:
    out = jnp.einsum("bkgts,bske->btkge", probs, v_bske, preferred_element_type=jnp.float32)
  return out.reshape(b, t, h * e).astype(q_bthe.dtype)


def decoder_layer(cfg: ModelConfig, inv_freq, x_btd, p, positions_bt, mask_bts, cache_kv):
  """One transformer block. `cache_kv` is None (training) or this layer's (k, v) [B, K, S, E]."""
  dt = cfg.compute_dtype
  w = jax.tree.map(lambda a: a.astype(dt), p)
  h = rms_norm(x_btd, p["attn_norm"], cfg.rms_norm_eps)
  q = h @ w["q"]
  k = h @ w["k"]
  v = h @ w["v"]
  if cfg.qkv_bias:
    q, k, v = q + w["q_bias"], k + w["k_bias"], v + w["v_bias"]
  attn, new_kv = _self_attention(cfg, inv_freq, q, k, v, p, positions_bt, mask_bts, cache_kv)
  attn = attn @ w["o"]
  if cfg.o_bias:
    attn = attn + w["o_bias"]
  x_btd = x_btd + attn
  h = rms_norm(x_btd, p["mlp_norm"], cfg.rms_norm_eps)
  mlp = (jax.nn.silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"]
  return x_btd + mlp, new_kv


def _self_attention(cfg: ModelConfig, inv_freq, q, k, v, p, positions_bt, mask_bts, cache_kv):
  """Projected q [B, T, H*E], k, v [B, T, K*E] -> attention output [B, T, H*E] (before `o`) and the
  updated cache: qk-norm, rope, the cache write, attention."""
  dt = cfg.compute_dtype
  b, t, _ = q.shape
  q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
  k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
  if cfg.qk_norm:
    q = rms_norm(q, p["q_norm"], cfg.rms_norm_eps)
    k = rms_norm(k, p["k_norm"], cfg.rms_norm_eps)
  q = apply_rope(q, positions_bt, inv_freq)
  k = apply_rope(k, positions_bt, inv_freq)
  if cache_kv is None:
    keys, values, new_kv = k, v, None
  else:
    cache_k, cache_v = cache_kv
    rows = jnp.arange(b)[:, None]
    slots = jnp.clip(positions_bt, 0, cache_k.shape[2] - 1)
    # Indices on dims 0 and 2 around a slice: the indexed region is [B, T, K, E], like k and v.
    cache_k = cache_k.at[rows, :, slots].set(k.astype(cache_k.dtype))
    cache_v = cache_v.at[rows, :, slots].set(v.astype(cache_v.dtype))
    keys, values, new_kv = cache_k.astype(dt), cache_v.astype(dt), (cache_k, cache_v)
  return _attention(q, keys, values, mask_bts, cfg, heads_major=cache_kv is not None), new_kv


# -- feature-major decode (CPU) --------------------------------------------------------------------------
# At one token per row a decode matmul is [B, D] x [D, N] with B ~ 16: it streams N*D weights for few
# FLOPs. XLA:CPU's library GEMM (YNNPACK) streams a weight matrix 20-35% faster when it is the row-major
# LEFT operand, W_t [N, D] @ h [D, B], than as the right one (measured at 16 x 576 x {576, 1536, 49152} on
# one core, weights read from DRAM). So the CPU decode keeps activations feature-major, [D, B], with
# weights stored [out, in], q/k/v and gate/up each fused into one matmul.


def feature_major_weights(p, cfg: ModelConfig) -> dict[str, Any]:
  """One layer's decode weights for `decoder_layer_feature_major`: [out, in] matrices, qkv and gate/up
  fused. `p` is one layer of `params["layers"]` (already in the compute dtype)."""
  w = {"qkv_t": jnp.concatenate([p["q"], p["k"], p["v"]], axis=1).T, "o_t": p["o"].T,
       "gate_up_t": jnp.concatenate([p["gate"], p["up"]], axis=1).T, "down_t": p["down"].T}
  w.update({k: p[k] for k in ("attn_norm", "mlp_norm", "q_norm", "k_norm", "o_bias") if k in p})
  if cfg.qkv_bias:
    w["qkv_bias"] = jnp.concatenate([p["q_bias"], p["k_bias"], p["v_bias"]])
  return w


def rms_norm_feature_major(x_db, weight, eps):
  """`rms_norm` over the leading (feature) axis of [D, B]."""
  x32 = x_db.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=0, keepdims=True) + eps)
  return (y * weight.astype(jnp.float32)[:, None]).astype(x_db.dtype)


def decoder_layer_feature_major(cfg: ModelConfig, inv_freq, x_db, w, positions_b1, mask_b1s, cache_kv):
  """`decoder_layer` for one token per row with activations [D, B] and `feature_major_weights`; the
  cache (k, v) [B, K, S, E] is the same as `decoder_layer`'s."""
  hq, hk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  h_db = rms_norm_feature_major(x_db, w["attn_norm"], cfg.rms_norm_eps)
  # The barrier keeps XLA from folding the transpose into the dot, which would swap its operands back.
  qkv_nb = jax.lax.optimization_barrier(w["qkv_t"] @ h_db)
  if cfg.qkv_bias:
    qkv_nb = qkv_nb + w["qkv_bias"][:, None]
  qkv_b1n = qkv_nb.T[:, None, :]
  q, k, v = qkv_b1n[..., :hq], qkv_b1n[..., hq:hq + hk], qkv_b1n[..., hq + hk:]
  attn_b1n, new_kv = _self_attention(cfg, inv_freq, q, k, v, w, positions_b1, mask_b1s, cache_kv)
  attn_db = w["o_t"] @ attn_b1n[:, 0].T
  if cfg.o_bias:
    attn_db = attn_db + w["o_bias"][:, None]
  x_db = x_db + attn_db
  h_db = rms_norm_feature_major(x_db, w["mlp_norm"], cfg.rms_norm_eps)
  gate_up_nb = w["gate_up_t"] @ h_db
  f = cfg.intermediate_size
  return x_db + w["down_t"] @ (jax.nn.silu(gate_up_nb[:f]) * gate_up_nb[f:]), new_kv


def attention_mask(positions_bt, valid_bt=None, cache_len: int | None = None, segment_ids_bt=None):
  """Boolean [B, T, S] mask: causal by position, restricted to valid (non-padding) keys.

  Without a cache the keys are the T input tokens; with a cache of length S, slot s holds position s, so a
  query at position p sees slots 0..p of its own row.
  """
  if cache_len is None:
    mask = positions_bt[:, None, :] <= positions_bt[:, :, None]
    if valid_bt is not None:
      mask &= valid_bt[:, None, :]
    if segment_ids_bt is not None:
      mask &= segment_ids_bt[:, None, :] == segment_ids_bt[:, :, None]
    return mask
  slots = jnp.arange(cache_len)
  return slots[None, None, :] <= positions_bt[:, :, None]


def forward(params, tokens_bt, cfg: ModelConfig, positions_bt=None, valid_bt=None, cache=None,
            segment_ids_bt=None, return_hidden: bool = False):
  """Logits [B, T, V] (float32) and the updated cache (None when no cache was given).

  tokens_bt: int ids. positions_bt: position of each token (default 0..T-1). valid_bt: False on padding.
  cache: a KVCache; the tokens are written at their positions and attend to slots 0..position.
  """
  b, t = tokens_bt.shape
  if positions_bt is None:
    positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  inv_freq = rope_inv_freq(cfg)
  if cache is None:
    mask = attention_mask(positions_bt, valid_bt, segment_ids_bt=segment_ids_bt)
  else:
    mask = attention_mask(positions_bt, cache_len=cache.k.shape[3])
  x = params["embed"][tokens_bt].astype(cfg.compute_dtype)

  def body(x, layer_in):
    p, kv = layer_in
    return decoder_layer(cfg, inv_freq, x, p, positions_bt, mask, kv)

  if cfg.remat:
    body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
  kv_in = None if cache is None else (cache.k, cache.v)
  x, kv_out = jax.lax.scan(body, x, (params["layers"], kv_in))
  x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
  if return_hidden:
    return x, (None if cache is None else KVCache(*kv_out))
  logits = lm_logits(params, x, cfg)
  return logits, (None if cache is None else KVCache(*kv_out))


def lm_logits(params, x_btd, cfg: ModelConfig):
  dt = cfg.compute_dtype
  if cfg.tie_word_embeddings:
    return jnp.einsum("btd,vd->btv", x_btd.astype(dt), params["embed"].astype(dt),
                      preferred_element_type=jnp.float32)
  return jnp.einsum("btd,dv->btv", x_btd.astype(dt), params["lm_head"].astype(dt),
                    preferred_element_type=jnp.float32)


def token_logprobs(params, tokens_bt, cfg: ModelConfig, valid_bt=None, positions_bt=None,
                   temperature: float = 1.0, window_start_b=None, window: int = 0):
  """log p(tokens[t+1] | tokens[:t+1]) for t in 0..T-2, shape [B, T-1], and the entropy [B, T-1].

  With `window` > 0, the vocabulary projection runs only on the `window` positions from `window_start_b`
  of each row (the response); elsewhere both outputs are 0. For RL batches whose prompt is much longer
  than the trained response this skips most of the [T, V] logits, the largest activation of the step.
  """
  if not window:
    logits, _ = forward(params, tokens_bt, cfg, positions_bt=positions_bt, valid_bt=valid_bt)
    return _logprobs_and_entropy(logits[:, :-1] / temperature, tokens_bt[:, 1:])
  b, t = tokens_bt.shape
  hidden, _ = forward(params, tokens_bt, cfg, positions_bt=positions_bt, valid_bt=valid_bt,
                      return_hidden=True)
  pos_bn = window_start_b[:, None] + jnp.arange(window)[None, :]
  in_range_bn = pos_bn <= t - 2
  pos_bn = jnp.clip(pos_bn, 0, t - 2)
  hidden_bnd = jnp.take_along_axis(hidden, pos_bn[..., None], axis=1)
  logits_bnv = lm_logits(params, hidden_bnd, cfg) / temperature
  logp_bn, entropy_bn = _logprobs_and_entropy(logits_bnv, jnp.take_along_axis(tokens_bt, pos_bn + 1, axis=1))
  rows = jnp.arange(b)[:, None]
  scatter = lambda x: jnp.zeros((b, t - 1), jnp.float32).at[rows, pos_bn].add(  # noqa: E731
      jnp.where(in_range_bn, x, 0.0))
  return scatter(logp_bn), scatter(entropy_bn)


def _logprobs_and_entropy(logits_btv, targets_bt):
  logp_all = jax.nn.log_softmax(logits_btv, axis=-1)
  logp = jnp.take_along_axis(logp_all, targets_bt[..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, entropy
