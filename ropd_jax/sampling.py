"""Rollout sampling: one jitted prefill + `while_loop` decode over a static KV cache, with per-token logprobs.

    scfg = SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=512, n=8)
    ids_bt, lengths_b = pad_prompts(token_lists, scfg)
    ro = sample(params, ids_bt, lengths_b, jax.random.key(0), model_cfg, scfg, mesh=mesh)
    batch = train_batch(ro)            # prompt + response, response mask, old logprobs

Layout. Prompts are right-padded: token t of row b sits at position t and, in the cache, at slot t
(`model.KVCache`). Each prompt is prefilled once; its cache is repeated for its n rollouts, which are rows
i*n .. i*n+n-1. Decode writes the token of step t at slot `length_b + t`, so padding slots of a short prompt
are overwritten before any query can see them (a query at position p only sees slots 0..p).

Decode runs the layers unrolled, each over its own cache buffer carried by the `while_loop`, so every
step writes one slot in place; a stacked [L, ...] cache threaded through `lax.scan` is copied (sliced in,
stacked out) every step instead, which is where a naive JAX decoder spends most of its time. The layer
weights are sliced (and cast to the compute dtype) once per call for the same reason: while sampling
they exist twice.

Shapes are static: the prompt width is bucketed (`prompt_buckets`), the response buffer is
`max_new_tokens` wide, so a steady-state trainer never recompiles. The loop stops early once every row
has hit a stop token. The cache holds room for `cache_grow_from` new tokens at first and doubles (a
padded copy, then the loop goes on) only when a row is still running at its end: each step's attention
reads, and the cache's memory, follow the longest live rollout instead of `max_new_tokens`, which at the
paper's 8192-token cap is most of the cache most of the time. Each cache size is one more compile of the
loop, made once.

Randomness: rollout r at decode step t draws from `fold_in(fold_in(rng, r), t)`, so a row's tokens depend
only on (rng, r, its own logits): the same on one CPU or a sharded pod, and reproducible run to run.

Sampling draws one uniform number per row and inverts the CDF of the kept tokens (two-level, blocks of
`_BLOCK` tokens), instead of drawing a Gumbel per vocabulary entry; top-p finds its probability threshold
by bisection on the float bits instead of sorting the vocabulary. Both are exact (up to float rounding)
and cost a few passes over the logits, which matters at 150k vocab x 256 rows per step.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ropd_jax import hosts
from ropd_jax import model as model_lib
from ropd_jax import sharding
from ropd_jax.model import ModelConfig

_BLOCK = 256          # tokens per block of the two-level inverse-CDF draw
_BISECT_STEPS = 31    # bit patterns of probabilities in [0, 1] lie in [0, 2^30]: 31 halvings pin one exactly
TENSOR_AXIS = "tensor"          # mesh axis heads / hidden / vocab are split over


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How rollouts are drawn. Hashable: it is a static argument of the jitted sampler."""
  temperature: float = 1.0        # softmax temperature; 0 means greedy
  top_p: float = 1.0              # nucleus mass in (0, 1]; 1 keeps every token
  top_k: int = 0                  # keep the k most likely tokens; 0 keeps all
  greedy: bool = False            # argmax decoding (temperature, top_p, top_k ignored)
  max_new_tokens: int = 256       # response buffer width; rows that reach it are truncated
  n: int = 1                      # rollouts per prompt (a GRPO group), rows i*n .. i*n+n-1
  stop_token_ids: tuple[int, ...] | None = None   # end a row (token kept); None: the model's eos ids
  stop_strings: tuple[str, ...] = ()              # applied after decoding, see apply_stop_strings
  # Padded prompt widths: steps of 1.5x / 2x, so padding wastes at most a third and a trainer compiles
  # only a few shapes.
  prompt_buckets: tuple[int, ...] = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048,
                                     3072, 4096)
  # Prefill prompts sorted by length in this many equal groups, each padded to its own bucket: less work
  # on padding when lengths vary (the group count is lowered until it divides the batch; 1 on a mesh).
  prefill_groups: int = 4
  truncate_prompt: bool = False   # keep the last tokens of a too-long prompt instead of raising
  # New-token room of the first KV cache; it doubles (up to max_new_tokens) while rows still run, so
  # attention reads and cache memory follow the longest rollout. 0: room for max_new_tokens at once.
  cache_grow_from: int = 1024
  pad_id: int = 0                 # written after a row's end in tokens_bt

  def __post_init__(self):
    if not isinstance(self.n, int) or self.n < 1:
      raise ValueError(f"SamplingConfig.n={self.n!r}: rollouts per prompt must be an int >= 1.")
    if self.temperature < 0:
      raise ValueError(f"SamplingConfig.temperature={self.temperature}: must be >= 0 "
                       "(0 or greedy=True for argmax decoding).")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SamplingConfig.top_p={self.top_p}: must be in (0, 1]; use 1.0 to disable top-p.")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k={self.top_k!r}: must be an int >= 0; use 0 to disable top-k.")
    if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
      raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens!r}: must be an int >= 1.")
    if not isinstance(self.cache_grow_from, int) or self.cache_grow_from < 0:
      raise ValueError(f"SamplingConfig.cache_grow_from={self.cache_grow_from!r}: must be an int >= 0 "
                       "(0 allocates room for max_new_tokens at once).")
    if not isinstance(self.prefill_groups, int) or self.prefill_groups < 1:
      raise ValueError(f"SamplingConfig.prefill_groups={self.prefill_groups!r}: must be an int >= 1.")
    if not self.prompt_buckets or min(self.prompt_buckets) < 1:
      raise ValueError(f"SamplingConfig.prompt_buckets={self.prompt_buckets!r}: need positive widths.")
    if self.stop_token_ids is not None:
      object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in self.stop_token_ids))
    object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
    object.__setattr__(self, "prompt_buckets", tuple(sorted(int(b) for b in self.prompt_buckets)))

  @property
  def is_greedy(self) -> bool:
    return self.greedy or self.temperature == 0

  @property
  def cache_capacities(self) -> tuple[int, ...]:
    """New-token room of each KV cache size the decode may grow through; the last is max_new_tokens."""
    room, new = self.cache_grow_from, self.max_new_tokens
    caps = []
    while 0 < room < new:
      caps.append(room)
      room *= 2
    return (*caps, new)

  def replace(self, **kw) -> "SamplingConfig":
    return dataclasses.replace(self, **kw)


