"""The ``peftjax`` command line: methods and their options, user errors (one line, exit code 2),
train -> eval / merge / export, resuming, data files.

The model paths run on tiny random HF directories (BERT and Llama, with all-MiniLM-L6-v2's
tokenizer) written once per module, so the whole command line runs in seconds.
"""

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax
from peftjax import cli
from _cli import one_error, run


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


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm_run(files, tmp_path_factory):
  """A finished 2-step LoRA run on the tiny Llama (checkpoints at steps 1 and 2): the argv that
  made it and its directory. Tests copy it before changing anything."""
  out = tmp_path_factory.mktemp("lm") / "run"
  argv = ["train", "--model", files / "llama", "--method", "lora", "--rank", "2", "--data",
          files / "text.txt", "--steps", "2", "--batch-size", "2", "--seq-len", "8",
          "--save-every", "1", "--out", out]
  assert cli.main([str(a) for a in argv]) == 0
  return argv, out


def copy_run(lm_run, dest: Path):
  argv, out = lm_run
  shutil.copytree(out, dest)
  return [dest if a == out else a for a in argv]


def hashes(d: Path) -> dict:
  """``{relative path: sha256}`` of every file under ``d`` (or of the file ``d``)."""
  if d.is_file():
    return {d.name: hashlib.sha256(d.read_bytes()).hexdigest()}
  return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest()
          for f in sorted(d.rglob("*")) if f.is_file()}


def adapter_arrays(d: Path) -> list:
  """The arrays of a saved adapter (``d/adapter``), as numpy, in checkpoint order."""
  import orbax.checkpoint as ocp
  saved = ocp.StandardCheckpointer().restore((d / "adapter").absolute())
  return [np.asarray(x) for x in jax.tree.leaves(saved)]


# ------------------------------------------------------------------------------------------------
# methods, options, help
# ------------------------------------------------------------------------------------------------

def test_methods_lists_every_method(capsys):
  rc, out, _ = run(capsys, "methods")
  names = [line.split()[0] for line in out.strip().splitlines()]
  assert rc == 0 and names == ["lora", "qlora", "dora", "vera", "loha", "lokr", "oft", "adapters",
                               "ia3", "prompt", "prefix", "ptuning", "bitfit", "partial",
                               "diff_pruning", "full"]
  assert names == peftjax.methods.names()


def test_help_teaches_with_examples(capsys):
  rc, out, _ = run(capsys, "train", "--help")
  assert rc == 0 and "examples:" in out and out.count("peftjax train --model") >= 3
  assert "lora / qlora / dora options" in out and "diff_pruning options" in out
  # a shared option shows the methods whose own default differs
  assert "(default: 8; vera 256)" in " ".join(out.split())
  rc, out, _ = run(capsys, "--help")
  assert rc == 0 and "peftjax eval --adapter" in out


def test_option_of_another_method_is_an_error(capsys):
  assert one_error(capsys, "train", "--method", "ia3", "--rank", "4") == (
      "peftjax train: error: --rank does not apply to --method ia3 (it applies to: lora, qlora, "
      "dora, vera, loha, lokr)")
  assert one_error(capsys, "train", "--method", "lora", "--n-tokens", "4") == (
      "peftjax train: error: --n-tokens does not apply to --method lora (it applies to: prompt, "
      "prefix, ptuning)")
  assert "--density does not apply to --method full" in one_error(
      capsys, "train", "--method", "full", "--density", "0.1")
  # an explicitly passed default value is still explicit
  assert "--placement does not apply" in one_error(
      capsys, "train", "--method", "bitfit", "--placement", "houlsby")


