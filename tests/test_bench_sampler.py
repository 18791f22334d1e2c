"""bench/sampler.py's FLOP count (the roofline it prints) against a hand count on a toy shape."""
import os
import sys

from ropd_jax import model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import sampler as sampler_bench  # noqa: E402


def test_workload_flops_by_hand():
  cfg = model.ModelConfig(model_type="llama", vocab_size=5, hidden_size=2, intermediate_size=3, num_layers=1,
                          num_heads=1, num_kv_heads=1, head_dim=2)
  # One layer: q k v 2x(1+1+1)x2 = 12, o 2x2 = 4, gate up down 3x2x3 = 18 -> 34 weights; vocab 5x2 = 10.
  # Prefill of 2 tokens: 2 x 2 x 34 = 136, attention 4 x 2 x (1 + 2) = 24, the last token's logits 20.
  # One decode step (new = 2) of n = 1 row: 2 x (34 + 10) = 88, attention over 3 positions 24.
  assert sampler_bench.workload_flops(cfg, [2], new=2, n=1) == 136 + 24 + 20 + 88 + 24
  # n rollouts share the prefill; each decodes.
  assert sampler_bench.workload_flops(cfg, [2], new=2, n=3) == 136 + 24 + 20 + 3 * (88 + 24)