class Rollouts(NamedTuple):
  """n rollouts per prompt; row r = i*n + j is rollout j of prompt i. Device arrays."""
  prompt_ids: jax.Array          # [R, P] int32, right-padded prompt of each row
  prompt_lengths_b: jax.Array    # [R] int32
  tokens_bt: jax.Array           # [R, N] int32 generated tokens (stop token included), pad_id after
  lengths_b: jax.Array           # [R] int32 generated tokens per row
  finished_b: jax.Array          # [R] bool: ended by a stop token / string; False: cut at max_new_tokens
  logprobs_bt: jax.Array         # [R, N] f32 log-prob under the distribution sampled from (after
                                 #   temperature, top-k, top-p; 0 for greedy); 0 on padding
  policy_logprobs_bt: jax.Array  # [R, N] f32 log_softmax(logits / T) of the token over the full vocab
                                 #   (T = 1 for greedy): what a teacher-forced `token_logprobs` recomputes
  group_b: jax.Array             # [R] int32 prompt index of each row (r // n)


# ---------------------------------------------------------------------------------------------- host side


def pad_prompts(token_lists: Sequence[Sequence[int]], scfg: SamplingConfig) -> tuple[np.ndarray, np.ndarray]:
  """Right-pads token lists to the smallest prompt bucket: `(ids_bt int32, lengths_b int32)`."""
  lengths_b = np.array([len(t) for t in token_lists], np.int32)
  width = _bucket(int(lengths_b.max(initial=1)), scfg.prompt_buckets)
  ids_bt = np.full((len(token_lists), width), scfg.pad_id, np.int32)
  for i, toks in enumerate(token_lists):
    ids_bt[i, :len(toks)] = np.asarray(toks, np.int32)
  return ids_bt, lengths_b


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
  for b in buckets:
    if b >= n:
      return b
  return -(-n // buckets[-1]) * buckets[-1]   # past the largest: a multiple of it


def _check_prompts(ids_bt: np.ndarray, lengths_b: np.ndarray, mcfg: ModelConfig, scfg: SamplingConfig):
  """Validated, maybe left-truncated, bucket-width prompts."""
  if ids_bt.ndim != 2 or lengths_b.shape != (ids_bt.shape[0],):
    raise ValueError(f"prompt_ids_bt must be [B, T] and prompt_lengths_b [B]; got {ids_bt.shape} and "
                     f"{lengths_b.shape}.")
  if ids_bt.shape[0] == 0:
    raise ValueError("prompt_ids_bt has no rows: give at least one prompt.")
  empty = np.flatnonzero(lengths_b < 1)
  if empty.size:
    raise ValueError(f"prompt {int(empty[0])} is empty (prompt_lengths_b={int(lengths_b[empty[0]])}): every "
                     "prompt needs at least one token (e.g. BOS or the chat template's header).")
  over = np.flatnonzero(lengths_b > ids_bt.shape[1])
  if over.size:
    raise ValueError(f"prompt_lengths_b[{int(over[0])}]={int(lengths_b[over[0]])} exceeds the width of "
                     f"prompt_ids_bt ({ids_bt.shape[1]}).")
  limit = mcfg.max_position_embeddings - scfg.max_new_tokens
  if limit < 1:
    raise ValueError(f"SamplingConfig.max_new_tokens={scfg.max_new_tokens} leaves no room for a prompt in "
                     f"the model's max_position_embeddings={mcfg.max_position_embeddings}; lower it.")
  too_long = np.flatnonzero(lengths_b > limit)
  if too_long.size and not scfg.truncate_prompt:
    i = int(too_long[0])
    raise ValueError(f"prompt {i} has {int(lengths_b[i])} tokens; with max_new_tokens="
                     f"{scfg.max_new_tokens} it exceeds the model's max_position_embeddings="
                     f"{mcfg.max_position_embeddings} (at most {limit} prompt tokens). Shorten the prompt, "
                     "lower max_new_tokens, or set SamplingConfig.truncate_prompt=True to keep its last "
                     f"{limit} tokens.")
  if too_long.size:
    ids_bt = ids_bt.copy()
    for i in too_long:   # keep the end: a chat prompt's question and generation header are there
      ids_bt[i, :limit] = ids_bt[i, lengths_b[i] - limit:lengths_b[i]]
    lengths_b = np.minimum(lengths_b, limit)
  width = _bucket(int(lengths_b.max()), scfg.prompt_buckets)
  out = np.full((ids_bt.shape[0], width), scfg.pad_id, np.int32)
  keep = min(width, ids_bt.shape[1])
  out[:, :keep] = ids_bt[:, :keep]
  out[np.arange(width)[None, :] >= lengths_b[:, None]] = scfg.pad_id
  bad = (out < 0) | (out >= mcfg.vocab_size)
  if bad.any():
    i, t = map(int, np.argwhere(bad)[0])
    raise ValueError(f"prompt {i} token {t} has id {int(out[i, t])}, outside the model's vocab "
                     f"[0, {mcfg.vocab_size}).")
  return out, lengths_b.astype(np.int32)


def sample(params, prompt_ids_bt, prompt_lengths_b, rng: jax.Array, model_cfg: ModelConfig,
           sampling_cfg: SamplingConfig, mesh: jax.sharding.Mesh | None = None,
           replicate_weights: bool = True, cache_spec: tuple | None = None) -> Rollouts:
  """Draws `sampling_cfg.n` rollouts for each of the B right-padded prompts: a `Rollouts` of B*n rows.

  params are placed for sampling on `mesh` when one is given (batch over `data`/`fsdp`, heads / hidden /
  vocab over `tensor`); the prompt batch is padded to a multiple of the batch shards and the padding rows
  are dropped again. `replicate_weights=False` keeps params in the layout they come in (e.g. the training
  layout, split over `fsdp`): less memory, but each decode step all-gathers each layer's weights.
  `cache_spec`: PartitionSpec entries of each layer's [rows, kv_heads, slots, head_dim] cache on the mesh
  (`sharding.kv_cache_spec`, from the config's rules); None: rows over the batch axes, kv heads over
  `tensor` when it divides them.

  On several hosts (`jax.process_count() > 1`; a mesh is required) each host passes its own B prompts, the
  block of the global batch at its position along the batch axes (`hosts.batch_block`), and gets back its
  own B*n rollouts as host (numpy) arrays. Seeds follow the global row index, so every row's tokens are
  those of a one-host run over the whole batch.
  """
  scfg, mcfg, n = sampling_cfg, model_cfg, sampling_cfg.n
  ids_bt, lengths_b = _check_prompts(np.asarray(prompt_ids_bt), np.asarray(prompt_lengths_b), mcfg, scfg)
  b = ids_bt.shape[0]
  block, blocks = 0, 1
  if jax.process_count() > 1:
    if mesh is None:
      raise ValueError("sampling on several hosts needs the run's mesh (sample(..., mesh=mesh)).")
    block, blocks = hosts.batch_block(mesh)
    width = hosts.all_max(ids_bt.shape[1])   # one prompt width on every host
    ids_bt = np.pad(ids_bt, ((0, 0), (0, width - ids_bt.shape[1])), constant_values=scfg.pad_id)
  pad_rows = -b % (_batch_shards(mesh) // blocks)
  if pad_rows:  # dummy one-token prompts, marked done from the start
    ids_bt = np.concatenate([ids_bt, np.full((pad_rows, ids_bt.shape[1]), scfg.pad_id, np.int32)])
    lengths_b = np.concatenate([lengths_b, np.ones(pad_rows, np.int32)])
  live_b = np.arange(ids_bt.shape[0]) < b
  groups = _prefill_groups(lengths_b, scfg, mesh)
  order_b = np.concatenate([g for g, _ in groups])          # prompts in prefill order
  ids_bt, lengths_b, live_b = ids_bt[order_b], lengths_b[order_b], live_b[order_b]
  prompt_ids_b = block * b + order_b            # seeds: global prompt ids (padding rows are never live)
  row_ids_r = (prompt_ids_b[:, None] * n + np.arange(n)).reshape(-1).astype(np.int32)
  width, capacities = ids_bt.shape[1], scfg.cache_capacities
  if cache_spec is not None and mesh is not None and cache_spec[2] is not None:
    split = int(np.prod([mesh.shape[a] for a in np.atleast_1d(cache_spec[2])]))
    bad = [width + c for c in capacities if (width + c) % split]
    if bad:
      raise ValueError(f"a KV cache of {bad[0]} slots (prompt bucket {width} + new-token room "
                       f"{bad[0] - width}, from max_new_tokens={scfg.max_new_tokens} and cache_grow_from="
                       f"{scfg.cache_grow_from}) does not split over {cache_spec[2]} ({split}); make both "
                       "multiples of it (prompt buckets are multiples of 16).")
  if mesh is not None:
    params = sampler_params(params, mcfg, mesh) if replicate_weights else _cast_matrices(params, mcfg.dtype)
    rows = NamedSharding(mesh, P(batch_axes(mesh)))
    ids_bt = hosts.to_global(ids_bt, NamedSharding(mesh, P(batch_axes(mesh), None)))
    lengths_b, live_b, row_ids_r = (hosts.to_global(x, rows) for x in (lengths_b, live_b, row_ids_r))
  kv, logits, start = None, [], 0
  for group_b, group_width in groups:
    stop = start + len(group_b)
    whole = len(groups) == 1   # on a mesh: no slicing of sharded arrays
    lg, kv = _prefill_jit(params, ids_bt if whole else ids_bt[start:stop, :group_width],
                          lengths_b if whole else lengths_b[start:stop], kv, np.int32(start * n), mcfg, n,
                          len(order_b) * n * blocks, width + capacities[0], mesh, cache_spec)
    logits.append(lg)
    start = stop
  logits_bv = logits[0] if len(logits) == 1 else jnp.concatenate(logits)
  # Host-side fields do not reach the decode jits, so changing them does not recompile them.
  dcfg = scfg.replace(stop_strings=(), prompt_buckets=(1,), prefill_groups=1, truncate_prompt=False,
                      cache_grow_from=0)
  dec = _decode_params_jit(params, mcfg)
  state = _first_draw_jit(logits_bv, lengths_b, live_b, row_ids_r, rng, mcfg, dcfg, mesh)
  for i, room in enumerate(capacities):
    if i:
      kv = _grow_jit(kv, width + room, mcfg, mesh, cache_spec)
    state, kv, all_done = _decode_loop_jit(dec, kv, state, mcfg, dcfg, room)
    if room == capacities[-1] or bool(all_done):   # one host sync per cache size, none for one size
      break
  del kv
  out = _rollouts_jit(state, ids_bt, row_ids_r, n)
  if len(groups) > 1:   # back to the caller's order: row i*n + j is rollout j of prompt i
    src_r = np.argsort(row_ids_r)
    out = jax.tree.map(lambda x: x[src_r], out)
  if blocks > 1:   # this host's rows, padding dropped
    return jax.tree.map(lambda x: hosts.to_local(x)[:b * n], out)
  if pad_rows:
    out = jax.tree.map(lambda x: x[:b * n], out)
  return out


def _prefill_groups(lengths_b: np.ndarray, scfg: SamplingConfig, mesh) -> list[tuple[np.ndarray, int]]:
  """[(prompt indices, padded width)] of each prefill call: equal groups of length-sorted prompts."""
  b = len(lengths_b)
  whole = [(np.arange(b), _bucket(int(lengths_b.max()), scfg.prompt_buckets))]
  if mesh is not None:   # a group per call would split the sharded batch unevenly
    return whole
  count = max(d for d in range(1, min(scfg.prefill_groups, b) + 1) if b % d == 0)
  order = np.argsort(lengths_b, kind="stable")
  groups = [(g, _bucket(int(lengths_b[g].max()), scfg.prompt_buckets)) for g in np.split(order, count)]
  if all(width == whole[0][1] for _, width in groups):
    return whole
  return groups


# ---------------------------------------------------------------------------------------------- sharding


batch_axes = sharding.batch_axes   # the rollout batch is split over those of (data, fsdp) the mesh has


def _batch_shards(mesh) -> int:
  if mesh is None:
    return 1
  return int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))


