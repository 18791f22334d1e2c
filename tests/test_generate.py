"""`python -m ropd_jax.generate`: a tiny random model with SmolLM2's tokenizer, saved as an HF directory;
the printed text must equal the decoded argmax of repeated full forwards (an independent reference)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ropd_jax import generate, model, weights

assets = pytest.importorskip("ropd_jax.assets")
tokenizer = pytest.importorskip("ropd_jax.tokenizer")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  try:
    gguf = assets.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  tok = tokenizer.load_tokenizer(gguf)
  cfg = model.ModelConfig(model_type="llama", vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32,
                          num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=256,
                          tie_word_embeddings=True, eos_token_ids=(2,))
  params = model.init_params(cfg, jax.random.key(0), scale=1.0)
  d = str(tmp_path_factory.mktemp("tiny_smollm_vocab"))
  weights.save_hf(params, cfg, d)
  tok.save(d)
  return d, cfg, params, tokenizer.load_tokenizer(d)


def _greedy_reference(params, cfg, ids, new, width=64):
  """Argmax of a full cache-free forward over the sequence so far, right-padded to one width."""
  full = jax.jit(lambda t, v: model.forward(params, t, cfg, valid_bt=v)[0][0])
  seq = list(ids)
  for _ in range(new):
    toks, valid = np.zeros((1, width), np.int32), np.zeros((1, width), bool)
    toks[0, :len(seq)], valid[0, :len(seq)] = seq, True
    seq.append(int(jnp.argmax(full(toks, valid)[len(seq) - 1])))
  return seq[len(ids):]


def test_cli_prints_greedy_completions_of_raw_and_chat_prompts(tiny_dir, capsys):
  d, cfg, params, tok = tiny_dir
  new = 6
  assert generate.main([f"--model_dir={d}", "--prompt=The sea is", "--prompt=Two and two", "--greedy",
                        f"--max_new_tokens={new}"]) == 0
  out = capsys.readouterr().out
  expected = []
  for i, text in enumerate(["The sea is", "Two and two"]):
    ids = tok.encode(text, add_special_tokens=True)
    expected += [f"### prompt {i}, sample 0", tok.decode(_greedy_reference(params, cfg, ids, new))]
  assert out == "\n".join(expected) + "\n"

  assert generate.main([f"--model_dir={d}", "--prompt=Hi there", "--chat", "--greedy", "--max_new_tokens=4"]) == 0
  chat_ids = tok.apply_chat("Hi there", tokenize=True)
  assert chat_ids[:1] == [tok.bos_id] and len(chat_ids) > 10   # the template was applied
  assert capsys.readouterr().out == tok.decode(_greedy_reference(params, cfg, chat_ids, 4)) + "\n"


def test_cli_samples_n_completions_reproducibly(tiny_dir, capsys):
  d, *_ = tiny_dir
  argv = [f"--model_dir={d}", "--prompt=Once", "--n=3", "--temperature=1.0", "--top_p=0.9",
          "--max_new_tokens=5", "--seed=4"]
  assert generate.main(argv) == 0
  first = capsys.readouterr().out
  assert [line for line in first.splitlines() if line.startswith("###")] == [
      f"### prompt 0, sample {j}" for j in range(3)]
  assert generate.main(argv) == 0
  assert capsys.readouterr().out == first


@pytest.mark.parametrize("flag,message", [("--top_p=1.5", "top_p"), ("--n=0", "n="),
                                          ("--temperature=-1", "temperature")])
def test_cli_rejects_bad_flags(tiny_dir, capsys, flag, message):
  d, *_ = tiny_dir
  assert generate.main([f"--model_dir={d}", "--prompt=x", flag]) == 2
  assert message in capsys.readouterr().err


def test_cli_rejects_an_empty_raw_prompt(tiny_dir, capsys):
  d, *_ = tiny_dir
  assert generate.main([f"--model_dir={d}", "--prompt="]) == 2
  assert "prompt 0 is empty" in capsys.readouterr().err


def test_default_model_is_the_offline_smollm2_gguf():
  try:
    path = assets.smollm2_gguf_path()
  except FileNotFoundError as e:
    pytest.skip(str(e))
  assert generate.default_gguf() == path
  args = generate.parse_args(["--prompt=x"])
  assert args.model_dir is None and args.gguf is None
