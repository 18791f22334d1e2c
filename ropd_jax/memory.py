"""Device memory per chip for training and sampling: params, optimizer, gradients, activations, KV cache.

An analytic estimate for a `ModelConfig` on a (data, fsdp, tensor) mesh, to choose a slice and batch sizes
before paying for one. What it assumes (the layout of `ropd_jax.model`, FSDP training, Tunix-style sampling):

- Weight matrices (embed, lm_head, q/k/v/o, gate/up/down) are split over fsdp x tensor; norms and biases
  are replicated. The batch is split over data x fsdp; heads, the MLP width and the vocabulary over tensor.
- Training keeps params and AdamW moments resident; a step adds gradients (+ a float32 accumulator over
  micro-steps), the all-gathered weights of the layer in flight (FSDP), the activations saved for the
  backward pass, and the loss head's [tokens, vocab] float32 buffers.
- Activations follow what `jax.grad` of `model.token_logprobs` saves per layer (`print_saved_residuals`):
  float32 RMSNorm inputs and outputs, the roped q/k and v, the attention output, six MLP-width tensors and,
  with the naive attention of `model.py`, the [T, S] scores and probabilities of every head. With
  `remat=True` only each layer's input is kept and one layer at a time is recomputed.
- Sampling keeps the training state resident and adds the sampler's copy of the weights in compute dtype
  (replicated over fsdp by default, so decode steps need no all-gather), the KV cache, and the transient
  of a prefill of all prompt rows at once, with logits of the last prompt position only.

`tests/test_memory.py` checks the parts against `jax.jit(...).lower(...).compile().memory_analysis()` for a
tiny model. `python -m ropd_jax.memory --table` prints the table of docs/scaling.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np

from ropd_jax import model as model_lib

GiB = 1024**3
F32 = 4
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_SHARDED_LEAVES = ("embed", "lm_head", "q", "k", "v", "o", "gate", "up", "down")
# Of a chip's HBM, what a program may use: XLA and the runtime keep some, and allocation fragments.
USABLE_FRACTION = 0.9


def dtype_bytes(name: str) -> int:
  if name not in _BYTES:
    raise ValueError(f"dtype {name!r} is not supported; use one of {', '.join(_BYTES)}.")
  return _BYTES[name]


@dataclasses.dataclass(frozen=True)
class MeshShape:
  data: int = 1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    for axis in ("data", "fsdp", "tensor"):
      if getattr(self, axis) < 1:
        raise ValueError(f"MeshShape.{axis}={getattr(self, axis)} must be >= 1.")

  @property
  def devices(self) -> int:
    return self.data * self.fsdp * self.tensor

  @property
  def batch_shards(self) -> int:
    return self.data * self.fsdp

  @property
  def param_shards(self) -> int:
    return self.fsdp * self.tensor


@dataclasses.dataclass(frozen=True)
class Workload:
  """Shapes of one training micro-step and one sampler pass, as global batch sizes."""
  train_batch: int = 8           # sequences per training micro-step (split over data x fsdp)
  train_len: int = 10240         # tokens per training sequence (prompt + response)
  micro_steps: int = 32          # micro-steps per optimizer update (>1 adds a float32 gradient accumulator)
  remat: bool = True             # recompute each layer in the backward pass
  attention: str = "naive"       # "naive": [T, S] scores materialized (model.py); "flash": a blockwise kernel
  logits_chunk: int = 0          # tokens per loss-head chunk; 0 = the whole sequence at once (token_logprobs)
  optimizer_bytes: int = 8       # per parameter: AdamW mu and nu in float32
  rollout_batch: int = 256       # sequences per sampler pass (split over data x fsdp)
  prompt_len: int = 2048
  response_len: int = 8192
  sampler_replicated: bool = True  # sampler weights replicated over fsdp (split over tensor only)
  cache_dtype: str = "bfloat16"

  def __post_init__(self):
    if self.attention not in ("naive", "flash"):
      raise ValueError(f"Workload.attention={self.attention!r}; use 'naive' or 'flash'.")


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes per device. `train_peak` and `sample_peak` include the resident params and optimizer state."""
  params: int
  optimizer: int
  gradients: int
  grad_accum: int
  fsdp_gather: int
  activations: int
  logits: int
  sampler_params: int
  kv_cache: int
  prefill: int

  @property
  def resident(self) -> int:
    return self.params + self.optimizer

  @property
  def train_peak(self) -> int:
    return (self.resident + self.gradients + self.grad_accum + self.fsdp_gather + self.activations
            + self.logits)

  @property
  def sample_peak(self) -> int:
    return self.resident + self.sampler_params + self.kv_cache + self.prefill

  @property
  def peak(self) -> int:
    return max(self.train_peak, self.sample_peak)


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


