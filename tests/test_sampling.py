"""The rollout sampler against independent references: HF greedy goldens, argmax over full (cache-free)
forwards, teacher-forced logprobs, exact softmax / top-p / top-k distributions, and the unsharded run."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ropd_jax import model, sampling, weights
from ropd_jax.sampling import SamplingConfig

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
FAMILIES = ["llama", "qwen2", "qwen3"]
PROMPTS = [[5, 17, 33], [9, 41, 12, 60, 7, 22, 30]]   # ragged on purpose


def _load(family):
  d = os.path.join(FIXTURES, f"tiny_{family}")
  cfg, params = weights.load_hf(d)
  return cfg, params, np.load(os.path.join(d, "golden.npz"))


def _sample(params, cfg, scfg, prompts=PROMPTS, seed=0, mesh=None):
  ids, lengths = sampling.pad_prompts(prompts, scfg)
  return sampling.sample(params, ids, lengths, jax.random.key(seed), cfg, scfg, mesh=mesh)


def _probs(logits, temperature):
  z = np.asarray(logits, np.float64) / temperature
  p = np.exp(z - z.max())
  return p / p.sum()


def _nucleus(p, top_p):
  """transformers' rule, by sorting: the most likely tokens until their mass reaches top_p."""
  order = np.argsort(-p, kind="stable")
  k = int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1
  keep = np.zeros(p.shape, bool)
  keep[order[:k]] = True
  return keep


