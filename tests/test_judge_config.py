"""Judge config defaults and validation (fails before any compute, naming the field and env var)."""
import ml_collections
import pytest

from ropd_jax.judge import config


@pytest.fixture
def no_keys(monkeypatch):
  for env in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL", "MY_KEY"):
    monkeypatch.delenv(env, raising=False)


def test_defaults_are_offline_and_sane(no_keys):
  cfg = config.judge_config()
  assert [cfg[r].backend for r in config.ROLES] == ["offline"] * 3
  for role in config.ROLES:
    assert cfg[role].retries >= 3 and cfg[role].quality_retries >= 2 and cfg[role].timeout_s > 0
  assert cfg.teacher.temperature > 0 and cfg.verifier_first
  config.validate_judge_config(cfg)                                   # no key needed offline
  idx = config.teacher_index_config()
  assert idx.m == 4 and idx.source == "teacher"
  full = ml_collections.ConfigDict({"judge": cfg})
  config.validate_judge_config(full)                                  # whole config accepted too


def test_gemini_without_key_names_role_and_env(no_keys, monkeypatch):
  cfg = config.judge_config()
  cfg.verifier.backend = "gemini"
  with pytest.raises(config.JudgeConfigError, match=r"judge\.verifier .*GEMINI_API_KEY / GOOGLE_API_KEY"):
    config.validate_judge_config(cfg)
  config.validate_judge_config(cfg, roles=("teacher",))             # roles not used are not checked
  monkeypatch.setenv("GOOGLE_API_KEY", "k")
  config.validate_judge_config(cfg)
  cfg.verifier.api_key_env = "MY_KEY"
  with pytest.raises(config.JudgeConfigError, match="MY_KEY"):
    config.validate_judge_config(cfg)
  cfg.verifier.vertexai = True                                       # Vertex AI uses ADC, no key
  config.validate_judge_config(cfg)


@pytest.mark.parametrize("field, value, match", [
    ("rubricator.backend", "claude", "choose one of"),
    ("rubricator.concurrency", 0, r"judge\.rubricator\.concurrency=0 must be > 0"),
    ("verifier.retries", -1, "must be >= 0"),
    ("max_answer_chars", 10, "too small"),
])
def test_bad_values(no_keys, field, value, match):
  cfg = config.judge_config()
  node, leaf = (cfg[field.split(".")[0]], field.split(".")[1]) if "." in field else (cfg, field)
  node[leaf] = value
  with pytest.raises(config.JudgeConfigError, match=match):
    config.validate_judge_config(cfg)


def test_openai_needs_url_and_offline_verifier_needs_offline_rubrics(no_keys, monkeypatch):
  cfg = config.judge_config()
  cfg.rubricator.backend = "openai"
  with pytest.raises(config.JudgeConfigError, match="OPENAI_BASE_URL"):
    config.validate_judge_config(cfg, roles=("rubricator",))
  monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
  config.validate_judge_config(cfg, roles=("rubricator",))
  with pytest.raises(config.JudgeConfigError, match="offline rubricator"):
    config.validate_judge_config(cfg)


def test_price_lookup_longest_prefix():
  prices = config.judge_config().prices
  assert config.price_per_mtok(prices, "gemini-2.5-flash-lite-preview") == (0.10, 0.40)
  assert config.price_per_mtok(prices, "gemini-2.5-flash") == (0.30, 2.50)
  assert config.price_per_mtok(prices, "offline-judge-v1") == (0.0, 0.0)
  assert config.price_per_mtok(prices, "my-local-model") is None
