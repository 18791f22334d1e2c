"""The student model against transformers: golden fixtures (no torch needed) and a live check (torch)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ropd_jax import model, weights

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ["llama", "qwen2", "qwen3"]


def _fixture(family):
  d = os.path.join(FIXTURES, f"tiny_{family}")
  return d, np.load(os.path.join(d, "golden.npz"))


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_golden(family):
  d, g = _fixture(family)
  cfg, params = weights.load_hf(d)
  logits, cache = model.forward(params, jnp.asarray(g["tokens"]), cfg, valid_bt=jnp.asarray(g["valid"]))
  assert cache is None
  diff = np.abs(np.asarray(logits) - g["logits"])[g["valid"]]
  assert diff.max() <= 1e-4, diff.max()


def test_config_features_per_family():
  cfgs = {f: weights.load_config(os.path.join(FIXTURES, f"tiny_{f}")) for f in FAMILIES}
  assert cfgs["llama"].rope_llama3 == (8.0, 1.0, 4.0, 16) and cfgs["llama"].tie_word_embeddings
  assert cfgs["qwen2"].qkv_bias and not cfgs["qwen2"].qk_norm
  assert cfgs["qwen3"].qk_norm and not cfgs["qwen3"].qkv_bias and cfgs["qwen3"].head_dim == 16


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_prefill_and_decode_equal_full_forward(family):
  d, g = _fixture(family)
  cfg, params = weights.load_hf(d)
  tokens = jnp.asarray(g["tokens"][:, :10])
  full, _ = model.forward(params, tokens, cfg)
  cache = model.init_cache(cfg, batch=2, max_len=16)
  pre, cache = model.forward(params, tokens[:, :6], cfg, cache=cache)
  np.testing.assert_allclose(pre, full[:, :6], atol=1e-5)
  for t in range(6, 10):
    pos = jnp.full((2, 1), t, jnp.int32)
    step, cache = model.forward(params, tokens[:, t:t + 1], cfg, positions_bt=pos, cache=cache)
    np.testing.assert_allclose(step[:, 0], full[:, t], atol=1e-5)


def test_padding_does_not_leak_into_valid_positions():
  d, g = _fixture("qwen2")
  cfg, params = weights.load_hf(d)
  tokens = np.array(g["tokens"])
  valid = np.ones_like(tokens, bool)
  valid[:, 8:] = False
  a, _ = model.forward(params, jnp.asarray(tokens), cfg, valid_bt=jnp.asarray(valid))
  tokens[:, 8:] = 5  # different padding content
  b, _ = model.forward(params, jnp.asarray(tokens), cfg, valid_bt=jnp.asarray(valid))
  np.testing.assert_array_equal(np.asarray(a)[:, :8], np.asarray(b)[:, :8])


def test_remat_and_bf16_are_config_switches():
  d, g = _fixture("llama")
  cfg, params = weights.load_hf(d)
  tokens = jnp.asarray(g["tokens"])
  ref, _ = model.forward(params, tokens, cfg)
  remat, _ = model.forward(params, tokens, cfg.replace(remat=True))
  np.testing.assert_allclose(remat, ref, atol=1e-6)
  bf_cfg, bf_params = weights.load_hf(d, param_dtype="bfloat16", dtype="bfloat16")
  assert jax.tree.leaves(bf_params)[0].dtype == jnp.bfloat16
  bf, _ = model.forward(bf_params, tokens, bf_cfg)
  assert bf.dtype == jnp.float32  # logits are always float32
  assert np.abs(np.asarray(bf) - np.asarray(ref)).max() < 0.1 * np.abs(np.asarray(ref)).max()

  def loss(p, c):
    return model.forward(p, tokens, c)[0].mean()
  g_ref = jax.grad(loss)(params, cfg)
  g_remat = jax.grad(loss)(params, cfg.replace(remat=True))
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_token_logprobs_teacher_forcing():
  d, g = _fixture("qwen3")
  cfg, params = weights.load_hf(d)
  tokens = jnp.asarray(g["tokens"])
  logp, entropy = model.token_logprobs(params, tokens, cfg)
  logits = np.asarray(g["logits"], np.float64)
  ref_lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  ref = (np.take_along_axis(logits[:, :-1], g["tokens"][:, 1:, None], -1)[..., 0]
         - ref_lse[:, :-1])
  # Row 0 of the golden is unpadded, so its logits are the plain teacher-forced ones.
  np.testing.assert_allclose(np.asarray(logp)[0], ref[0], atol=1e-4)
  assert entropy.shape == logp.shape and np.all(np.asarray(entropy) > 0)


def test_layers_are_scanned_so_compile_does_not_unroll_depth():
  cfg = model.ModelConfig(num_layers=6)
  params = model.init_params(cfg, jax.random.key(0))
  hlo = jax.jit(lambda p, t: model.forward(p, t, cfg)[0]).lower(
      params, jnp.zeros((1, 8), jnp.int32)).as_text()
  assert "while" in hlo  # one loop body, not six copies
  assert hlo.count("dot_general") < 6 * 7


def test_unsupported_model_type_names_the_supported_ones():
  with pytest.raises(ValueError, match=r"model_type='gpt2'.*llama, qwen2, qwen3"):
    model.ModelConfig.from_hf({"model_type": "gpt2"})


def test_unsupported_rope_scaling_is_an_error():
  hf = json.load(open(os.path.join(FIXTURES, "tiny_llama", "config.json")))
  hf["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
  with pytest.raises(ValueError, match="yarn"):
    model.ModelConfig.from_hf(hf)


@pytest.mark.parametrize("family", FAMILIES)
def test_live_against_transformers(family):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  d, g = _fixture(family)
  hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, 97, size=(3, 17))
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(tokens)).logits.numpy()
  cfg, params = weights.load_hf(d)
  ours, _ = model.forward(params, jnp.asarray(tokens), cfg)
  assert np.abs(np.asarray(ours) - ref).max() <= 1e-4


def test_token_logprobs_window_equals_full_inside_the_window():
  d, g = _fixture("qwen2")
  cfg, params = weights.load_hf(d)
  tokens = jnp.asarray(g["tokens"])
  full_lp, full_ent = model.token_logprobs(params, tokens, cfg, temperature=0.7)
  start = jnp.array([3, 7])
  lp, ent = model.token_logprobs(params, tokens, cfg, temperature=0.7, window_start_b=start, window=5)
  inside = np.zeros((2, 11), bool)
  inside[0, 3:8] = True
  inside[1, 7:11] = True  # row 1's window runs past the end: clipped, not wrapped
  np.testing.assert_allclose(np.asarray(lp)[inside], np.asarray(full_lp)[inside], atol=1e-5)
  np.testing.assert_allclose(np.asarray(ent)[inside], np.asarray(full_ent)[inside], atol=1e-5)
  assert np.all(np.asarray(lp)[~inside] == 0) and np.all(np.asarray(ent)[~inside] == 0)