def _tensor_size(mesh) -> int:
  return mesh.shape[TENSOR_AXIS] if TENSOR_AXIS in mesh.axis_names else 1


# Which dim of each param is split over `tensor` for sampling (None: replicated). Weights are replicated
# over the batch axes, so decode needs no weight all-gathers.
_TENSOR_DIM = {"embed": 1, "lm_head": 1, "q": 2, "k": 2, "v": 2, "o": 1, "gate": 2, "up": 2, "down": 1,
               "q_bias": 1, "k_bias": 1, "v_bias": 1}


def param_shardings(params, mesh):
  """NamedSharding of each param for sampling; a dim that `tensor` does not divide stays replicated."""
  t = _tensor_size(mesh)

  def spec(path, x):
    name = path[-1].key
    spec = [None] * x.ndim
    dim = _TENSOR_DIM.get(name)
    if dim is not None and t > 1 and x.shape[dim] % t == 0:
      spec[dim] = TENSOR_AXIS
    return NamedSharding(mesh, P(*spec))

  return jax.tree_util.tree_map_with_path(spec, params)


# Weight matrices: cast to the compute dtype before the sampler's all-gather (norms and biases stay as stored).
_MATRICES = frozenset(("embed", "lm_head", "q", "k", "v", "o", "gate", "up", "down"))