@pytest.mark.parametrize("argv, message", [
    (["train", "--method", "boft"], "argument --method: invalid choice: 'boft'"),
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
    (["train", "--general-data", "speeches"], "measures a language model's forgetting"),
    (["train", "--model", "smollm2", "--data", "moby_dick", "--general-data", "x.csv"],
     "--general-data x.csv: expected speeches or a .txt file"),
    (["train", "--model", "smollm2", "--data", "moby_dick", "--general-data", "missing.txt"],
     "--general-data missing.txt does not exist"),
    (["eval"], "give --adapter DIR"),
    (["eval", "--adapter", "no/such/dir"], "adapter directory no/such/dir does not exist"),
    (["merge", "--adapter", ".", "--out", "x"], "not a `peftjax train --out` directory"),
    (["generate", "--prompt", "x", "--chat", "--raw"], "--chat and --raw contradict each other"),
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
  # --sharding: a bad mesh is argparse's one line; one that does not fit the devices is ours
  line = one_error(capsys, "train", "--model", bert, "--data", files / "reviews.csv",
                   "--sharding", "data=2,tp=2")
  assert "argument --sharding: expected dp, fsdp or a mesh: mesh 'data=2,tp=2'" in line
  line = one_error(capsys, "train", "--model", bert, "--data", files / "reviews.csv",
                   "--sharding", "fsdp=-1,tensor=2")
  assert line.endswith("--sharding fsdp=-1,tensor=2: 1 devices do not split into "
                       "data*fsdp*tensor = [1, -1, 2] (JAX sees 1 device(s))"), line
  line = one_error(capsys, "train", "--model", bert, "--data", files / "text.txt")
  assert "a BertModel is not a decoder; language modelling needs a causal LM" in line
  line = one_error(capsys, "train", "--model", files / "llama", "--data", files / "reviews.csv",
                   "--text-column", "review", "--label-column", "sentiment")
  assert "sentence classification needs an encoder" in line


# ------------------------------------------------------------------------------------------------
# train -> eval -> export -> merge
# ------------------------------------------------------------------------------------------------

def test_train_eval_export_merge_classification(capsys, files, tmp_path, caplog):
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
  caplog.clear()
  rc, stdout, err = run(capsys, "eval", "--adapter", out)
  assert rc == 0, err
  assert res["rows"][-1]["test accuracy"] in stdout and "lora (" in stdout
  # the head comes from the adapter: no word of an initialized one
  assert not [r for r in caplog.records if "initialized" in r.getMessage()]

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
  cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
  assert cfg["id2label"] == {"0": "neg", "1": "pos"} and cfg["label2id"] == {"neg": 0, "pos": 1}
  np.testing.assert_allclose(merged["classifier.weight"], tensors[
      "base_model.model.classifier.weight"], rtol=1e-6)
  base = load_file(files / "bert" / "model.safetensors")
  key = next(k for k in base if k.endswith("attention.self.query.weight"))
  assert not np.allclose(merged["bert." + key], base[key])

  # an option of another method on the same --out is refused before anything loads
  line = one_error(capsys, "train", "--model", files / "bert", "--method", "lora", "--rank", "4",
                   *data, "--steps", "2", "--batch-size", "4", "--seq-len", "8", "--out", out)
  assert "holds a finished run of another configuration (options differ" in line


def test_a_sentence_transformers_pooler_trains_with_the_head_and_exports(capsys, files, tmp_path):
  """A sentence-transformers checkpoint (``modules.json``) never trained its BERT pooler: it trains
  with the classifier, and the HF PEFT export carries both as modules_to_save, so that PyTorch +
  HF PEFT gives the logits peftjax gives."""
  st = tmp_path / "st"
  shutil.copytree(files / "bert", st)
  (st / "modules.json").write_text("[]")
  out = tmp_path / "run"
  rc, _, err = run(capsys, "train", "--model", st, "--method", "prompt", "--n-tokens", "2",
                   "--data", files / "reviews.csv", "--text-column", "review", "--label-column",
                   "sentiment", "--steps", "2", "--batch-size", "4", "--seq-len", "8",
                   "--lr", "0.1", "--no-baseline", "--out", out)
  assert rc == 0, err
  assert "whose BERT pooler never trained: the pooler trains with the classifier head" in err
  rc, _, err = run(capsys, "export", "--adapter", out, "--out", tmp_path / "hf")
  assert rc == 0, err
  cfg = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
  assert cfg["modules_to_save"] == ["classifier", "pooler"]
  from safetensors.numpy import load_file
  tensors = load_file(tmp_path / "hf" / "adapter_model.safetensors")
  base = load_file(st / "model.safetensors")
  pooler = tensors["base_model.bert.pooler.dense.weight"]  # prompt learning wraps the model itself
  assert pooler.shape == (16, 16) and not np.allclose(pooler, base["pooler.dense.weight"])
  # peftjax reads its own export back ...
  from peftjax.io.hf import from_pretrained
  from peftjax.io.hf_peft import load_hf_peft
  model, params, tok = from_pretrained(st, task="sequence-classification", num_labels=2)
  tree = load_hf_peft(tmp_path / "hf", params)
  np.testing.assert_allclose(peftjax.as_tuned(tree).params["pooler"]["dense"]["kernel"], pooler.T,
                             rtol=1e-6)
  ids = np.asarray(tok(["good film", "awful plot story"], padding=True)["input_ids"], np.int32)
  ours = np.asarray(peftjax.forward(model)(tree, ids, attention_mask=ids != 0))
  assert peftjax.as_tuned(tree).prompt is not None
  # ... and so does PyTorch + HF PEFT, with the same logits
  torch = pytest.importorskip("torch", reason="PyTorch (the reference) is not installed")
  peft = pytest.importorskip("peft", reason="HF PEFT (the reference) is not installed")
  import transformers
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(st, num_labels=2).eval()
  pm = peft.PeftModel.from_pretrained(hf, tmp_path / "hf").eval()
  with torch.no_grad():
    theirs = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(ids != 0)).logits.numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-5)