# ------------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate_golden(family):
  cfg, params, g = _load(family)
  scfg = SamplingConfig(greedy=True, max_new_tokens=10, stop_token_ids=())
  ro = sampling.sample(params, g["prompt"], np.full(2, 6), jax.random.key(0), cfg, scfg)
  np.testing.assert_array_equal(np.asarray(ro.tokens_bt), g["greedy"][:, 6:])
  np.testing.assert_array_equal(ro.lengths_b, [10, 10])
  assert not np.asarray(ro.finished_b).any()


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_greedy_equals_argmax_of_full_forwards(family):
  cfg, params, _ = _load(family)
  new = 8
  ro = _sample(params, cfg, SamplingConfig(greedy=True, max_new_tokens=new, stop_token_ids=()))
  # Reference: no cache; re-run the whole right-padded sequence each step, argmax at its last token.
  width = max(map(len, PROMPTS)) + new
  full = jax.jit(lambda t, v: model.forward(params, t, cfg, valid_bt=v)[0])
  seqs = [list(p) for p in PROMPTS]
  for _ in range(new):
    toks = np.zeros((len(seqs), width), np.int32)
    valid = np.zeros_like(toks, bool)
    for i, s in enumerate(seqs):
      toks[i, :len(s)], valid[i, :len(s)] = s, True
    logits = np.asarray(full(toks, valid))
    for i, s in enumerate(seqs):
      s.append(int(np.argmax(logits[i, len(s) - 1])))
  expected = np.array([s[len(p):] for s, p in zip(seqs, PROMPTS)])
  np.testing.assert_array_equal(np.asarray(ro.tokens_bt), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_cpu_feature_major_decode_equals_the_accelerator_layout(family, monkeypatch):
  """The CPU decode (activations [D, R], fused [out, in] weights) against the layout accelerators run
  (model.decoder_layer, the training block): same draws, same logprobs, for bias / qk-norm families."""
  cfg, params, _ = _load(family)
  scfg = SamplingConfig(temperature=1.2, top_p=0.9, max_new_tokens=8, n=2, stop_token_ids=())
  runs = {}
  for feature_major in (True, False):
    monkeypatch.setattr(sampling, "_feature_major_decode", lambda fm=feature_major: fm)
    jax.clear_caches()   # the layout is chosen at trace time
    assert ("head_vd" in sampling._decode_params(params, cfg)[0]) == feature_major
    runs[feature_major] = _sample(params, cfg, scfg, seed=3)
  jax.clear_caches()
  fm, ref = runs[True], runs[False]
  np.testing.assert_array_equal(np.asarray(fm.tokens_bt), np.asarray(ref.tokens_bt))
  np.testing.assert_allclose(np.asarray(fm.logprobs_bt), np.asarray(ref.logprobs_bt), atol=1e-5)
  np.testing.assert_allclose(np.asarray(fm.policy_logprobs_bt), np.asarray(ref.policy_logprobs_bt), atol=1e-5)


def test_prompts_within_a_bucket_reuse_the_compiled_sampler():
  cfg, params, _ = _load("llama")
  scfg = SamplingConfig(greedy=True, max_new_tokens=8, stop_token_ids=())
  compiled = lambda: sampling._prefill_jit._cache_size() + sampling._decode_loop_jit._cache_size()  # noqa: E731
  _sample(params, cfg, scfg)
  before = compiled()
  _sample(params, cfg, scfg, prompts=[[4, 4, 4, 4, 4], [8, 9]])   # other lengths, same bucket (16)
  _sample(params, cfg, scfg, prompts=[[7] * 16, [1]])
  assert compiled() == before


# ------------------------------------------------------------------------------------------- logprobs


def test_logprobs_equal_teacher_forced_forward():
  cfg, params, _ = _load("qwen2")
  t = 0.8
  ro = _sample(params, cfg, SamplingConfig(temperature=t, max_new_tokens=6, n=2, stop_token_ids=()), seed=1)
  batch = sampling.train_batch(ro)
  ref, _ = jax.jit(lambda tk, v: model.token_logprobs(params, tk, cfg, valid_bt=v, temperature=t))(
      batch["tokens_bt"], batch["valid_bt"])
  mask = np.asarray(batch["response_mask_bt"])[:, 1:]
  assert mask.sum() == 4 * 6
  np.testing.assert_allclose(np.asarray(batch["old_logprobs_bt"])[:, 1:][mask], np.asarray(ref)[mask],
                             atol=1e-4)
  np.testing.assert_allclose(np.asarray(ro.policy_logprobs_bt), np.asarray(ro.logprobs_bt), atol=1e-6)


def test_top_p_logprobs_are_renormalised_over_the_nucleus():
  cfg, params, _ = _load("llama")
  t, top_p = 1.3, 0.6
  ro = _sample(params, cfg, SamplingConfig(temperature=t, top_p=top_p, max_new_tokens=5, n=2,
                                           stop_token_ids=()), seed=2)
  batch = sampling.train_batch(ro)
  logits = jax.jit(lambda tk, v: model.forward(params, tk, cfg, valid_bt=v)[0])(batch["tokens_bt"],
                                                                                batch["valid_bt"])
  logits, resp = np.asarray(logits), np.asarray(batch["response_mask_bt"])
  tokens = np.asarray(batch["tokens_bt"])
  got_lp = np.asarray(ro.logprobs_bt)
  got_pol = np.asarray(ro.policy_logprobs_bt)
  for r in range(tokens.shape[0]):
    for k, pos in enumerate(np.flatnonzero(resp[r])):
      p = _probs(logits[r, pos - 1], t)
      keep = _nucleus(p, top_p)
      tok = tokens[r, pos]
      assert keep[tok], "sampled a token outside the nucleus"
      np.testing.assert_allclose(got_pol[r, k], np.log(p[tok]), atol=1e-4)
      np.testing.assert_allclose(got_lp[r, k], np.log(p[tok] / p[keep].sum()), atol=1e-4)


# ------------------------------------------------------------------------------------------- distribution


def _first_token_counts(params, cfg, scfg, seed):
  prompt = [[5, 17, 33, 8]]
  logits, _ = model.forward(params, jnp.asarray(prompt), cfg)
  ro = _sample(params, cfg, scfg, prompts=prompt, seed=seed)
  toks = np.asarray(ro.tokens_bt)[:, 0]
  return np.bincount(toks, minlength=cfg.vocab_size), np.asarray(logits)[0, -1], ro, toks


def test_sampled_frequencies_match_softmax_after_top_p():
  cfg, params, _ = _load("qwen3")
  t, top_p, draws = 0.7, 0.8, 8000
  scfg = SamplingConfig(temperature=t, top_p=top_p, max_new_tokens=1, n=draws, stop_token_ids=())
  counts, logits, ro, toks = _first_token_counts(params, cfg, scfg, seed=3)
  p = _probs(logits, t)
  keep = _nucleus(p, top_p)
  assert 5 < keep.sum() < cfg.vocab_size - 5   # the test needs a nucleus that excludes a lot
  assert counts[~keep].sum() == 0, "top-p let an excluded token through"
  expected = p * keep / p[keep].sum()
  assert stats.chisquare(counts[keep], expected[keep] * draws).pvalue > 1e-3
  # The same test has the power to reject a wrong distribution (no temperature).
  wrong = _probs(logits, 1.0) * keep
  assert stats.chisquare(counts[keep], wrong[keep] / wrong.sum() * draws).pvalue < 1e-6
  np.testing.assert_allclose(np.asarray(ro.logprobs_bt)[:, 0], np.log(expected[toks]), atol=1e-5)


def test_sampled_frequencies_match_top_k_then_top_p():
  cfg, params, _ = _load("llama")
  t, k, top_p, draws = 1.5, 6, 0.9, 6000
  scfg = SamplingConfig(temperature=t, top_k=k, top_p=top_p, max_new_tokens=1, n=draws, stop_token_ids=())
  counts, logits, _, _ = _first_token_counts(params, cfg, scfg, seed=4)
  p = _probs(logits, t)
  top = np.zeros_like(p, bool)
  top[np.argsort(-p)[:k]] = True
  renorm = p * top / p[top].sum()
  keep = top & _nucleus(renorm, top_p)
  assert 1 < keep.sum() <= k
  assert counts[~keep].sum() == 0
  expected = renorm * keep / renorm[keep].sum()
  assert stats.chisquare(counts[keep], expected[keep] * draws).pvalue > 1e-3


def test_nucleus_and_top_k_thresholds_equal_sort_based_rules():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(64, 500)) * rng.uniform(0.5, 6, size=(64, 1))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs = (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
  for top_p in (0.05, 0.5, 0.9, 0.999):
    got = np.asarray(jax.jit(sampling._keep_top_p, static_argnums=1)(probs, top_p))
    want = np.stack([_nucleus(row.astype(np.float64), top_p) for row in probs])
    # float32 sums may put a row whose mass sits within 1e-6 of top_p on the other side
    assert (got != want).any(axis=-1).sum() <= 1
  for k in (1, 7, 499):
    got = np.asarray(jax.jit(sampling._keep_top_k, static_argnums=1)(probs, k))
    assert (got.sum(-1) == k).all()
    np.testing.assert_array_equal(got, probs >= np.sort(probs, -1)[:, -k][:, None])


# ------------------------------------------------------------------------------------------- groups, seeds, stops


def _spy_forward_shapes(monkeypatch) -> list:
  """Records the token shape of every `model.forward` call (each is one traced prefill)."""
  shapes = []
  real_forward = model.forward

  def spy(params, tokens_bt, *a, **kw):
    shapes.append(tokens_bt.shape)
    return real_forward(params, tokens_bt, *a, **kw)

  monkeypatch.setattr(model, "forward", spy)
  return shapes


def test_groups_share_one_prefill_and_rows_are_reproducible(monkeypatch):
  cfg, params, _ = _load("qwen2")
  batches = _spy_forward_shapes(monkeypatch)
  scfg = SamplingConfig(max_new_tokens=7, n=3, stop_token_ids=())
  ro = _sample(params, cfg, scfg, seed=5)
  assert batches == [(2, 16)], "expected one prefill over the 2 prompts, not one per rollout"
  monkeypatch.undo()
  np.testing.assert_array_equal(ro.group_b, [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(np.asarray(ro.prompt_ids)[:3, :3], [PROMPTS[0]] * 3)
  np.testing.assert_array_equal(ro.prompt_lengths_b, [3, 3, 3, 7, 7, 7])
  tokens = np.asarray(ro.tokens_bt)
  assert len({tuple(row) for row in tokens}) == 6, "rollouts of a group should differ"
  np.testing.assert_array_equal(np.asarray(_sample(params, cfg, scfg, seed=5).tokens_bt), tokens)
  assert not np.array_equal(np.asarray(_sample(params, cfg, scfg, seed=6).tokens_bt), tokens)
  # A row's draws depend on (seed, row id) only: dropping the second prompt leaves rows 0..2 alone.
  alone = _sample(params, cfg, scfg, prompts=PROMPTS[:1], seed=5)
  np.testing.assert_array_equal(np.asarray(alone.tokens_bt), tokens[:3])


def test_length_sorted_prefill_groups_equal_one_padded_prefill(monkeypatch):
  cfg, params, _ = _load("qwen2")
  rng = np.random.default_rng(1)
  lengths = [40, 3, 20, 5, 33, 9, 2, 17]
  prompts = [rng.integers(3, 90, size=k).tolist() for k in lengths]
  scfg = SamplingConfig(temperature=1.1, top_p=0.95, max_new_tokens=4, n=2, stop_token_ids=())
  one = _sample(params, cfg, scfg.replace(prefill_groups=1), prompts=prompts, seed=8)
  widths = _spy_forward_shapes(monkeypatch)
  grouped = _sample(params, cfg, scfg.replace(prefill_groups=4), prompts=prompts, seed=8)
  monkeypatch.undo()
  # sorted lengths 2 3 | 5 9 | 17 20 | 33 40 -> buckets 16, 16, 32, 48 (one jit per width)
  assert sorted(set(widths)) == [(2, 16), (2, 32), (2, 48)]
  for name in ("tokens_bt", "lengths_b", "prompt_ids", "prompt_lengths_b", "group_b"):
    np.testing.assert_array_equal(np.asarray(getattr(grouped, name)), np.asarray(getattr(one, name)))
  np.testing.assert_allclose(np.asarray(grouped.logprobs_bt), np.asarray(one.logprobs_bt), atol=1e-5)


def _spy_cache_growth(monkeypatch) -> list:
  """Records the slot count of every cache growth."""
  slots = []
  real_grow = sampling._grow_jit

  def spy(kv, new_slots, *a, **kw):
    slots.append(new_slots)
    return real_grow(kv, new_slots, *a, **kw)

  monkeypatch.setattr(sampling, "_grow_jit", spy)
  return slots


def test_growing_cache_samples_what_one_full_cache_does(monkeypatch):
  cfg, params, _ = _load("qwen3")
  scfg = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=11, n=2, stop_token_ids=())
  assert scfg.replace(cache_grow_from=2).cache_capacities == (2, 4, 8, 11)
  assert scfg.replace(cache_grow_from=0).cache_capacities == (11,)
  assert scfg.replace(cache_grow_from=16).cache_capacities == (11,)
  full = _sample(params, cfg, scfg.replace(cache_grow_from=0), seed=3)
  grown_to = _spy_cache_growth(monkeypatch)
  grown = _sample(params, cfg, scfg.replace(cache_grow_from=2), seed=3)
  assert grown_to == [16 + 4, 16 + 8, 16 + 11]   # prompt bucket 16, then room for 4, 8, 11 new tokens
  for name in ("tokens_bt", "lengths_b", "finished_b", "group_b"):
    np.testing.assert_array_equal(np.asarray(getattr(grown, name)), np.asarray(getattr(full, name)))
  np.testing.assert_allclose(np.asarray(grown.logprobs_bt), np.asarray(full.logprobs_bt), atol=1e-5)
  np.testing.assert_allclose(np.asarray(grown.policy_logprobs_bt), np.asarray(full.policy_logprobs_bt),
                             atol=1e-5)


def test_cache_stops_growing_once_every_row_has_stopped(monkeypatch):
  cfg, params, g = _load("qwen3")
  greedy = g["greedy"][:, 6:]
  stops = (int(greedy[0, 2]), int(greedy[1, 2]))      # both rows end within their first 3 tokens
  scfg = SamplingConfig(greedy=True, max_new_tokens=10, stop_token_ids=stops, cache_grow_from=4)
  grown_to = _spy_cache_growth(monkeypatch)
  ro = sampling.sample(params, g["prompt"], np.full(2, 6), jax.random.key(0), cfg, scfg)
  assert grown_to == []
  assert np.asarray(ro.finished_b).all() and (np.asarray(ro.lengths_b) <= 3).all()
  # A row still running at the end of the room grows the cache: stop only on row 0's token.
  ro = sampling.sample(params, g["prompt"], np.full(2, 6), jax.random.key(0), cfg,
                       scfg.replace(stop_token_ids=(int(greedy[0, 2]),)))
  n1 = int(np.asarray(ro.lengths_b)[1])
  np.testing.assert_array_equal(np.asarray(ro.tokens_bt)[1, :n1], greedy[1, :n1])
  assert grown_to == ([16 + 8, 16 + 10] if n1 > 8 else [16 + 8]) and n1 > 4


def test_stop_tokens_end_rows_and_pad_the_rest():
  cfg, params, g = _load("qwen3")
  greedy = g["greedy"][:, 6:]
  stop = int(greedy[0, 3])
  scfg = SamplingConfig(greedy=True, max_new_tokens=10, stop_token_ids=(stop,), pad_id=0)
  ro = sampling.sample(params, g["prompt"], np.full(2, 6), jax.random.key(0), cfg, scfg)
  tokens, lengths = np.asarray(ro.tokens_bt), np.asarray(ro.lengths_b)
  for r in range(2):
    hits = np.flatnonzero(greedy[r] == stop)
    n = int(hits[0]) + 1 if hits.size else 10
    assert lengths[r] == n and bool(ro.finished_b[r]) == bool(hits.size)
    np.testing.assert_array_equal(tokens[r, :n], greedy[r, :n])
    assert (tokens[r, n:] == 0).all() and (np.asarray(ro.policy_logprobs_bt)[r, n:] == 0).all()
  assert lengths[0] == 4


def test_stop_strings_truncate_at_the_first_token_that_completes_one():
  ro = sampling.Rollouts(
      prompt_ids=jnp.zeros((2, 2), jnp.int32), prompt_lengths_b=jnp.array([1, 1]),
      tokens_bt=jnp.array([[1, 2, 3, 4, 5], [5, 6, 7, 8, 0]]), lengths_b=jnp.array([5, 4]),
      finished_b=jnp.array([False, True]), logprobs_bt=-jnp.ones((2, 5)), policy_logprobs_bt=-jnp.ones((2, 5)),
      group_b=jnp.array([0, 1]))
  decode = lambda ids: "".join("_ab cdefg"[i] for i in ids)  # noqa: E731  1->a 2->b 3->' ' 4->c ...
  out = sampling.apply_stop_strings(ro, decode, ("b c", "zz"))
  np.testing.assert_array_equal(out.lengths_b, [4, 4])
  np.testing.assert_array_equal(out.finished_b, [True, True])
  np.testing.assert_array_equal(out.tokens_bt, [[1, 2, 3, 4, 0], [5, 6, 7, 8, 0]])
  np.testing.assert_array_equal(out.logprobs_bt[0], [-1, -1, -1, -1, 0])


def test_train_batch_concatenates_prompt_and_response():
  ro = sampling.Rollouts(
      prompt_ids=jnp.array([[5, 6, 0], [7, 0, 0]]), prompt_lengths_b=jnp.array([2, 1]),
      tokens_bt=jnp.array([[8, 9, 0], [10, 11, 12]]), lengths_b=jnp.array([2, 3]),
      finished_b=jnp.array([True, False]), logprobs_bt=jnp.array([[-.1, -.2, 0], [-.3, -.4, -.5]]),
      policy_logprobs_bt=jnp.zeros((2, 3)), group_b=jnp.array([0, 1]))
  b = sampling.train_batch(ro)
  np.testing.assert_array_equal(b["tokens_bt"], [[5, 6, 8, 9, 0, 0], [7, 10, 11, 12, 0, 0]])
  np.testing.assert_array_equal(b["valid_bt"], [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(b["response_mask_bt"], [[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 0, 0]])
  np.testing.assert_allclose(b["old_logprobs_bt"], [[0, 0, -.1, -.2, 0, 0], [0, -.3, -.4, -.5, 0, 0]])
  np.testing.assert_array_equal(sampling.response_mask(ro), [[1, 1, 0], [1, 1, 1]])


# ------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("shape,axes", [((8,), ("data",)), ((2, 4), ("data", "tensor"))])
def test_sharded_equals_unsharded_token_for_token(shape, axes):
  cfg, params, _ = _load("qwen3")
  prompts = PROMPTS + [[3, 4]]      # 3 prompts x n=2: the prompt batch is padded to the data axis
  scfg = SamplingConfig(temperature=0.9, top_p=0.9, max_new_tokens=6, n=2, stop_token_ids=())
  ref = _sample(params, cfg, scfg, prompts=prompts, seed=7)
  mesh = jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * len(axes))
  got = _sample(params, cfg, scfg.replace(cache_grow_from=2), prompts=prompts, seed=7, mesh=mesh)
  assert got.tokens_bt.shape == (6, 6)
  np.testing.assert_array_equal(np.asarray(got.tokens_bt), np.asarray(ref.tokens_bt))
  np.testing.assert_array_equal(np.asarray(got.lengths_b), np.asarray(ref.lengths_b))
  np.testing.assert_allclose(np.asarray(got.logprobs_bt), np.asarray(ref.logprobs_bt), atol=1e-5)


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw,field", [({"n": 0}, "n="), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                      ({"temperature": -0.5}, "temperature"), ({"top_k": -1}, "top_k"),
                                      ({"max_new_tokens": 0}, "max_new_tokens"),
                                      ({"cache_grow_from": -1}, "cache_grow_from")])
def test_bad_sampling_config_names_the_field(kw, field):
  with pytest.raises(ValueError, match=field):
    SamplingConfig(**kw)


def test_bad_prompts_raise_clear_errors_or_truncate_when_asked():
  cfg, params, _ = _load("llama")    # max_position_embeddings = 128
  scfg = SamplingConfig(greedy=True, max_new_tokens=8, stop_token_ids=())
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    sampling.sample(params, np.ones((2, 4), np.int32), np.array([3, 0]), jax.random.key(0), cfg, scfg)
  with pytest.raises(ValueError, match="outside the model's vocab"):
    sampling.sample(params, np.array([[3, 500]]), np.array([2]), jax.random.key(0), cfg, scfg)
  long = np.random.default_rng(0).integers(3, 90, size=130).tolist()
  with pytest.raises(ValueError, match="max_position_embeddings=128.*truncate_prompt"):
    _sample(params, cfg, scfg, prompts=[long])
  cut = _sample(params, cfg, scfg.replace(truncate_prompt=True), prompts=[long])
  np.testing.assert_array_equal(cut.prompt_lengths_b, [120])
  direct = _sample(params, cfg, scfg, prompts=[long[-120:]])
  np.testing.assert_array_equal(np.asarray(cut.tokens_bt), np.asarray(direct.tokens_bt))