def sampler_params(params, mcfg: ModelConfig, mesh):
  """`params` in the sampler's layout (`param_shardings`: replicated over the batch axes, split over
  `tensor`), weight matrices in the compute dtype. Each device casts its own training shard before the
  reshard, so the once-per-step all-gather moves compute-dtype bytes (half of float32 master weights);
  the sampler would cast them anyway, so the rollouts are unchanged (bench/reshard.py)."""
  return jax.device_put(_cast_matrices(params, mcfg.dtype), param_shardings(params, mesh))


@functools.partial(jax.jit, static_argnums=(1,))
def _cast_matrices(params, dtype: str):
  """Elementwise, so every shard stays where it is."""
  dt = jnp.dtype(dtype)
  return jax.tree_util.tree_map_with_path(lambda path, x: x.astype(dt) if path[-1].key in _MATRICES else x,
                                          params)


def _layer_cache_sharding(mcfg: ModelConfig, mesh, cache_spec: tuple | None = None):
  """One layer's [R, K, S, E] cache: `cache_spec`, or the rules' default (rows over the batch axes, kv
  heads over `tensor` when it divides them)."""
  return NamedSharding(mesh, P(*(cache_spec or sharding.kv_cache_spec(mesh, mcfg.num_kv_heads))))


def _constrain(x, mesh, spec_fn):
  return x if mesh is None else jax.lax.with_sharding_constraint(x, spec_fn(mesh))


def _rows_spec(ndim):
  return lambda mesh: NamedSharding(mesh, P(batch_axes(mesh), *([None] * (ndim - 1))))


# ---------------------------------------------------------------------------------------------- the draw