@pytest.mark.newest_only
def test_a_pissa_run_exports_as_lora_on_the_original_base(capsys, files, tmp_path):
  """PiSSA trains on a residual base; the export is HF PEFT's rank-2r LoRA on the original model,
  so PyTorch + HF PEFT on the unmodified checkpoint gives the merged run's logits."""
  out = tmp_path / "run"
  rc, _, err = run(capsys, "train", "--model", files / "llama", "--method", "lora", "--rank", "2",
                   "--init", "pissa", "--data", files / "text.txt", "--steps", "3", "--warmup", "0",
                   "--batch-size", "2", "--seq-len", "8", "--lr", "0.05", "--no-baseline",
                   "--out", out)
  assert rc == 0, err
  train_err = err
  for cmd, where in (("export", "hf"), ("merge", "merged")):
    rc, _, err = run(capsys, cmd, "--adapter", out, "--out", tmp_path / where)
    assert rc == 0, err
  cfg = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
  assert cfg["r"] == 4  # [A, A0] / [B; -B0]
  torch = pytest.importorskip("torch", reason="PyTorch (the reference) is not installed")
  peft = pytest.importorskip("peft", reason="HF PEFT (the reference) is not installed")
  import transformers
  ids = torch.tensor([[5, 9, 2, 7, 1, 3]])
  base = transformers.AutoModelForCausalLM.from_pretrained(files / "llama").eval()
  merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
  with torch.no_grad():
    plain, want = base(input_ids=ids).logits.numpy(), merged(input_ids=ids).logits.numpy()
    pm = peft.PeftModel.from_pretrained(base, tmp_path / "hf").eval()  # wraps base in place
    theirs = pm(input_ids=ids).logits.numpy()
  assert np.abs(want - plain).max() > 1e-4, train_err  # training moved the model
  np.testing.assert_allclose(theirs, want, atol=2e-5)
  # LoftQ fits its own quantized base: export refuses and says what to do instead
  rc, _, err = run(capsys, "train", "--model", files / "llama", "--method", "lora", "--rank", "2",
                   "--init", "loftq", "--data", files / "text.txt", "--steps", "1",
                   "--batch-size", "2", "--seq-len", "8", "--no-baseline", "--out", tmp_path / "lq")
  assert rc == 0, err
  line = one_error(capsys, "export", "--adapter", tmp_path / "lq", "--out", tmp_path / "lq_hf")
  assert "LoftQ" in line and "peftjax merge" in line


