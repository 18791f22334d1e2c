"""The paper's setup: a Qwen3 student, Gemini as teacher, rubricator and verifier, DAPO-Math-17K.

  export GEMINI_API_KEY=...
  python -m ropd_jax.teacher_index build --config=configs/qwen.py       # once: m teacher answers/prompt
  python -m ropd_jax.train --config=configs/qwen.py --workdir=gs://BUCKET/ropd/qwen3-4b

Paper variants, one flag each: --config.rl.normalize_adv_std=True (std-normalised advantages),
--config.rl.schedule=cosine --config.rl.warmup_steps=100, --config.rl.weight_decay=0.1,
--config.rl.kl_coef=0.001 (KL to the frozen starting policy).
"""
from configs.common import base_config


def get_config():
  c = base_config()
  c.total_steps = 500                  # ~1 epoch of DAPO-Math-17K at 32 prompts/step
  c.checkpoint_every = 20
  c.async_judge = True                 # overlap judge latency with the next step's sampling
  c.model.source = "hf"
  c.model.path = "/mnt/models/Qwen3-4B"  # local HF checkpoint directory (config.json + safetensors)
  c.model.param_dtype = "float32"      # fp32 master weights
  c.model.dtype = "bfloat16"           # bf16 matmuls
  c.model.remat = True
  c.chat.enable_thinking = False       # the paper's non-thinking track
  c.chat.instruction = "Please reason step by step, and put your final answer within \\boxed{}."
  c.data.source = "dapo_math_17k"
  c.data.path = "/mnt/data/dapo-math-17k.parquet"  # local copy of BytedTsinghua-SIA/DAPO-Math-17k
  c.data.max_prompt_len = 2048
  c.data.prompts_per_step = 32         # B
  c.data.num_epochs = 1
  c.sampling.n = 8                     # rollouts per prompt
  c.sampling.max_new_tokens = 8192     # max response
  c.sampling.temperature = 1.0
  c.rl.lr = 1e-6
  c.rl.schedule = "constant"
  c.rl.weight_decay = 0.01
  c.rl.clip_low = 0.2
  c.rl.clip_high = 0.28
  c.rl.loss_agg = "token_mean"
  c.rl.kl_coef = 0.0
  c.rl.normalize_adv_std = False       # mean-centred (the official code); True = the paper's text
  c.rl.num_minibatches = 4
  c.rl.microbatch_size = 8             # rollouts per gradient-accumulation micro-batch
  c.mesh.data = 1
  c.mesh.fsdp = -1                     # FSDP over every chip
  c.teacher_index.source = "teacher"
  c.teacher_index.path = "/mnt/data/dapo-math-17k.teacher_index.jsonl"
  c.teacher_index.m = 4                # teacher answers per prompt
  for role in ("teacher", "rubricator", "verifier"):
    c.judge[role].backend = "gemini"
  c.judge.teacher.model = "gemini-2.5-pro"
  c.judge.rubricator.model = "gemini-2.5-flash"
  c.judge.verifier.model = "gemini-2.5-flash"
  return c