def _threshold(probs_bv, enough: Callable[[jax.Array], jax.Array]):
  """Largest probability tau per row with `enough(probs >= tau)`, for a condition that holds at tau = 0
  and only weakens as tau grows. Exact: bisection over the int32 bit patterns of the (non-negative)
  float32 probabilities, which order like the values. Returns tau's bit pattern [B].

  31 masked reductions over the vocabulary instead of a sort: at 16 x 49k on one CPU core, top-p costs
  ~6 ms this way against ~140 ms for `jnp.sort`; `lax.top_k` inside this function fell back to a sort
  (~130 ms) too, so top-k uses the same bisection (~7 ms)."""
  bits_bv = jax.lax.bitcast_convert_type(probs_bv, jnp.int32)
  lo = jnp.zeros(probs_bv.shape[:1], jnp.int32)               # enough(all tokens) holds
  hi = jnp.max(bits_bv, axis=-1) + 1                           # nothing is >= hi: enough fails

  def halve(_, lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2
    ok = enough(bits_bv >= mid[:, None])
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, _BISECT_STEPS, halve, (lo, hi))
  return lo


def _keep_top_p(probs_bv, top_p: float):
  """The nucleus: tokens at least as likely as the least likely one that the top-p mass needs (ties at
  the edge all kept)."""
  tau_b = _threshold(probs_bv, lambda kept: jnp.sum(jnp.where(kept, probs_bv, 0.0), axis=-1) >= top_p)
  return jax.lax.bitcast_convert_type(probs_bv, jnp.int32) >= tau_b[:, None]


def _keep_top_k(probs_bv, k: int):
  """Tokens at least as likely as the k-th most likely (ties kept, as transformers' top-k does)."""
  tau_b = _threshold(probs_bv, lambda kept: jnp.sum(kept, axis=-1) >= k)
  return jax.lax.bitcast_convert_type(probs_bv, jnp.int32) >= tau_b[:, None]


def _inverse_cdf(probs_bv, u_b):
  """Index of the token whose CDF interval holds u * total, per row, via block sums then one block."""
  b, v = probs_bv.shape
  nb = -(-v // _BLOCK)
  padded = jnp.pad(probs_bv, ((0, 0), (0, nb * _BLOCK - v))).reshape(b, nb, _BLOCK)
  cum_bn = jnp.cumsum(jnp.sum(padded, axis=-1), axis=-1)
  target_b = u_b * cum_bn[:, -1]
  block_b = jnp.minimum(jnp.sum(cum_bn <= target_b[:, None], axis=-1), nb - 1)
  before_b = jnp.where(block_b > 0, jnp.take_along_axis(cum_bn, jnp.maximum(block_b - 1, 0)[:, None],
                                                        axis=-1)[:, 0], 0.0)
  inner_bc = jnp.take_along_axis(padded, block_b[:, None, None], axis=1)[:, 0]
  cum_bc = jnp.cumsum(inner_bc, axis=-1)
  offset_b = jnp.minimum(jnp.sum(cum_bc <= (target_b - before_b)[:, None], axis=-1), _BLOCK - 1)
  return block_b * _BLOCK + offset_b


def draw(logits_bv, keys_b, scfg: SamplingConfig):
  """One token per row from `logits_bv`: `(token_b, logprob_b, policy_logprob_b)`.

  Temperature, then top-k, then top-p on the renormalised top-k distribution (transformers' order).
  logprob: under the distribution sampled from (0 for greedy); policy_logprob: log_softmax(logits / T).
  """
  logits_bv = logits_bv.astype(jnp.float32)
  if scfg.is_greedy:
    token_b = _argmax(logits_bv)
    logp_b = _pick(jax.nn.log_softmax(logits_bv, axis=-1), token_b)
    return token_b, jnp.zeros_like(logp_b), logp_b
  z_bv = logits_bv / scfg.temperature
  lse_b = jax.nn.logsumexp(z_bv, axis=-1)
  probs_bv = jnp.exp(z_bv - lse_b[:, None])
  keep_bv = None
  if 0 < scfg.top_k < z_bv.shape[-1]:
    keep_bv = _keep_top_k(probs_bv, scfg.top_k)
  if scfg.top_p < 1.0:
    renorm_bv = probs_bv if keep_bv is None else _renormalise(jnp.where(keep_bv, probs_bv, 0.0))
    nucleus_bv = _keep_top_p(renorm_bv, scfg.top_p)
    keep_bv = nucleus_bv if keep_bv is None else keep_bv & nucleus_bv
  lse_kept_b = lse_b
  if keep_bv is not None:
    probs_bv = jnp.where(keep_bv, probs_bv, 0.0)
    lse_kept_b = jax.nn.logsumexp(jnp.where(keep_bv, z_bv, -jnp.inf), axis=-1)
  u_b = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys_b)
  token_b = _inverse_cdf(probs_bv, u_b).astype(jnp.int32)
  # Float rounding at a CDF edge could land on a token of probability 0 (odds ~1e-7): take the mode.
  token_b = jnp.where(_pick(probs_bv, token_b) > 0, token_b, _argmax(z_bv))
  z_tok_b = _pick(z_bv, token_b)
  return token_b, z_tok_b - lse_kept_b, z_tok_b - lse_b


