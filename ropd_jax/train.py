"""ROPD training: `python -m ropd_jax.train --config=configs/demo.py [--workdir=DIR] [--config.x.y=...]`.

One step is the recipe of the method:
  prompts -> n rollouts each (jitted sampler) -> rubric + blind verification (async judge) -> group
  advantages -> PPO-clip update (jitted, donated state) -> metrics, artifacts -> checkpoint.
With `async_judge`, the judge scores step t while the sampler draws step t+1; the update of step t then
runs one optimizer step late, and the PPO ratio against the rollout log-probs corrects that staleness.
"""
from __future__ import annotations

import json
import os
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from ropd_jax import checkpoint as ckpt_lib
from ropd_jax import data as data_lib
from ropd_jax import groups as groups_lib
from ropd_jax import hosts
from ropd_jax import metrics as metrics_lib
from ropd_jax import model as model_lib
from ropd_jax import policy as policy_lib
from ropd_jax import rewards as rewards_lib
from ropd_jax import rl
from ropd_jax import sampling
from ropd_jax import sharding as sharding_lib
from ropd_jax import teacher_index as teacher_index_lib
from ropd_jax.judge import client as judge_client
from ropd_jax.judge import config as judge_config_lib



def define_flags():
  """CLI flags, defined only when run as a program (so the module imports cleanly beside others)."""
  config_flags.DEFINE_config_file("config", None, "Training config file (get_config()).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Run folder (checkpoints, metrics, artifacts, judge cache); default "
                      "runs/<config name>. An existing run in it is resumed.")
  # Multi-host off Cloud TPU (GPU clusters, several processes on one machine); TPU pods need none of these.
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (else $JAX_COORDINATOR_ADDRESS).")
  flags.DEFINE_integer("num_processes", None, "Processes in the run (else $JAX_NUM_PROCESSES).")
  flags.DEFINE_integer("process_id", None, "This process, 0..num_processes-1 (else $JAX_PROCESS_ID).")


class ConfigError(ValueError):
  """A setting that cannot work; raised before any compute, naming the field and the fix."""


class GateStop(RuntimeError):
  """The quality gate stopped the run (on_gate=stop); a checkpoint and a report were written."""


# -- before any compute --------------------------------------------------------------------------------------
def preflight(cfg, workdir: str):
  """Every check that does not need the model, so bad input fails in seconds and loses nothing.

  Returns the teacher index (None for reward=correctness), checked against the data and the config.
  """
  for key in ("total_steps", "seed", "checkpoint_every"):
    if key not in cfg:
      raise ConfigError(f"config has no top-level `{key}`; start from configs/common.py base_config().")
  if cfg.total_steps < 1 or cfg.checkpoint_every < 1:
    raise ConfigError(f"total_steps={cfg.total_steps} and checkpoint_every={cfg.checkpoint_every} must be >= 1.")
  if cfg.sampling.n < 2:
    raise ConfigError(f"sampling.n={cfg.sampling.n}: GRPO needs >= 2 rollouts per prompt.")
  rows = cfg.data.prompts_per_step * cfg.sampling.n
  if rows % cfg.rl.num_minibatches:
    raise ConfigError(f"data.prompts_per_step x sampling.n = {rows} rollouts do not split into "
                      f"rl.num_minibatches={cfg.rl.num_minibatches}; change one of them.")
  sampling_config(cfg)
  if cfg.on_gate not in ("skip", "stop"):
    raise ConfigError(f"on_gate={cfg.on_gate!r}; choose skip or stop.")
  if cfg.reward not in ("ropd", "correctness"):
    raise ConfigError(f"reward={cfg.reward!r}; choose ropd (rubric reward) or correctness (RLVR control).")
  policy_lib.check_model_config(cfg.model)
  if cfg.reward == "ropd":
    judge_config_lib.validate_judge_config(cfg, roles=("rubricator", "verifier"))
  if not ckpt_lib.is_writable(workdir):
    raise ConfigError(f"workdir {workdir!r} is not writable; pass --workdir=<a folder you can write>.")
  return load_teacher_index(cfg, data_lib.read_rows(data_lib.build_source(cfg.data)))