def test_prompt_tuning_lm_resumes_and_exports(capsys, files, tmp_path):
  out = tmp_path / "run"
  general = tmp_path / "general.txt"
  general.write_text(" ".join(["the story of a good film"] * 120))
  argv = ["train", "--model", files / "llama", "--method", "prompt", "--n-tokens", "3",
          "--data", files / "text.txt", "--steps", "2", "--batch-size", "2", "--seq-len", "8",
          "--save-every", "1", "--general-data", general, "--out", out]
  rc, stdout, err = run(capsys, *argv)
  assert rc == 0, err
  rows = json.loads((out / "results.json").read_text())["rows"]
  assert rows[-1]["model"] == "prompt" and rows[-1]["trainable"] == "48"  # 3 tokens x 16
  assert float(rows[-1]["perplexity"]) > 1
  # forgetting: the general text's NLL after (through the soft prompt) minus the base model's
  before, after = float(rows[0]["general nll"]), float(rows[-1]["general nll"])
  assert rows[0]["forgetting"] == "-" and after != before
  assert float(rows[-1]["forgetting"]) == pytest.approx(after - before, abs=2e-4)
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


def test_qlora_lm_run_generates_and_stacks_its_layers(capsys, files, tmp_path):
  out = tmp_path / "run"
  rc, stdout, err = run(capsys, "train", "--model", files / "llama", "--method", "qlora",
                        "--rank", "2", "--data", files / "text.txt", "--steps", "1",
                        "--batch-size", "2", "--seq-len", "8", "--no-baseline", "--out", out)
  assert rc == 0, err
  assert json.loads((out / "run.json").read_text())["scan_layers"] is True
  # generation loads the base as training did (quantized, f32 compute): the adapter restores
  rc, stdout, err = run(capsys, "generate", "--adapter", out, "--prompt", "good film",
                        "--max-new-tokens", "2")
  assert rc == 0 and stdout.strip(), err


def test_a_run_saved_unstacked_keeps_its_layout(capsys, files, tmp_path, monkeypatch):
  # Runs saved before language models were layer-stacked have no "scan_layers" in run.json and
  # per-layer checkpoints: they resume and generate with per-layer parameters, as trained.
  record = cli._run_record

  def old_record(a):
    r = record(a)
    r.pop("scan_layers")
    return r
  out = tmp_path / "run"
  argv = ["train", "--model", files / "llama", "--method", "lora", "--rank", "2", "--data",
          files / "text.txt", "--batch-size", "2", "--seq-len", "8", "--save-every", "1",
          "--no-baseline", "--out", out]
  with monkeypatch.context() as m:
    m.setattr(cli, "_run_record", old_record)
    rc, stdout, err = run(capsys, *argv, "--steps", "1")
  assert rc == 0, err
  assert "scan_layers" not in json.loads((out / "run.json").read_text())
  rc, stdout, err = run(capsys, *argv, "--steps", "2")
  assert rc == 0 and "resuming from step 1" in err, err
  assert not json.loads((out / "run.json").read_text()).get("scan_layers")
  rc, stdout, err = run(capsys, "generate", "--adapter", out, "--prompt", "good film",
                        "--max-new-tokens", "2")
  assert rc == 0 and stdout.strip(), err


def test_eval_base_model_on_a_file(capsys, files, caplog):
  rc, stdout, err = run(capsys, "eval", "--model", files / "bert", "--data", files / "reviews.csv",
                        "--text-column", "review", "--label-column", "sentiment")
  assert rc == 0, err
  assert "base model (untrained head)" in stdout and "test accuracy" in stdout
  # no adapter: the head really is a fresh one, and the loader says so
  assert any("initialized" in r.getMessage() and "classifier" in r.getMessage()
             for r in caplog.records)


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


# ------------------------------------------------------------------------------------------------
# the user's files: never clobbered, refused outputs are one line naming the path
# ------------------------------------------------------------------------------------------------

