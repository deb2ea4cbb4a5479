"""The one tuned-tree shape, and the forward pass and generation loop that read it.

Methods that rewrite leaves (LoRA, IA3, adapters, selective methods) return the parameter tree
itself, with nodes at the rewritten leaves. Methods that add model *inputs* rather than weights
(prompt tuning, P-tuning: a soft prompt before the embeddings; prefix tuning, P-tuning v2:
per-layer key/value prefixes) return a :class:`Tuned`: the parameters plus those slots. A
:class:`Tuned` is a registered pytree, so ``split``, ``optimizer``, ``summary``, ``merge``,
``lift`` and checkpoints see it like any tree; its leaves' paths are ``params/...``,
``prefix/...``, ``prompt/...``.

Every consumer reads a tree through :func:`as_tuned`, the one place that knows the accepted
shapes: a :class:`Tuned`, a plain parameter tree, Flax's ``{"params": tree}`` variables, and the
dict ``{"params": ..., "prompt" | "prefix": ...}`` that peftjax 0.1 returned.

:func:`forward` runs a model on any of them (soft prompt prepended, prefixes passed to every
layer, nodes lifted); :func:`generate` is KV-cache generation on any of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from peftjax._src import additive
from peftjax._src import nodes as nodes_lib

__all__ = ["Tuned", "as_tuned", "SLOTS", "forward", "generate", "embed", "prepend", "strip"]

#: The model-input slots of a :class:`Tuned` besides ``params``.
SLOTS = ("prefix", "prompt")


@dataclasses.dataclass(frozen=True)
class Tuned:
  """Parameters plus the model inputs a method trains.

  Attributes:
    params: the model's parameter tree (the inner tree, without Flax's ``{"params": ...}``);
      may hold nodes.
    prefix: ``None`` or per-layer key/value prefixes ``[layers, 2, n_tokens, kv_heads,
      head_dim]`` (a ``Prefix``/``PrefixMLP`` node or an array), given to every attention layer.
    prompt: ``None`` or soft tokens ``[n_tokens, hidden]`` (a ``SoftPrompt``/``PromptEncoder``
      node or an array), prepended to the input embeddings.

  >>> import jax, jax.numpy as jnp, peftjax
  >>> t = peftjax.Tuned({"w": jnp.ones(2)}, prompt=jnp.zeros((3, 2)))
  >>> [peftjax._src.targeting.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(t)[0]]
  ['params/w', 'prompt']
  >>> t.replace(prompt=None).slots()
  {}
  """

  params: Any
  prefix: Any = None
  prompt: Any = None

  def replace(self, **changes) -> "Tuned":
    return dataclasses.replace(self, **changes)

  def slots(self) -> dict:
    """``{slot: value}`` of the slots that are set."""
    return {s: getattr(self, s) for s in SLOTS if getattr(self, s) is not None}


jax.tree_util.register_dataclass(Tuned, data_fields=["params", *SLOTS], meta_fields=[])


def as_tuned(tree) -> Tuned:
  """``tree`` as a :class:`Tuned` (see the module docstring for the accepted shapes).

  >>> import jax.numpy as jnp
  >>> as_tuned({"params": {"w": 1}}).params, as_tuned({"w": 1}).params
  ({'w': 1}, {'w': 1})
  >>> as_tuned({"params": {"w": 1}, "prompt": 2}).prompt
  2
  """
  if isinstance(tree, Tuned):
    return tree
  if isinstance(tree, Mapping) and "params" in tree and set(tree) <= {"params", *SLOTS}:
    return Tuned(tree["params"], **{s: tree[s] for s in SLOTS if s in tree})
  return Tuned(tree)


def require_slot(tree, slot: str, who: str) -> Tuned:
  """``as_tuned(tree)``, which must have ``slot`` set (else a TypeError naming ``who``)."""
  t = as_tuned(tree)
  if getattr(t, slot) is None:
    got = type(tree).__name__ if not isinstance(tree, Mapping) else f"keys {sorted(tree)}"
    raise TypeError(f"{who} expects a tree with a {slot} (peftjax.Tuned(params, {slot}=...), as "
                    f"the {slot} method's apply() returns); got {got}")
  return t


# ------------------------------------------------------------------------------------------------
# model inputs: soft prompts and prefixes
# ------------------------------------------------------------------------------------------------

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


def _batch_of(args, kwargs) -> int:
  x = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs_embeds"))
  if x is None or not hasattr(x, "shape"):
    raise TypeError("a prefix needs input_ids (first argument) or inputs_embeds= to know the "
                    "batch size")
  return x.shape[0]


# ------------------------------------------------------------------------------------------------
# forward and generate
# ------------------------------------------------------------------------------------------------

def forward(model, *, embedding_path: Optional[str] = None, strip_outputs: bool = True):
  """``model.apply`` on any tuned tree: ``f(tree, *args, **kwargs)``, lifted.

  ``tree`` is anything :func:`as_tuned` accepts. Its ``params`` go to the model as
  ``{"params": ...}`` (nodes run through :func:`peftjax.lift`); a ``prefix`` is broadcast over
  the batch and passed as ``prefix=``; a ``prompt`` is prepended to the embeddings of
  ``input_ids`` (``attention_mask`` and ``token_type_ids`` extended), and, with
  ``strip_outputs``, its positions are dropped from outputs with a sequence axis (arrays of rank
  >= 3 whose axis 1 has ``p + seq`` entries), so logits line up with ``input_ids``..

  Raises:
    TypeError: the tree has a prompt (prefix) and the model takes no ``inputs_embeds=``
      (``prefix=``).

  >>> import jax, jax.numpy as jnp, peftjax
  >>> from peftjax.models import LlamaConfig, LlamaForCausalLM
  >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,
  ...                                      num_layers=1, num_heads=2, num_kv_heads=1))
  >>> params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 3), jnp.int32))["params"]
  >>> f = peftjax.forward(model)
  >>> f(peftjax.lora.apply(params, rank=2), jnp.ones((2, 3), jnp.int32)).shape
  (2, 3, 16)
  >>> f(peftjax.prompt.apply(params, 4), jnp.ones((2, 3), jnp.int32)).shape
  (2, 3, 16)
  """
  from peftjax._src.lift import lift

  def run(tree, *args, **kwargs):
    t = as_tuned(tree)
    variables = {"params": t.params}
    if t.prefix is not None:
      additive.check_hook(model, "prefix", "prefix tuning")
      kwargs["prefix"] = additive.batch_prefix(nodes_lib.materialize(t.prefix),
                                               _batch_of(args, kwargs))
    if t.prompt is None:
      return model.apply(variables, *args, **kwargs)
    additive.check_hook(model, "inputs_embeds", "prompt tuning")
    args = list(args)
    input_ids = args.pop(0) if args else kwargs.pop("input_ids")
    mask = args.pop(0) if args else kwargs.pop("attention_mask", None)
    if args:
      raise TypeError("with a soft prompt, pass model arguments after attention_mask by keyword")
    inputs = prepend(t.prompt, embed(t.params, input_ids, embedding_path=embedding_path), mask,
                     token_type_ids=kwargs.pop("token_type_ids", None))
    n_virtual = t.prompt.shape[0]
    for name, fill in (("labels", -100), ("loss_weights", 0)):   # the fused loss's targets
      if kwargs.get(name) is not None:
        kwargs[name] = jnp.pad(kwargs[name], ((0, 0), (n_virtual, 0)), constant_values=fill)
    out = model.apply(variables, **inputs, **kwargs)
    if strip_outputs:
      out = _strip_outputs(out, t.prompt.shape[0], inputs["attention_mask"].shape[1])
    return out

  return lift(run)


def generate(model, tree, input_ids, attention_mask=None, *, embedding_path: Optional[str] = None,
             **kwargs):
  """KV-cache generation from any tuned tree (a causal reference model).

  A soft prompt goes before every row (as embeddings), a prefix into every layer, nodes in
  ``params`` are lifted (merge mergeable ones first, ``peftjax.merge``, for the fastest decode).

  Args:
    model: a :class:`peftjax.models.LlamaForCausalLM`.
    tree: anything :func:`as_tuned` accepts.
    input_ids: int ``[batch, prompt_len]`` (left padding recommended).
    attention_mask: ``[batch, prompt_len]``; default all ones.
    embedding_path: where the token embedding table is, if not at a usual place.
    **kwargs: ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``stop_tokens``,
      ``pad_token_id``, ``key``, ``cache_dtype`` as for :func:`peftjax.models.generate`.

  Returns:
    :class:`peftjax.models.GenerateOutput` ``(tokens [batch, max_new_tokens], lengths [batch])``.

  Example:
    >>> out = peftjax.generate(model, tree, ids, mask, max_new_tokens=8)  # doctest: +SKIP
  """
  from peftjax.models.generate import generate as generate_tokens
  t = as_tuned(tree)
  if t.prefix is not None:
    kwargs["prefix"] = jnp.asarray(nodes_lib.materialize(t.prefix))
  if t.prompt is None:
    return generate_tokens(model, t.params, input_ids, attention_mask, **kwargs)
  input_ids = jnp.asarray(input_ids, jnp.int32)
  inputs = prepend(t.prompt, embed(t.params, input_ids, embedding_path=embedding_path),
                   None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32))
  return generate_tokens(model, t.params, attention_mask=inputs["attention_mask"],
                         inputs_embeds=inputs["inputs_embeds"], **kwargs)