def sampling_config(cfg, stop_token_ids=None, pad_id: int = 0) -> sampling.SamplingConfig:
  """The sampler's settings from `cfg.sampling`; a bad value is a ConfigError naming its config field."""
  c = cfg.sampling
  try:
    return sampling.SamplingConfig(
        temperature=c.temperature, top_p=c.top_p, top_k=c.top_k, max_new_tokens=c.max_new_tokens, n=c.n,
        cache_grow_from=c.cache_grow_from, stop_token_ids=stop_token_ids,
        stop_strings=tuple(c.stop_strings), pad_id=pad_id)
  except ValueError as e:   # SamplingConfig names the field; say where it lives in the config
    raise ConfigError(f"config.sampling: {e}") from None


def load_teacher_index(cfg, loader_rows):
  """The m teacher answers per prompt: an index file built by the teacher, or the data's references."""
  if cfg.reward != "ropd":
    return None
  if cfg.teacher_index.source == "references":
    return teacher_index_lib.import_references(loader_rows)
  index = teacher_index_lib.load(cfg.teacher_index.path, cfg)
  missing = [r for r in loader_rows if r["prompt"] not in index]
  if missing:
    raise teacher_index_lib.TeacherIndexError(
        f"teacher index {cfg.teacher_index.path} has no answers for {len(missing)} of {len(loader_rows)} "
        f"training prompts (e.g. id {missing[0].get('id')}); it was built for other data. Rebuild it: "
        "python -m ropd_jax.teacher_index build --config=...")
  return index