def _argmax(x_bv):
  """`jnp.argmax` over the last axis (the first maximum), int32. On the CPU as a max then a min over
  the indices holding it: XLA:CPU runs argmax's (value, index) reduction ~8x slower (3.5 ms against
  0.4 ms at 16 x 49k, one core), and the draw needs one every step."""
  if jax.default_backend() != "cpu":
    return jnp.argmax(x_bv, axis=-1).astype(jnp.int32)
  v = x_bv.shape[-1]
  at_max = x_bv == jnp.max(x_bv, axis=-1, keepdims=True)
  index = jax.lax.broadcasted_iota(jnp.int32, x_bv.shape, x_bv.ndim - 1)
  first = jnp.min(jnp.where(at_max, index, v), axis=-1)
  return jnp.minimum(first, v - 1)   # all-NaN row: no index equals the max


def _renormalise(p_bv):
  return p_bv / jnp.sum(p_bv, axis=-1, keepdims=True)


def _pick(x_bv, idx_b):
  return jnp.take_along_axis(x_bv, idx_b[:, None], axis=-1)[:, 0]


# ---------------------------------------------------------------------------------------------- the loop


@functools.partial(jax.jit, static_argnums=(5, 6, 7, 8, 9, 10), donate_argnums=(3,))
def _prefill_jit(params, ids_bt, lengths_b, kv, row_start, mcfg: ModelConfig, n: int, rows: int, slots: int,
                 mesh, cache_spec=None):
  """Prefills B prompts once, into a cache exactly as wide as their bucket; returns the logits of each
  prompt's last token [B, V] and the decode cache with their n rollouts' rows from `row_start` filled in.

  The decode cache is one [rows, K, slots, E] buffer per layer (so the decode loop can update each in
  place); `kv` holds them from the previous group, or is None for the first.
  """
  b, width = ids_bt.shape
  positions_bt = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (b, width))
  cache = model_lib.init_cache(mcfg, b, width)
  hidden_btd, cache = model_lib.forward(params, ids_bt, mcfg, positions_bt=positions_bt, cache=cache,
                                        return_hidden=True)
  last_b1d = jnp.take_along_axis(hidden_btd, (lengths_b - 1)[:, None, None], axis=1)
  logits_bv = model_lib.lm_logits(params, last_b1d, mcfg)[:, 0]
  whole = b * n == rows

  def place(buf, c_bkse):
    c_rkse = jnp.repeat(c_bkse, n, axis=0)
    if whole:
      c_rkse = jnp.pad(c_rkse, ((0, 0), (0, 0), (0, slots - width), (0, 0)))
      return _constrain(c_rkse, mesh, lambda m: _layer_cache_sharding(mcfg, m, cache_spec))
    if buf is None:
      buf = jnp.zeros((rows, mcfg.num_kv_heads, slots, mcfg.head_dim), c_bkse.dtype)
    return jax.lax.dynamic_update_slice(buf, c_rkse, (row_start, 0, 0, 0))

  kv = kv or ((None, None),) * mcfg.num_layers
  kv = tuple((place(k, cache.k[i]), place(v, cache.v[i])) for i, (k, v) in enumerate(kv))
  return logits_bv, kv


class _Decoding(NamedTuple):
  """The decode loop's state, carried from one cache size to the next. Row arrays are [R] / [R, N]."""
  t: jax.Array            # [] int32: the response index the next draw fills
  tok_r: jax.Array        # the last drawn token (the next one fed)
  tokens_rn: jax.Array
  logp_rn: jax.Array
  pol_rn: jax.Array
  done_r: jax.Array       # stopped, truncated or a padding row
  len_r: jax.Array
  stopped_r: jax.Array    # ended by a stop token
  plen_r: jax.Array       # prompt length: the fed token's position is plen_r + t - 1
  row_keys_r: jax.Array   # per-row keys; step t draws with fold_in(key, t)


def _stop_ids(mcfg: ModelConfig, scfg: SamplingConfig):
  return jnp.asarray(scfg.stop_token_ids if scfg.stop_token_ids is not None else mcfg.eos_token_ids,
                     jnp.int32).reshape(-1)


def _is_stop(tok_r, stop_ids):
  return jnp.any(tok_r[:, None] == stop_ids[None, :], axis=-1)


def _step_keys(row_keys_r, t):
  return jax.vmap(lambda k: jax.random.fold_in(k, t))(row_keys_r)


@functools.partial(jax.jit, static_argnums=(5, 6, 7))
def _first_draw_jit(logits_bv, lengths_b, live_b, row_ids_r, rng, mcfg: ModelConfig, scfg: SamplingConfig,
                    mesh) -> _Decoding:
  """The draw from each prompt's prefill logits (repeated for its n rollouts): the loop's first state."""
  n, new = scfg.n, scfg.max_new_tokens
  rep = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731
  rows = lambda x: _constrain(x, mesh, _rows_spec(x.ndim))  # noqa: E731
  logits_rv, plen_r, live_r = rep(logits_bv), rep(lengths_b), rep(live_b)
  r = logits_rv.shape[0]
  row_keys_r = jax.vmap(lambda i: jax.random.fold_in(rng, i))(row_ids_r.astype(jnp.uint32))
  tok_r, logp_r, pol_r = draw(logits_rv, _step_keys(row_keys_r, 0), scfg)
  stopped_r = _is_stop(tok_r, _stop_ids(mcfg, scfg))
  first = lambda x, dtype, fill: rows(jnp.full((r, new), fill, dtype).at[:, 0].set(x))  # noqa: E731
  return _Decoding(t=jnp.int32(1), tok_r=rows(tok_r), tokens_rn=first(tok_r, jnp.int32, scfg.pad_id),
                   logp_rn=first(logp_r, jnp.float32, 0.0), pol_rn=first(pol_r, jnp.float32, 0.0),
                   done_r=rows(~live_r | stopped_r), len_r=rows(jnp.ones((r,), jnp.int32)),
                   stopped_r=rows(stopped_r), plen_r=rows(plen_r), row_keys_r=rows(row_keys_r))


