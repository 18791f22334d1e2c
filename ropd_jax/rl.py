"""GRPO advantages, the PPO-clip loss, AdamW, and the jitted, sharded `train_step`.

One training step = `rl.num_minibatches` optimizer steps over contiguous mini-batches of the rollout batch
(whole groups when the mini-batch size is a multiple of the group size), each mini-batch accumulated over
micro-batches of `rl.microbatch_size` rows with `lax.scan`. Everything runs inside one jit with the state
donated.

Loss aggregation: `token_mean` divides the masked token sum by the number of valid tokens of the whole
mini-batch, counted before the micro-batch split, so accumulation gives exactly the full-batch gradient. The
official code's per-micro-batch token mean (`per_microbatch_token_mean`) is available only as a flag. Groups
whose judge failed are masked: their rows carry `sample_valid_b=False` (or a zero `loss_mask_bt`), so they
leave the numerator and the denominator, and a mini-batch with no valid token leaves params and optimizer
state untouched (the official code still stepped AdamW on zero gradients).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ropd_jax import model as model_lib
from ropd_jax import sharding as sharding_lib

LOSS_AGGS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean", "per_microbatch_token_mean")
KL_ESTIMATORS = ("k1", "k2", "k3")
# exp() of a larger log-ratio overflows float32 long before it means anything.
_LOG_RATIO_CLAMP = 20.0


# -- advantages ------------------------------------------------------------------------------------------
def group_advantages(rewards_b, group_size: int, valid_groups_g=None, normalize_std: bool = False,
                     eps: float = 1e-6):
  """GRPO advantages: reward minus its group's mean, optionally over the group's std (ddof=1, as verl).

  Rows i*n .. i*n+n-1 form group i. Groups with `valid_groups_g[i] == False` (judge failed) get 0.
  """
  if group_size < 2:
    raise ValueError(f"group_size={group_size}: GRPO needs at least 2 rollouts per prompt "
                     "(sampling.n >= 2); a single rollout has no group baseline.")
  rewards_b = jnp.asarray(rewards_b, jnp.float32)
  if rewards_b.shape[0] % group_size:
    raise ValueError(f"{rewards_b.shape[0]} rewards do not split into groups of {group_size}.")
  r_gn = rewards_b.reshape(-1, group_size)
  adv_gn = r_gn - r_gn.mean(axis=1, keepdims=True)
  if normalize_std:
    adv_gn = adv_gn / (jnp.std(r_gn, axis=1, ddof=1, keepdims=True) + eps)
  if valid_groups_g is not None:
    adv_gn = jnp.where(jnp.asarray(valid_groups_g, bool)[:, None], adv_gn, 0.0)
  return adv_gn.reshape(-1)


def group_row_mask(valid_groups_g, group_size: int):
  """Per-row validity [B] from per-group validity [G] (rows of a group are contiguous)."""
  return jnp.repeat(jnp.asarray(valid_groups_g, bool), group_size)


# -- loss ------------------------------------------------------------------------------------------------
def kl_penalty(logprobs_bt, ref_logprobs_bt, estimator: str = "k3"):
  """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1/k2/k3)."""
  log_ratio = logprobs_bt - ref_logprobs_bt  # log pi/ref
  if estimator == "k1":
    return log_ratio
  if estimator == "k2":
    return 0.5 * jnp.square(log_ratio)
  if estimator == "k3":
    neg = jnp.clip(-log_ratio, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return jnp.exp(neg) - neg - 1.0
  raise ValueError(f"rl.kl_estimator={estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}.")


def ppo_loss(logprobs_bt, old_logprobs_bt, advantages_b, loss_mask_bt, *, clip_low: float = 0.2,
             clip_high: float = 0.28, dual_clip: float | None = None, loss_agg: str = "token_mean",
             ref_logprobs_bt=None, kl_coef: float = 0.0, kl_estimator: str = "k3", entropy_bt=None,
             num_tokens=None, num_seqs=None, num_microbatches: int = 1):
  """Clipped PPO policy loss (+ optional KL to a reference) and its metrics.

  Per token: ratio r = exp(lp - old_lp); loss = max(-A r, -A clip(r, 1-clip_low, 1+clip_high)); with
  `dual_clip` = c > 1 and A < 0 the loss is capped at -A c (Ye et al. 2020).

  Aggregation over the valid tokens (loss_mask_bt):
    token_mean                 sum / num_tokens (valid tokens of the whole mini-batch; default: this batch)
    seq_mean_token_sum         sum / num_seqs (valid sequences of the mini-batch)
    seq_mean_token_mean        sum over sequences of (token mean of the sequence) / num_seqs (paper Eq. 8)
    per_microbatch_token_mean  (sum / this batch's tokens) / num_microbatches (the official code's quirk)
  Token metrics (kl_to_old, clip fractions, entropy, kl_to_ref) are sums / num_tokens, so summing them over
  the micro-batches of a mini-batch gives the mini-batch mean.
  """
  if loss_agg not in LOSS_AGGS:
    raise ValueError(f"rl.loss_agg={loss_agg!r}; choose one of {', '.join(LOSS_AGGS)}.")
  mask = loss_mask_bt.astype(jnp.float32)
  local_tokens = mask.sum()
  seq_valid_b = (mask.sum(axis=1) > 0).astype(jnp.float32)
  num_tokens = local_tokens if num_tokens is None else num_tokens
  num_seqs = seq_valid_b.sum() if num_seqs is None else num_seqs
  tok_den = jnp.maximum(jnp.asarray(num_tokens, jnp.float32), 1.0)
  seq_den = jnp.maximum(jnp.asarray(num_seqs, jnp.float32), 1.0)

  adv_bt = advantages_b.astype(jnp.float32)[:, None]
  log_ratio = jnp.clip(logprobs_bt - old_logprobs_bt, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
  ratio = jnp.exp(log_ratio)
  pg_unclipped = -adv_bt * ratio
  pg_clipped = -adv_bt * jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  pg = jnp.maximum(pg_unclipped, pg_clipped)
  clipped = pg_clipped > pg_unclipped
  dual_active = jnp.zeros_like(clipped)
  if dual_clip:
    if dual_clip <= 1.0:
      raise ValueError(f"rl.dual_clip={dual_clip} must be > 1 (e.g. 3.0), or 0 to turn it off.")
    cap = -adv_bt * dual_clip
    dual_active = (adv_bt < 0) & (pg > cap)
    pg = jnp.where(adv_bt < 0, jnp.minimum(pg, cap), pg)
  per_token = pg
  kl_ref = None
  if ref_logprobs_bt is not None:
    kl_ref = kl_penalty(logprobs_bt, ref_logprobs_bt, kl_estimator)
    if kl_coef:
      per_token = per_token + kl_coef * kl_ref

  masked = per_token * mask
  if loss_agg == "token_mean":
    loss = masked.sum() / tok_den
  elif loss_agg == "seq_mean_token_sum":
    loss = masked.sum() / seq_den
  elif loss_agg == "seq_mean_token_mean":
    seq_len_b = jnp.maximum(mask.sum(axis=1), 1.0)
    loss = (masked.sum(axis=1) / seq_len_b).sum() / seq_den
  else:
    loss = masked.sum() / jnp.maximum(local_tokens, 1.0) / num_microbatches

  def token_metric(x_bt):
    return jnp.sum(jax.lax.stop_gradient(x_bt) * mask) / tok_den

  # k3 estimate of KL(rollout || current) from tokens sampled by the rollout policy: >= 0, low variance.
  kl_old = jnp.exp(log_ratio) - log_ratio - 1.0
  metrics = {
      "kl_to_old": token_metric(kl_old),
      "clip_fraction": token_metric(clipped.astype(jnp.float32)),
      "dual_clip_fraction": token_metric(dual_active.astype(jnp.float32)),
      "entropy": token_metric(entropy_bt) if entropy_bt is not None else jnp.zeros(()),
      "kl_to_ref": token_metric(kl_ref) if kl_ref is not None else jnp.zeros(()),
  }
  return loss, metrics


# -- optimizer -------------------------------------------------------------------------------------------
def lr_schedule(rl_cfg: Mapping[str, Any], total_steps: int | None = None) -> Callable:
  """Learning rate as a function of the *training* step (warm-up, then constant or cosine to 0)."""
  lr = float(rl_cfg["lr"])
  warmup = int(rl_cfg.get("warmup_steps", 0))
  kind = rl_cfg.get("schedule", "constant")
  if kind == "constant":
    after = optax.constant_schedule(lr)
  elif kind == "cosine":
    if not total_steps or total_steps <= warmup:
      raise ValueError(f"rl.schedule='cosine' needs total_steps > rl.warmup_steps={warmup}; "
                       f"got total_steps={total_steps}.")
    after = optax.cosine_decay_schedule(lr, decay_steps=total_steps - warmup, alpha=0.0)
  else:
    raise ValueError(f"rl.schedule={kind!r}; choose 'constant' or 'cosine'.")
  if warmup <= 0:
    return after
  warm = optax.linear_schedule(0.0, lr, warmup)
  return optax.join_schedules([warm, after], [warmup])


def make_optimizer(rl_cfg: Mapping[str, Any], total_steps: int | None = None):
  """AdamW with global-norm clipping; the lr follows `lr_schedule` per training step.

  verl steps its lr scheduler once per training step, not per mini-batch, so `warmup_steps` and
  `total_steps` count training steps: optimizer update k uses the lr of step k // num_minibatches.
  """
  per_step = lr_schedule(rl_cfg, total_steps)
  num_mb = int(rl_cfg.get("num_minibatches", 1))
  schedule = lambda count: per_step(count // num_mb)  # noqa: E731

  def decay_mask(params):
    if rl_cfg.get("decay_norms_and_biases", True):
      return jax.tree.map(lambda _: True, params)
    flat = model_lib.flatten_params(params)
    return model_lib.unflatten_params(
        {k: not (k.endswith("norm") or k.endswith("bias")) for k in flat})

  adamw = optax.inject_hyperparams(optax.adamw)(
      learning_rate=schedule, b1=float(rl_cfg.get("b1", 0.9)), b2=float(rl_cfg.get("b2", 0.999)),
      eps=float(rl_cfg.get("eps", 1e-8)), weight_decay=float(rl_cfg.get("weight_decay", 0.0)),
      mask=decay_mask)
  clip = float(rl_cfg.get("grad_clip", 0.0))
  return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else optax.chain(adamw)


def current_lr(opt_state):
  """The learning rate of the last update, read from the injected AdamW hyperparameters."""
  is_inject = lambda x: hasattr(x, "hyperparams") and "learning_rate" in x.hyperparams  # noqa: E731
  found = [x.hyperparams["learning_rate"] for x in jax.tree.leaves(opt_state, is_leaf=is_inject)
           if is_inject(x)]
  if not found:
    raise ValueError("optimizer state has no injected learning rate; build it with rl.make_optimizer.")
  return jnp.asarray(found[0], jnp.float32)


# -- train state -----------------------------------------------------------------------------------------
@flax.struct.dataclass
class TrainState:
  params: Any
  opt_state: Any
  step: jax.Array  # training steps done (int32 scalar)


def init_train_state(params, optimizer, shardings: "TrainState | None" = None) -> TrainState:
  """TrainState for `params`; with `shardings` (from `train_state_shardings`) it is built on the mesh.

  The state holds fresh buffers (jit copies), so donating it to `train_step` leaves `params` alive.
  """
  def build(p):
    return TrainState(params=p, opt_state=optimizer.init(p), step=jnp.zeros((), jnp.int32))

  if shardings is None:
    return jax.jit(build)(params)
  return jax.jit(build, in_shardings=(shardings.params,), out_shardings=shardings)(params)


def train_state_shardings(params, optimizer, mesh: Mesh, param_shardings) -> TrainState:
  """NamedShardings for the whole TrainState: Adam moments follow their params, counters replicated."""
  abstract = jax.eval_shape(lambda p: optimizer.init(p), params)
  rep = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, abstract, param_shardings,
                                 transform_non_params=lambda _: rep)
  return TrainState(params=param_shardings, opt_state=opt_sh, step=rep)


# -- train step ------------------------------------------------------------------------------------------
BATCH_KEYS = ("tokens_bt", "valid_bt", "loss_mask_bt", "old_logprobs_bt", "advantages_b")
OPTIONAL_KEYS = ("ref_logprobs_bt", "sample_valid_b")


def _check_batch(batch: Mapping[str, Any], num_minibatches: int, microbatch_size: int, shards: int,
                 kl_coef: float):
  missing = [k for k in BATCH_KEYS if k not in batch]
  if kl_coef and "ref_logprobs_bt" not in batch:
    missing.append("ref_logprobs_bt (rl.kl_coef > 0)")
  unknown = [k for k in batch if k not in BATCH_KEYS + OPTIONAL_KEYS]
  if missing or unknown:
    raise ValueError(f"train_step batch: missing keys {missing}, unknown keys {unknown}; expected "
                     f"{BATCH_KEYS} plus optional {OPTIONAL_KEYS}.")
  b, t = batch["tokens_bt"].shape
  for k in ("loss_mask_bt", "old_logprobs_bt") + (("ref_logprobs_bt",) if "ref_logprobs_bt" in batch else ()):
    if batch[k].shape != (b, t - 1):
      raise ValueError(f"train_step batch[{k!r}] has shape {batch[k].shape}; expected {(b, t - 1)} "
                       "(aligned with tokens_bt[:, 1:]).")
  if b % num_minibatches:
    raise ValueError(f"batch of {b} rows does not split into rl.num_minibatches={num_minibatches}.")
  mb = b // num_minibatches
  micro = microbatch_size or mb
  if mb % micro:
    raise ValueError(f"mini-batch of {mb} rows does not split into rl.microbatch_size={micro} rows.")
  if micro % shards:
    raise ValueError(f"rl.microbatch_size={micro} is not divisible by the {shards} batch shards of the "
                     "mesh (data x fsdp); every device needs whole rows of each micro-batch.")
  return mb, micro


def make_train_step(model_cfg: model_lib.ModelConfig, rl_cfg: Mapping[str, Any], optimizer,
                    mesh: Mesh | None = None, param_shardings=None):
  """Returns jitted `train_step(state, batch) -> (state, metrics)`, donating `state`.

  batch: tokens_bt [B, T] (prompt + response, right-padded), valid_bt [B, T], loss_mask_bt [B, T-1] (True on
  trained response tokens, aligned with tokens_bt[:, 1:]), old_logprobs_bt [B, T-1], advantages_b [B],
  optional ref_logprobs_bt [B, T-1] and sample_valid_b [B] (False for rows of failed groups).
  With a mesh, params follow `param_shardings` and the batch is split over (data, fsdp).
  """
  num_mb = int(rl_cfg.get("num_minibatches", 1))
  micro_cfg = int(rl_cfg.get("microbatch_size", 0))
  loss_agg = rl_cfg.get("loss_agg", "token_mean")
  if loss_agg not in LOSS_AGGS:
    raise ValueError(f"rl.loss_agg={loss_agg!r}; choose one of {', '.join(LOSS_AGGS)}.")
  kl_coef = float(rl_cfg.get("kl_coef", 0.0))
  loss_kw = dict(clip_low=float(rl_cfg.get("clip_low", 0.2)), clip_high=float(rl_cfg.get("clip_high", 0.28)),
                 dual_clip=float(rl_cfg.get("dual_clip", 0.0)) or None, loss_agg=loss_agg,
                 kl_coef=kl_coef, kl_estimator=rl_cfg.get("kl_estimator", "k3"))
  temperature = float(rl_cfg.get("logprob_temperature", 1.0))
  # Response width: logits only for the `window` positions from each row's first trained token (0 = all).
  window = int(rl_cfg.get("logits_window", 0))
  shards = sharding_lib.batch_shards(mesh) if mesh is not None else 1

  def constrain(x, lead_dims: int):
    """Keep each (mini/micro) batch spread over all batch shards after reshaping."""
    if mesh is None:
      return x
    spec = P(*([None] * lead_dims), sharding_lib.BATCH_AXES, *([None] * (x.ndim - lead_dims - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

  def micro_loss(params, mb, counts, n_micro):
    # The loss only reads response positions: with a window, logits are computed there alone.
    start_b = jnp.argmax(mb["loss_mask_bt"], axis=1) if window else None
    logprobs_bt, entropy_bt = model_lib.token_logprobs(params, mb["tokens_bt"], model_cfg,
                                                       valid_bt=mb["valid_bt"], temperature=temperature,
                                                       window_start_b=start_b, window=window)
    return ppo_loss(logprobs_bt, mb["old_logprobs_bt"], mb["advantages_b"], mb["loss_mask_bt"],
                    ref_logprobs_bt=mb.get("ref_logprobs_bt"), entropy_bt=entropy_bt,
                    num_tokens=counts[0], num_seqs=counts[1], num_microbatches=n_micro, **loss_kw)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def minibatch_update(micro: int, state: TrainState, mini):
    n_micro = mini["tokens_bt"].shape[0] // micro
    mask = mini["loss_mask_bt"]
    counts = (mask.sum().astype(jnp.float32), (mask.sum(axis=1) > 0).sum().astype(jnp.float32))
    micros = jax.tree.map(lambda x: constrain(x.reshape(n_micro, micro, *x.shape[1:]), 1), mini)

    def accumulate(carry, mb):
      grads_acc, metrics_acc = carry
      (loss, metrics), grads = grad_fn(state.params, mb, counts, n_micro)
      metrics = dict(metrics, loss=loss)
      return (jax.tree.map(jnp.add, grads_acc, grads), jax.tree.map(jnp.add, metrics_acc, metrics)), None

    zeros_g = jax.tree.map(jnp.zeros_like, state.params)
    zeros_m = {k: jnp.zeros((), jnp.float32) for k in
               ("kl_to_old", "clip_fraction", "dual_clip_fraction", "entropy", "kl_to_ref", "loss")}
    (grads, metrics), _ = jax.lax.scan(accumulate, (zeros_g, zeros_m), micros)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # No valid token (every group of the mini-batch failed): no step at all, not an AdamW step on zeros.
    has_tokens = counts[0] > 0
    keep = lambda new, old: jnp.where(has_tokens, new, old)  # noqa: E731
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    metrics = dict(metrics, grad_norm=grad_norm, lr=current_lr(opt_state), num_tokens=counts[0],
                   skipped=(~has_tokens).astype(jnp.float32))
    return state.replace(params=params, opt_state=opt_state), metrics

  def train_step(state: TrainState, batch):
    batch = dict(batch)
    b = batch["tokens_bt"].shape[0]
    if "sample_valid_b" in batch:
      batch["loss_mask_bt"] = batch["loss_mask_bt"] & batch.pop("sample_valid_b")[:, None]
    batch["loss_mask_bt"] = batch["loss_mask_bt"].astype(bool)
    mb_rows = b // num_mb
    micro = micro_cfg or mb_rows  # static: shapes are known at trace time
    minis = jax.tree.map(lambda x: constrain(x.reshape(num_mb, mb_rows, *x.shape[1:]), 1), batch)
    state, metrics_m = jax.lax.scan(functools.partial(minibatch_update, micro), state, minis)
    ran = jnp.maximum(num_mb - metrics_m["skipped"].sum(), 1.0)
    metrics = {k: (v * (1.0 - metrics_m["skipped"])).sum() / ran for k, v in metrics_m.items()
               if k not in ("skipped", "num_tokens", "lr")}
    metrics["lr"] = metrics_m["lr"][-1]
    metrics["num_tokens"] = metrics_m["num_tokens"].sum()
    metrics["skipped_minibatches"] = metrics_m["skipped"].sum()
    return state.replace(step=state.step + 1), metrics

  if mesh is not None and param_shardings is None:
    raise ValueError("make_train_step: a mesh needs param_shardings (sharding.param_shardings(...)).")
  compiled: dict[tuple, Callable] = {}  # one jit per set of batch keys (ref_logprobs_bt is optional)

  def step(state: TrainState, batch: Mapping[str, Any]):
    _check_batch(batch, num_mb, micro_cfg, shards, kl_coef)
    keys = tuple(sorted(batch))
    if keys not in compiled:
      if mesh is None:
        compiled[keys] = jax.jit(train_step, donate_argnums=0)
      else:
        state_sh = train_state_shardings(state.params, optimizer, mesh, param_shardings)
        batch_sh = {k: sharding_lib.batch_sharding(mesh, batch[k].ndim) for k in keys}
        compiled[keys] = jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                                 out_shardings=(state_sh, sharding_lib.replicated(mesh)), donate_argnums=0)
    return compiled[keys](state, dict(batch))

  return step