# -- the run ---------------------------------------------------------------------------------------------------
class Run:
  """Everything a step needs, built once."""

  def __init__(self, cfg, workdir: str, index):
    self.cfg, self.workdir, self.index = cfg, workdir, index
    self.mesh = sharding_lib.make_mesh(cfg.mesh)
    # This host's block of every step's prompts (all of them on one host); the judge scores each host's
    # own groups, so judge throughput grows with the hosts and no rollout text crosses hosts before it.
    self.block, self.blocks = hosts.batch_block(self.mesh)
    self.tok, self.model_cfg, params = policy_lib.load_policy(cfg.model, self.mesh, cfg.mesh, cfg.seed)
    self.scfg = sampling_config(cfg, stop_token_ids=tuple(self.model_cfg.eos_token_ids),
                                pad_id=self.tok.pad_id or 0)
    # Logprobs at the sampling temperature (the PPO old policy's), logits only over the response width.
    rl_cfg = dict(cfg.rl.to_dict(), logprob_temperature=cfg.sampling.temperature or 1.0,
                  logits_window=cfg.sampling.max_new_tokens)
    self.optimizer = rl.make_optimizer(cfg.rl, cfg.total_steps)  # schedules count training steps
    self.param_sh = sharding_lib.param_shardings_from_config(params, self.mesh, cfg.mesh)
    self.cache_spec = sharding_lib.kv_cache_spec(self.mesh, self.model_cfg.num_kv_heads, cfg.mesh.rules or ())
    state_sh = rl.train_state_shardings(params, self.optimizer, self.mesh, self.param_sh)
    self.state = rl.init_train_state(params, self.optimizer, state_sh)
    self.train_step = rl.make_train_step(self.model_cfg, rl_cfg, self.optimizer, self.mesh, self.param_sh)
    self.ref_logprobs = None
    if cfg.rl.kl_coef > 0:  # a frozen copy of the starting policy
      ref_params = jax.tree.map(lambda x: x.copy(), params)
      self.ref_logprobs = jax.jit(lambda t, v: model_lib.token_logprobs(
          ref_params, t, self.model_cfg, valid_bt=v, temperature=rl_cfg["logprob_temperature"])[0])
    del params
    self.loader = data_lib.make_loader(cfg.data, self.format_prompt, lambda text: len(self.tok.encode(text)),
                                       shard_index=self.block, shard_count=self.blocks)
    self.judge = judge_client.Judge(cfg.judge, workdir=workdir) if cfg.reward == "ropd" else None
    self.runner = rewards_lib.JudgeRunner(self.judge) if self.judge else None
    self.ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints,
                                      async_save=cfg.async_checkpoint)
    self.writer = metrics_lib.MetricWriter(workdir, tensorboard=cfg.tensorboard,
                                           wandb_project=cfg.wandb_project or None, config=cfg.to_dict())

  def format_prompt(self, row: dict) -> str:
    messages = []
    if self.cfg.chat.system_prompt:
      messages.append({"role": "system", "content": self.cfg.chat.system_prompt})
    messages.append({"role": "user", "content": groups_lib.question_of(row, self.cfg.chat.instruction)})
    return self.tok.apply_chat(messages, add_generation_prompt=True,
                               enable_thinking=self.cfg.chat.enable_thinking)

  # -- sample ----------------------------------------------------------------------------------------
  def sample(self, step: int, rows: list[dict]) -> groups_lib.StepRollouts:
    t0 = time.perf_counter()
    ids_bt, lengths_b = sampling.pad_prompts([self.tok.encode(r["text"]) for r in rows], self.scfg)
    rng = jax.random.fold_in(jax.random.key(self.cfg.seed), step)  # resumable: a function of the step
    ro = sampling.sample(self.state.params, ids_bt, lengths_b, rng, self.model_cfg, self.scfg, self.mesh,
                         replicate_weights=self.cfg.sampling.replicate_weights, cache_spec=self.cache_spec)
    ro = jax.tree.map(hosts.to_local, ro)   # this host's rows, on the host
    if self.scfg.stop_strings:
      ro = jax.tree.map(np.asarray, sampling.apply_stop_strings(ro, self.tok.decode, self.scfg.stop_strings))
    texts = [self.tok.decode(ro.tokens_bt[i, :ro.lengths_b[i]]) for i in range(len(ro.lengths_b))]
    truncated = (~ro.finished_b).tolist()
    return groups_lib.StepRollouts(step, rows, ro, texts, truncated, time.perf_counter() - t0)

  # -- score -----------------------------------------------------------------------------------------
  def submit(self, sr: groups_lib.StepRollouts):
    groups = groups_lib.make_groups(sr, self.scfg.n, self.index, self.cfg.chat.instruction)
    if self.cfg.reward == "correctness":
      return groups, None
    return groups, self.runner.submit(groups)

  def collect(self, groups, future) -> tuple[list, float]:
    t0 = time.perf_counter()
    if future is None:
      return groups_lib.correctness_results(groups), 0.0
    results = future.result()
    failed = [i for i, r in enumerate(results) if not r.ok]
    if self.over_gate(results):  # quality gate: one retry of the failures
      retried = self.runner.submit([groups[i] for i in failed]).result()
      results = groups_lib.merge_retry(results, retried, failed)
    return results, time.perf_counter() - t0

  def over_gate(self, results, local: bool = True) -> bool:
    """Judge failures above max_fallback_rate; `local` results are counted over every host, so all hosts
    take the same decision (one skipping the update while another ran it would hang the collectives)."""
    failed, total = sum(not r.ok for r in results), len(results)
    if local:
      failed, total = np.sum(hosts.gather((failed, total)), axis=0)
    return failed / total > self.cfg.max_fallback_rate

  def gather_step(self, sr: groups_lib.StepRollouts, groups, results, judge_s: float) -> dict:
    """Every host's groups, results and rollout stats, in global row order (for metrics and artifacts)."""
    mine = (self.block, groups, results, np.asarray(sr.rollouts.lengths_b), sr.truncated, sr.sample_s, judge_s)
    parts = sorted(hosts.gather(mine), key=lambda part: part[0])
    return {"groups": [g for p in parts for g in p[1]], "results": [r for p in parts for r in p[2]],
            "lengths": np.concatenate([p[3] for p in parts]), "truncated": [t for p in parts for t in p[4]],
            "sample_s": max(p[5] for p in parts), "judge_s": max(p[6] for p in parts)}

  # -- update ----------------------------------------------------------------------------------------
  def update(self, sr: groups_lib.StepRollouts, groups, future, data_state_before: dict) -> dict:
    results, judge_s = self.collect(groups, future)
    step = self.gather_step(sr, groups, results, judge_s)   # the whole step, on every host
    all_groups, all_results = step["groups"], step["results"]
    metrics: dict[str, Any] = {"time/sample_s": step["sample_s"], "time/judge_s": step["judge_s"]}
    metrics.update(groups_lib.judge_metrics(all_results))
    acc = groups_lib.accuracy(all_groups)
    if acc is not None:
      metrics["accuracy/mean"] = acc
    metrics["response_length/mean"] = float(step["lengths"].mean())
    metrics["response/truncated_fraction"] = float(np.mean(step["truncated"]))
    metrics["throughput/tokens_per_s"] = float(step["lengths"].sum()) / max(step["sample_s"], 1e-9)
    self.writer.write_artifacts(sr.step, groups_lib.artifact_rows(sr.step, all_groups, all_results))
    rows = len(sr.texts)   # this host's rows are block `self.block` of the step's
    batch, reward_stats = groups_lib.train_batch(
        sr.rollouts, all_results, self.scfg.n, self.cfg.rl.normalize_adv_std,
        longest=hosts.all_max(groups_lib.longest_sequence(sr.rollouts)),
        rows=slice(self.block * rows, (self.block + 1) * rows))
    metrics.update(reward_stats)
    if self.over_gate(all_results, local=False):  # still, after the retry
      metrics["gate/skipped"] = 1
      if self.cfg.on_gate == "stop":
        self._stop_at_gate(sr.step, all_results, data_state_before)
      return metrics
    t0 = time.perf_counter()
    batch = {k: hosts.to_global(v, sharding_lib.batch_sharding(self.mesh, v.ndim)) for k, v in batch.items()}
    if self.ref_logprobs is not None:
      batch["ref_logprobs_bt"] = self.ref_logprobs(batch["tokens_bt"], batch["valid_bt"])
    self.state, step_metrics = self.train_step(self.state, batch)
    step_metrics = jax.device_get(step_metrics)
    metrics["time/update_s"] = time.perf_counter() - t0
    metrics["gate/skipped"] = 0
    metrics.update({k: float(v) for k, v in step_metrics.items()})
    return metrics

  def _stop_at_gate(self, step: int, results, data_state_before: dict):
    """Save the state before this step (its prompts are redone on resume; cached judge calls are free)."""
    self.save(step, data_state_before, force=True)
    report = {"step": step, "max_fallback_rate": self.cfg.max_fallback_rate,
              "failed_groups": [{"group": i, **r.error} for i, r in enumerate(results) if not r.ok]}
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, "gate_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    raise GateStop(f"quality gate: {len(report['failed_groups'])}/{len(results)} groups failed at step "
                   f"{step} (> max_fallback_rate={self.cfg.max_fallback_rate}) after one retry; saved a "
                   f"checkpoint and {os.path.join(self.workdir, 'gate_report.json')}. Fix the judge and "
                   "rerun the same command to resume.")

  # -- checkpoint ------------------------------------------------------------------------------------
  def save(self, next_step: int, data_state: dict, force: bool = False):
    meta = {"next_step": next_step, "seed": self.cfg.seed, "model_config": self.model_cfg.to_hf()}
    self.ckpt.save(next_step, self.state, data_state, meta, force=force)

  def restore(self) -> int:
    """Resumes the latest checkpoint of the workdir, if any; returns the first step to run."""
    if self.ckpt.latest_step() is None:
      return 0
    self.state, data_state, meta = self.ckpt.restore(ckpt_lib.abstract_like(self.state))
    self.loader.set_state(data_state)
    if meta["seed"] != self.cfg.seed:
      raise ConfigError(f"{self.workdir} holds a run with seed={meta['seed']} but the config says "
                        f"seed={self.cfg.seed}; use a new --workdir or the same seed.")
    self.writer.truncate_after(meta["next_step"] - 1)
    return int(meta["next_step"])

  def close(self):
    self.ckpt.close()
    self.writer.close()
    if self.runner:
      self.runner.close()


