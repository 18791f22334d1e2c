"""Export a run's student as an HF directory: `python -m ropd_jax.export --workdir=RUN --out=DIR [--step=N]`.

The directory (config.json, sharded safetensors, tokenizer files) loads unchanged in transformers'
`AutoModelForCausalLM.from_pretrained` and in vLLM.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import jax
import ml_collections
from absl import app, flags, logging

from ropd_jax import checkpoint as ckpt_lib
from ropd_jax import model as model_lib
from ropd_jax import policy as policy_lib
from ropd_jax import rl
from ropd_jax import weights



def define_flags():
  """CLI flags, defined only when run as a program (so the module imports cleanly beside others)."""
  flags.DEFINE_string("workdir", None, "The training run's folder.")
  flags.DEFINE_string("out", None, "Output HF directory.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Dtype of the exported weights.")


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: --workdir must be a folder written by ropd_jax.train.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_params(workdir: str, step: int | None = None):
  """(config, ModelConfig, params) of a run's checkpoint, on the local devices."""
  cfg = load_run_config(workdir)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints yet.")
  meta = ckpt._manager.restore(step, args=ckpt_lib.ocp.args.Composite(  # noqa: SLF001
      meta=ckpt_lib.ocp.args.JsonRestore()))["meta"]
  model_cfg = model_lib.ModelConfig.from_hf(meta["model_config"], param_dtype=cfg.model.param_dtype,
                                            dtype=cfg.model.dtype)
  optimizer = rl.make_optimizer(cfg.rl, cfg.total_steps)
  abstract = jax.eval_shape(lambda p: rl.TrainState(p, optimizer.init(p), jax.numpy.zeros((), "int32")),
                            weights.abstract_params(model_cfg))
  state, _, _ = ckpt.restore(abstract, step)
  ckpt.close()
  return cfg, model_cfg, state.params


def export(workdir: str, out: str, step: int | None = None, dtype: str = "bfloat16") -> str:
  cfg, model_cfg, params = restore_params(workdir, step)
  tok = policy_lib.load_tokenizer(cfg.model)
  with tempfile.TemporaryDirectory() as tok_dir:
    tok.save(tok_dir)
    weights.save_hf(params, model_cfg, out, tokenizer_dir=tok_dir, dtype=dtype)
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  if not f.workdir or not f.out:
    raise app.UsageError("--workdir and --out are required.")
  try:
    out = export(f.workdir, f.out, f.step, f.dtype)
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {out}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
