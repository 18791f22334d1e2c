"""The growing KV cache against one full-size cache, side by side in one run, same rollouts.

    python bench/cache_growth.py                       # CPU: SmolLM2-135M, 16 chat prompts, up to 1024 new
    python bench/cache_growth.py --gpu-shape           # Qwen3-0.6B shape, random bf16, 256 rows, up to 4096
    python bench/cache_growth.py --gpu-shape --tiny    # a CPU smoke test of that mode

Rollouts end where they end: SmolLM2 at its own end-of-turn token; the random --gpu-shape model at any of
`--stop_frac` of the vocabulary (a geometric length distribution with a long tail, as real rollouts have).
Both sides sample the same rows with the same seed; the only difference is
`SamplingConfig.cache_grow_from`: attention reads and cache memory follow the longest live rollout, or
always cover `max_new_tokens`. Attention over a wider cache sums its (masked, zero) slots in another
order, so logits agree to float32 rounding, not bit for bit: now and then a draw
whose uniform lands within rounding of a CDF edge picks the neighbouring token, and that row goes its own
way from there. The bench checks that the log-probs agree (<= 1e-3) up to each row's first differing
token and reports how many rows diverged; throughput is new tokens over wall time per side. After a
warm-up call each (which compiles every cache size), the sides are timed in alternation.
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
                 help="Qwen3-0.6B-shaped random bf16 model, 128-token random prompts")
  p.add_argument("--tiny", action="store_true", help="with --gpu-shape: a 2-layer model (smoke test)")
  p.add_argument("--batch", type=int, default=None, help="rollouts per call (16 CPU, 256 --gpu-shape)")
  p.add_argument("--new", type=int, default=None, help="max_new_tokens (1024 CPU, 4096 --gpu-shape)")
  p.add_argument("--grow_from", type=int, default=None,
                 help="cache_grow_from of the growing side (128 CPU, 512 --gpu-shape)")
  p.add_argument("--stop_frac", type=float, default=0.005,
                 help="--gpu-shape: fraction of the vocabulary that ends a row (mean length ~ 1 / it)")
  p.add_argument("--reps", type=int, default=2, help="timed calls per side")
  return p.parse_args(argv)


def _setup(args):
  """(model config, params, prompts, stop ids)."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import sampler as sampler_bench   # the same models and prompts as bench/sampler.py
  if not args.gpu_shape:
    cfg, params, tok = sampler_bench._cpu_model()
    return cfg, params, sampler_bench._chat_prompts(tok, args.batch), tuple(tok.stop_ids)
  cfg, params = sampler_bench._gpu_shape_model(args.tiny)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(10, cfg.vocab_size, 128).tolist() for _ in range(args.batch)]
  stops = rng.choice(np.arange(10, cfg.vocab_size), max(1, int(args.stop_frac * cfg.vocab_size)), replace=False)
  return cfg, params, prompts, tuple(int(s) for s in stops)


def main(argv=None):
  args = _args(argv)
  import jax
  from ropd_jax import sampling
  args.batch = args.batch or (256 if args.gpu_shape else 16)
  args.new = args.new or (4096 if args.gpu_shape else 1024)
  args.grow_from = args.grow_from or (512 if args.gpu_shape else 128)
  cfg, params, prompts, stops = _setup(args)
  base = sampling.SamplingConfig(temperature=1.0, max_new_tokens=args.new, stop_token_ids=stops)
  sides = {"one full cache": base.replace(cache_grow_from=0),
           f"growing from {args.grow_from}": base.replace(cache_grow_from=args.grow_from)}
  ids_bt, lengths_b = sampling.pad_prompts(prompts, base)
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); model {cfg.model_type} "
        f"L={cfg.num_layers} d={cfg.hidden_size} V={cfg.vocab_size} {cfg.dtype}; {len(prompts)} rows, prompt "
        f"bucket {ids_bt.shape[1]}, max_new_tokens {args.new}; {len(stops)} stop ids")

  def call(scfg, seed):
    return jax.tree.map(np.asarray, sampling.sample(params, ids_bt, lengths_b, jax.random.key(seed), cfg, scfg))

  times = {name: [] for name in sides}
  tokens = {name: [] for name in sides}
  for name, scfg in sides.items():   # warm-up: compiles the cache sizes its rollouts reach
    t0 = time.perf_counter()
    call(scfg, 0)
    print(f"{name}: first call (compile + run) {time.perf_counter() - t0:.1f}s")
  for rep in range(args.reps):
    outs = []
    for name, scfg in sides.items():
      t0 = time.perf_counter()
      outs.append(call(scfg, 1 + rep))
      times[name].append(time.perf_counter() - t0)
      tokens[name].append(int(outs[-1].lengths_b.sum()))
    diverged = _diverged_rows(*outs)
    print(f"call {rep + 1}: lengths min {outs[0].lengths_b.min()}, median {int(np.median(outs[0].lengths_b))}, "
          f"max {outs[0].lengths_b.max()} (cap {args.new}); rows that diverged at a rounding flip: "
          f"{diverged} of {len(outs[0].lengths_b)}")
  best_rate = {name: max(n / t for n, t in zip(tokens[name], ts)) for name, ts in times.items()}
  for name, ts in times.items():
    print(f"{name:>22}: {', '.join(f'{t:.2f}s' for t in ts)} -> best {best_rate[name]:,.1f} new tok/s")
  full, grown = best_rate.values()
  print(f"speed-up of the growing cache: {grown / full:.2f}x (best new tok/s)")


def _diverged_rows(a, b) -> int:
  """Rows whose tokens differ; raises if log-probs differ before a row's first differing token."""
  count = 0
  for r in range(a.tokens_bt.shape[0]):
    diff = np.flatnonzero(a.tokens_bt[r] != b.tokens_bt[r])
    upto = int(diff[0]) if diff.size else int(a.lengths_b[r])
    gap = np.abs(a.policy_logprobs_bt[r, :upto] - b.policy_logprobs_bt[r, :upto]).max(initial=0.0)
    if gap > 1e-3:
      raise SystemExit(f"row {r}: log-probs differ by {gap:.2e} before any token does: a bug, not rounding")
    count += bool(diff.size)
  return count


if __name__ == "__main__":
  main()