@functools.partial(jax.jit, static_argnums=(3, 4, 5), donate_argnums=(1, 2))
def _decode_loop_jit(dec, kv, state: _Decoding, mcfg: ModelConfig, scfg: SamplingConfig,
                     room: int) -> tuple[_Decoding, tuple, jax.Array]:
  """Decode steps until every row stopped, max_new_tokens, or the cache's `room` new tokens are used
  (the caller then grows the cache and calls again). Returns the state, the cache (so that the donated
  `kv` buffers can be the loop's own, updated in place) and whether every row is done."""
  stop_ids = _stop_ids(mcfg, scfg)
  end = min(room, scfg.max_new_tokens)

  def cond(carry):
    s, _ = carry
    return (s.t < end) & ~jnp.all(s.done_r)

  def body(carry):
    s, kv = carry
    logits_rv, kv = _decode_step(dec, s.tok_r, s.plen_r + s.t - 1, kv, mcfg)
    tok_r, logp_r, pol_r = draw(logits_rv, _step_keys(s.row_keys_r, s.t), scfg)
    tok_r = jnp.where(s.done_r, scfg.pad_id, tok_r)
    hit_r = ~s.done_r & _is_stop(tok_r, stop_ids)
    s = s._replace(t=s.t + 1, tok_r=tok_r, tokens_rn=s.tokens_rn.at[:, s.t].set(tok_r),
                   logp_rn=s.logp_rn.at[:, s.t].set(jnp.where(s.done_r, 0.0, logp_r)),
                   pol_rn=s.pol_rn.at[:, s.t].set(jnp.where(s.done_r, 0.0, pol_r)),
                   len_r=s.len_r + (~s.done_r).astype(jnp.int32), done_r=s.done_r | hit_r,
                   stopped_r=s.stopped_r | hit_r)
    return s, kv

  state, kv = jax.lax.while_loop(cond, body, (state, kv))
  return state, kv, jnp.all(state.done_r) | (state.t >= scfg.max_new_tokens)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))   # a bigger output: donation cannot help
def _grow_jit(kv, slots: int, mcfg: ModelConfig, mesh, cache_spec=None):
  """Each layer's cache padded with empty slots to `slots` (the rows' slots keep their positions)."""
  def grow(c_rkse):
    c_rkse = jnp.pad(c_rkse, ((0, 0), (0, 0), (0, slots - c_rkse.shape[2]), (0, 0)))
    return _constrain(c_rkse, mesh, lambda m: _layer_cache_sharding(mcfg, m, cache_spec))
  return jax.tree.map(grow, kv)


