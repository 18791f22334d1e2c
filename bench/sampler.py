"""Rollout throughput: our jitted sampler vs transformers `generate`, side by side in one run.

    python bench/sampler.py                 # CPU: SmolLM2-135M (offline GGUF), 16 chat prompts x 128 new, fp32
    python bench/sampler.py --top_p=0.95    # the same with nucleus sampling on both sides
    python bench/sampler.py --cores=1       # XLA and torch pinned to one core each (shared machines)
    python bench/sampler.py --breakdown     # + our prefill alone, one decode step, one draw
    python bench/sampler.py --roofline      # + the workload's FLOPs against this machine's peak matmul rate
    python bench/sampler.py --gpu-shape     # Qwen3-0.6B shape, random bf16, 256 rollouts, 128 prompt + 256 new
    python bench/sampler.py --gpu-shape --n=8 --hf_batch=64   # GRPO groups (32 prompts x 8), HF at batch 64

Both sides generate exactly `--new` tokens per row (stop tokens off), with the same weights, prompts, dtype
and sampling settings; tokens/s counts new tokens over the wall time of a whole call (prefill included).
After one warm-up call each, the two sides are timed in alternation (`--reps` rounds), so a load spike
from other processes hits both; the best and the median call are printed, the ratio uses the best.
With --n > 1 our sampler prefills each prompt once for its n rollouts; transformers gets the prompt
repeated n times (what `num_return_sequences` does).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gpu-shape", dest="gpu_shape", action="store_true",
                 help="Qwen3-0.6B-shaped random bf16 model, 256 rollouts, 128 prompt + 256 new tokens")
  p.add_argument("--tiny", action="store_true",
                 help="with --gpu-shape: 2 layers, 4k vocab, d=128 (a CPU smoke test of that mode)")
  p.add_argument("--batch", type=int, default=None, help="rollouts per call (16 CPU, 256 --gpu-shape)")
  p.add_argument("--n", type=int, default=1, help="rollouts per prompt (prompts = batch / n)")
  p.add_argument("--new", type=int, default=None, help="new tokens per rollout (128 CPU, 256 --gpu-shape)")
  p.add_argument("--prompt_len", type=int, default=128, help="--gpu-shape: prompt tokens per row")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--reps", type=int, default=3, help="timed calls per side (median reported)")
  p.add_argument("--cores", type=int, default=None,
                 help="pin the whole process (XLA's thread pool and torch) to this many cores; torch gets "
                      "as many threads. On a shared machine 1 core each is the steadiest like-for-like")
  p.add_argument("--skip_hf", action="store_true", help="time our sampler only")
  p.add_argument("--breakdown", action="store_true",
                 help="also time our prefill alone, one decode step (model only) and one draw")
  p.add_argument("--roofline", action="store_true",
                 help="also count the call's FLOPs and time a large float32 matmul: the time no sampler on "
                      "these cores can beat, and the share of peak that a 3x-transformers call would need")
  p.add_argument("--hf_batch", type=int, default=None, help="transformers batch (default: same as ours)")
  p.add_argument("--hf_static", action="store_true", help="transformers cache_implementation='static'")
  p.add_argument("--hf_threads", type=int, nargs="+", default=None,
                 help="torch CPU thread counts to time (default: 1 and all cores; on a shared machine "
                      "torch's multi-threaded small matmuls can stall, so the best is compared)")
  return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- models


def _cpu_model():
  from ropd_jax import assets, tokenizer, weights
  path = assets.smollm2_gguf_path()
  cfg, params = weights.load_gguf(path)
  tok = tokenizer.load_tokenizer(path)
  return cfg, params, tok


def _gpu_shape_model(tiny: bool = False):
  import jax
  from ropd_jax import model
  cfg = model.ModelConfig(
      model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
      num_heads=16, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
      max_position_embeddings=40960, tie_word_embeddings=True, qk_norm=True, param_dtype="bfloat16",
      dtype="bfloat16", eos_token_ids=(151645,))
  if tiny:
    cfg = cfg.replace(vocab_size=4096, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=32, eos_token_ids=(7,))
  params = model.init_params(cfg, jax.random.key(0))
  return cfg, params


def _chat_prompts(tok, count):
  from ropd_jax import assets
  questions = [r["question"] for r in assets.load_gsm_symbolic()][:count]
  return [tok.apply_chat(q, tokenize=True) for q in questions]


def _hf_model(cfg, params, torch_dtype):
  import torch
  import transformers
  from ropd_jax import weights
  hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
  with torch.device("cpu"):
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch_dtype)
  state = {name: torch.from_numpy(np.array(arr, np.float32))
           for name, arr in weights.to_hf_tensors(params, cfg)}
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
  if missing or unexpected:
    raise RuntimeError(f"HF weight copy failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
  model.tie_weights()
  model.generation_config.eos_token_id = None   # exactly --new tokens, like ours with stops off
  model.generation_config.pad_token_id = 0
  return model.eval()


# ---------------------------------------------------------------------------------------------- timing


def _timed(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _ours(cfg, params, prompts, args):
  """A no-argument call that samples the whole batch once (fresh seed each call)."""
  import jax
  from ropd_jax import sampling
  scfg = sampling.SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                 max_new_tokens=args.new, n=args.n, stop_token_ids=())
  ids_bt, lengths_b = sampling.pad_prompts(prompts, scfg)
  calls = iter(range(10 ** 6))

  def run():
    ro = sampling.sample(params, ids_bt, lengths_b, jax.random.key(next(calls)), cfg, scfg)
    lengths = np.asarray(ro.lengths_b)   # host copy: waits for the device
    assert lengths.min() == args.new, "a row stopped early; stops should be off"

  return run


def _hf(model, prompts, args, device, batch):
  import torch
  # HF decoder-only batching needs left padding.
  width = max(len(p) for p in prompts)
  ids = np.zeros((len(prompts), width), np.int64)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  ids, mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
  kw = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            max_new_tokens=args.new, min_new_tokens=0)
  if args.hf_static:
    kw["cache_implementation"] = "static"

  def run():
    with torch.inference_mode():
      for s in range(0, ids.shape[0], batch):
        out = model.generate(input_ids=ids[s:s + batch], attention_mask=mask[s:s + batch], **kw)
        assert out.shape[1] == width + args.new
    if device != "cpu":
      torch.cuda.synchronize()

  return run


def _breakdown(cfg, params, prompts, args, whole_s):
  """Where a call's time goes: prefill (a 1-token call), the model's decode step at the full cache and at
  a 64-slot cache (the difference is attention over the cache and its update), the lm_head, the draw."""
  import jax
  import jax.numpy as jnp
  from ropd_jax import model as model_lib
  from ropd_jax import sampling
  rows = len(prompts) * args.n
  one = argparse.Namespace(**{**vars(args), "new": 1})
  prefill = _ours(cfg, params, prompts, one)
  prefill()
  prefill_s = min(_timed(prefill) for _ in range(args.reps))
  scfg = sampling.SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
  slots = sampling._bucket(max(map(len, prompts)), scfg.prompt_buckets) + args.new
  dec = jax.jit(lambda p: sampling._decode_params(p, cfg))(params)
  step = jax.jit(lambda d, t, p, kv: sampling._decode_step(d, t, p, kv, cfg), donate_argnums=(3,))
  draw = jax.jit(lambda lg, k: sampling.draw(lg, k, scfg))
  if "head_vd" in dec[0]:   # the CPU's feature-major decode layout
    head = jax.jit(lambda top, x: sampling.head_feature_major(top, x[:, 0].T))
  else:
    head = jax.jit(lambda top, x: model_lib.lm_logits(top, x, cfg))
  keys = jax.random.split(jax.random.key(0), rows)
  tok_r = jnp.ones((rows,), jnp.int32)
  x_r1d = jnp.ones((rows, 1, cfg.hidden_size), cfg.compute_dtype)

  def step_ms(width):
    shape = (rows, cfg.num_kv_heads, width, cfg.head_dim)
    kv = tuple((jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
               for _ in range(cfg.num_layers))
    pos_r = jnp.full((rows,), width - max(args.new // 2, 1), jnp.int32)   # a mid-generation position
    logits, kv = step(dec, tok_r, pos_r, kv)
    jax.block_until_ready(logits)
    times = []
    for _ in range(max(args.reps, 5)):
      t0 = time.perf_counter()
      logits, kv = step(dec, tok_r, pos_r, kv)
      jax.block_until_ready(kv)
      times.append(time.perf_counter() - t0)
    return min(times) * 1e3, logits

  full_ms, logits = step_ms(slots)
  short = min(64, slots)
  short_ms, _ = step_ms(short) if short < slots else (full_ms, None)
  jax.block_until_ready(draw(logits, keys))
  jax.block_until_ready(head(dec[0], x_r1d))
  reps = range(max(args.reps, 5))
  draw_ms = min(_timed(lambda: jax.block_until_ready(draw(logits, keys))) for _ in reps) * 1e3
  head_ms = min(_timed(lambda: jax.block_until_ready(head(dec[0], x_r1d))) for _ in reps) * 1e3
  per_step = (whole_s - prefill_s) / max(args.new - 1, 1)
  print(f"breakdown (ours): prefill + first draw {prefill_s:.3f}s; loop {per_step * 1e3:.2f} ms/step, of "
        f"which model step alone {full_ms:.2f} ms at {slots} cache slots ({short_ms:.2f} ms at {short}; "
        f"lm_head alone {head_ms:.2f} ms), draw alone {draw_ms:.2f} ms")


def workload_flops(cfg, prompt_lens, new: int, n: int) -> float:
  """Matmul FLOPs of one call with no padding: each prompt token through every layer, each prompt's
  last hidden state through the vocab projection, then new - 1 decode steps of n rows per prompt (the
  layers and the vocab projection); attention counts q.K and probs.V over the positions so far."""
  d, e, f, layers = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.num_layers
  per_layer = d * (cfg.num_heads + 2 * cfg.num_kv_heads) * e + cfg.num_heads * e * d + 3 * d * f
  head = cfg.vocab_size * d
  attn = lambda ctx: 4 * cfg.num_heads * e * ctx * layers   # noqa: E731  per token, at `ctx` positions
  flops = 0.0
  for plen in prompt_lens:
    flops += plen * 2 * per_layer * layers + sum(attn(p + 1) for p in range(plen)) + 2 * head
    flops += n * sum(2 * (per_layer * layers + head) + attn(plen + t + 1) for t in range(new - 1))
  return flops


def _roofline(cfg, prompts, args, ours_s: float, hf_s: float | None):
  """Peak float32 matmul rate on these cores (XLA, 2048^3, best of 5) and what it means for a call of
  ours taking `ours_s` and, when timed, the best transformers call `hf_s`."""
  import jax
  import jax.numpy as jnp
  a = jnp.asarray(np.random.default_rng(0).standard_normal((2048, 2048), np.float32))
  mm = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(mm(a, a))
  peak = 2 * 2048 ** 3 / min(_timed(lambda: jax.block_until_ready(mm(a, a))) for _ in range(5))
  flops = workload_flops(cfg, [len(p) for p in prompts], args.new, args.n)
  floor = flops / peak
  print(f"roofline: {flops / 1e9:,.0f} GFLOP per call (no padding); peak float32 matmul here "
        f"{peak / 1e9:.1f} GFLOP/s -> no call can take less than {floor:.2f}s; ours {ours_s:.2f}s = "
        f"{flops / ours_s / 1e9:.1f} GFLOP/s ({floor / ours_s:.0%} of peak)")
  if hf_s is not None:
    print(f"roofline: 3x the best transformers call is {hf_s / 3:.2f}s: {floor / (hf_s / 3):.0%} of peak, "
          f"sustained over prefill, decode and the draw")


def _fmt(times):
  return f"best {min(times):.3f}s, median {statistics.median(times):.3f}s over {len(times)}"


# ---------------------------------------------------------------------------------------------- main


def main(argv=None):
  args = _args(argv)
  if args.gpu_shape:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the card
  if args.cores:   # before JAX starts: XLA sizes its CPU thread pool from the affinity mask
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
    args.hf_threads = [args.cores]
  import jax
  batch = args.batch or (256 if args.gpu_shape else 16)
  args.new = args.new or (256 if args.gpu_shape else 128)
  if batch % args.n:
    raise SystemExit(f"--batch={batch} must be a multiple of --n={args.n}")
  load0 = os.getloadavg()
  if args.gpu_shape:
    cfg, params = _gpu_shape_model(args.tiny)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, cfg.vocab_size, args.prompt_len).tolist() for _ in range(batch // args.n)]
    dtype_name = "bfloat16"
  else:
    cfg, params, tok = _cpu_model()
    prompts = _chat_prompts(tok, batch // args.n)
    dtype_name = "float32"
  lens = [len(p) for p in prompts]
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}); "
        f"model {cfg.model_type} L={cfg.num_layers} d={cfg.hidden_size} V={cfg.vocab_size} {dtype_name}; "
        f"{len(prompts)} prompts x n={args.n} = {batch} rows, prompt tokens {min(lens)}..{max(lens)} "
        f"(sum {sum(lens)}), {args.new} new; T={args.temperature} top_p={args.top_p} top_k={args.top_k}")
  sides = {"ours": _ours(cfg, params, prompts, args)}
  first = _timed(sides["ours"])
  print(f"ours: first call (compile + run) {first:.2f}s")
  if not args.skip_hf:
    import torch
    import transformers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = _hf_model(cfg, params, torch.bfloat16 if args.gpu_shape else torch.float32).to(device)
    hf_prompts = [p for p in prompts for _ in range(args.n)]   # no shared-prefill groups in HF
    hf_batch = args.hf_batch or batch
    run_hf = _hf(hf, hf_prompts, args, device, hf_batch)
    threads = [None] if device != "cpu" else sorted(set(args.hf_threads or [1, os.cpu_count()]))
    for n_threads in threads:
      def run(n_threads=n_threads):
        if n_threads:
          torch.set_num_threads(n_threads)
        run_hf()
      name = "transformers" + (f" ({n_threads} thr)" if n_threads else "")
      sides[name] = run
      _timed(run)   # warm-up
    print(f"transformers {transformers.__version__} generate (torch {torch.__version__}, batch {hf_batch}"
          f"{', static cache' if args.hf_static else ', dynamic cache'})")
  times = {name: [] for name in sides}
  for _ in range(args.reps):
    for name, run in sides.items():
      times[name].append(_timed(run))
  new_tokens = batch * args.new
  for name, ts in times.items():
    print(f"{name:>22}: {_fmt(ts)} -> {new_tokens / min(ts):,.1f} new tok/s (best), "
          f"{new_tokens / statistics.median(ts):,.1f} (median)")
  if args.breakdown:
    _breakdown(cfg, params, prompts, args, min(times["ours"]))
  hf_names = [name for name in times if name != "ours"]
  best = min(hf_names, key=lambda name: min(times[name])) if hf_names else None
  if args.roofline:
    _roofline(cfg, prompts, args, min(times["ours"]), min(times[best]) if best else None)
  if best:
    print(f"ratio ours / {best}: {min(times[best]) / min(times['ours']):.2f}x (best calls), "
          f"{statistics.median(times[best]) / statistics.median(times['ours']):.2f}x (medians)")
  print(f"load average (1 min) before {load0[0]:.2f}, after {os.getloadavg()[0]:.2f} "
        f"({os.cpu_count()} cpus, this process on {len(os.sched_getaffinity(0))})")


if __name__ == "__main__":
  main()