# -- parameters ------------------------------------------------------------------------------------------
def param_count(cfg: model_lib.ModelConfig) -> int:
  return sum(int(np.prod(s)) for s in model_lib.flatten_params(model_lib.param_shapes(cfg)).values())


def param_bytes(cfg: model_lib.ModelConfig, mesh: MeshShape, bytes_per_value: int | None = None,
                shards: int | None = None) -> int:
  """Bytes per device of a params-shaped pytree: matrices split over `shards` (default fsdp x tensor),
  vectors replicated. `bytes_per_value` defaults to the storage dtype."""
  bpv = dtype_bytes(cfg.param_dtype) if bytes_per_value is None else bytes_per_value
  shards = mesh.param_shards if shards is None else shards
  total = 0
  for path, shape in model_lib.flatten_params(model_lib.param_shapes(cfg)).items():
    n = int(np.prod(shape))
    total += _ceil_div(n, shards) if path.split("/")[-1] in _SHARDED_LEAVES else n
  return total * bpv


def layer_weight_count(cfg: model_lib.ModelConfig) -> int:
  d, f = cfg.hidden_size, cfg.intermediate_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  return d * q + 2 * d * kv + q * d + 3 * d * f


def fsdp_gather_bytes(cfg: model_lib.ModelConfig, mesh: MeshShape) -> int:
  """All-gathered weights in flight under FSDP: two layers (the one computing, the next one prefetched) and
  the embedding or LM head, in compute dtype, still split over tensor."""
  if mesh.fsdp == 1:
    return 0
  c = dtype_bytes(cfg.dtype)
  head = cfg.vocab_size * cfg.hidden_size
  return (2 * layer_weight_count(cfg) + head) * c // mesh.tensor


# -- training activations --------------------------------------------------------------------------------
def _saved_per_token(cfg: model_lib.ModelConfig, keys: int, tensor: int, attention: str) -> float:
  """Bytes one layer saves for its backward pass, per token of the micro-batch."""
  c = dtype_bytes(cfg.dtype)
  q = cfg.num_heads * cfg.head_dim / tensor
  kv = cfg.num_kv_heads * cfg.head_dim / tensor
  norm = 2 * F32 if cfg.qk_norm else 0
  per_token = 2 * cfg.hidden_size * (2 * F32 + c)   # two RMSNorms: float32 input and normalized, output
  per_token += q * (norm + 2 * c)                     # q-norm input/output, roped q, attention output
  per_token += kv * (norm + 2 * c)                    # k-norm input/output, roped k, v
  per_token += 6 * cfg.intermediate_size / tensor * c  # gate, up, silu's parts, product
  heads = cfg.num_heads / tensor
  # Two float32 statistics per normalized row: RMSNorm's rsqrt and scale, softmax's max and sum.
  norm_rows = 2 + (heads + cfg.num_kv_heads / tensor if cfg.qk_norm else 0)
  per_token += 2 * F32 * (norm_rows + (heads if attention == "naive" else 0))
  if attention == "naive":
    # Per head: the float32 softmax output and the probabilities in compute dtype (one buffer in float32).
    per_token += heads * keys * (F32 + c)
  return per_token


def saved_residual_bytes(cfg: model_lib.ModelConfig, batch_per_device: int, seq_len: int, tensor: int = 1,
                         remat: bool | None = None, attention: str = "naive") -> int:
  """Bytes the decoder layers keep from the forward pass for the backward pass (what `jax.vjp` holds).

  Without remat: every layer's residuals, plus the compute-dtype copy of its weights when that differs from
  the storage dtype. With remat: only each layer's input."""
  remat = cfg.remat if remat is None else remat
  tokens = batch_per_device * seq_len
  if remat:
    return cfg.num_layers * tokens * cfg.hidden_size * dtype_bytes(cfg.dtype)
  weights = 0
  if cfg.param_dtype != cfg.dtype:
    weights = cfg.num_layers * layer_weight_count(cfg) * dtype_bytes(cfg.dtype) // tensor
  return int(cfg.num_layers * _saved_per_token(cfg, seq_len, tensor, attention) * tokens + weights)


def train_activation_bytes(cfg: model_lib.ModelConfig, batch_per_device: int, seq_len: int,
                           tensor: int = 1, remat: bool | None = None, attention: str = "naive") -> int:
  """Activation bytes per device of one forward+backward of the decoder layers (the loss head excluded):
  the saved residuals, the layer being recomputed (remat) and the backward's largest cotangent."""
  remat = cfg.remat if remat is None else remat
  tokens = batch_per_device * seq_len
  saved = saved_residual_bytes(cfg, batch_per_device, seq_len, tensor, remat, attention)
  recomputed = _saved_per_token(cfg, seq_len, tensor, attention) * tokens if remat else 0
  # The biggest cotangent: the float32 [T, S] gradient of the attention scores (naive), else MLP-width.
  transient = (F32 * cfg.num_heads / tensor * seq_len * tokens if attention == "naive"
               else cfg.intermediate_size / tensor * F32 * tokens)
  return int(saved + recomputed + transient)


