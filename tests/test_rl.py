"""RL math against hand computation; the optimizer schedule; gradient accumulation; sharded train_step.

Reference numbers are worked by hand from the PPO-clip definition (clip 0.2 / 0.28, dual clip 3):
  row 0, A=+1.0:  r=1.1 -> -1.1 | r=1.5 -> clipped to -1.28 | r=0.9 -> -0.9
  row 1, A=-0.5:  r=0.7 -> clipped to 0.4 | r=1.5 -> 0.75 | r=4.0 -> 2.0, dual-capped to 1.5
  row 2, A=+0.5:  r=1.2 -> -0.6 | two padding tokens
  row 3: a failed group, every token masked
  7 valid tokens, sum -1.23. d(loss)/d(logprob) of an unclipped token is -A*r, of a clipped one 0.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ropd_jax import model, rl, sharding

# ---------------------------------------------------------------------------------------- advantages


def test_group_advantages_mean_centred_std_normalised_and_failed_groups_zero():
  rewards = [0.2, 0.6, 1.0, 0.2, 0.5, 0.5, 0.5, 0.5, 1.0, 0.0, 0.0, 0.0]
  adv = np.asarray(rl.group_advantages(jnp.array(rewards), 4, valid_groups_g=[True, True, False]))
  np.testing.assert_allclose(adv, [-0.3, 0.1, 0.5, -0.3, 0, 0, 0, 0, 0, 0, 0, 0], atol=1e-6)
  # group 0: deviations -0.3, 0.1, 0.5, -0.3 -> sample variance 0.44 / 3
  std0 = math.sqrt(0.44 / 3)
  adv = np.asarray(rl.group_advantages(jnp.array(rewards), 4, normalize_std=True))
  np.testing.assert_allclose(adv[:4], np.array([-0.3, 0.1, 0.5, -0.3]) / (std0 + 1e-6), rtol=1e-5)
  np.testing.assert_allclose(adv[4:8], 0.0, atol=1e-6)  # identical rewards: nothing to learn, no blow-up
  # group 2: mean 0.25, deviations 0.75, -0.25 x3, sample std sqrt(0.75/3)=0.5
  np.testing.assert_allclose(adv[8:], np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-6), rtol=1e-5)
  np.testing.assert_array_equal(rl.group_row_mask([True, False], 2), [True, True, False, False])
  with pytest.raises(ValueError, match="at least 2 rollouts"):
    rl.group_advantages(jnp.ones(4), 1)


# ---------------------------------------------------------------------------------------------- loss
RATIOS = np.array([[1.1, 1.5, 0.9], [0.7, 1.5, 4.0], [1.2, 2.0, 1.0], [3.0, 3.0, 3.0]])
ADV = np.array([1.0, -0.5, 0.5, 0.0])
MASK = np.array([[1, 1, 1], [1, 1, 1], [1, 0, 0], [0, 0, 0]], bool)
OLD = np.array([[-1.0, -2.0, -0.5], [-3.0, -1.5, -4.0], [-0.7, -2.2, -1.1], [-1.0, -1.0, -1.0]])
NEW = OLD + np.log(RATIOS)
HAND_TOKEN_LOSS = np.array([[-1.1, -1.28, -0.9], [0.4, 0.75, 1.5], [-0.6, 0, 0], [0, 0, 0]])
HAND_TOKEN_GRAD = np.array([[-1.1, 0.0, -0.9], [0.0, 0.75, 0.0], [-0.6, 0, 0], [0, 0, 0]])
KW = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0)


def _loss(lp, agg="token_mean", **kw):
  return rl.ppo_loss(lp, jnp.asarray(OLD, jnp.float32), jnp.asarray(ADV, jnp.float32), jnp.asarray(MASK),
                     loss_agg=agg, **KW, **kw)


def test_ppo_loss_and_gradient_match_hand_computation():
  lp = jnp.asarray(NEW, jnp.float32)
  entropy = jnp.asarray(np.arange(12, dtype=np.float32).reshape(4, 3))
  loss, metrics = _loss(lp, entropy_bt=entropy)
  assert HAND_TOKEN_LOSS.sum() == pytest.approx(-1.23)
  np.testing.assert_allclose(loss, -1.23 / 7, rtol=1e-6)
  grad = jax.grad(lambda x: _loss(x)[0])(lp)
  np.testing.assert_allclose(grad, HAND_TOKEN_GRAD / 7, atol=1e-7)
  np.testing.assert_allclose(metrics["clip_fraction"], 2 / 7, rtol=1e-6)   # r=1.5 (A>0), r=0.7 (A<0)
  np.testing.assert_allclose(metrics["dual_clip_fraction"], 1 / 7, rtol=1e-6)
  np.testing.assert_allclose(metrics["entropy"], (0 + 1 + 2 + 3 + 4 + 5 + 6) / 7, rtol=1e-6)
  valid_r = RATIOS[MASK]
  np.testing.assert_allclose(metrics["kl_to_old"], np.mean(valid_r - 1 - np.log(valid_r)), rtol=1e-5)
  # The denominator is the whole mini-batch's token count when one is passed in (accumulation).
  np.testing.assert_allclose(_loss(lp, num_tokens=14.0)[0], -1.23 / 14, rtol=1e-6)


def test_without_dual_clip_the_big_ratio_is_unbounded():
  loss, metrics = rl.ppo_loss(jnp.asarray(NEW, jnp.float32), jnp.asarray(OLD, jnp.float32),
                              jnp.asarray(ADV, jnp.float32), jnp.asarray(MASK), clip_low=0.2, clip_high=0.28)
  np.testing.assert_allclose(loss, (-1.23 - 1.5 + 2.0) / 7, rtol=1e-6)
  assert float(metrics["dual_clip_fraction"]) == 0.0


def test_loss_aggregations():
  lp = jnp.asarray(NEW, jnp.float32)
  row_sums = np.array([-3.28, 2.65, -0.6])  # rows 0-2; row 3 has no valid token
  np.testing.assert_allclose(_loss(lp, "seq_mean_token_sum")[0], row_sums.sum() / 3, rtol=1e-6)
  np.testing.assert_allclose(_loss(lp, "seq_mean_token_mean")[0], (-3.28 / 3 + 2.65 / 3 - 0.6) / 3, rtol=1e-6)
  np.testing.assert_allclose(_loss(lp, "per_microbatch_token_mean", num_microbatches=2)[0], -1.23 / 7 / 2,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="rl.loss_agg='mean'"):
    _loss(lp, "mean")


def test_kl_to_reference_k3_term_and_gradient():
  lp = jnp.asarray(NEW, jnp.float32)
  ref = lp - math.log(2.0)   # ref/pi = 1/2 everywhere: k3 = 1/2 - log(1/2) - 1 = log 2 - 1/2
  loss, metrics = _loss(lp, ref_logprobs_bt=ref, kl_coef=0.1, kl_estimator="k3")
  k3 = math.log(2.0) - 0.5
  np.testing.assert_allclose(metrics["kl_to_ref"], k3, rtol=1e-5)
  np.testing.assert_allclose(loss, -1.23 / 7 + 0.1 * k3, rtol=1e-5)
  # d k3 / d lp = 1 - ref/pi = 1/2 on each valid token (ref held fixed)
  grad = jax.grad(lambda x: _loss(x, ref_logprobs_bt=ref, kl_coef=0.1)[0])(lp)
  np.testing.assert_allclose(grad, (HAND_TOKEN_GRAD + 0.1 * 0.5 * MASK) / 7, atol=1e-6)
  np.testing.assert_allclose(rl.kl_penalty(jnp.log(2.0), 0.0, "k1"), math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(rl.kl_penalty(jnp.log(2.0), 0.0, "k2"), 0.5 * math.log(2.0) ** 2, rtol=1e-6)


# ----------------------------------------------------------------------------------------- optimizer


def _rl_cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      lr=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
      grad_clip=1.0, clip_low=0.2, clip_high=0.28, dual_clip=3.0, loss_agg="token_mean",
      normalize_adv_std=False, kl_coef=0.0, kl_estimator="k3", num_minibatches=2, microbatch_size=0))
  c.update(kw)
  return c


def test_schedule_counts_training_steps_warmup_then_cosine():
  cfg = _rl_cfg(lr=1.0, schedule="cosine", warmup_steps=2, weight_decay=0.5, num_minibatches=2)
  tx = rl.make_optimizer(cfg, total_steps=6)
  params = {"w": jnp.ones(())}
  state = tx.init(params)
  lrs = []
  for _ in range(12):  # 6 training steps x 2 mini-batches; zero grads: the update is -lr * wd * w
    updates, state = tx.update({"w": jnp.zeros(())}, state, params)
    lrs.append(-float(updates["w"]) / 0.5)
    assert float(rl.current_lr(state)) == pytest.approx(lrs[-1], abs=1e-6)
  per_step = [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
  np.testing.assert_allclose(lrs, np.repeat(per_step, 2), atol=1e-6)
  with pytest.raises(ValueError, match="needs total_steps"):
    rl.make_optimizer(cfg)


# ------------------------------------------------------------------------------------ train step
# One layer: the layer scan is model.py's business and a second layer doubles the compile time here.
CFG = model.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                        num_kv_heads=2, head_dim=8)


def _batch(b, t=12, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32)
  lengths = rng.integers(t // 2, t + 1, b)                       # right padding of varied length
  valid = np.arange(t)[None, :] < lengths[:, None]
  loss_mask = valid[:, 1:] & (np.arange(1, t)[None, :] >= 4)      # response starts at token 4
  old = rng.normal(-4.2, 0.3, (b, t - 1)).astype(np.float32)
  rewards = rng.random(b).astype(np.float32)
  adv = np.asarray(rl.group_advantages(rewards, 4))
  return dict(tokens_bt=tokens, valid_bt=valid, loss_mask_bt=loss_mask, old_logprobs_bt=old, advantages_b=adv)


def _grads_via_sgd(params, batch, **kw):
  """The accumulated gradient, read back from one SGD(lr=1) step: new = params - grads."""
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
  step = rl.make_train_step(CFG, _rl_cfg(num_minibatches=1, **kw), tx)
  state, _ = step(rl.init_train_state(params, tx), batch)
  return jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), params, state.params)


def test_gradient_accumulation_equals_full_batch_gradient():
  params = model.init_params(CFG, jax.random.key(1))
  batch = _batch(8)
  batch["loss_mask_bt"][6:] = False   # a failed group: out of the loss and of the denominator

  def full_loss(p):
    lp, _ = model.token_logprobs(p, jnp.asarray(batch["tokens_bt"]), CFG, valid_bt=jnp.asarray(batch["valid_bt"]))
    return rl.ppo_loss(lp, jnp.asarray(batch["old_logprobs_bt"]), jnp.asarray(batch["advantages_b"]),
                       jnp.asarray(batch["loss_mask_bt"]), **KW)[0]

  direct = jax.jit(jax.grad(full_loss))(params)
  accumulated = _grads_via_sgd(params, batch, microbatch_size=2)   # 4 micro-batches of unequal lengths
  for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(direct)):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-4)
  assert max(float(np.max(np.abs(a))) for a in jax.tree.leaves(direct)) > 1e-3  # not trivially zero


@pytest.fixture(scope="module")
def single_device_step():
  params = model.init_params(CFG, jax.random.key(0))
  cfg = _rl_cfg(num_minibatches=2, microbatch_size=8)
  tx = rl.make_optimizer(cfg)
  step = rl.make_train_step(CFG, cfg, tx)
  batch = dict(_batch(32), sample_valid_b=np.ones(32, bool))
  state, metrics = step(rl.init_train_state(params, tx), batch)
  out = (jax.tree.map(np.asarray, state.params), {k: float(v) for k, v in metrics.items()})
  # A step whose groups all failed changes nothing (no AdamW step on zero gradients + weight decay).
  failed = dict(batch, sample_valid_b=np.zeros(32, bool))
  count_before = np.asarray(state.opt_state[1].count)
  state2, metrics2 = step(state, failed)   # same shapes and keys: no recompile
  for a, b in zip(jax.tree.leaves(state2.params), jax.tree.leaves(out[0])):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert int(state2.step) == 2 and np.asarray(state2.opt_state[1].count) == count_before
  assert float(metrics2["skipped_minibatches"]) == 2.0
  return params, cfg, batch, out


def test_train_step_metrics(single_device_step):
  _, _, batch, (_, metrics) = single_device_step
  assert set(metrics) >= {"loss", "kl_to_old", "clip_fraction", "entropy", "grad_norm", "lr", "kl_to_ref"}
  assert metrics["lr"] == pytest.approx(1e-3) and metrics["num_tokens"] == batch["loss_mask_bt"].sum()
  assert 0.0 < metrics["clip_fraction"] < 1.0 and metrics["grad_norm"] > 0 and metrics["kl_to_old"] > 0
  assert metrics["entropy"] == pytest.approx(math.log(CFG.vocab_size), rel=0.05)  # near-uniform random model


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_train_step_equals_single_device(single_device_step, shape):
  params, cfg, batch, (want_params, want_metrics) = single_device_step
  mesh = sharding.make_mesh({"data": shape[0], "fsdp": shape[1], "tensor": shape[2]})
  param_sh = sharding.param_shardings(params, mesh)
  tx = rl.make_optimizer(cfg)
  state = rl.init_train_state(params, tx, rl.train_state_shardings(params, tx, mesh, param_sh))
  state, metrics = rl.make_train_step(CFG, cfg, tx, mesh, param_sh)(state, batch)
  assert state.params["layers"]["q"].sharding.spec == param_sh["layers"]["q"].spec
  if shape[1] > 1:
    assert "fsdp" in state.params["layers"]["gate"].sharding.spec
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(np.asarray(a), b, atol=5e-6)
  for k, v in want_metrics.items():
    assert float(metrics[k]) == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_batch_errors_are_named():
  params = model.init_params(CFG, jax.random.key(0))
  tx = rl.make_optimizer(_rl_cfg())
  step = rl.make_train_step(CFG, _rl_cfg(num_minibatches=3), tx)
  with pytest.raises(ValueError, match="does not split into rl.num_minibatches=3"):
    step(rl.init_train_state(params, tx), _batch(8))
  bad = _batch(8)
  bad["old_logprobs_bt"] = bad["old_logprobs_bt"][:, :-1]
  with pytest.raises(ValueError, match=r"batch\['old_logprobs_bt'\] has shape \(8, 10\)"):
    rl.make_train_step(CFG, _rl_cfg(), tx)(rl.init_train_state(params, tx), bad)
  with pytest.raises(ValueError, match=r"missing keys \['ref_logprobs_bt \(rl.kl_coef > 0\)'\]"):
    rl.make_train_step(CFG, _rl_cfg(kl_coef=0.1), tx)(rl.init_train_state(params, tx), _batch(8))


# ------------------------------------------------------------------------------------------ sharding


def test_default_partition_specs_for_our_param_layout():
  cfg = CFG.replace(model_type="qwen3", qkv_bias=True, qk_norm=True)
  shapes = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  specs = model.flatten_params(sharding.partition_specs(shapes, {"data": 2, "fsdp": 2, "tensor": 2}))
  P = jax.sharding.PartitionSpec
  assert specs == {
      "embed": P("tensor", "fsdp"), "lm_head": P("fsdp", "tensor"), "final_norm": P("fsdp"),
      "layers/q": P(None, "fsdp", "tensor"), "layers/k": P(None, "fsdp", "tensor"),
      "layers/v": P(None, "fsdp", "tensor"), "layers/o": P(None, "tensor", "fsdp"),
      "layers/gate": P(None, "fsdp", "tensor"), "layers/up": P(None, "fsdp", "tensor"),
      "layers/down": P(None, "tensor", "fsdp"), "layers/q_bias": P(None, "tensor"),
      "layers/k_bias": P(None, "tensor"), "layers/v_bias": P(None, "tensor"),
      "layers/attn_norm": P(None, "fsdp"), "layers/mlp_norm": P(None, "fsdp"),
      # [L, E=8]: the stacked-layer axis is never FSDP-sharded, E=8 is
      "layers/q_norm": P(None, "fsdp"), "layers/k_norm": P(None, "fsdp")}
  # a user rule wins over the defaults
  user = model.flatten_params(sharding.partition_specs(shapes, {"data": 1, "fsdp": 4, "tensor": 1},
                                                       rules=[("^embed$", ("fsdp", None))]))
  assert user["embed"] == P("fsdp", None) and user["lm_head"] == P("fsdp", "tensor")


def test_partition_rule_errors_name_the_rule_or_parameter():
  shapes = jax.eval_shape(lambda: model.init_params(CFG, jax.random.key(0)))
  with pytest.raises(sharding.ShardingError, match="pattern 'layers/qq' matches no parameter"):
    sharding.partition_specs(shapes, {"fsdp": 2, "tensor": 1}, rules=[("layers/qq", (None, "tensor"))])
  # one kv head: K*E = 8 cannot be split over 16 tensor shards (vocab 64, q 32 and mlp 64 can)
  one_kv = jax.eval_shape(lambda: model.init_params(CFG.replace(num_kv_heads=1), jax.random.key(0)))
  with pytest.raises(sharding.ShardingError, match="parameter 'layers/k' dimension 2 has size 8"):
    sharding.partition_specs(one_kv, {"data": 1, "fsdp": 1, "tensor": 16})
  with pytest.raises(sharding.ShardingError, match="names mesh axis 'model'"):
    sharding.partition_specs(shapes, {"fsdp": 1, "tensor": 1}, rules=[("^embed$", ("model", None))])


def test_mesh_from_config():
  assert sharding.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  assert sharding.mesh_shape({"data": 1, "fsdp": -1, "tensor": 2}, 8) == (1, 4, 2)
  with pytest.raises(sharding.ShardingError, match="only one axis may be -1"):
    sharding.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(sharding.ShardingError, match="needs 4 devices but 8 are available"):
    sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 1}, 8)
  mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": -1, "tensor": 2}))
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
