"""The judge against a real HTTP server on 127.0.0.1 speaking the Gemini REST and OpenAI chat APIs:
wire format, fault injection with exact accounting, limits measured by the server, and the cache."""
import collections
import time

import pytest

from judge_server import CLIENT_KIND, FaultPlan, JudgeServer
from ropd_jax import rewards
from ropd_jax.judge import client, config

POINTS = [5, 5, 4, 5, 3]
BITS = ["10111", "10000", "11111", "00000", "01010", "11100", "00111", "10101"]


def expected_reward(bits):
  return sum(p for p, c in zip(POINTS, bits) if c == "1") / sum(POINTS)


def http_cfg(srv, **top):
  cfg = config.judge_config()
  cfg.cache_dir = ""
  cfg.rubricator.backend, cfg.rubricator.base_url, cfg.rubricator.model = "gemini", srv.url, "gemini-2.5-flash"
  cfg.verifier.backend, cfg.verifier.base_url, cfg.verifier.model = "openai", srv.url + "/v1", "local-judge"
  for key, value in top.items():
    if "__" in key:
      role, field = key.split("__")
      for r in ([role] if role != "both" else ["rubricator", "verifier"]):
        cfg[r][field] = value
    else:
      cfg[key] = value
  return cfg


def groups(n, tag=lambda i: ""):
  return [rewards.Group(f"Question {i}: how many? {tag(i)}", ["teacher VERDICT:11111", "teacher two VERDICT:11110"],
                        [f"student {i}.{j} VERDICT:{b}" for j, b in enumerate(BITS[:4])]) for i in range(n)]


@pytest.fixture(autouse=True)
def keys(monkeypatch):
  monkeypatch.setenv("GEMINI_API_KEY", "test-key")
  monkeypatch.setenv("OPENAI_API_KEY", "test-key")


def test_gemini_and_openai_wire_format(monkeypatch):
  with JudgeServer() as srv:
    cfg = http_cfg(srv)
    cfg.rubricator.base_url = ""                                   # falls back to the SDK's own env variable
    monkeypatch.setenv("GOOGLE_GEMINI_BASE_URL", srv.url)
    config.validate_judge_config(cfg, ("rubricator", "verifier"))
    (r,) = rewards.score_groups_sync(groups(1), client.Judge(cfg))
    assert r.error is None
    assert r.student_rewards == pytest.approx([expected_reward(b) for b in BITS[:4]])
    gem, oai = srv.records
    assert (gem.api, gem.stage, gem.model) == ("gemini", "rubricator", "gemini-2.5-flash")
    gen = gem.body["generationConfig"]
    assert gen["responseMimeType"] == "application/json" and gen["responseJsonSchema"]["required"][0] == "schema_version"
    assert gen["maxOutputTokens"] == 8192 and gen["temperature"] == 0.0
    assert "additionalProperties" not in str(gen["responseJsonSchema"])  # not every Gemini endpoint takes it
    assert (oai.api, oai.stage, oai.model) == ("openai", "verifier", "local-judge")
    assert oai.body["response_format"]["type"] == "json_schema"
    assert oai.body["response_format"]["json_schema"]["schema"]["required"] == ["schema_version", "answers"]
    assert oai.body["max_tokens"] == 4096
    assert r.usage["total"]["input_tokens"] > 0 and r.usage["rubricator"]["cost_usd"] > 0
    assert r.usage["verifier"]["unpriced_requests"] == 1            # "local-judge" is not in the price table