def train(cfg, workdir: str) -> dict:
  """Runs (or resumes) the configured training; returns a summary of the run's metrics."""
  hosts.initialize_from_env()  # before any JAX compute: every host runs this same program
  index = preflight(cfg, workdir)
  if jax.process_index() == 0:  # what `export` and `evaluate` rebuild the run from
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(cfg.to_json_best_effort(indent=1, sort_keys=True))
  run = Run(cfg, workdir, index)
  guard = ckpt_lib.PreemptionGuard()
  try:
    start = run.restore()
    pending = None  # async judge: (rollouts, groups, future, data state) waiting for their update
    bar = _progress(cfg, start)
    for step in range(start, cfg.total_steps):
      data_state_before = run.loader.get_state()
      rows = next(run.loader)
      sr = run.sample(step, rows)
      groups, future = run.submit(sr)
      if cfg.async_judge:
        if pending is not None:
          _log(run, bar, pending[0].step, run.update(*pending))
        pending = (sr, groups, future, data_state_before)
      else:
        _log(run, bar, step, run.update(sr, groups, future, data_state_before))
      preempted = guard.stop
      if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.total_steps or preempted:
        if pending is not None:  # a checkpoint holds no half-done step
          _log(run, bar, pending[0].step, run.update(*pending))
          pending = None
        run.save(step + 1, run.loader.get_state(), force=preempted)
      if preempted:
        print(f"SIGTERM: saved a checkpoint after step {step}; rerun the same command to resume.",
              file=sys.stderr)
        break
    if bar is not None:
      bar.close()
  finally:
    guard.restore()
    run.close()
  return summarize(os.path.join(workdir, "metrics.jsonl"))