def test_merge_adapters_of_train_runs_reads_the_model_from_the_runs(capsys, files, lm_run,
                                                                   tmp_path):
  """Two `train --out` runs (here one run twice, and its adapter/ directory) combine without
  --model: the runs record it. (HF PEFT inputs and errors: test_cli_merge_adapters.py.)"""
  _, out = lm_run
  rc, so, err = run(capsys, "merge-adapters", "--adapter", f"a={out}",
                    "--adapter", f"b={out / 'adapter'}", "--weights", "0.5,0.5", "--method",
                    "cat", "--out", tmp_path / "m")
  assert rc == 0, err
  from peftjax.io import from_pretrained
  from peftjax.io.checkpoint import restore_adapter
  from peftjax.io.hf_peft import load_hf_peft
  _, params, _ = from_pretrained(files / "llama", scan_layers=True)
  alone = restore_adapter(out / "adapter", params)
  got = load_hf_peft(tmp_path / "m", params)
  pairs = [(g, w) for g, w in zip(jax.tree.leaves(got, is_leaf=peftjax.is_node),
                                  jax.tree.leaves(alone, is_leaf=peftjax.is_node))
           if isinstance(w, peftjax.lora.LoraWeight)]
  assert pairs
  for g, w in pairs:   # cat of an adapter with itself at weights 1/2, 1/2: the adapter
    assert g.rank == 2 * w.rank
    np.testing.assert_allclose(np.asarray(g.scale * g.a @ g.b), np.asarray(w.scale * w.a @ w.b),
                               rtol=1e-5, atol=1e-6)


def test_merge_adapters_refuses_runs_that_are_not_lora_on_the_base(capsys, lm_run, tmp_path):
  """A PiSSA/OLoRA/LoftQ run's factors belong to a changed base, a classification run's head is
  no adapter, an IA3 or QLoRA run's nodes are not LoRA on these weights: each is one line."""
  import shutil
  _, out = lm_run
  cases = (({"options": {"init": "pissa"}}, "was trained with --init pissa, on a changed base"),
           ({"options": {"init": "loftq"}}, "--init loftq"),
           ({"kind": "classification"}, "is a classification run"),
           ({"method": "ia3"}, "is a --method ia3 run; merge-adapters combines LoRA"),
           ({"method": "qlora"}, "is a --method qlora run"))
  for i, (change, says) in enumerate(cases):
    d = tmp_path / f"run{i}"
    shutil.copytree(out, d)
    run_json = json.loads((d / cli.RUN_FILE).read_text())
    for k, v in change.items():
      run_json[k] = {**run_json.get(k, {}), **v} if isinstance(v, dict) else v
    (d / cli.RUN_FILE).write_text(json.dumps(run_json))
    line = one_error(capsys, "merge-adapters", "--adapter", f"a={out}", "--adapter", f"b={d}",
                     "--out", tmp_path / "m")
    assert f"--adapter b={d}" in line and says in line, line
  assert not (tmp_path / "m").exists()


def test_merge_and_export_never_write_over_other_files(capsys, files, lm_run, tmp_path):
  _, out = lm_run
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "config.json").write_text('{"mine": true}')
  model, before = files / "llama", hashes(files / "llama")
  run_before = hashes(out)
  for cmd in ("merge", "export"):
    line = one_error(capsys, cmd, "--adapter", out, "--out", mine)
    assert f"--out {mine} is a directory that holds other files (config.json)" in line, line
    assert "--overwrite" in line
    line = one_error(capsys, cmd, "--adapter", out, "--out", model)  # the base model itself
    assert f"--out {model} is the base model {model}, which this command reads" in line, line
    line = one_error(capsys, cmd, "--adapter", out, "--out", out / "adapter")
    assert f"is inside the run directory {out}" in line, line
    line = one_error(capsys, cmd, "--adapter", out, "--out", mine / "config.json")
    assert line.endswith(f"--out {mine / 'config.json'} is a file, not a directory; give a "
                         f"directory"), line
  assert hashes(model) == before and hashes(out) == run_before
  assert (mine / "config.json").read_text() == '{"mine": true}'
  # its own output again is fine (no --overwrite needed); other files only with --overwrite
  for _ in range(2):
    rc, stdout, err = run(capsys, "merge", "--adapter", out, "--out", tmp_path / "merged")
    assert rc == 0, err
  assert json.loads((tmp_path / "merged" / "peftjax_output.json").read_text())["command"] == \
      "merge"
  line = one_error(capsys, "export", "--adapter", out, "--out", tmp_path / "merged")
  assert "holds other files" in line  # a merge's directory is not an export's
  rc, stdout, err = run(capsys, "export", "--adapter", out, "--out", mine, "--overwrite")
  assert rc == 0 and (mine / "adapter_config.json").is_file(), err
  assert (mine / "config.json").read_text() == '{"mine": true}'  # other names stay


