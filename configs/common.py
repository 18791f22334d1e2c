"""Shared defaults for every config: each section in one place, each knob with a one-line comment.

A config file imports `base_config()` and overrides what differs. Any field can be set from the command line:
`python -m ropd_jax.train --config=configs/qwen.py --config.rl.lr=2e-6 --workdir=gs://bucket/run1`.
"""
import ml_collections

from ropd_jax.data import data_config
from ropd_jax.judge.config import judge_config, teacher_index_config


def model_config():
  c = ml_collections.ConfigDict()
  c.source = "hf"             # hf: HF directory | gguf: GGUF file | random: random init (tests, benchmarks)
  c.path = ""                 # HF checkpoint directory or .gguf file (source hf / gguf)
  c.tokenizer = ""            # tokenizer directory or .gguf; "" = the model path (random: the SmolLM2 GGUF)
  c.param_dtype = "float32"   # storage dtype of the trained params (float32 master weights)
  c.dtype = "bfloat16"        # matmul compute dtype; norms, softmax and logits stay float32
  c.remat = True              # recompute each layer in backward: trades ~30% compute for activation memory
  # Shape of a random model (source=random only); ignored otherwise.
  c.random = ml_collections.ConfigDict(dict(
      model_type="qwen3", vocab_size=0, hidden_size=64, intermediate_size=128, num_layers=2,
      num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True))
  return c


def chat_config():
  c = ml_collections.ConfigDict()
  c.system_prompt = ""        # system turn prepended to every prompt ("" = none)
  c.enable_thinking = False   # Qwen3 chat templates: thinking mode on/off (ignored by other templates)
  c.instruction = ""          # text appended to each problem (e.g. the required answer format)
  return c


def sampling_config():
  c = ml_collections.ConfigDict()
  c.n = 8                     # rollouts per prompt (the GRPO group size)
  c.temperature = 1.0         # on-policy sampling temperature (1.0 keeps the PPO ratio exact)
  c.top_p = 1.0               # nucleus mass; < 1 makes rollouts slightly off-policy
  c.top_k = 0                 # 0 = off
  c.max_new_tokens = 8192     # response length cap; longer rollouts are truncated and flagged
  c.stop_strings = ()         # extra stop strings (the tokenizer's EOS / end-of-turn ids always stop)
  # KV cache room for this many new tokens at first, doubled while rollouts still run (0: max_new_tokens
  # at once): decode attention and cache memory follow the longest rollout; one compile per size.
  c.cache_grow_from = 1024
  # Sampler copy of the weights replicated over data/fsdp (no all-gather per decode step); False keeps
  # the training layout: less memory per chip (docs/scaling.md), an all-gather per layer per decode step.
  c.replicate_weights = True
  return c


def rl_config():
  c = ml_collections.ConfigDict()
  c.lr = 1e-6                 # AdamW peak learning rate
  c.schedule = "constant"     # constant | cosine (decays to 0 at total_steps after warm-up)
  c.warmup_steps = 0          # linear warm-up steps (paper variant: 100)
  c.weight_decay = 0.01       # AdamW decoupled weight decay (paper variant: 0.1)
  c.decay_norms_and_biases = True  # apply weight decay to norm scales and biases too (torch/verl behaviour)
  c.b1 = 0.9                  # Adam beta1
  c.b2 = 0.999                # Adam beta2
  c.eps = 1e-8                # Adam epsilon
  c.grad_clip = 1.0           # global-norm gradient clipping (0 = off)
  c.clip_low = 0.2            # PPO ratio clip below 1
  c.clip_high = 0.28          # PPO ratio clip above 1 (DAPO clip-higher)
  c.dual_clip = 0.0           # dual-clip constant for negative advantages (0 = off; e.g. 3.0)
  # token_mean over the mini-batch | seq_mean_token_mean (paper) | seq_mean_token_sum |
  # per_microbatch_token_mean (the official code's quirk)
  c.loss_agg = "token_mean"
  c.normalize_adv_std = False  # divide group-centred advantages by the group std (paper variant)
  c.kl_coef = 0.0             # KL penalty to a frozen reference policy (0 = off, no reference kept)
  c.kl_estimator = "k3"       # k1 | k2 | k3 estimator of KL(policy || reference)
  c.num_minibatches = 4       # optimizer steps per training step (PPO epochs over mini-batches)
  c.microbatch_size = 0       # rows per gradient-accumulation micro-batch (0 = the whole mini-batch)
  return c


def mesh_config():
  c = ml_collections.ConfigDict()
  c.data = -1                 # data-parallel axis size (-1 = the devices left over)
  c.fsdp = 1                  # parameter/optimizer sharding axis size
  c.tensor = 1                # tensor-parallel axis size (heads, MLP hidden, vocab)
  c.num_devices = 0           # use only the first N devices (0 = all); e.g. to resume on a smaller slice
  # Multislice: how many slices (DCN) the data / fsdp axes span; data, fsdp, tensor above are then per slice.
  c.dcn_data = 1              # slices the data axis spans (e.g. 2 for two v5e-256 slices)
  c.dcn_fsdp = 1              # slices the fsdp axis spans (all-gathers of params cross DCN: prefer dcn_data)
  # Extra (regex on param path, PartitionSpec tuple) rules, tried before the defaults; a spec shorter than
  # the parameter's rank applies to its trailing dimensions. The path `kv_cache/k` (and /v) sets the
  # sampler's per-layer cache [rows, kv_heads, slots, head_dim], e.g. ('kv_cache', (('data', 'fsdp'), None,
  # 'tensor', None)) splits the slots over tensor instead of the kv heads.
  c.rules = ()
  c.auto_fsdp = True          # put `fsdp` on the largest free divisible dimension (never the layer axis)
  c.auto_fsdp_min_size = 0    # leave parameters smaller than this (elements) replicated
  return c


def base_config():
  c = ml_collections.ConfigDict()
  c.seed = 0                  # one seed for init, data order, and every rollout's sampling key
  c.total_steps = 100         # training steps (one step = prompts_per_step prompts x n rollouts)
  c.checkpoint_every = 20     # save every N steps (and at the end, and on SIGTERM)
  c.keep_checkpoints = 3      # checkpoints kept on disk
  c.async_checkpoint = True   # write checkpoints in the background
  c.log_every = 1             # metrics row every N steps (always 1 for exact resume checks)
  c.async_judge = False       # score step t while sampling step t+1 (one step off-policy, PPO-corrected)
  c.max_fallback_rate = 0.25  # quality gate: above this fraction of failed groups, retry them once, then...
  c.on_gate = "skip"          # ...skip the update ("skip") or save a checkpoint and stop ("stop")
  c.reward = "ropd"           # ropd: rubric reward | correctness: math answer check (RLVR control)
  c.tensorboard = True        # also write TensorBoard event files under WORKDIR/tensorboard
  c.wandb_project = ""        # W&B project ("" = off; needs `pip install wandb`)
  c.progress_bar = True       # live progress bar with the current reward
  c.model = model_config()
  c.chat = chat_config()
  c.data = data_config()
  c.sampling = sampling_config()
  c.rl = rl_config()
  c.mesh = mesh_config()
  c.judge = judge_config()
  c.teacher_index = teacher_index_config()
  return c