def _progress(cfg, start):
  if not cfg.progress_bar or jax.process_index() != 0:
    return None
  from tqdm import tqdm
  return tqdm(total=cfg.total_steps, initial=start, desc="ropd", unit="step", dynamic_ncols=True)


def _log(run: Run, bar, step: int, metrics: dict):
  run.writer.write(step, metrics)
  if bar is not None:
    bar.update(1)
    shown = {k.split("/")[0][:6]: metrics.get(k) for k in ("reward/mean", "accuracy/mean", "loss")}
    bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if isinstance(v, float)})


def summarize(metrics_path: str) -> dict:
  """Reward and accuracy of the first and last quarter of the run's steps."""
  if not os.path.exists(metrics_path):
    return {}
  rows = metrics_lib.read_metrics(metrics_path)
  q = max(1, len(rows) // 4)

  def mean(rs, key):
    vals = [r[key] for r in rs if r.get(key) is not None]
    return float(np.mean(vals)) if vals else None

  return {"steps": len(rows),
          "reward_first_quarter": mean(rows[:q], "reward/mean"),
          "reward_last_quarter": mean(rows[-q:], "reward/mean"),
          "accuracy_first_quarter": mean(rows[:q], "accuracy/mean"),
          "accuracy_last_quarter": mean(rows[-q:], "accuracy/mean")}


USER_ERRORS = (ConfigError, GateStop, policy_lib.PolicyConfigError, judge_config_lib.JudgeConfigError,
               teacher_index_lib.TeacherIndexError, data_lib.DataError, sharding_lib.ShardingError,
               hosts.HostLayoutError,
               FileNotFoundError)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
  # XLA:CPU cannot reuse some donated decode buffers; harmless, and it would flood the progress bar.
  warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
  cfg = flags.FLAGS.config
  if cfg is None:
    raise app.UsageError("--config is required, e.g. --config=configs/demo.py")
  name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  workdir = flags.FLAGS.workdir or os.path.join("runs", name)
  try:
    hosts.initialize_from_env(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                              flags.FLAGS.process_id)
    summary = train(cfg, workdir)
  except USER_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({"workdir": workdir, **summary}, indent=1))


if __name__ == "__main__":
  define_flags()
  app.run(main)