@functools.partial(jax.jit, static_argnums=(3,))
def _rollouts_jit(state: _Decoding, ids_bt, row_ids_r, n: int) -> Rollouts:
  return Rollouts(prompt_ids=jnp.repeat(ids_bt, n, axis=0), prompt_lengths_b=state.plen_r,
                  tokens_bt=state.tokens_rn, lengths_b=state.len_r, finished_b=state.stopped_r,
                  logprobs_bt=state.logp_rn, policy_logprobs_bt=state.pol_rn, group_b=row_ids_r // n)


@functools.partial(jax.jit, static_argnums=(1,))
def _decode_params_jit(params, mcfg: ModelConfig):
  return _decode_params(params, mcfg)


def _decode_params(params, mcfg: ModelConfig):
  """Per-layer weights in the compute dtype, sliced and cast once per call instead of once per step.

  On the CPU they are also laid out for `model.decoder_layer_feature_major` (fused, [out, in]), with the
  vocab projection as `head_vd` [V, D]. CPU-only: it is about which operand XLA:CPU's GEMM streams
  fastest; an accelerator's decode is bandwidth-bound and keeps the training layout."""
  dt = mcfg.compute_dtype
  layers = tuple(jax.tree.map(lambda a: a[i].astype(dt), params["layers"]) for i in range(mcfg.num_layers))
  top = {k: v for k, v in params.items() if k != "layers"}
  top["embed"] = top["embed"].astype(dt)
  if "lm_head" in top:
    top["lm_head"] = top["lm_head"].astype(dt)
  if _feature_major_decode():
    layers = tuple(model_lib.feature_major_weights(p, mcfg) for p in layers)
    top["head_vd"] = top.pop("lm_head").T if "lm_head" in top else top["embed"]
  return top, layers


def _feature_major_decode() -> bool:
  """Whether decode uses the CPU layout (read at trace time; a function so tests can try both)."""
  return jax.default_backend() == "cpu"


def _decode_step(dec, tok_r, pos_r, kv, mcfg: ModelConfig):
  """`model.forward` for one token per row, with the layers unrolled over per-layer cache buffers."""
  top, layers = dec
  pos_r1 = pos_r[:, None]
  mask = model_lib.attention_mask(pos_r1, cache_len=kv[0][0].shape[2])
  inv_freq = model_lib.rope_inv_freq(mcfg)
  if "head_vd" in top:
    return _decode_step_feature_major(top, layers, tok_r, pos_r1, mask, inv_freq, kv, mcfg)
  x = top["embed"][tok_r[:, None]]
  new_kv = []
  for p, layer_kv in zip(layers, kv):
    x, layer_kv = model_lib.decoder_layer(mcfg, inv_freq, x, p, pos_r1, mask, layer_kv)
    new_kv.append(layer_kv)
  x = model_lib.rms_norm(x, top["final_norm"], mcfg.rms_norm_eps)
  return model_lib.lm_logits(top, x, mcfg)[:, 0], tuple(new_kv)


def _decode_step_feature_major(top, layers, tok_r, pos_r1, mask, inv_freq, kv, mcfg: ModelConfig):
  """`_decode_step` on `_decode_params`' CPU layout: activations [D, R] through the layers."""
  x_dr = top["embed"][tok_r].T
  new_kv = []
  for w, layer_kv in zip(layers, kv):
    x_dr, layer_kv = model_lib.decoder_layer_feature_major(mcfg, inv_freq, x_dr, w, pos_r1, mask, layer_kv)
    new_kv.append(layer_kv)
  x_dr = model_lib.rms_norm_feature_major(x_dr, top["final_norm"], mcfg.rms_norm_eps)
  return head_feature_major(top, x_dr), tuple(new_kv)


def head_feature_major(top, x_dr):
  """Logits [R, V] (float32) of final hidden states [D, R], from `_decode_params`' CPU layout."""
  # The barrier keeps XLA from folding the transpose into the dot (see model.feature_major_weights).
  logits_vr = jax.lax.optimization_barrier(jnp.dot(top["head_vd"], x_dr, preferred_element_type=jnp.float32))
  return logits_vr.T


# ---------------------------------------------------------------------------------------------- after


def response_mask(ro: Rollouts) -> jax.Array:
  """[R, N] bool: True on generated tokens (the stop token included)."""
  return jnp.arange(ro.tokens_bt.shape[1])[None, :] < ro.lengths_b[:, None]


def train_batch(ro: Rollouts, seq_len: int | None = None) -> dict[str, jax.Array]:
  """Prompt + response of each row as one right-padded sequence, for the policy-gradient step.

  Returns `tokens_bt` [R, T] int32, `valid_bt` (not padding), `response_mask_bt` (response tokens) and
  `old_logprobs_bt` (sampling log-prob at response tokens, 0 elsewhere), all [R, T]; T = prompt width +
  max_new_tokens unless `seq_len` is given. `model.token_logprobs` predicts tokens[:, 1:], so pair its
  output with `response_mask_bt[:, 1:]` and `old_logprobs_bt[:, 1:]`.
  """
  r, width = ro.prompt_ids.shape
  new = ro.tokens_bt.shape[1]
  t_len = seq_len or width + new
  t_bt = jnp.arange(t_len, dtype=jnp.int32)[None, :]
  plen_b1, rlen_b1 = ro.prompt_lengths_b[:, None], ro.lengths_b[:, None]
  in_prompt = t_bt < plen_b1
  resp_idx = jnp.clip(t_bt - plen_b1, 0, new - 1)
  in_resp = (t_bt >= plen_b1) & (t_bt - plen_b1 < rlen_b1)
  prompt_tok = jnp.take_along_axis(ro.prompt_ids, jnp.clip(t_bt, 0, width - 1).repeat(r, 0), axis=1)
  resp_tok = jnp.take_along_axis(ro.tokens_bt, resp_idx, axis=1)  # resp_idx is already [R, T]
  tokens = jnp.where(in_prompt, prompt_tok, jnp.where(in_resp, resp_tok, 0))
  old = jnp.where(in_resp, jnp.take_along_axis(ro.logprobs_bt, resp_idx, axis=1), 0.0)
  return {"tokens_bt": tokens.astype(jnp.int32), "valid_bt": in_prompt | in_resp,
          "response_mask_bt": in_resp, "old_logprobs_bt": old}


def apply_stop_strings(ro: Rollouts, decode: Callable[[list[int]], str],
                       stop_strings: Sequence[str]) -> Rollouts:
  """Ends each row at the first token whose prefix text contains a stop string (that token kept).

  Host side: `decode(token_ids) -> str`. A row's text only grows with its tokens, so the shortest prefix
  holding a stop string is found by bisection (log N decodes per row that has one).
  """
  if not stop_strings:
    return ro
  tokens = np.asarray(ro.tokens_bt)
  lengths = np.asarray(ro.lengths_b).copy()
  finished = np.asarray(ro.finished_b).copy()
  hit = lambda row, k: any(s in decode(tokens[row, :k].tolist()) for s in stop_strings)  # noqa: E731
  for row in range(tokens.shape[0]):
    n = int(lengths[row])
    if n == 0 or not hit(row, n):
      continue
    lo, hi = 0, n   # hit(lo) false, hit(hi) true
    while hi - lo > 1:
      mid = (lo + hi) // 2
      lo, hi = (lo, mid) if hit(row, mid) else (mid, hi)
    lengths[row], finished[row] = hi, True
  keep = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
  return ro._replace(tokens_bt=jnp.asarray(np.where(keep, tokens, 0).astype(np.int32)),
                     lengths_b=jnp.asarray(lengths), finished_b=jnp.asarray(finished),
                     logprobs_bt=jnp.asarray(np.where(keep, np.asarray(ro.logprobs_bt), 0.0)),
                     policy_logprobs_bt=jnp.asarray(np.where(keep, np.asarray(ro.policy_logprobs_bt), 0.0)))
