"""bench/train_step.py: its batch, loss check, FLOP count and load wait, on a tiny model (nothing timed).

Hand references: the first step's old logprobs are the policy's own, so every ratio is 1, nothing clips, and
the token-mean PPO loss is -sum_b A_b n_b / sum_b n_b = -mean(A) (every row trains the same n_b tokens).
Qwen3-0.6B has N = 596,049,920 parameters (embedding 151936 x 1024, 28 layers of 15,730,944, final norm 1024);
at 8 x 1024 tokens, 6 N + 6 L T H E FLOPs per token at 41.4k tok/s is the issue's 16.4% of 989 TFLOP/s.
"""
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

from ropd_jax import model

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "train_step.py")
_spec = importlib.util.spec_from_file_location("bench_train_step", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

try:
  import torch  # noqa: F401
  HAS_TORCH = True
except ImportError:
  HAS_TORCH = False


def _tiny():
  return bench.cpu_model(tiny=True)


def test_make_batch_trains_the_last_tokens_against_the_policys_own_logprobs():
  cfg, params = _tiny()
  b = bench.make_batch(cfg, params, batch=2, seq=8, response=3, seed=1)
  assert b["tokens_bt"].shape == (2, 8) and b["loss_mask_bt"].shape == (2, 7)
  # columns 4, 5, 6 of the [B, T-1] mask train tokens 5, 6, 7: the last three
  np.testing.assert_array_equal(b["loss_mask_bt"][0], [0, 0, 0, 0, 1, 1, 1])
  lp, _ = model.token_logprobs(params, b["tokens_bt"], cfg)
  np.testing.assert_allclose(b["old_logprobs_bt"][:, 4:], np.asarray(lp)[:, 4:], atol=1e-6)
  assert not b["old_logprobs_bt"][:, :4].any()
  with pytest.raises(ValueError, match="response=8"):
    bench.make_batch(cfg, params, batch=2, seq=8, response=8)


def test_one_step_each_side_gives_the_hand_loss_and_the_same_gradient_norm():
  cfg, params = _tiny()
  r = bench.bench_case(cfg, params, batch=2, seq=12, window=4, steps=1, with_torch=HAS_TORCH, seed=3)
  adv = bench.make_batch(cfg, params, batch=2, seq=12, response=4, seed=3)["advantages_b"]
  assert r["response_tokens"] == 4 and r["tokens"] == 24
  assert r["ours"]["loss_step1"] == pytest.approx(-adv.mean(), abs=1e-6)
  assert r["ours"]["tok_s"] == pytest.approx(24 / r["ours"]["step_s"])
  assert r["ours"]["grad_norm_step1"] > 0
  assert 0 < r["ours"]["compile_s"] < r["ours"]["first_call_s"]  # jax's own compile report, inside the first call
  if HAS_TORCH:  # the torch half: same loss definition, same weights, so the same first step
    assert r["torch"]["loss_step1"] == pytest.approx(-adv.mean(), abs=1e-6)
    assert r["torch"]["grad_norm_step1"] == pytest.approx(r["ours"]["grad_norm_step1"], rel=1e-4)
    assert r["ratio_ours_over_torch"] == pytest.approx(r["ours"]["tok_s"] / r["torch"]["tok_s"])


def test_gpu_shape_mode_runs_tiny_on_cpu_and_prints_mfu(capsys):
  result = bench.main(["--gpu-shape", "--tiny", "--no-wait", "--skip-torch", "--sequential", "--seq", "8",
                       "--peak-tflops", "1"])
  (case,) = result["cases"]
  assert result["model"]["dtype"] == "bfloat16" and result["model"]["remat"]
  six_n, _ = bench.model_flops_per_token(model.ModelConfig(**dict(bench.QWEN3_06B, **bench.TINY)),
                                         bench.gpu_shape_model(tiny=True)[1], 8)
  assert case["ours"]["mfu_6n"] == pytest.approx(six_n * case["ours"]["tok_s"] / 1e12)
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["bench"] == "train_step"


def test_flops_per_token_reproduce_the_issues_h100_mfu():
  cfg = model.ModelConfig(**bench.QWEN3_06B)
  abstract = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  assert bench.param_count(abstract) == 596_049_920
  six_n, with_attn = bench.model_flops_per_token(cfg, abstract, 1024)
  assert six_n == 6 * 596_049_920
  assert with_attn - six_n == 6 * 28 * 1024 * 16 * 128
  assert 41.4e3 * with_attn / 989e12 == pytest.approx(0.164, abs=5e-4)


def test_wait_for_load_polls_until_below_the_threshold(monkeypatch):
  loads = iter([3.0, 2.6, 1.2])
  sleeps = []
  monkeypatch.setattr(bench.os, "getloadavg", lambda: (next(loads), 0.0, 0.0))
  monkeypatch.setattr(bench.time, "sleep", sleeps.append)
  assert bench.wait_for_load(2.5, max_wait=600, poll=30) == 1.2
  assert sleeps == [30, 30]


def test_rl_defaults_match_the_shared_config():
  from configs.common import rl_config
  shared = rl_config().to_dict()
  differ = {k: (v, shared[k]) for k, v in bench.RL_DEFAULTS.items() if k in shared and shared[k] != v}
  assert differ == {"num_minibatches": (1, 4)}  # the bench times one mini-batch on purpose