def logits_bytes(cfg: model_lib.ModelConfig, tokens: int, tensor: int = 1) -> int:
  """The loss head: float32 logits, their log-softmax (saved) and its cotangent, [tokens, vocab / tensor]."""
  return 3 * tokens * _ceil_div(cfg.vocab_size, tensor) * F32


# -- sampling --------------------------------------------------------------------------------------------
def kv_cache_bytes(cfg: model_lib.ModelConfig, batch_per_device: int, max_len: int,
                   cache_dtype: str | None = None, tensor: int = 1) -> int:
  """K and V for every layer, row and slot: L x B x S x K x E x 2 x bytes (kv heads split over tensor)."""
  b = dtype_bytes(cache_dtype or cfg.dtype)
  kv_heads = _ceil_div(cfg.num_kv_heads, tensor)
  return 2 * cfg.num_layers * batch_per_device * max_len * kv_heads * cfg.head_dim * b


def prefill_bytes(cfg: model_lib.ModelConfig, batch_per_device: int, prompt_len: int, cache_len: int,
                  tensor: int = 1, attention: str = "naive", all_logits: bool = False) -> int:
  """Transient of one prefill forward (no backward: one layer's intermediates live at a time).

  The cache is read in compute dtype (a converted copy of this layer's K and V), attention scores are
  [prompt_len, cache_len] per head, and the logits cover the last position only unless `all_logits`."""
  c = dtype_bytes(cfg.dtype)
  tokens = batch_per_device * prompt_len
  heads = cfg.num_heads / tensor
  per_token = 3 * cfg.intermediate_size / tensor * c + 4 * cfg.hidden_size * F32
  if attention == "naive":
    per_token += heads * cache_len * (F32 + c)   # float32 scores/softmax, probabilities in compute dtype
  layer_kv = kv_cache_bytes(cfg, batch_per_device, cache_len, cfg.dtype, tensor) // cfg.num_layers
  logit_rows = tokens if all_logits else batch_per_device
  return int(per_token * tokens + layer_kv + logit_rows * _ceil_div(cfg.vocab_size, tensor) * F32)


# -- everything ------------------------------------------------------------------------------------------
def estimate(cfg: model_lib.ModelConfig, mesh: MeshShape, work: Workload) -> MemoryEstimate:
  """Bytes per device of one training micro-step and one sampler pass of `work` on `mesh`."""
  n_params = param_count(cfg)
  shards = mesh.param_shards
  train_rows = _ceil_div(work.train_batch, mesh.batch_shards)
  rollout_rows = _ceil_div(work.rollout_batch, mesh.batch_shards)
  head_tokens = train_rows * work.train_len if work.logits_chunk == 0 else work.logits_chunk
  cache_len = work.prompt_len + work.response_len
  sampler_shards = mesh.tensor if work.sampler_replicated else shards
  return MemoryEstimate(
      params=param_bytes(cfg, mesh),
      optimizer=_ceil_div(n_params, shards) * work.optimizer_bytes,
      gradients=param_bytes(cfg, mesh),
      grad_accum=param_bytes(cfg, mesh, F32) if work.micro_steps > 1 else 0,
      fsdp_gather=fsdp_gather_bytes(cfg, mesh),
      activations=train_activation_bytes(cfg, train_rows, work.train_len, mesh.tensor, work.remat,
                                         work.attention),
      logits=logits_bytes(cfg, head_tokens, mesh.tensor),
      sampler_params=param_bytes(cfg, mesh, dtype_bytes(cfg.dtype), shards=sampler_shards),
      kv_cache=kv_cache_bytes(cfg, rollout_rows, cache_len, work.cache_dtype, mesh.tensor),
      prefill=prefill_bytes(cfg, rollout_rows, work.prompt_len, cache_len, mesh.tensor, work.attention),
  )


def max_rollout_batch(cfg: model_lib.ModelConfig, mesh: MeshShape, work: Workload, hbm_bytes: float) -> int:
  """The largest global rollout batch (a multiple of data x fsdp) whose sampler pass fits in `hbm_bytes`."""
  budget = hbm_bytes * USABLE_FRACTION
  rows = 0
  while True:
    trial = dataclasses.replace(work, rollout_batch=(rows + 1) * mesh.batch_shards)
    if estimate(cfg, mesh, trial).sample_peak > budget:
      return rows * mesh.batch_shards
    rows += 1
    if rows > 1 << 16:
      return rows * mesh.batch_shards


