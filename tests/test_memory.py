"""ropd_jax.memory against hand counts, model cards, jax.vjp residuals and XLA's compiled memory analysis."""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from ropd_jax import memory as mem
from ropd_jax import model as M

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = M.ModelConfig(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=192, num_layers=4,
                     num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=True)
# Compiled temp bytes depend on XLA's fusion and buffer reuse, which the estimate does not model; it counts
# the tensors the program must hold. Over cases where a different term dominates ([T, S] scores, MLP width,
# vocabulary, remat) it stays within this factor of the measurement; dropping any term breaks that.
TEMP_FACTOR = 1.5


def _loss(cfg):
  def loss(params, tokens_bt):
    logp, _ = M.token_logprobs(params, tokens_bt, cfg)
    return -jnp.mean(logp)
  return loss


# -- hand counts and published sizes ---------------------------------------------------------------------
def test_param_count_and_sharded_bytes_by_hand():
  per_layer = (64 + 64 * 64 + 2 * 64 * 32 + 64 * 64   # attn_norm, q, k, v, o
               + 64 + 3 * 64 * 192                     # mlp_norm, gate, up, down
               + 2 * 16)                               # q_norm, k_norm
  total = 4 * per_layer + 2 * 512 * 64 + 64           # layers, embed + lm_head, final_norm
  assert mem.param_count(TINY) == total == 262848
  # fsdp x tensor = 4 splits the matrices; the 704 norm values stay whole on every device.
  replicated = 4 * (64 + 64 + 16 + 16) + 64
  assert replicated == 704
  mesh = mem.MeshShape(data=2, fsdp=2, tensor=2)
  assert mem.param_bytes(TINY, mesh) == ((total - replicated) // 4 + replicated) * 4 == 264960
  assert mem.param_bytes(TINY, mesh, bytes_per_value=2, shards=2) == ((total - replicated) // 2 + replicated) * 2


@pytest.mark.parametrize("name,non_embedding_billions", [
    ("Qwen3-0.6B", 0.44), ("Qwen3-4B", 3.6), ("Qwen3-8B", 6.95)])
def test_qwen3_configs_match_the_model_cards(name, non_embedding_billions):
  cfg = mem.qwen3_config(name)
  embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
  got = (mem.param_count(cfg) - embeddings) / 1e9
  assert got == pytest.approx(non_embedding_billions, rel=0.01)


def test_kv_cache_bytes_by_hand():
  cfg = mem.qwen3_config("Qwen3-8B")
  # 36 layers x 8 kv heads x 128 dims x (K, V) x 2 bytes per token; 10240 slots; 256 rows over 8 chips.
  per_token = 36 * 8 * 128 * 2 * 2
  assert per_token == 147456
  assert mem.kv_cache_bytes(cfg, 32, 10240, "bfloat16") == per_token * 10240 * 32
  assert mem.kv_cache_bytes(cfg, 32, 10240, "bfloat16", tensor=2) == per_token * 10240 * 32 // 2


# -- residuals: what jax.vjp really keeps, independent of the backend -------------------------------------
@pytest.mark.parametrize("overrides", [
    dict(dtype="bfloat16"),                                        # float32 master weights, bf16 compute
    dict(dtype="bfloat16", model_type="llama", qk_norm=False),    # no q/k norm
    dict(dtype="float32", num_heads=8),
    dict(dtype="bfloat16", remat=True),
])
def test_saved_residuals_match_jax_vjp(overrides):
  cfg = TINY.replace(**overrides)
  b, t = 2, 32
  params = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
  tokens_bt = jax.ShapeDtypeStruct((b, t), jnp.int32)
  # The residuals are the leaves of the function jax.vjp returns; eval_shape gets them without running.
  leaves = jax.eval_shape(lambda p, tok: jax.tree.leaves(jax.vjp(lambda q: _loss(cfg)(q, tok), p)[1]),
                          params, tokens_bt)
  nbytes = lambda x: int(np.prod(x.shape)) * x.dtype.itemsize
  # Per-layer activations are stacked by the layer scan: [L, B, T, ...].
  acts = sum(nbytes(x) for x in leaves if len(x.shape) >= 4 and x.shape[:2] == (cfg.num_layers, b))
  # Compute-dtype copies of the float32 layer weights: [L, in, out] in bf16.
  copies = sum(nbytes(x) for x in leaves if len(x.shape) == 3 and x.shape[0] == cfg.num_layers
               and x.dtype == jnp.bfloat16)
  expected = mem.saved_residual_bytes(cfg, b, t)
  assert acts + copies == pytest.approx(expected, rel=0.01)
  if cfg.dtype == "bfloat16" and not cfg.remat:
    assert copies == cfg.num_layers * mem.layer_weight_count(cfg) * 2


# -- compiled memory -------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,b,t", [
    (dict(num_heads=8), 2, 256),                                     # [T, S] scores dominate, no remat
    (dict(remat=True), 4, 128),                                      # remat, scores still large
    (dict(remat=True, intermediate_size=1024, vocab_size=4096), 4, 64),   # MLP width and vocabulary
])
def test_training_step_memory_matches_compiled(overrides, b, t):
  cfg = TINY.replace(**overrides)
  params = jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0)))
  tokens = jax.ShapeDtypeStruct((b, t), jnp.int32)
  stats = jax.jit(jax.grad(_loss(cfg))).lower(params, tokens).compile().memory_analysis()
  assert stats.argument_size_in_bytes == mem.param_bytes(cfg, mem.MeshShape()) + b * t * 4
  predicted = mem.train_activation_bytes(cfg, b, t) + mem.logits_bytes(cfg, b * t)
  ratio = stats.temp_size_in_bytes / predicted
  assert 1 / TEMP_FACTOR <= ratio <= TEMP_FACTOR, (stats.temp_size_in_bytes, predicted)