def test_fault_injection_64_groups_exact_accounting():
  persist = {5: "[[PERSIST:verifier:wrong_length]]", 17: "[[PERSIST:rubricator:server_error]]",
             40: "[[PERSIST:verifier:nan_score]]"}
  plan = FaultPlan(rate=0.3, seed=7, retry_after="1", hang_s=10.0)
  with JudgeServer(faults=plan) as srv:
    cfg = http_cfg(srv, both__timeout_s=1.5, both__retries=3, both__quality_retries=2, backoff_initial_s=0.01,
                   backoff_max_s=0.05, retry_after_cap_s=0.05, breaker_consecutive=10**6, breaker_window=10**6)
    judge = client.Judge(cfg)
    t0 = time.monotonic()
    results = rewards.score_groups_sync(groups(64, lambda i: persist.get(i, "")), judge)
    elapsed = time.monotonic() - t0
  assert len(results) == 64 and elapsed < 60                        # every call had a deadline
  failed = {i: (r.error["stage"], r.error["type"]) for i, r in enumerate(results) if r.error}
  assert failed == {5: ("verifier", "validation_error"), 17: ("rubricator", "server_error"),
                    40: ("verifier", "validation_error")}
  for i, r in enumerate(results):
    if i not in failed:
      assert r.student_rewards == pytest.approx([expected_reward(b) for b in BITS[:4]])
  # The injected faults are exactly the errors the client saw, kind by kind.
  seen = collections.Counter()
  retries = 0
  for r in results:
    for stage in ("rubricator", "verifier"):
      seen.update(r.usage[stage]["errors"])
      retries += r.usage[stage]["retries"]
  want = collections.Counter()
  for kind, n in srv.injected.items():
    want[CLIENT_KIND[kind]] += n
  assert seen == want
  transient = sum(srv.injected.values()) - (4 + 3 + 3)             # persistent: 1 + 3 transport, 2 x (1 + 2) quality
  assert transient > 20 and set(srv.injected) == set(CLIENT_KIND)   # every fault kind occurred
  # Every injected fault was retried except the last attempt of each of the 3 persistent calls.
  assert retries == sum(srv.injected.values()) - 3
  assert len(srv.records) == 64 * 2 - 1 + retries                    # group 17 never reached the verifier


class OneRateLimit(FaultPlan):
  def choose(self, stage, key, attempt, prompt):
    return "rate_limited" if attempt == 0 and stage == "rubricator" else None


@pytest.mark.parametrize("cap, lo, hi", [(5.0, 0.4, 2.0), (0.05, 0.0, 0.3)])
def test_retry_after_honoured_up_to_cap(cap, lo, hi):
  with JudgeServer(faults=OneRateLimit(retry_after="0.4")) as srv:
    cfg = http_cfg(srv, retry_after_cap_s=cap, backoff_initial_s=5.0)   # backoff would be >= 2.5 s if used
    (r,) = rewards.score_groups_sync(groups(1), client.Judge(cfg))
    first, second = srv.records[0], srv.records[1]
  assert r.error is None and r.usage["rubricator"]["errors"] == {"rate_limited": 1}
  assert lo <= second.start - first.end < hi


def test_concurrency_limit_measured_by_server():
  with JudgeServer(latency=0.3) as srv:
    cfg = http_cfg(srv, both__concurrency=3)
    cfg.verifier.backend, cfg.verifier.base_url = "gemini", srv.url  # same endpoint + model: one shared gate
    cfg.verifier.model = cfg.rubricator.model
    rewards.score_groups_sync(groups(8), client.Judge(cfg))
  assert srv.max_in_flight == 3


def test_requests_per_minute_measured_by_server():
  rpm = 600                                                          # burst 10 (1 s of quota), then 9.83/s
  with JudgeServer() as srv:
    cfg = http_cfg(srv, both__rpm=rpm, limits_burst_s=1.0)
    cfg.verifier.backend, cfg.verifier.base_url, cfg.verifier.model = "gemini", srv.url, cfg.rubricator.model
    rewards.score_groups_sync(groups(15), client.Judge(cfg))
    starts = sorted(r.start for r in srv.records)
  assert len(starts) == 30
  burst = rpm / 60
  rate = (rpm - burst) / 60
  for i in range(len(starts)):
    for j in range(i + 1, len(starts)):
      assert j - i + 1 <= burst + rate * (starts[j] - starts[i]) + 2  # +2: timer and network jitter
  assert starts[-1] - starts[0] >= (30 - burst) / rate * 0.9


def test_cache_second_run_makes_no_calls_and_matches(tmp_path):
  with JudgeServer() as srv:
    cfg = http_cfg(srv, cache_dir=str(tmp_path / "cache"))
    first = rewards.score_groups_sync(groups(6), client.Judge(cfg))
    calls = len(srv.records)
    second = rewards.score_groups_sync(groups(6), client.Judge(cfg))
    assert len(srv.records) == calls == 12
  for a, b in zip(first, second):
    da, db = a.to_dict(), b.to_dict()
    ua, ub = da.pop("usage"), db.pop("usage")
    assert da == db
    assert ua["total"]["requests"] == 2 and ub["total"]["requests"] == 0 and ub["total"]["cache_hits"] == 2
