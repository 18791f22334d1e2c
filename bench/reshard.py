"""The training -> sampling weight reshard, once per step: its time and bytes, per mesh.

    python bench/reshard.py                        # 8 fake CPU devices, SmolLM2-135M shape, fp32 master weights
    python bench/reshard.py --shape=qwen3-0.6b     # the Qwen3-0.6B shape
    python bench/reshard.py --meshes 1,8,1 2,2,2   # (data, fsdp, tensor) meshes to measure

Training keeps float32 params split over `fsdp` (and `tensor`); the sampler wants them replicated over the
batch axes (`data`, `fsdp`) so that no decode step all-gathers weights, split over `tensor` only
(`sampling.param_shardings`). Two ways to get there are timed side by side, alternating, median of `--reps`:
  - `device_put`: all-gather the float32 params, the sampler casts them to the compute dtype afterwards;
  - `cast, then gather` (`sampling.sampler_params`, what `sampling.sample` does): each device casts its
    own shard to the compute dtype (bf16) first, then the same `device_put`, which moves half the bytes.
On an accelerator the reshard is an all-gather over the interconnect, so its time follows the bytes; on 8
fake CPU devices it is host memcpy plus per-shard overhead and says little about a TPU slice.
Bytes are what each device must receive: its sampler-layout bytes minus what it already holds.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")   # CPU only; no-op elsewhere
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ropd_jax import model as model_lib  # noqa: E402
from ropd_jax import sampling  # noqa: E402
from ropd_jax import sharding  # noqa: E402

SHAPES = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, tie_word_embeddings=True),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, tie_word_embeddings=True,
                       qk_norm=True),
}


def _args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
  p.add_argument("--meshes", nargs="+", default=["1,8,1", "2,4,1", "2,2,2"],
                 help="(data,fsdp,tensor) sizes; their product must be the device count")
  p.add_argument("--reps", type=int, default=5)
  return p.parse_args(argv)


def _local_bytes(tree) -> int:
  """Bytes one device holds (device 0's shards; every device holds as much under these layouts)."""
  dev = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards if s.device == dev)


def _seconds(fn):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def main(argv=None):
  args = _args(argv)
  cfg = model_lib.ModelConfig(**SHAPES[args.shape], param_dtype="float32", dtype="bfloat16")
  host_params = model_lib.init_params(cfg, jax.random.key(0))
  total = sum(x.nbytes for x in jax.tree.leaves(host_params))
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}); "
        f"{args.shape}: {total / 2**20:,.0f} MiB of float32 params, compute bfloat16")
  print(f"{'mesh (d,f,t)':>13} | {'train MiB/dev':>13} | {'device_put: recv MiB':>20} {'ms':>8} | "
        f"{'cast, then gather: recv MiB':>27} {'ms':>8} | speed-up")
  for text in args.meshes:
    shape = tuple(int(v) for v in text.split(","))
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    train = sharding.shard_params(host_params, sharding.param_shardings(host_params, mesh))
    target = sampling.param_shardings(train, mesh)
    put = lambda: jax.device_put(train, target)  # noqa: E731
    cast = lambda: sampling.sampler_params(train, cfg, mesh)  # noqa: E731
    put_out, cast_out = put(), cast()   # warm-up (compiles)
    held = _local_bytes(train)
    recv_put = _local_bytes(put_out) - held
    recv_cast = _local_bytes(cast_out) - held // 2   # the device's own shard, cast, is not received
    put_s, cast_s = [], []
    for _ in range(args.reps):   # alternate, so a change of load hits both
      put_s.append(_seconds(put))
      cast_s.append(_seconds(cast))
    put_ms, cast_ms = statistics.median(put_s) * 1e3, statistics.median(cast_s) * 1e3
    print(f"{text:>13} | {held / 2**20:13,.1f} | {recv_put / 2**20:20,.1f} {put_ms:8.1f} | "
          f"{recv_cast / 2**20:27,.1f} {cast_ms:8.1f} | {put_ms / cast_ms:.2f}x")
    np.testing.assert_array_equal(   # same weights either way, up to the cast the sampler does anyway
        np.asarray(cast_out["layers"]["q"]).astype(np.float32),
        np.asarray(put_out["layers"]["q"].astype(cfg.compute_dtype)).astype(np.float32))


if __name__ == "__main__":
  main()
