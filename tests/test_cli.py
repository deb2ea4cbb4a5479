"""The ``peftjax`` command line: methods and their options, user errors (one line, exit code 2),
train -> eval / merge / export, resuming, data files.

The model paths run on tiny random HF directories (BERT and Llama, with all-MiniLM-L6-v2's
tokenizer) written once per module, so the whole command line runs in seconds.
"""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax
from peftjax import cli


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Tiny HF model directories and data files."""
  transformers = pytest.importorskip("transformers")
  from peftjax import tasks
  from peftjax.io.hf import save_pretrained
  from peftjax.models import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
  try:
    tok = transformers.AutoTokenizer.from_pretrained(tasks.resolve_model("minilm"))
  except Exception as e:  # offline without a cache
    pytest.skip(f"all-MiniLM-L6-v2's tokenizer is not available: {e}")
  d = tmp_path_factory.mktemp("cli")
  v = tok.vocab_size
  bert = BertModel(BertConfig(vocab_size=v, hidden_size=16, num_layers=1, num_heads=2,
                              intermediate_size=32, max_position_embeddings=64))
  llama = LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=16, intermediate_size=32,
                                       num_layers=1, num_heads=2, num_kv_heads=1))
  rng = np.random.default_rng(0)
  for name, m in (("bert", bert), ("llama", llama)):
    # random weights straight from the shapes: nothing to compile
    shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    p = jax.tree_util.tree_map_with_path(
        lambda path, s: (np.ones(s.shape, np.float32) if "scale" in jax.tree_util.keystr(path)
                         else rng.normal(0, 0.1, s.shape).astype(np.float32)), shapes)
    save_pretrained(p, m, d / name, tokenizer=tok)
  rng = random.Random(0)
  words = "good great fine bad awful poor film plot acting story".split()
  with open(d / "reviews.csv", "w") as f:
    f.write("review,sentiment\n")
    for i in range(60):
      f.write(" ".join(rng.choice(words) for _ in range(5)) + f",{'pos' if i % 2 else 'neg'}\n")
  (d / "text.txt").write_text(" ".join(rng.choice(words) for _ in range(2500)))
  return d


def run(capsys, *argv):
  rc = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return rc, out, err


def one_error(capsys, *argv) -> str:
  rc, out, err = run(capsys, *argv)
  assert rc == 2, (out, err)
  lines = err.strip().splitlines()
  assert len(lines) == 1 and "Traceback" not in err, err
  return lines[0]


# ------------------------------------------------------------------------------------------------
# methods, options, help
# ------------------------------------------------------------------------------------------------

def test_methods_lists_every_method(capsys):
  rc, out, _ = run(capsys, "methods")
  names = [line.split()[0] for line in out.strip().splitlines()]
  assert rc == 0 and names == ["lora", "qlora", "adapters", "ia3", "prompt", "prefix", "ptuning",
                               "bitfit", "partial", "diff_pruning", "full"]
  assert names == peftjax.methods.names()


def test_help_teaches_with_examples(capsys):
  rc, out, _ = run(capsys, "train", "--help")
  assert rc == 0 and "examples:" in out and out.count("peftjax train --model") >= 3
  assert "lora / qlora options" in out and "diff_pruning options" in out
  rc, out, _ = run(capsys, "--help")
  assert rc == 0 and "peftjax eval --adapter" in out


def test_option_of_another_method_is_an_error(capsys):
  assert one_error(capsys, "train", "--method", "ia3", "--rank", "4") == (
      "peftjax train: error: --rank does not apply to --method ia3 (it applies to: lora, qlora)")
  assert one_error(capsys, "train", "--method", "lora", "--n-tokens", "4") == (
      "peftjax train: error: --n-tokens does not apply to --method lora (it applies to: prompt, "
      "prefix, ptuning)")
  assert "--density does not apply to --method full" in one_error(
      capsys, "train", "--method", "full", "--density", "0.1")
  # an explicitly passed default value is still explicit
  assert "--placement does not apply" in one_error(
      capsys, "train", "--method", "bitfit", "--placement", "houlsby")


@pytest.mark.parametrize("argv, message", [
    (["train", "--method", "dora"], "argument --method: invalid choice: 'dora'"),
    (["train", "--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
    (["train", "--steps", "x"], "argument --steps: expected a positive integer, got 'x'"),
    (["train", "--lr", "-1"], "argument --lr: expected a positive number, got '-1'"),
    (["train", "--method", "diffpruning", "--density", "1.5"],
     "argument --density: expected a number in (0, 1), got '1.5'"),
    (["train", "--model", "nosuch"], "unknown model 'nosuch'"),
    (["train", "--data", "nosuch"], "unknown dataset 'nosuch'"),
    (["train", "--data", "missing.csv"], "data file missing.csv does not exist"),
    (["train", "--model", "smollm2"], "--model smollm2 is a decoder"),
    (["train", "--data", "moby_dick"], "--model minilm is an encoder"),
    (["eval"], "give --adapter DIR"),
    (["eval", "--adapter", "no/such/dir"], "adapter directory no/such/dir does not exist"),
    (["merge", "--adapter", ".", "--out", "x"], "not a `peftjax train --out` directory"),
])
def test_user_errors_are_one_line(capsys, argv, message):
  line = one_error(capsys, *argv)
  assert line.startswith(f"peftjax {argv[0]}: error: ") and message in line, line


def test_export_and_merge_refuse_what_they_cannot_write(capsys, tmp_path):
  for method in ("bitfit", "prompt", "adapters"):
    d = tmp_path / method
    (d / "adapter" / "manifest").mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({"method": method}))
  line = one_error(capsys, "export", "--adapter", tmp_path / "bitfit", "--out", tmp_path / "x")
  assert "--method bitfit has no Hugging Face PEFT format (export writes lora, qlora" in line
  assert "`peftjax merge --adapter RUN --out DIR` writes the merged model" in line
  line = one_error(capsys, "merge", "--adapter", tmp_path / "prompt", "--out", tmp_path / "x")
  assert ("--method prompt (prompt tuning: trained soft tokens before the input) has no "
          "merged form" in line and "`peftjax export --adapter RUN --out DIR`" in line), line
  # bottleneck adapters have neither: neither command sends the user to the other
  line = one_error(capsys, "export", "--adapter", tmp_path / "adapters", "--out", tmp_path / "x")
  assert "no merged form either" in line and "peftjax merge" not in line, line
  line = one_error(capsys, "merge", "--adapter", tmp_path / "adapters", "--out", tmp_path / "x")
  assert "has no merged form" in line and "peftjax export" not in line, line
  assert not (tmp_path / "x").exists()


def test_internal_errors_keep_their_traceback(capsys, monkeypatch):
  """Only usage errors become one-line messages: a bug inside a command propagates."""
  def broken(a):
    raise TypeError("internal bug")
  monkeypatch.setitem(cli._COMMANDS, "methods", broken)
  with pytest.raises(TypeError, match="internal bug"):
    cli.main(["methods"])


def test_old_method_names_still_resolve(capsys):
  """run.json files and scripts written with the 0.1 names (adapter, diffpruning) keep working."""
  assert "--placement does not apply to --method diff_pruning" in one_error(
      capsys, "train", "--method", "diffpruning", "--placement", "houlsby")


def test_run_directory_errors(capsys, tmp_path):
  (tmp_path / "run.json").write_text("{not json")
  assert "corrupt run file" in one_error(capsys, "eval", "--adapter", tmp_path)
  (tmp_path / "run.json").write_text(json.dumps({"method": "lora"}))
  assert "no trained adapter in" in one_error(capsys, "eval", "--adapter", tmp_path)


def test_data_file_errors(capsys, files):
  bert = files / "bert"
  line = one_error(capsys, "train", "--model", bert, "--data", files / "reviews.csv")
  assert line.endswith("no column 'text' (--text-column); the columns are: review, sentiment")
  line = one_error(capsys, "train", "--model", bert, "--data", files / "reviews.csv",
                   "--text-column", "review", "--label-column", "stars")
  assert "no column 'stars' (--label-column)" in line
  line = one_error(capsys, "train", "--model", files / "llama", "--data", files / "text.txt",
                   "--text-column", "review")
  assert "--text-column/--label-column apply to classification data files" in line
  (files / "one.csv").write_text("text,label\na,x\nb,x\n")
  line = one_error(capsys, "train", "--model", bert, "--data", files / "one.csv")
  assert "classification needs at least 2 classes, found ['x']" in line
  line = one_error(capsys, "train", "--model", bert, "--data", files / "reviews.csv",
                   "--batch-size", "6", "--grad-accum", "4")
  assert "--batch-size 6 is not divisible by --grad-accum 4" in line
  line = one_error(capsys, "train", "--model", bert, "--data", files / "text.txt")
  assert "a BertModel is not a decoder; language modelling needs a causal LM" in line
  line = one_error(capsys, "train", "--model", files / "llama", "--data", files / "reviews.csv",
                   "--text-column", "review", "--label-column", "sentiment")
  assert "sentence classification needs an encoder" in line


# ------------------------------------------------------------------------------------------------
# train -> eval -> export -> merge
# ------------------------------------------------------------------------------------------------

def test_train_eval_export_merge_classification(capsys, files, tmp_path):
  out = tmp_path / "run"
  data = ["--data", files / "reviews.csv", "--text-column", "review", "--label-column",
          "sentiment"]
  rc, stdout, err = run(capsys, "train", "--model", files / "bert", "--method", "lora",
                        "--rank", "2", "--targets", ".*/(query|value)/kernel", *data,
                        "--steps", "2", "--batch-size", "4", "--seq-len", "8", "--no-baseline",
                        "--out", out)
  assert rc == 0, err
  res = json.loads((out / "results.json").read_text())
  assert [r["model"] for r in res["rows"]] == ["base model (untrained head)", "lora + head"]
  assert {"trainable", "trainable %", "test accuracy", "s/step"} <= set(res["rows"][-1])
  assert res["args"]["lr"] == peftjax.lora.METHOD.learning_rate  # the rate used, not None
  run_file = json.loads((out / "run.json").read_text())
  assert run_file["method"] == "lora" and run_file["options"]["rank"] == 2
  assert run_file["options"]["targets"] == ".*/(query|value)/kernel"
  assert run_file["labels"] == ["neg", "pos"] and run_file["options"]["alpha"] == 16.0
  assert (out / "adapter" / "manifest").exists() and (out / "checkpoints" / "2").exists()
  assert not (out / "adapter.safetensors").exists()

  # eval needs nothing but the directory, and sees the same held-out split
  rc, stdout, err = run(capsys, "eval", "--adapter", out)
  assert rc == 0, err
  assert res["rows"][-1]["test accuracy"] in stdout and "lora (" in stdout

  # HF PEFT export: LoRA + the trained head as modules_to_save
  rc, stdout, err = run(capsys, "export", "--adapter", out, "--out", tmp_path / "hf")
  assert rc == 0, err
  cfg = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
  assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["modules_to_save"] == ["classifier"]
  from safetensors.numpy import load_file
  tensors = load_file(tmp_path / "hf" / "adapter_model.safetensors")
  assert tensors["base_model.model.classifier.weight"].shape == (2, 16)
  assert sum(k.endswith("lora_A.weight") for k in tensors) == 2  # query, value

  # merged export: an ordinary HF directory holding the trained head and W + s A B
  rc, stdout, err = run(capsys, "merge", "--adapter", out, "--out", tmp_path / "merged")
  assert rc == 0, err
  merged = load_file(tmp_path / "merged" / "model.safetensors")
  np.testing.assert_allclose(merged["classifier.weight"], tensors[
      "base_model.model.classifier.weight"], rtol=1e-6)
  base = load_file(files / "bert" / "model.safetensors")
  key = next(k for k in base if k.endswith("attention.self.query.weight"))
  assert not np.allclose(merged["bert." + key], base[key])

  # an option of another method on the same --out is refused before anything loads
  line = one_error(capsys, "train", "--model", files / "bert", "--method", "lora", "--rank", "4",
                   *data, "--steps", "2", "--batch-size", "4", "--seq-len", "8", "--out", out)
  assert "holds a finished run of another configuration (options differ" in line


def test_prompt_tuning_lm_resumes_and_exports(capsys, files, tmp_path):
  out = tmp_path / "run"
  argv = ["train", "--model", files / "llama", "--method", "prompt", "--n-tokens", "3",
          "--data", files / "text.txt", "--steps", "2", "--batch-size", "2", "--seq-len", "8",
          "--save-every", "1", "--out", out]
  rc, stdout, err = run(capsys, *argv)
  assert rc == 0, err
  rows = json.loads((out / "results.json").read_text())["rows"]
  assert rows[-1]["model"] == "prompt" and rows[-1]["trainable"] == "48"  # 3 tokens x 16
  assert float(rows[-1]["perplexity"]) > 1
  # the same command again continues from the last checkpoint (here: nothing left to train)
  rc, stdout2, err = run(capsys, *argv)
  assert rc == 0 and "resuming from step 2" in err
  assert json.loads((out / "results.json").read_text())["rows"][-1]["perplexity"] == \
      rows[-1]["perplexity"]
  rc, stdout, err = run(capsys, "export", "--adapter", out / "adapter", "--out", tmp_path / "hf")
  assert rc == 0, err
  cfg = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
  assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 3
  rc, stdout, err = run(capsys, "generate", "--adapter", out, "--prompt", "good film",
                        "--max-new-tokens", "2")
  assert rc == 0 and stdout.strip(), err


def test_eval_base_model_on_a_file(capsys, files):
  rc, stdout, err = run(capsys, "eval", "--model", files / "bert", "--data", files / "reviews.csv",
                        "--text-column", "review", "--label-column", "sentiment")
  assert rc == 0, err
  assert "base model (untrained head)" in stdout and "test accuracy" in stdout


def test_mixed_precision_run_evaluates_as_trained(capsys, files, tmp_path):
  out = tmp_path / "run"
  rc, stdout, err = run(capsys, "train", "--model", files / "llama", "--method", "lora",
                        "--rank", "2", "--data", files / "text.txt", "--steps", "2",
                        "--batch-size", "2", "--seq-len", "8", "--compute-dtype", "bfloat16",
                        "--out", out)
  assert rc == 0, err
  assert json.loads((out / "run.json").read_text())["compute_dtype"] == "bfloat16"
  ppl = json.loads((out / "results.json").read_text())["rows"][-1]["perplexity"]
  assert np.isfinite(float(ppl))
  rc, bf16, err = run(capsys, "eval", "--adapter", out)  # bf16 again, from run.json
  assert rc == 0 and ppl in bf16, err
  rc, f32, err = run(capsys, "eval", "--adapter", out, "--compute-dtype", "float32")
  assert rc == 0 and f32 != bf16, err  # f32 activations: (slightly) different figures
