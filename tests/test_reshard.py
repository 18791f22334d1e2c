"""The sampler's layouts: the once-per-step weight reshard from the training layout (float32, split over
fsdp), and the KV cache layout from the config's rules."""
import jax
import numpy as np
import pytest

from ropd_jax import model as model_lib
from ropd_jax import sampling
from ropd_jax import sharding

CFG = model_lib.ModelConfig(model_type="qwen3", vocab_size=96, hidden_size=32, intermediate_size=64,
                            num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True,
                            param_dtype="float32", dtype="bfloat16", eos_token_ids=(1,))


def _train_layout(mesh_cfg):
  params = model_lib.init_params(CFG, jax.random.key(3))
  mesh = sharding.make_mesh(mesh_cfg)
  return params, mesh, sharding.shard_params(params, sharding.param_shardings(params, mesh))


def test_sampler_layout_is_replicated_over_batch_axes_with_bf16_matrices_and_f32_norms():
  params, mesh, train = _train_layout({"data": 1, "fsdp": 4, "tensor": 2})
  assert tuple(train["layers"]["gate"].sharding.spec) == (None, "fsdp", "tensor")   # the training layout
  out = sampling.sampler_params(train, CFG, mesh)
  gate, norm = out["layers"]["gate"], out["layers"]["attn_norm"]
  assert gate.dtype == jax.numpy.bfloat16 and norm.dtype == np.float32
  assert tuple(gate.sharding.spec) == (None, None, "tensor")               # fsdp gathered, tensor kept
  assert all(s.data.shape == (2, 32, 32) for s in gate.addressable_shards)
  np.testing.assert_array_equal(np.asarray(gate, np.float32),
                                np.asarray(params["layers"]["gate"].astype(jax.numpy.bfloat16), np.float32))
  np.testing.assert_array_equal(np.asarray(norm), np.asarray(params["layers"]["attn_norm"]))


def test_rollouts_from_fsdp_sharded_f32_params_equal_unsharded_ones():
  params, mesh, train = _train_layout({"data": 2, "fsdp": 2, "tensor": 2})
  scfg = sampling.SamplingConfig(temperature=1.0, max_new_tokens=5, n=2, stop_token_ids=())
  ids, lengths = sampling.pad_prompts([[5, 6, 7], [8, 9], [10, 11, 12, 13]], scfg)
  ref = sampling.sample(params, ids, lengths, jax.random.key(1), CFG, scfg)
  got = sampling.sample(train, ids, lengths, jax.random.key(1), CFG, scfg, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(got.tokens_bt), np.asarray(ref.tokens_bt))
  # bf16 matmuls split over `tensor` sum their partial products in another order: bf16-level agreement.
  np.testing.assert_allclose(np.asarray(got.logprobs_bt), np.asarray(ref.logprobs_bt), atol=5e-3)


def test_sampling_in_the_training_layout_gives_the_same_tokens():
  # replicate_weights=False: weights stay split over fsdp; GSPMD gathers them inside each decode step.
  params, mesh, train = _train_layout({"data": 2, "fsdp": 4, "tensor": 1})
  scfg = sampling.SamplingConfig(temperature=1.0, max_new_tokens=5, n=2, stop_token_ids=())
  ids, lengths = sampling.pad_prompts([[5, 6, 7], [8, 9]], scfg)
  ref = sampling.sample(params, ids, lengths, jax.random.key(2), CFG, scfg)
  got = sampling.sample(train, ids, lengths, jax.random.key(2), CFG, scfg, mesh=mesh, replicate_weights=False)
  np.testing.assert_array_equal(np.asarray(got.tokens_bt), np.asarray(ref.tokens_bt))


def test_kv_cache_spec_from_the_rules():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert sharding.kv_cache_spec(mesh, 2) == (("data", "fsdp"), "tensor", None, None)   # default
  assert sharding.kv_cache_spec(mesh, 3) == (("data", "fsdp"), None, None, None)       # 3 heads: whole
  slots = [("kv_cache", (("data", "fsdp"), None, "tensor", None))]
  assert sharding.kv_cache_spec(mesh, 3, slots) == (("data", "fsdp"), None, "tensor", None)
  # a rule for the cache alone is a valid user rule for the params too (it matches kv_cache/k)
  params = model_lib.init_params(CFG, jax.random.key(0))
  sharding.param_shardings(params, mesh, rules=slots)
  with pytest.raises(sharding.ShardingError, match="must split its rows"):
    sharding.kv_cache_spec(mesh, 2, [("kv_cache", ("tensor", None, None, None))])
  with pytest.raises(sharding.ShardingError, match="kv_heads=3 is not divisible"):
    sharding.kv_cache_spec(mesh, 3, [("kv_cache", (("data", "fsdp"), "tensor", None, None))])
  with pytest.raises(sharding.ShardingError, match="names mesh axis 'seq'"):
    sharding.kv_cache_spec(mesh, 2, [("kv_cache", (("data", "fsdp"), None, "seq", None))])


def test_cache_split_over_slots_samples_the_same_tokens():
  # Slots over tensor (a sequence-split cache) instead of heads: the prefill places it so, decode agrees.
  params, mesh, train = _train_layout({"data": 2, "fsdp": 1, "tensor": 4})
  spec = sharding.kv_cache_spec(mesh, CFG.num_kv_heads, [("kv_cache", (("data", "fsdp"), None, "tensor", None))])
  scfg = sampling.SamplingConfig(temperature=1.0, max_new_tokens=8, n=2, stop_token_ids=())
  ids, lengths = sampling.pad_prompts([[5, 6, 7], [8, 9]], scfg)
  _, kv = sampling._prefill_jit(sampling.sampler_params(train, CFG, mesh), ids, lengths, None, np.int32(0),
                                CFG, 2, 4, ids.shape[1] + 8, mesh, spec)
  want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None))
  assert kv[0][0].sharding.is_equivalent_to(want, 4)
  assert kv[0][0].addressable_shards[0].data.shape == (2, CFG.num_kv_heads, (ids.shape[1] + 8) // 4, 8)
  ref = sampling.sample(params, ids, lengths, jax.random.key(4), CFG, scfg)
  got = sampling.sample(train, ids, lengths, jax.random.key(4), CFG, scfg, mesh=mesh, cache_spec=spec)
  np.testing.assert_array_equal(np.asarray(got.tokens_bt), np.asarray(ref.tokens_bt))
  # A growing cache (room 4, then 8) keeps the slot split: 20 and 24 slots over 4 devices.
  grown = sampling.sample(train, ids, lengths, jax.random.key(4), CFG, scfg.replace(cache_grow_from=4),
                          mesh=mesh, cache_spec=spec)
  np.testing.assert_array_equal(np.asarray(grown.tokens_bt), np.asarray(ref.tokens_bt))
  with pytest.raises(ValueError, match="does not split over tensor"):
    sampling.sample(train, ids, lengths, jax.random.key(4), CFG, scfg.replace(max_new_tokens=7), mesh=mesh,
                    cache_spec=spec)
  with pytest.raises(ValueError, match="cache_grow_from=2"):   # 16 + 2 slots
    sampling.sample(train, ids, lengths, jax.random.key(4), CFG, scfg.replace(cache_grow_from=2), mesh=mesh,
                    cache_spec=spec)