def test_unwritable_out_is_one_line(capsys, lm_run, tmp_path, monkeypatch):
  _, out = lm_run
  locked = tmp_path / "locked"
  locked.mkdir()
  if os.geteuid() == 0:  # root may write anywhere: play an unwritable directory
    real = os.access
    monkeypatch.setattr(cli.os, "access", lambda p, m: real(p, m) and Path(p) != locked)
  else:
    locked.chmod(0o555)
  line = one_error(capsys, "merge", "--adapter", out, "--out", locked / "m")
  assert line.endswith(f"--out {locked / 'm'}: cannot write into {locked} (permission denied)")
  line = one_error(capsys, "train", "--model", "minilm", "--out", locked / "run")
  assert "cannot write into" in line
  assert not any(locked.iterdir())


def test_train_out_refuses_other_files_and_other_finished_runs(capsys, files, lm_run, tmp_path):
  d = tmp_path / "run"
  argv = copy_run(lm_run, d)
  shutil.rmtree(d / "checkpoints")  # the user deleted the checkpoints of the finished run
  before = hashes(d)
  other = [str(a) for a in argv[:argv.index("--method") + 1]] + ["ia3"] + [
      str(a) for a in argv[argv.index("--data"):]]
  line = one_error(capsys, *other)
  assert line.startswith(f"peftjax train: error: {d} holds a finished run of another "
                         f"configuration (method, options differ; it has method='lora'"), line
  assert "--overwrite" in line and hashes(d) == before
  # a directory of other files, a file, the model directory: refused before anything loads
  user = tmp_path / "user"
  user.mkdir()
  (user / "notes.txt").write_text("mine")
  line = one_error(capsys, *other[:-1], user)
  assert f"--out {user} holds other files (notes.txt) and no run.json" in line, line
  line = one_error(capsys, *other[:-1], user / "notes.txt")
  assert f"--out {user / 'notes.txt'} is a file, not a directory" in line
  line = one_error(capsys, *other[:-1], files / "llama")
  assert "is the model directory" in line
  assert (user / "notes.txt").read_text() == "mine" and hashes(d) == before