# -- the table of docs/scaling.md ------------------------------------------------------------------------
# Architecture numbers from the models' Hugging Face config.json files.
QWEN3 = {
    "Qwen3-0.6B": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True),
    "Qwen3-4B": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=9728, vocab_size=151936, tie_word_embeddings=True),
    "Qwen3-8B": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
}
# (name, chips, HBM per chip in GiB, hosts)
SLICES = (("v5e-8", 8, 16, 1), ("v6e-8", 8, 32, 1), ("v5p-16", 8, 95, 2))


def qwen3_config(name: str) -> model_lib.ModelConfig:
  hf = dict(QWEN3[name], model_type="qwen3", rms_norm_eps=1e-6, rope_theta=1e6)
  # Training keeps float32 master weights and computes in bfloat16.
  return model_lib.ModelConfig.from_hf(hf, param_dtype="float32", dtype="bfloat16", remat=True)


def _gib(n: float) -> str:
  return f"{n / GiB:.1f}"


def _best_rollout(cfg, mesh, work, hbm):
  """(rows, layout): the largest rollout batch per pass and the sampler weight layout that gives it.

  Replicated weights (no all-gather per decode step) are kept unless fsdp-sharded ones fit a third more
  rows: a decode step is bandwidth-bound, so more rows per pass usually pay for the gathers only then."""
  replicated = max_rollout_batch(cfg, mesh, dataclasses.replace(work, sampler_replicated=True), hbm)
  sharded = max_rollout_batch(cfg, mesh, dataclasses.replace(work, sampler_replicated=False), hbm)
  if replicated > 0 and 3 * sharded < 4 * replicated:
    return replicated, "replicated"
  return sharded, "fsdp"


def _verdict(train_ok: bool, rows: int, layout: str, total: int) -> str:
  if not train_ok:
    return "no: the training step does not fit"
  if rows == 0:
    return "no: not one rollout row per chip fits next to the training state"
  where = "" if layout == "replicated" else " (sampler weights fsdp-sharded)"
  if rows >= total:
    return "yes" + where
  return f"yes, rollouts in {math.ceil(total / rows)} passes of <= {rows}{where}"


def _row(name, slice_name, chips, hbm_gib, work_naive, work_flash):
  cfg = qwen3_config(name)
  mesh = MeshShape(fsdp=chips)
  hbm = hbm_gib * GiB
  budget = hbm * USABLE_FRACTION
  naive = estimate(cfg, mesh, work_naive)
  flash = estimate(cfg, mesh, work_flash)
  rows_naive, layout_naive = _best_rollout(cfg, mesh, work_naive, hbm)
  rows_flash, layout_flash = _best_rollout(cfg, mesh, work_flash, hbm)
  total = work_naive.rollout_batch
  as_written = _verdict(naive.train_peak <= budget, rows_naive, layout_naive, total)
  with_flash = _verdict(flash.train_peak <= budget, rows_flash, layout_flash, total)
  verdict = as_written if as_written.startswith("yes") else f"as written: {as_written}; flash: {with_flash}"
  return (f"| {name} | {slice_name} | {hbm_gib} | {_gib(naive.params)} | {_gib(naive.optimizer)} | "
          f"{_gib(naive.gradients + naive.grad_accum)} | {_gib(naive.activations + naive.logits)} | "
          f"{_gib(naive.train_peak)} | {_gib(flash.activations + flash.logits)} | {_gib(flash.train_peak)} | "
          f"{_gib(naive.kv_cache)} | {rows_naive} | {rows_flash} | {verdict} |")


def table(work: Workload | None = None) -> str:
  """The markdown table of docs/scaling.md: every Qwen3 size on every slice, FSDP over all chips."""
  work_naive = work or Workload()
  work_flash = dataclasses.replace(work_naive, attention="flash", logits_chunk=1024)
  lines = [
      "| model | slice | HBM/chip | params | AdamW | grads + accum | act + logits (naive) | train peak (naive) | "
      f"act + logits (flash) | train peak (flash) | KV cache ({work_naive.rollout_batch} rows) | "
      "rollout rows/pass (naive) | rollout rows/pass (flash) | fits? |",
      "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|",
  ]
  for name in QWEN3:
    for slice_name, chips, hbm_gib, _hosts in SLICES:
      lines.append(_row(name, slice_name, chips, hbm_gib, work_naive, work_flash))
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ropd_jax.memory", description=__doc__.splitlines()[0])
  parser.add_argument("--table", action="store_true", help="print the markdown table of docs/scaling.md")
  parser.add_argument("--rollout-batch", type=int, default=Workload.rollout_batch)
  parser.add_argument("--prompt-len", type=int, default=Workload.prompt_len)
  parser.add_argument("--response-len", type=int, default=Workload.response_len)
  args = parser.parse_args(argv)
  if not args.table:
    parser.print_help()
    return 2
  work = Workload(rollout_batch=args.rollout_batch, prompt_len=args.prompt_len,
                  response_len=args.response_len, train_len=args.prompt_len + args.response_len)
  print(table(work))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
