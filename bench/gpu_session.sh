#!/usr/bin/env bash
# Every GPU figure in docs/benchmarks.md, in one call on a lent H100/H200 (the device tool's 15 minutes
# fit one run of this): environment, sampler vs transformers generate, train step vs torch, GRPO sampler.
#   bash bench/gpu_session.sh            # logs under $OUT (or /tmp/ropd_gpu)
#   SMOKE=1 bash bench/gpu_session.sh    # the same commands at toy sizes, on a CPU (checks the script)
set -u
out=${OUT:-/tmp/ropd_gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false   # torch shares the card with JAX
py=${PYTHON:-python3}
small=()
train_small=()
if [[ -n "${SMOKE:-}" ]]; then
  small=(--tiny --batch 16 --new 32 --prompt_len 20 --hf_threads 1)
  train_small=(--tiny)
fi

{ nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import jax, torch, transformers; print('jax', jax.__version__, jax.devices(), '| torch', \
torch.__version__, '| transformers', transformers.__version__)"; } 2>&1 | tee "$out/env.log"

# The shape: Qwen3-0.6B, bf16, 256 rollouts, 128 prompt + 256 new tokens, vs HF at batch 256.
timeout 300 "$py" bench/sampler.py --gpu-shape --reps 2 --breakdown "${small[@]}" 2>&1 | tee "$out/sampler.log"
# The training step at the same shape (8 x 1024 tokens) vs transformers + torch AdamW; one side at a
# time (both at once do not fit 80 GB: JAX keeps its memory pool).
timeout 140 "$py" bench/train_step.py --gpu-shape --no-wait --sequential "${train_small[@]}" 2>&1 | tee "$out/train_step.log"
# GRPO groups: 32 prompts x 8 rollouts share their prompt's prefill.
timeout 80 "$py" bench/sampler.py --gpu-shape --reps 2 --n 8 --skip_hf "${small[@]}" 2>&1 | tee "$out/sampler_n8.log"
