"""The ``peftjax`` command line.

    peftjax train --model minilm --method lora --data rotten_tomatoes --steps 300
    peftjax train --model smollm2 --method lora --data moby_dick --steps 50 --seq-len 128
    peftjax generate --model smollm2 --prompt "The whale"
    peftjax methods

``train`` fine-tunes a real model on a real dataset with one PEFT method, shows a progress bar,
evaluates the base model (and, for classification, a trained linear head on the frozen model)
before, and prints a final comparison table; ``--out DIR`` keeps ``metrics.jsonl``, the result
table and the trained adapter (only the trainable leaves, safetensors).

Models: ``minilm`` (all-MiniLM-L6-v2, BERT), ``smollm2`` (SmolLM2-135M-Instruct, Llama, GGUF),
an HF model directory or a ``.gguf`` file. Datasets: ``rotten_tomatoes`` (sentiment, with an
encoder), ``moby_dick`` or a ``.txt`` file (language modelling, with a decoder).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import peftjax
from peftjax.train import TrainConfig, evaluate, train


def _method_lora(params, a):
  return peftjax.lora.apply(params, rank=a.rank, alpha=a.alpha, targets=a.targets,
                            dropout=a.lora_dropout, key=jax.random.key(a.seed))


def _method_qlora(params, a):
  from peftjax import qlora
  return qlora.apply(params, rank=a.rank, alpha=a.alpha, targets=a.targets,
                     key=jax.random.key(a.seed))


def _method_ia3(params, a):
  from peftjax import ia3
  return ia3.apply(params, targets=a.targets)


def _method_adapter(params, a):
  from peftjax import adapters
  return adapters.apply(params, bottleneck=a.bottleneck, placement=a.placement,
                        key=jax.random.key(a.seed))


def _method_bitfit(params, a):
  from peftjax import bitfit
  return bitfit.apply(params, which=a.bitfit_which)


def _method_partial(params, a):
  from peftjax import partial
  return partial.apply(params, layers=-a.top_layers, targets=a.targets)


def _method_full(params, a):
  from peftjax import partial
  return partial.apply(
      params, targets=lambda p, x: hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating))


#: method name -> (apply(params, args) -> tree, one-line description)
METHODS: dict[str, tuple[Callable, str]] = {
    "lora": (_method_lora, "low-rank update W + (alpha/r) B A on the linear layers"),
    "qlora": (_method_qlora, "NF4 4-bit base (double quantization) + LoRA on top"),
    "ia3": (_method_ia3, "learned scaling of keys, values and the FFN activation"),
    "adapter": (_method_adapter, "bottleneck adapters (Houlsby/Pfeiffer/parallel)"),
    "bitfit": (_method_bitfit, "train the bias terms only"),
    "partial": (_method_partial, "train the top --top-layers layers fully"),
    "full": (_method_full, "full fine-tuning (every floating leaf trains)"),
}


def _add_train_args(p):
  p.add_argument("--model", default="minilm", help="minilm | smollm2 | HF dir | .gguf file")
  p.add_argument("--method", default="lora", choices=sorted(METHODS))
  p.add_argument("--data", default="rotten_tomatoes",
                 help="rotten_tomatoes (classification) | moby_dick | path.txt (language model)")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--lr", type=float, default=None, help="default: 1e-3 (PEFT), 5e-5 (full)")
  p.add_argument("--warmup", type=int, default=20)
  p.add_argument("--grad-accum", type=int, default=1)
  p.add_argument("--seq-len", type=int, default=64, help="max tokens per example / LM window")
  p.add_argument("--eval-limit", type=int, default=1024, help="test examples (0 = all)")
  p.add_argument("--eval-every", type=int, default=0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="directory for metrics.jsonl, results and adapter")
  p.add_argument("--no-baseline", action="store_true", help="skip the head-only baseline")
  g = p.add_argument_group("method options")
  g.add_argument("--rank", type=int, default=8)
  g.add_argument("--alpha", type=float, default=16)
  g.add_argument("--lora-dropout", type=float, default=0.0)
  g.add_argument("--targets", default=None, help="regex over parameter paths (default: method's)")
  g.add_argument("--bottleneck", type=int, default=64)
  g.add_argument("--placement", default="houlsby", choices=["houlsby", "pfeiffer", "parallel"])
  g.add_argument("--bitfit-which", default="all")
  g.add_argument("--top-layers", type=int, default=2)


def _table(rows: list[dict], cols: list[str]) -> str:
  w = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
  line = lambda vals: "| " + " | ".join(str(v).ljust(w[c]) for c, v in zip(cols, vals)) + " |"
  out = [line(cols), "|" + "|".join("-" * (w[c] + 2) for c in cols) + "|"]
  out += [line([r.get(c, "") for c in cols]) for r in rows]
  return "\n".join(out)


def _with_head(tree, task):
  """Makes the task's classification head train too (HF PEFT's ``modules_to_save``)."""
  if task.head_targets is None:
    return tree
  import re
  from peftjax import partial
  head = re.compile(task.head_targets)
  # Leaves a method already made trainable (BitFit's head bias, say) stay as they are.
  return partial.apply(tree, targets=lambda p, x: bool(head.fullmatch(p)) and not peftjax.is_node(x))


def cmd_train(a) -> dict:
  from peftjax import tasks
  if a.method == "full":
    a.lr = a.lr or 5e-5
  a.lr = a.lr or 1e-3
  lm = a.data != "rotten_tomatoes"
  t0 = time.perf_counter()
  if lm:
    task = tasks.lm_task(a.model, a.data, batch_size=a.batch_size, seq_len=a.seq_len,
                         seed=a.seed, scan_layers=False)
  else:
    task = tasks.classification_task(a.model, a.data, batch_size=a.batch_size, max_len=a.seq_len,
                                     seed=a.seed, eval_limit=a.eval_limit or None)
  print(f"loaded {a.model} and {a.data} in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
  cfg = TrainConfig(steps=a.steps, learning_rate=a.lr, warmup_steps=min(a.warmup, a.steps - 1),
                    grad_accum=a.grad_accum, eval_every=a.eval_every, seed=a.seed,
                    out_dir=a.out, log_every=10)
  rows = []

  def row(name, tree, metrics, seconds=None, steps=None):
    s = peftjax.summary(tree)
    r = {"model": name, "trainable": f"{s.trainable:,}", "trainable %": f"{100 * s.fraction:.3f}"}
    if lm:
      r["held-out nll"] = f"{metrics['nll']:.4f}"
      r["perplexity"] = f"{math.exp(metrics['nll']):.2f}"
    else:
      r["test accuracy"] = f"{100 * metrics['accuracy']:.2f}%"
      r["test loss"] = f"{metrics['loss']:.4f}"
    r["s/step"] = f"{seconds / steps:.3f}" if seconds else "-"
    rows.append(r)

  base_metrics = evaluate(task.eval_fn, task.params, task.eval_batches())
  row("base model" + ("" if lm else " (untrained head)"), task.params, base_metrics)
  if not lm and not a.no_baseline and a.method != "full":
    probe = _with_head(task.params, task)
    t1 = time.perf_counter()
    res = train(task.loss_fn, probe, task.train_loader, cfg.__class__(**{**cfg.__dict__,
                                                                         "out_dir": None}),
                eval_fn=task.eval_fn, eval_data=task.eval_batches)
    row("base + trained head (linear probe)", res.params, res.eval_metrics,
        time.perf_counter() - t1, a.steps)
  tuned = METHODS[a.method][0](task.params, a)
  if not lm and a.method != "full":
    tuned = _with_head(tuned, task)
  print(peftjax.summary(tuned).table(max_rows=15), file=sys.stderr)
  t1 = time.perf_counter()
  res = train(task.loss_fn, tuned, task.train_loader, cfg, eval_fn=task.eval_fn,
              eval_data=task.eval_batches)
  row(f"{a.method}" + ("" if lm or a.method == "full" else " + head"), res.params,
      res.eval_metrics, time.perf_counter() - t1, a.steps)
  cols = list(rows[0])
  table = _table(rows, cols)
  print("\n" + table)
  if a.out:
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.md"), "w") as f:
      f.write(table + "\n")
    with open(os.path.join(a.out, "results.json"), "w") as f:
      json.dump({"args": vars(a), "rows": rows}, f, indent=2, default=str)
    _save_trainable(res.params, os.path.join(a.out, "adapter.safetensors"))
  return {"rows": rows, "result": res}


def _save_trainable(tree, path):
  """The trainable leaves only, as safetensors keyed by path (a few MB for LoRA)."""
  from safetensors.numpy import save_file
  from peftjax._src.targeting import path_str
  trainable, _ = peftjax.split(tree)
  flat = jax.tree_util.tree_flatten_with_path(trainable)[0]
  save_file({path_str(p): np.asarray(x) for p, x in flat}, path)


def cmd_generate(a):
  from peftjax import tasks
  from peftjax.io.hf import from_pretrained
  from peftjax.models.generate import generate
  model, params, tok = from_pretrained(tasks.resolve_model(a.model))
  text = a.prompt
  if getattr(tok, "chat_template", None) and not a.raw:
    text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=False,
                                   add_generation_prompt=True)
  ids = np.asarray(tok(text)["input_ids"], np.int32)[None]
  out = generate(model, params, jnp.asarray(ids), max_new_tokens=a.max_new_tokens,
                 temperature=a.temperature, key=jax.random.key(a.seed),
                 stop_tokens=[tok.eos_token_id] if tok.eos_token_id is not None else None)
  seq = np.asarray(out.tokens if hasattr(out, "tokens") else out)[0]
  print(tok.decode(seq[ids.shape[1]:] if seq.shape[0] > ids.shape[1] else seq,
                   skip_special_tokens=True))


def cmd_methods(a):
  for name, (_, desc) in sorted(METHODS.items()):
    print(f"{name:10s} {desc}")


def main(argv=None):
  ap = argparse.ArgumentParser(prog="peftjax", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = ap.add_subparsers(dest="cmd", required=True)
  p = sub.add_parser("train", help="fine-tune a model with a PEFT method and compare to the base",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  _add_train_args(p)
  p = sub.add_parser("generate", help="generate text with a decoder")
  p.add_argument("--model", default="smollm2")
  p.add_argument("--prompt", required=True)
  p.add_argument("--max-new-tokens", type=int, default=48)
  p.add_argument("--temperature", type=float, default=0.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--raw", action="store_true", help="do not apply the chat template")
  sub.add_parser("methods", help="list the PEFT methods")
  a = ap.parse_args(argv)
  try:
    {"train": cmd_train, "generate": cmd_generate, "methods": cmd_methods}[a.cmd](a)
  except (ValueError, TypeError, FileNotFoundError) as e:
    print(f"peftjax {a.cmd}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