def _spec(path):
  """FSDP x tensor for every matrix, replicated vectors: the layout `memory.param_bytes` assumes."""
  name = path.split("/")[-1]
  if name == "embed":
    return P("tensor", "fsdp")
  if name == "lm_head":
    return P("fsdp", "tensor")
  if name in ("q", "k", "v", "gate", "up"):
    return P(None, "fsdp", "tensor")
  if name in ("o", "down"):
    return P(None, "tensor", "fsdp")
  return P()


def test_prefill_with_kv_cache_on_a_mesh_matches_compiled():
  cfg = TINY
  shape = mem.MeshShape(data=2, fsdp=2, tensor=2)
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  rows, prompt, slots = 8, 64, 256
  flat = M.flatten_params(jax.eval_shape(lambda: M.init_params(cfg, jax.random.key(0))))
  params = M.unflatten_params({p: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, _spec(p)))
                               for p, a in flat.items()})
  cache = jax.eval_shape(lambda: M.init_cache(cfg, rows, slots))
  # Rows over data x fsdp, kv heads over tensor, whichever axis order the cache uses.
  kv_axis = cache.k.shape.index(cfg.num_kv_heads)
  spec = [None] * cache.k.ndim
  spec[1], spec[kv_axis] = ("data", "fsdp"), "tensor"
  cache = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                      sharding=NamedSharding(mesh, P(*spec))), cache)
  tokens = jax.ShapeDtypeStruct((rows, prompt), jnp.int32,
                                sharding=NamedSharding(mesh, P(("data", "fsdp"), None)))
  prefill = jax.jit(lambda p, t, c: M.forward(p, t, cfg, cache=c))
  stats = prefill.lower(params, tokens, cache).compile().memory_analysis()

  local_rows = rows // shape.batch_shards
  cache_bytes = mem.kv_cache_bytes(cfg, local_rows, slots, tensor=shape.tensor)
  assert cache_bytes == sum(np.prod(a.shape) * a.dtype.itemsize for a in (cache.k, cache.v)) // 8
  assert stats.argument_size_in_bytes == mem.param_bytes(cfg, shape) + cache_bytes + local_rows * prompt * 4
  # forward() returns the logits of every prompt position: an output here, live at the end of a prefill.
  logits = local_rows * prompt * cfg.vocab_size // shape.tensor * 4
  predicted = mem.prefill_bytes(cfg, local_rows, prompt, slots, shape.tensor, all_logits=True)
  ratio = (stats.temp_size_in_bytes + logits) / predicted
  assert 1 / TEMP_FACTOR <= ratio <= TEMP_FACTOR, (stats.temp_size_in_bytes + logits, predicted)


# -- totals, fitting, the table ---------------------------------------------------------------------------
def test_estimate_adds_up_and_max_rollout_is_the_boundary():
  cfg = mem.qwen3_config("Qwen3-0.6B")
  mesh = mem.MeshShape(fsdp=8)
  work = mem.Workload(attention="flash", logits_chunk=1024)
  est = mem.estimate(cfg, mesh, work)
  assert est.optimizer == -(-mem.param_count(cfg) // 8) * 8          # two float32 moments
  assert est.grad_accum == est.gradients                              # float32 params: same bytes
  assert est.train_peak == (est.params + est.optimizer + est.gradients + est.grad_accum + est.fsdp_gather
                            + est.activations + est.logits)
  assert est.sample_peak == est.params + est.optimizer + est.sampler_params + est.kv_cache + est.prefill
  assert est.kv_cache == mem.kv_cache_bytes(cfg, 256 // 8, 2048 + 8192, "bfloat16")
  hbm = 32 * mem.GiB
  rows = mem.max_rollout_batch(cfg, mesh, work, hbm)
  assert rows > 0 and rows % 8 == 0
  fits = mem.estimate(cfg, mesh, dataclasses.replace(work, rollout_batch=rows)).sample_peak
  over = mem.estimate(cfg, mesh, dataclasses.replace(work, rollout_batch=rows + 8)).sample_peak
  assert fits <= hbm * mem.USABLE_FRACTION < over
  # Remat and flash attention only ever lower the training estimate.
  naive = mem.estimate(cfg, mesh, mem.Workload(remat=False))
  assert est.train_peak < mem.estimate(cfg, mesh, mem.Workload()).train_peak < naive.train_peak


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match="MeshShape.fsdp=0"):
    mem.MeshShape(fsdp=0)
  with pytest.raises(ValueError, match="Workload.attention='splash'"):
    mem.Workload(attention="splash")


def test_docs_table_is_the_generated_one(capsys):
  assert mem.main(["--table"]) == 0
  printed = capsys.readouterr().out.strip()
  assert len(printed.splitlines()) == 2 + len(mem.QWEN3) * len(mem.SLICES)
  doc = (REPO / "docs" / "scaling.md").read_text()
  assert printed in doc, "docs/scaling.md is stale: regenerate it with `python -m ropd_jax.memory --table`"
