"""Sample completions from a checkpoint and print them: the sanity check to run on a model.

    python -m ropd_jax.generate --prompt="What is 7*8?" --chat                    # offline SmolLM2 default
    python -m ropd_jax.generate --model_dir=hf_dir --prompt="Once upon a time" --n=4 --temperature=0.8
    python -m ropd_jax.generate --gguf=model.gguf --prompt="2+2=" --greedy --max_new_tokens=16

Without `--chat` the prompt is raw text (the tokenizer's own special tokens, e.g. BOS, but no template).
A completion ends at the tokenizer's end-of-turn / eos tokens, at a `--stop` string, or at
`--max_new_tokens`. With several prompts or `--n` > 1 each completion gets a `### prompt i, sample j` line.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import numpy as np

from ropd_jax import sampling


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m ropd_jax.generate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group()
  src.add_argument("--model_dir", help="HF checkpoint directory (config.json, model.safetensors, tokenizer)")
  src.add_argument("--gguf", help="GGUF file (weights and tokenizer)")
  p.add_argument("--tokenizer", help="tokenizer directory or .gguf (default: the model's own)")
  p.add_argument("--prompt", action="append", required=True, help="prompt text; repeat for several")
  p.add_argument("--system", default=None, help="with --chat: system message (default: the template's)")
  p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
  p.add_argument("--thinking", choices=("on", "off"), default=None,
                 help="with --chat: the template's enable_thinking switch (Qwen3)")
  p.add_argument("--greedy", action="store_true", help="argmax decoding")
  p.add_argument("--temperature", type=float, default=1.0)
  p.add_argument("--top_p", type=float, default=1.0)
  p.add_argument("--top_k", type=int, default=0)
  p.add_argument("--max_new_tokens", type=int, default=128)
  p.add_argument("--n", type=int, default=1, help="completions per prompt")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stop", action="append", default=[], help="stop string; repeat for several")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="params and compute dtype")
  p.add_argument("--truncate_prompt", action="store_true",
                 help="keep the end of a prompt too long for the model instead of failing")
  return p.parse_args(argv)


def default_gguf() -> str:
  from ropd_jax import assets
  return assets.smollm2_gguf_path()


def load(args):
  """(model cfg, params, tokenizer) from --model_dir, --gguf, or the offline SmolLM2 default."""
  from ropd_jax import tokenizer as tokenizer_lib
  from ropd_jax import weights
  gguf = args.gguf or (None if args.model_dir else default_gguf())
  cfg, params = weights.load_model(model_dir=args.model_dir, gguf_file=gguf, param_dtype=args.dtype,
                                   dtype=args.dtype)
  tok = tokenizer_lib.load_tokenizer(args.tokenizer or args.model_dir or gguf)
  return cfg, params, tok


def encode_prompts(tok, args) -> list[list[int]]:
  out = []
  for text in args.prompt:
    if args.chat:
      thinking = None if args.thinking is None else args.thinking == "on"
      out.append(list(tok.apply_chat((args.system, text), enable_thinking=thinking, tokenize=True)))
    else:
      out.append(tok.encode(text, add_special_tokens=True))
  return out


def generate(params, cfg, tok, prompts: list[list[int]], scfg: sampling.SamplingConfig, seed: int):
  """Completions as `texts[prompt][sample]`, plus the Rollouts."""
  for i, ids in enumerate(prompts):
    if not ids:
      raise ValueError(f"prompt {i} is empty after tokenization; give some text (or use --chat).")
  ids_bt, lengths_b = sampling.pad_prompts(prompts, scfg)
  ro = sampling.sample(params, ids_bt, lengths_b, jax.random.key(seed), cfg, scfg)
  ro = sampling.apply_stop_strings(ro, lambda t: tok.decode(t, stop=False), scfg.stop_strings)
  tokens, lengths = np.asarray(ro.tokens_bt), np.asarray(ro.lengths_b)
  texts = [tok.decode(tokens[r], length=int(lengths[r])) for r in range(tokens.shape[0])]
  for s in scfg.stop_strings:   # the stop string itself is not part of the answer
    texts = [t.split(s, 1)[0] for t in texts]
  return [texts[i * scfg.n:(i + 1) * scfg.n] for i in range(len(prompts))], ro


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    scfg = sampling.SamplingConfig(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, greedy=args.greedy,
        max_new_tokens=args.max_new_tokens, n=args.n, stop_strings=tuple(args.stop),
        truncate_prompt=args.truncate_prompt)
    cfg, params, tok = load(args)
    stop_ids = tuple(sorted(set(tok.stop_ids) | set(cfg.eos_token_ids)))
    scfg = scfg.replace(stop_token_ids=stop_ids, pad_id=tok.pad_id or 0)
    t0 = time.perf_counter()
    texts, ro = generate(params, cfg, tok, encode_prompts(tok, args), scfg, args.seed)
    elapsed = time.perf_counter() - t0
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  many = len(texts) > 1 or args.n > 1
  for i, samples in enumerate(texts):
    for j, text in enumerate(samples):
      if many:
        print(f"### prompt {i}, sample {j}")
      print(text)
  new = int(np.asarray(ro.lengths_b).sum())
  print(f"[{new} new tokens in {elapsed:.1f}s incl. compile]", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
