"""Prompt tuning (Lester et al., 2021): ``n`` trained soft tokens prepended to the input embeddings.

The frozen model is untouched; what trains is a :class:`SoftPrompt` node ``[n_tokens, hidden]``
kept beside the model's parameters in one tree, ``peftjax.Tuned(params, prompt=SoftPrompt)``, so
``peftjax.optimizer``, ``split`` and ``summary`` see ``n_tokens * hidden`` trainable parameters and
nothing else. The model needs the ``inputs_embeds`` hook (the reference models have it)::

  tree = peftjax.prompt.apply(params, n_tokens=20, init="text", text_ids=tok("Classify:").ids)
  forward = peftjax.forward(model)                   # lifted: params may hold other nodes too
  logits = forward(tree, input_ids, attention_mask)  # virtual positions stripped from the output
  out = peftjax.generate(model, tree, input_ids, attention_mask, max_new_tokens=20)

The pieces are pure functions you can call yourself: :func:`embed` (token ids to embeddings),
:func:`prepend` (soft tokens before the embeddings, attention mask and token types extended),
:func:`extend_labels`, :func:`strip`. Soft tokens come first in every row, before any left
padding; they are real tokens to the mask, so with a causal model they see only themselves, every
real token sees all of them, and padding stays invisible. A P-tuning prompt encoder
(:mod:`peftjax.ptuning`) can stand in the ``prompt`` slot: everything here materializes whatever
node is there. ``forward`` and ``generate`` are :func:`peftjax.forward` and
:func:`peftjax.generate`, which read every tuned tree.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peftjax._src import additive
from peftjax._src import method as method_lib
from peftjax._src import nodes as nodes_lib
from peftjax._src import tuned as tuned_lib
from peftjax._src.additive import SoftPrompt
from peftjax._src.tuned import Tuned, embed, prepend, strip

__all__ = ["SoftPrompt", "init", "apply", "embed", "prepend", "extend_labels", "strip", "forward",
           "generate", "INITS", "METHOD"]

INITS = ("vocab", "random", "text")


def init(params, n_tokens: int, *, init: str = "vocab", text_ids: Optional[Sequence[int]] = None,
         key=None, embedding_path: Optional[str] = None, dtype=None) -> SoftPrompt:
  """A :class:`SoftPrompt` ``[n_tokens, hidden]`` for the model whose parameters are ``params``.

  Args:
    params: the model's parameters (the token embedding table is read from them).
    n_tokens: number of soft tokens ``p`` (> 0).
    init: ``"vocab"``: embeddings of ``p`` token ids sampled from the vocabulary (Lester et al.'s
      best); ``"random"``: ``U(-0.5, 0.5)``; ``"text"``: the embeddings of ``text_ids``, repeated
      or cut to ``p`` tokens (e.g. a task description).
    text_ids: token ids for ``init="text"``.
    key: PRNG key for ``"vocab"``/``"random"`` (default ``key(0)``).
    embedding_path: path of the ``[vocab, hidden]`` table when it is not at a usual place
      (``embed_tokens/embedding``, ``embeddings/word_embeddings/embedding``, ...).
    dtype: dtype of the prompt (default: the table's).

  Returns:
    A :class:`SoftPrompt`.

  Raises:
    ValueError: ``n_tokens <= 0``, an unknown ``init``, missing or out-of-range ``text_ids``, no
      embedding table found.

  >>> import jax.numpy as jnp, peftjax
  >>> params = {"embed_tokens": {"embedding": jnp.arange(12.).reshape(6, 2)}}
  >>> peftjax.prompt.init(params, 3, init="text", text_ids=[4, 5]).tokens
  Array([[ 8.,  9.],
         [10., 11.],
         [ 8.,  9.]], dtype=float32)
  """
  p = additive.check_positive_int(n_tokens, "n_tokens")
  if init not in INITS:
    raise ValueError(f"init={init!r} is not one of {INITS}")
  _, table = additive.find_embedding(params, embedding_path)
  table = nodes_lib.materialize(table)
  vocab, hidden = table.shape
  dtype = jnp.dtype(dtype or table.dtype)
  key = additive.as_key(key)
  if init == "random":
    (tokens,) = additive.random_arrays(key, (((p, hidden), "uniform", 0.5),), jnp.float32)
  elif init == "vocab":
    ids = jax.random.choice(key, vocab, (p,), replace=p > vocab)
    tokens = table[ids]
  else:
    if text_ids is None or len(text_ids) == 0:
      raise ValueError("init='text' needs text_ids: the token ids of a text (non-empty)")
    ids = np.asarray(text_ids).reshape(-1)
    if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= vocab:
      raise ValueError(f"text_ids must be integer token ids in [0, {vocab}); got {list(ids[:8])}")
    tokens = table[np.resize(ids, p)]
  return SoftPrompt(tokens=jnp.asarray(tokens, dtype))


def apply(params, n_tokens: int, **kwargs) -> Tuned:
  """``Tuned(params, prompt=init(params, n_tokens, **kwargs))``: the tree to train.

  >>> import jax.numpy as jnp, peftjax
  >>> params = {"embed_tokens": {"embedding": jnp.ones((10, 4))}}
  >>> tree = peftjax.prompt.apply(params, 5)
  >>> peftjax.summary(tree).trainable           # p * d
  20
  """
  return Tuned(params, prompt=init(params, n_tokens, **kwargs))


def extend_labels(labels, n_tokens: int, *, ignore_index: int = -100):
  """Per-token labels ``[batch, seq] -> [batch, n_tokens + seq]``, the soft positions ignored.

  >>> import jax.numpy as jnp, peftjax
  >>> peftjax.prompt.extend_labels(jnp.array([[5, 6]]), 2).tolist()
  [[-100, -100, 5, 6]]
  """
  labels = jnp.asarray(labels)
  pad = jnp.full(labels.shape[:1] + (n_tokens,) + labels.shape[2:], ignore_index, labels.dtype)
  return jnp.concatenate([pad, labels], axis=1)


def forward(model, *, embedding_path: Optional[str] = None, strip_outputs: bool = True):
  """:func:`peftjax.forward`, after checking that ``model`` takes ``inputs_embeds=``.

  Raises:
    TypeError: the model has no ``inputs_embeds`` argument.
  """
  additive.check_hook(model, "inputs_embeds", "prompt tuning")
  return tuned_lib.forward(model, embedding_path=embedding_path, strip_outputs=strip_outputs)


def generate(model, tree, input_ids, attention_mask=None, **kwargs):
  """:func:`peftjax.generate` for a tree with a soft prompt (a TypeError if it has none)."""
  tuned_lib.require_slot(tree, "prompt", "peftjax.prompt.generate")
  return tuned_lib.generate(model, tree, input_ids, attention_mask, **kwargs)


METHOD = method_lib.Method(
    name="prompt", apply=apply,
    description="prompt tuning: trained soft tokens before the input",
    options=(method_lib.Option("n_tokens", 20, "soft tokens", type=method_lib.positive_int),
             method_lib.Option("prompt_init", "vocab", "soft prompt initialization",
                               kwarg="init", choices=("vocab", "random"))),
    forward=tuned_lib.forward, mergeable=False, hf_peft_type="PROMPT_TUNING", learning_rate=1e-2)