def test_retry_of_a_run_that_never_saved_a_step_and_runs_work_from_anywhere(
    capsys, files, tmp_path, monkeypatch):
  """Relative --model/--data: run.json stores them absolute, so the run evaluates from another
  directory; a failed first try (run.json, no checkpoint) does not block the corrected one."""
  work = tmp_path / "work"
  shutil.copytree(files / "llama", work / "models" / "tiny")
  shutil.copy(files / "text.txt", work / "text.txt")
  (work / "run" / "checkpoints").mkdir(parents=True)
  (work / "run" / "run.json").write_text(json.dumps({"method": "lora", "batch_size": 512}))
  (work / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
  monkeypatch.chdir(work)
  rc, stdout, err = run(capsys, "train", "--model", "models/tiny", "--method", "ia3", "--data",
                        "text.txt", "--steps", "2", "--batch-size", "2", "--seq-len", "8",
                        "--out", "run")
  assert rc == 0, err
  rec = json.loads((work / "run" / "run.json").read_text())
  assert (rec["model"], rec["data"]) == (str(work / "models" / "tiny"), str(work / "text.txt"))
  assert '"loss": 9.0' not in (work / "run" / "metrics.jsonl").read_text()  # started over
  ppl = json.loads((work / "run" / "results.json").read_text())["rows"][-1]["perplexity"]
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  rc, stdout, err = run(capsys, "eval", "--adapter", work / "run")
  assert rc == 0 and ppl in stdout, err
  # a run.json of peftjax 0.1 (relative paths, no cwd): a clear error from elsewhere
  rec.update(model="models/tiny", data="text.txt")
  del rec["cwd"]
  (work / "run" / "run.json").write_text(json.dumps(rec))
  line = one_error(capsys, "eval", "--adapter", work / "run")
  assert (f"{work / 'run' / 'run.json'} records --model models/tiny, a path relative to the "
          f"directory `peftjax train` ran in, and it is not found from here") in line, line
  # with the directory recorded, relative paths resolve against it
  (work / "run" / "run.json").write_text(json.dumps({**rec, "cwd": str(work)}))
  rc, stdout, err = run(capsys, "eval", "--adapter", work / "run")
  assert rc == 0 and ppl in stdout, err
  # a model moved away: named
  (work / "run" / "run.json").write_text(json.dumps(
      {**rec, "model": str(work / "models" / "tiny"), "data": str(work / "text.txt")}))
  (work / "models" / "tiny").rename(work / "models" / "moved")
  line = one_error(capsys, "eval", "--adapter", work / "run")
  assert f"records --model {work / 'models' / 'tiny'}, which does not exist (moved" in line, line


def test_resume_falls_back_to_the_last_checkpoint_that_reads(capsys, lm_run, tmp_path):
  d = tmp_path / "run"
  argv = copy_run(lm_run, d)
  adapter = adapter_arrays(d / "adapter")
  for f in (d / "checkpoints" / "2").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  rc, stdout, err = run(capsys, *argv)
  assert rc == 0, err
  assert f"checkpoint {d / 'checkpoints' / '2'} does not read completely" in err
  assert f"resuming from step 1 ({d / 'checkpoints' / '1'})" in err
  assert "Traceback" not in err and "Event loop is closed" not in err
  assert (d / "checkpoints" / "2.corrupt").is_dir() and (d / "checkpoints" / "2").is_dir()
  assert "baseline from" in err  # the base model is not evaluated again on resume
  # step 2 again from step 1: the same adapter as the uninterrupted run's, bit for bit
  for a, b in zip(adapter, adapter_arrays(d / "adapter"), strict=True):
    np.testing.assert_array_equal(a, b)


def test_eval_of_a_truncated_adapter_is_one_line(capsys, lm_run, tmp_path):
  d = tmp_path / "run"
  copy_run(lm_run, d)
  for f in (d / "adapter").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
  line = one_error(capsys, "eval", "--adapter", d)
  assert line.startswith(f"peftjax eval: error: {d / 'adapter'}: the adapter data does not read "
                         f"completely (truncated or corrupt files?)"), line


def test_a_data_file_that_is_not_utf8_is_named(capsys, files, tmp_path):
  bad = tmp_path / "latin1.csv"
  bad.write_bytes("review,sentiment\nvery good,pos\nmal jou\xe9,neg\n".encode("latin-1"))
  line = one_error(capsys, "train", "--model", files / "bert", "--data", bad, "--text-column",
                   "review", "--label-column", "sentiment", "--steps", "1")
  assert line == (f"peftjax train: error: {bad}: not UTF-8 text: byte 0xe9 at offset 38 (line 3) "
                  f"does not decode; data files are read as UTF-8: save it as UTF-8 (e.g. iconv "
                  f"-f latin1 -t utf-8)")


@pytest.mark.newest_only
def test_sigint_during_training_saves_and_says_how_to_resume(files, tmp_path):
  """The real command in a subprocess: Ctrl-C after the first checkpoint finishes the step, writes
  a checkpoint and the adapter, prints one line and exits 130 without a traceback."""
  out = tmp_path / "run"
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [
      p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
  argv = [sys.executable, "-m", "peftjax.cli", "train", "--model", str(files / "llama"),
          "--method", "lora", "--rank", "2", "--data", str(files / "text.txt"), "--steps",
          "100000", "--batch-size", "2", "--seq-len", "8", "--save-every", "5", "--out", str(out)]
  proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "5").is_dir():
      assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
      time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 130, err
  assert "Traceback" not in err, err
  last = err.strip().splitlines()[-1]
  step = int(last.split(" at step ")[1].split("/")[0])
  assert last == (f"peftjax train: SIGINT at step {step}/100000: saved checkpoint "
                  f"{out / 'checkpoints' / str(step)} and the adapter to {out / 'adapter'}; run "
                  f"the same command again to resume"), last
  assert step >= 5 and (out / "checkpoints" / str(step)).is_dir()
  assert (out / "adapter" / "manifest").is_dir()
