"""Machinery shared by the additive methods (adapters, IA3, prompt/prefix/P-tuning).

* where a projection's output axes land in a ``dot_general`` result, so output-side nodes
  (bottleneck adapters, IA3) can transform ``x @ W`` for any kernel layout, stacked or not;
* the default *placements*: which kernels are attention outputs, FFN outputs, keys, values, in the
  reference models and in common Flax naming schemes;
* the trainable nodes of the prompt family (:class:`SoftPrompt`, :class:`Prefix`) and their
  ``finalize`` step that drops a training-time reparameterization;
* the model hooks those methods need (``inputs_embeds``, ``prefix``) and KV-cache generation from
  input embeddings.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from peftjax._src import targeting
from peftjax._src.nodes import Node, is_node, node_dataclass

__all__ = ["SoftPrompt", "Prefix", "finalize", "ACTIVATIONS"]

# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------

#: Nonlinearities of bottleneck adapters and prompt encoders, by name (names are static metadata,
#: so trees stay hashable and serializable).
ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
    "identity": lambda x: x,
}


def check_activation(name) -> str:
  if not isinstance(name, str) or name not in ACTIVATIONS:
    raise ValueError(f"activation={name!r} is not supported; use one of {sorted(ACTIVATIONS)}")
  return name


def as_key(key):
  """``key`` as a typed PRNG key (default ``key(0)``); raw ``uint32[2]`` data is wrapped."""
  if key is None:
    return jax.random.key(0)
  if isinstance(key, jax.Array) and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(key)
  return key


path_key = targeting.path_key


def check_positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


@functools.partial(jax.jit, static_argnums=(1, 2))
def random_arrays(key, specs: tuple, dtype) -> list:
  """Arrays from one random draw (one threefry in the program, so one cheap compile).

  Args:
    key: a PRNG key.
    specs: ``((shape, "normal", std) | (shape, "uniform", bound), ...)``: ``N(0, std^2)`` or
      ``U(-bound, bound)`` arrays.
    dtype: dtype of the results.
  """
  sizes = [math.prod(shape) for shape, _, _ in specs]
  tiny = float(np.nextafter(np.float32(-1.0), np.float32(0.0)))
  u = jax.random.uniform(key, (sum(sizes),), jnp.float32, tiny, 1.0)   # (-1, 1)
  out, start = [], 0
  for (shape, kind, scale), n in zip(specs, sizes):
    v = u[start:start + n].reshape(shape)
    start += n
    if kind == "normal":
      v = np.sqrt(2.0) * lax.erf_inv(v)   # what jax.random.normal does with its uniform draw
    out.append((v * scale).astype(dtype))
  return out


describe = targeting.describe_leaf


def place_on(v, axes: Sequence[int], ndim: int):
  """Reshapes ``v`` so its axis ``i`` lies on axis ``axes[i]`` of an ``ndim``-D array (others 1).

  ``axes`` must be distinct; ``v``'s axes are transposed into increasing target order first.
  """
  order = sorted(range(v.ndim), key=lambda i: axes[i])
  v = jnp.transpose(v, order) if order != list(range(v.ndim)) else v
  shape = [1] * ndim
  for i in order:
    shape[axes[i]] = v.shape[order.index(i)]
  return v.reshape(shape)


def kernel_axes(n_batch: int, n_in: int, ndim: int):
  """``(batch, in, out)`` axis tuples of a ``[*batch, *in, *out]`` kernel."""
  return (tuple(range(n_batch)), tuple(range(n_batch, n_batch + n_in)),
          tuple(range(n_batch + n_in, ndim)))


def plain_use(dimension_numbers, n_batch: int, n_in: int, ndim: int) -> bool:
  """Whether a ``dot_general`` uses the kernel as ``x @ W``: contracting exactly its input axes
  and batching exactly its layer axes (the way every ``Dense``/``DenseGeneral`` uses it)."""
  (_, rc), (_, rb) = dimension_numbers
  b, i, _ = kernel_axes(n_batch, n_in, ndim)
  return tuple(sorted(rc)) == i and tuple(sorted(rb)) == b


def out_positions(dimension_numbers, n_batch: int, out_ndim: int, result_ndim: int):
  """Where the kernel's layer axes and output axes land in a plain use's result.

  ``dot_general``'s result is ``[batch (in rb order), lhs free, rhs free]``; for a plain use the
  rhs free axes are the kernel's output axes, last and in order.
  """
  (_, _), (_, rb) = dimension_numbers
  batch = tuple(list(rb).index(a) for a in range(n_batch))
  out = tuple(range(result_ndim - out_ndim, result_ndim))
  return batch, out


# ------------------------------------------------------------------------------------------------
# placements: which kernels are attention outputs, FFN outputs, keys and values
# ------------------------------------------------------------------------------------------------

_ATTN = re.compile(r"(?i).*(attn|attention).*")
_ATTN_OUT = {"o_proj", "out_proj", "o", "out", "c_proj", "dense", "wo", "proj"}
_FFN = re.compile(r"(?i).*(mlp|ffn|feed_?forward|densereludense|fc).*")
_FFN_OUT = {"down_proj", "fc2", "wo", "c_proj", "dense_4h_to_h", "w2", "fc_out", "out_proj"}
_KEY = {"k_proj", "key", "k", "wk", "k_lin"}
_VALUE = {"v_proj", "value", "v", "wv", "v_lin"}


def _parts(path: str) -> list[str]:
  parts = path.split("/")
  return parts[:-1] if parts and parts[-1] == "kernel" else []


def is_attention_output(path: str, leaf=None) -> bool:
  """``.../self_attn/o_proj/kernel`` (Llama), ``.../attention/output/dense/kernel`` (BERT),
  ``.../attn/c_proj``, ``.../SelfAttention/o``, ``.../MultiHeadDotProductAttention_0/out``, ..."""
  p = _parts(path)
  if len(p) >= 2 and p[-1] in _ATTN_OUT and _ATTN.fullmatch(p[-2]):
    return True
  return len(p) >= 3 and p[-2:] == ["output", "dense"] and _ATTN.fullmatch(p[-3]) is not None


def is_ffn_output(path: str, leaf=None) -> bool:
  """``.../mlp/down_proj/kernel`` (Llama), ``layers_i/output/dense/kernel`` (BERT, not under
  ``attention``), ``.../mlp/fc2``, ``.../DenseReluDense/wo``, or a bare ``down_proj``/``fc2``."""
  p = _parts(path)
  if not p:
    return False
  if len(p) >= 2 and p[-2:] == ["output", "dense"]:
    return not (len(p) >= 3 and _ATTN.fullmatch(p[-3]))
  if p[-1] in ("down_proj", "fc2", "dense_4h_to_h"):
    return not (len(p) >= 2 and _ATTN.fullmatch(p[-2]))
  return len(p) >= 2 and p[-1] in _FFN_OUT and _FFN.fullmatch(p[-2]) is not None


def is_key_proj(path: str, leaf=None) -> bool:
  p = _parts(path)
  return bool(p) and p[-1] in _KEY and (len(p) < 2 or p[-1] != "k" or _ATTN.fullmatch(p[-2]))


def is_value_proj(path: str, leaf=None) -> bool:
  p = _parts(path)
  return bool(p) and p[-1] in _VALUE and (len(p) < 2 or p[-1] != "v" or _ATTN.fullmatch(p[-2]))


def select_kernels(params, pred: Callable[[str, Any], bool], what: str,
                   allow_empty: bool = False) -> list[tuple[str, Any]]:
  """``(path, leaf)`` of the kernels chosen by ``pred``; an error naming ``what`` if none."""
  pairs = targeting.leaves_with_paths(params)
  chosen = [(p, l) for p, l in pairs if pred(p, l)]
  if not chosen and not allow_empty:
    raise ValueError(f"{what} matched no kernel of the parameter tree; pass `targets=` (a regex, "
                     f"module names or a callable). Some of its paths:\n"
                     f"{targeting.describe_paths(pairs)}")
  return chosen


def check_kernel(path: str, leaf, node_types: tuple, method: str):
  """A kernel a method may wrap: a floating array (ndim >= 2) or a node, not already ``method``."""
  if isinstance(leaf, node_types):
    raise ValueError(f"{path} already has {method} ({type(leaf).__name__}); apply it once per "
                     f"kernel")
  ok = (is_node(leaf) and leaf.ndim >= 2) or targeting.is_kernel_like(leaf)
  if not ok:
    raise ValueError(f"target {path} is not a kernel (a floating array with ndim >= 2): got "
                     f"{describe(leaf)}; narrow `targets`")


# ------------------------------------------------------------------------------------------------
# prompt-family nodes
# ------------------------------------------------------------------------------------------------

@node_dataclass
class SoftPrompt(Node):
  """Trainable virtual-token embeddings ``[n_tokens, hidden]`` (prompt tuning, finalized P-tuning).

  Attributes:
    tokens: ``[n_tokens, hidden]``.
  """

  tokens: jax.Array
  type_id = "soft_prompt"
  base_field = "tokens"
  hf_peft_type = "PROMPT_TUNING"
  trainable_fields = ("tokens",)


  def materialize(self):
    return self.tokens


@node_dataclass
class Prefix(Node):
  """Trainable per-layer key/value prefixes ``[layers, 2, n_tokens, kv_heads, head_dim]``.

  ``kv[:, 0]`` are keys and ``kv[:, 1]`` values, the layout the reference models take as
  ``prefix=`` (batch axis added at the call). Used by finalized prefix tuning and by P-tuning v2.

  Attributes:
    kv: ``[layers, 2, n_tokens, kv_heads, head_dim]``; the layer axis is axis 0, so the node is
      layer-stacked in the ``nn.scan`` sense.
  """

  kv: jax.Array
  type_id = "prefix"
  base_field = "kv"
  hf_peft_type = "PREFIX_TUNING"
  trainable_fields = ("kv",)


  def materialize(self):
    return self.kv


def finalize(tree):
  """Every node with a training-time reparameterization replaced by its plain form.

  ``PrefixMLP -> Prefix``, ``PromptEncoder -> SoftPrompt`` (each node type says how with a
  ``finalized()`` method). The model's outputs do not change; the reparameterization's parameters
  are gone.
  """
  def visit(x):
    return x.finalized() if is_node(x) and hasattr(x, "finalized") else x
  return jax.tree_util.tree_map(visit, tree, is_leaf=is_node)


# ------------------------------------------------------------------------------------------------
# model hooks
# ------------------------------------------------------------------------------------------------

#: Where the token embedding table lives, by suffix of its path (first match wins).
EMBEDDING_PATHS = ("embed_tokens/embedding", "embeddings/word_embeddings/embedding",
                   "wte/embedding", "shared/embedding", "embed/embedding",
                   "word_embeddings/embedding", "embed_in/embedding", "tok_embeddings/embedding",
                   "token_embedding/embedding")


def find_embedding(params, path: Optional[str] = None) -> tuple[str, Any]:
  """``(path, table [vocab, hidden])`` of the token embedding table of ``params``.

  Raises:
    ValueError: no table at ``path`` (or at any of :data:`EMBEDDING_PATHS` when ``path`` is None).
  """
  pairs = targeting.leaves_with_paths(params)
  if path is not None:
    for p, leaf in pairs:
      if p == path or p.endswith("/" + path):
        if getattr(leaf, "ndim", 0) != 2:
          raise ValueError(f"embedding_path={path!r} is {describe(leaf)}, not a [vocab, hidden] "
                           f"table")
        return p, leaf
    raise ValueError(f"embedding_path={path!r} is not a path of the parameter tree. Some of its "
                     f"paths:\n{targeting.describe_paths(pairs)}")
  for suffix in EMBEDDING_PATHS:
    for p, leaf in pairs:
      if (p == suffix or p.endswith("/" + suffix)) and getattr(leaf, "ndim", 0) == 2:
        return p, leaf
  raise ValueError(f"found no token embedding table (a [vocab, hidden] leaf ending in one of "
                   f"{list(EMBEDDING_PATHS[:3])}, ...); pass embedding_path=. Some paths:\n"
                   f"{targeting.describe_paths(pairs)}")


def takes_keyword(fn, arg: str) -> bool:
  """Whether the callable ``fn`` accepts a keyword argument ``arg`` (by name or ``**kwargs``)."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return arg in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def check_hook(model, arg: str, method: str):
  """Raises a TypeError unless ``model.__call__`` takes a keyword argument ``arg``."""
  if takes_keyword(getattr(model, "__call__", None), arg):
    return
  raise TypeError(f"{method} needs a model that accepts `{arg}=`; {type(model).__name__}.__call__ "
                  f"has no such argument. The reference models in peftjax.models "
                  f"(LlamaForCausalLM, BertModel, BertForSequenceClassification) do.")


def kv_layout(config) -> tuple[int, int, int]:
  """``(layers, kv_heads, head_dim)`` of a reference-model config (Llama or BERT family)."""
  try:
    layers = int(config.num_layers)
    heads = int(getattr(config, "num_kv_heads", None) or config.num_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_heads)
  except (AttributeError, TypeError):
    raise TypeError(f"config must describe the attention layout (num_layers, num_heads or "
                    f"num_kv_heads, head_dim or hidden_size), as LlamaConfig and BertConfig do; "
                    f"got {type(config).__name__}") from None
  return layers, heads, head_dim


def batch_prefix(kv, batch: int):
  """``[L, 2, p, h, d] -> [L, 2, batch, p, h, d]`` (an explicit broadcast: under ``lift`` a prefix
  node is materialized here, before any layer scan could slice its leaves)."""
  kv = jnp.asarray(kv) if not hasattr(kv, "shape") else kv
  if kv.ndim != 5:
    raise ValueError(f"prefix must be [layers, 2, n_tokens, kv_heads, head_dim], got shape "
                     f"{tuple(kv.shape)}")
  return jnp.broadcast_to(kv[:, :, None], kv.shape[:2] + (batch,) + kv.shape[2:])
