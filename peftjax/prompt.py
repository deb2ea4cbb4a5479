"""Prompt tuning (Lester et al., 2021): ``n`` trained soft tokens prepended to the input embeddings.

The frozen model is untouched; what trains is a :class:`SoftPrompt` node ``[n_tokens, hidden]``
kept beside the model's parameters in one tree, ``{"params": params, "prompt": SoftPrompt}``, so
``peftjax.optimizer``, ``split`` and ``summary`` see ``n_tokens * hidden`` trainable parameters and
nothing else. The model needs the ``inputs_embeds`` hook (the reference models have it)::

  tree = peftjax.prompt.apply(params, n_tokens=20, init="text", text_ids=tok("Classify:").ids)
  forward = peftjax.prompt.forward(model)            # lifted: params may hold other nodes too
  logits = forward(tree, input_ids, attention_mask)  # virtual positions stripped from the output
  out = peftjax.prompt.generate(model, tree, input_ids, attention_mask, max_new_tokens=20)

The pieces are pure functions you can call yourself: :func:`embed` (token ids to embeddings),
:func:`prepend` (soft tokens before the embeddings, attention mask and token types extended),
:func:`extend_labels`, :func:`strip`. Soft tokens come first in every row, before any left
padding; they are real tokens to the mask, so with a causal model they see only themselves, every
real token sees all of them, and padding stays invisible. A P-tuning prompt encoder
(:mod:`peftjax.ptuning`) can stand in the ``"prompt"`` slot: everything here materializes whatever
node is there.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peftjax._src import additive
from peftjax._src import nodes as nodes_lib
from peftjax._src.additive import SoftPrompt
from peftjax._src.lift import lift

__all__ = ["SoftPrompt", "init", "apply", "embed", "prepend", "extend_labels", "strip", "forward",
           "generate", "INITS"]

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


def apply(params, n_tokens: int, **kwargs) -> dict:
  """``{"params": params, "prompt": init(params, n_tokens, **kwargs)}``: the tree to train.

  >>> import jax.numpy as jnp, peftjax
  >>> params = {"embed_tokens": {"embedding": jnp.ones((10, 4))}}
  >>> tree = peftjax.prompt.apply(params, 5)
  >>> peftjax.summary(tree).trainable           # p * d
  20
  """
  return {"params": params, "prompt": init(params, n_tokens, **kwargs)}


def _unpack(tree, slot: str, method: str):
  if not isinstance(tree, dict) or "params" not in tree or slot not in tree:
    got = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
    raise TypeError(f"{method} expects the tree {{'params': ..., '{slot}': ...}} built by its "
                    f"apply(); got {got}")
  return tree["params"], tree[slot]


def embed(params, input_ids, *, embedding_path: Optional[str] = None):
  """Token embeddings ``[batch, seq, hidden]`` of ``input_ids [batch, seq]`` (``params``' table).

  >>> import jax.numpy as jnp, peftjax
  >>> params = {"embed_tokens": {"embedding": jnp.arange(6.).reshape(3, 2)}}
  >>> peftjax.prompt.embed(params, jnp.array([[2, 0]])).tolist()
  [[[4.0, 5.0], [0.0, 1.0]]]
  """
  _, table = additive.find_embedding(params, embedding_path)
  return jnp.take(nodes_lib.materialize(table), jnp.asarray(input_ids), axis=0)


def prepend(prompt, inputs_embeds, attention_mask=None, *, token_type_ids=None) -> dict:
  """Model inputs with the soft tokens first: ``inputs_embeds``, ``attention_mask`` (and types).

  Args:
    prompt: ``[p, hidden]``: a :class:`SoftPrompt` (or any prompt node) or an array.
    inputs_embeds: ``[batch, seq, hidden]``.
    attention_mask: ``[batch, seq]`` (1 real, 0 padding); default all ones.
    token_type_ids: ``[batch, seq]`` or None; extended with zeros.

  Returns:
    ``{"inputs_embeds": [batch, p + seq, hidden], "attention_mask": [batch, p + seq]}`` (ones for
    the soft tokens), plus ``"token_type_ids"`` if given: keyword arguments for the model.

  Raises:
    ValueError: shapes that do not fit together.

  >>> import jax.numpy as jnp, peftjax
  >>> out = peftjax.prompt.prepend(jnp.ones((2, 4)), jnp.zeros((1, 3, 4)), jnp.array([[0, 1, 1]]))
  >>> out["inputs_embeds"].shape, out["attention_mask"].tolist()
  ((1, 5, 4), [[1, 1, 0, 1, 1]])
  """
  prompt = nodes_lib.materialize(prompt)
  if inputs_embeds.ndim != 3:
    raise ValueError(f"inputs_embeds must be [batch, seq, hidden], got shape "
                     f"{tuple(inputs_embeds.shape)}")
  b, t, d = inputs_embeds.shape
  if prompt.ndim != 2 or prompt.shape[1] != d:
    raise ValueError(f"the prompt must be [n_tokens, {d}] to match inputs_embeds "
                     f"{tuple(inputs_embeds.shape)}, got shape {tuple(prompt.shape)}")
  p = prompt.shape[0]
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  if tuple(attention_mask.shape) != (b, t):
    raise ValueError(f"attention_mask must have shape {(b, t)}, got {tuple(attention_mask.shape)}")
  soft = jnp.broadcast_to(prompt.astype(inputs_embeds.dtype)[None], (b, p, d))
  out = {"inputs_embeds": jnp.concatenate([soft, inputs_embeds], axis=1),
         "attention_mask": jnp.concatenate([jnp.ones((b, p), attention_mask.dtype),
                                            attention_mask], axis=1)}
  if token_type_ids is not None:
    out["token_type_ids"] = jnp.concatenate(
        [jnp.zeros((b, p), token_type_ids.dtype), token_type_ids], axis=1)
  return out


def extend_labels(labels, n_tokens: int, *, ignore_index: int = -100):
  """Per-token labels ``[batch, seq] -> [batch, n_tokens + seq]``, the soft positions ignored.

  >>> import jax.numpy as jnp, peftjax
  >>> peftjax.prompt.extend_labels(jnp.array([[5, 6]]), 2).tolist()
  [[-100, -100, 5, 6]]
  """
  labels = jnp.asarray(labels)
  pad = jnp.full(labels.shape[:1] + (n_tokens,) + labels.shape[2:], ignore_index, labels.dtype)
  return jnp.concatenate([pad, labels], axis=1)


def strip(x, n_tokens: int):
  """Drops the soft positions: ``[batch, n_tokens + seq, ...] -> [batch, seq, ...]``.

  >>> import jax.numpy as jnp, peftjax
  >>> peftjax.prompt.strip(jnp.zeros((2, 7, 3)), 4).shape
  (2, 3, 3)
  """
  return x[:, n_tokens:]


def _strip_outputs(out, p: int, total: int):
  def visit(x):
    if hasattr(x, "ndim") and x.ndim >= 3 and x.shape[1] == total:
      return x[:, p:]
    return x
  return jax.tree_util.tree_map(visit, out)


def forward(model, *, embedding_path: Optional[str] = None, strip_outputs: bool = True):
  """``model.apply`` taking ``{"params", "prompt"}`` trees: the soft tokens are prepended.

  Args:
    model: a Flax module whose ``__call__`` accepts ``inputs_embeds=`` (and ``attention_mask=``).
    embedding_path: see :func:`init`.
    strip_outputs: drop the soft positions from outputs with a sequence axis (arrays of rank >= 3
      whose axis 1 has ``p + seq`` entries: logits, hidden states), so they line up with
      ``input_ids``; pooled or classification outputs are returned as they are.

  Returns:
    ``f(tree, input_ids, attention_mask=None, **kwargs)``, lifted with :func:`peftjax.lift`
    (``tree["params"]`` may hold LoRA, adapter, quantized ... nodes). ``token_type_ids`` in
    ``kwargs`` are extended; other keyword arguments go to the model as they are.

  Raises:
    TypeError: the model has no ``inputs_embeds`` argument.

  >>> import jax, jax.numpy as jnp, peftjax
  >>> from peftjax.models import LlamaConfig, LlamaForCausalLM
  >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
  ...                                      num_layers=1, num_heads=2, num_kv_heads=1))
  >>> params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 3), jnp.int32))["params"]
  >>> tree = peftjax.prompt.apply(params, 4)
  >>> jax.jit(peftjax.prompt.forward(model))(tree, jnp.ones((2, 3), jnp.int32)).shape
  (2, 3, 16)
  """
  additive.check_hook(model, "inputs_embeds", "prompt tuning")

  def run(tree, input_ids, attention_mask=None, **kwargs):
    params, prompt = _unpack(tree, "prompt", "peftjax.prompt.forward")
    emb = embed(params, input_ids, embedding_path=embedding_path)
    inputs = prepend(prompt, emb, attention_mask, token_type_ids=kwargs.pop("token_type_ids", None))
    out = model.apply({"params": params}, **inputs, **kwargs)
    if strip_outputs:
      out = _strip_outputs(out, prompt.shape[0], inputs["attention_mask"].shape[1])
    return out

  return lift(run)


def generate(model, tree, input_ids, attention_mask=None, *, embedding_path: Optional[str] = None,
             **kwargs):
  """KV-cache generation with the soft prompt before every row (a causal reference model).

  Args:
    model: a :class:`peftjax.models.LlamaForCausalLM`.
    tree: ``{"params": ..., "prompt": ...}``.
    input_ids: int ``[batch, prompt_len]`` (left padding recommended).
    attention_mask: ``[batch, prompt_len]``; default all ones.
    embedding_path: see :func:`init`.
    **kwargs: ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``stop_tokens``,
      ``pad_token_id``, ``key``, ``cache_dtype`` as for :func:`peftjax.models.generate`.

  Returns:
    :class:`peftjax.models.GenerateOutput` ``(tokens [batch, max_new_tokens], lengths [batch])``.

  Example:
    >>> out = peftjax.prompt.generate(model, tree, ids, mask, max_new_tokens=8)  # doctest: +SKIP
  """
  params, prompt = _unpack(tree, "prompt", "peftjax.prompt.generate")
  input_ids = jnp.asarray(input_ids, jnp.int32)
  inputs = prepend(prompt, embed(params, input_ids, embedding_path=embedding_path),
                   None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32))
  return additive.generate_from_embeds(model, params, inputs["inputs_embeds"],
                                       inputs["attention_mask"], **kwargs)
