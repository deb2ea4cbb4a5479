"""Prefix tuning (Li & Liang, 2021): trained key/value prefixes in every attention layer.

Every layer attends to ``n_tokens`` extra key/value pairs before the real tokens. Training them
directly is unstable, so Li & Liang train them through a reparameterization: a small embedding
``E [n_tokens, token_dim]`` and an MLP ``tanh(E @ W1 + b1) @ W2 + b2`` produce all layers' prefixes
at once (:class:`PrefixMLP`). After training, :func:`finalize` computes the prefixes once and drops
the MLP, leaving a plain :class:`Prefix` ``[layers, 2, n_tokens, kv_heads, head_dim]``
(``2 * L * p * d`` parameters for ``d = kv_heads * head_dim``).

The tree to train is ``peftjax.Tuned(params, prefix=node)``; the model needs the ``prefix`` hook
(the reference models take ``prefix=[layers, 2, batch, n_prefix, kv_heads, head_dim]``)::

  tree = peftjax.prefix.apply(params, model.config, n_tokens=16)
  forward = peftjax.forward(model)                  # lifted; prefix visible to every query
  logits = forward(tree, input_ids, attention_mask=mask)
  tree = peftjax.prefix.finalize(tree)              # MLP gone; same outputs
  out = peftjax.generate(model, tree, input_ids, mask, max_new_tokens=20)

Prefix positions are keys every query may see (padding never is), so padding and causal masks of
the real tokens are respected. In the Llama model the prefix keys carry no rotary position and
the real tokens keep positions ``0, 1, ...`` (see :mod:`peftjax.models.llama`). P-tuning v2 is
the same prefix trained without the MLP (``projection=False``, or
:func:`peftjax.ptuning.apply_v2`).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from peftjax._src import additive
from peftjax._src import nodes as nodes_lib
from peftjax._src.additive import Prefix
from peftjax._src.tuned import Tuned
from peftjax._src.nodes import Node, node_dataclass, static_field
from peftjax._src import method as method_lib
from peftjax._src import tuned as tuned_lib

__all__ = ["Prefix", "PrefixMLP", "init", "apply", "finalize", "kv", "forward", "generate"]


@node_dataclass
class PrefixMLP(Node):
  """Prefixes computed by an MLP: ``tanh(embedding @ w1 + b1) @ w2 + b2``, reshaped per layer.

  Stands for ``[layers, 2, n_tokens, kv_heads, head_dim]``; every field trains.

  Attributes:
    embedding: ``[n_tokens, token_dim]``.
    w1: ``[token_dim, hidden]``; b1: ``[hidden]``.
    w2: ``[hidden, layers * 2 * kv_heads * head_dim]``; b2: ``[layers * 2 * kv_heads * head_dim]``.
    layers, kv_heads, head_dim: the model's attention layout.
  """

  scan_slices_leaves = False  # its leaves are MLP weights, not per-layer slices

  embedding: jax.Array
  w1: jax.Array
  b1: jax.Array
  w2: jax.Array
  b2: jax.Array
  layers: int = static_field(default=1)
  kv_heads: int = static_field(default=1)
  head_dim: int = static_field(default=1)

  type_id = "prefix_mlp"
  trainable_fields = ("embedding", "w1", "b1", "w2", "b2")

  @property
  def shape(self):
    return (self.layers, 2, self.embedding.shape[0], self.kv_heads, self.head_dim)

  @property
  def dtype(self):
    return self.w2.dtype

  def materialize(self):
    h = jnp.tanh(self.embedding @ self.w1 + self.b1[None])
    out = h @ self.w2 + self.b2[None]                                   # [p, L * 2 * kvh * hd]
    out = out.reshape(self.embedding.shape[0], self.layers, 2, self.kv_heads, self.head_dim)
    return jnp.transpose(out, (1, 2, 0, 3, 4))

  def finalized(self) -> Prefix:
    """The plain :class:`Prefix` this MLP produces now."""
    return Prefix(kv=self.materialize())


def init(config, n_tokens: int, *, projection: bool = True, hidden: int = 512,
         token_dim: Optional[int] = None, key=None, init_std: float = 1.0,
         dtype=jnp.float32):
  """A prefix for a model with ``config``'s attention layout.

  Args:
    config: the model's config (``LlamaConfig``, ``BertConfig``: ``num_layers``, heads,
      ``head_dim``).
    n_tokens: prefix length ``p`` (> 0).
    projection: train through Li & Liang's MLP (:class:`PrefixMLP`, dropped by :func:`finalize`);
      False trains the prefixes directly (:class:`Prefix`; this is P-tuning v2).
    hidden: the MLP's hidden width.
    token_dim: width of the MLP's input embedding (default the model's ``hidden_size``).
    key: PRNG key (default ``key(0)``).
    init_std: standard deviation of the prefix embedding (``projection``) or of the prefixes.
    dtype: parameter dtype.

  Returns:
    :class:`PrefixMLP` (``p*e + e*h + h + h*2Ld + 2Ld`` parameters for ``e = token_dim``,
    ``d = kv_heads * head_dim``) or :class:`Prefix` (``2*L*p*d``).

  Raises:
    ValueError: ``n_tokens``, ``hidden`` or ``token_dim`` not positive.
    TypeError: a config without the attention layout.

  >>> import peftjax
  >>> from peftjax.models import LlamaConfig
  >>> cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
  ...                   num_heads=2, num_kv_heads=1)
  >>> peftjax.prefix.init(cfg, 3, hidden=5).shape      # [layers, 2, p, kv_heads, head_dim]
  (2, 2, 3, 1, 4)
  >>> peftjax.prefix.init(cfg, 3, projection=False).kv.size     # 2 * L * p * d
  48
  """
  p = additive.check_positive_int(n_tokens, "n_tokens")
  layers, kvh, hd = additive.kv_layout(config)
  key = additive.as_key(key)
  if not projection:
    return Prefix(kv=_normal(key, (layers, 2, p, kvh, hd), float(init_std), jnp.dtype(dtype)))
  hidden = additive.check_positive_int(hidden, "hidden")
  e = additive.check_positive_int(token_dim if token_dim is not None else config.hidden_size,
                                  "token_dim")
  arrays = _mlp_arrays(key, p, e, hidden, layers * 2 * kvh * hd, float(init_std), jnp.dtype(dtype))
  return PrefixMLP(**arrays, layers=layers, kv_heads=kvh, head_dim=hd)


def _normal(key, shape, std, dtype):
  return additive.random_arrays(key, ((shape, "normal", std),), dtype)[0]


def _mlp_arrays(key, p, e, hidden, n_out, init_std, dtype):
  # torch.nn.Linear's default init, U(+-1/sqrt(fan_in)), for the MLP; N(0, init_std^2) embedding
  be, bh = 1.0 / math.sqrt(e), 1.0 / math.sqrt(hidden)
  names = ("embedding", "w1", "b1", "w2", "b2")
  specs = (((p, e), "normal", init_std), ((e, hidden), "uniform", be), ((hidden,), "uniform", be),
           ((hidden, n_out), "uniform", bh), ((n_out,), "uniform", bh))
  return dict(zip(names, additive.random_arrays(key, specs, dtype)))


def apply(params, config, n_tokens: int, **kwargs) -> Tuned:
  """``Tuned(params, prefix=init(config, n_tokens, **kwargs))``: the tree to train.

  >>> import peftjax
  >>> from peftjax.models import BertConfig
  >>> cfg = BertConfig(vocab_size=16, hidden_size=8, num_layers=2, num_heads=2,
  ...                  intermediate_size=16)
  >>> tree = peftjax.prefix.apply({}, cfg, 3, hidden=4)
  >>> peftjax.summary(tree).trainable == 3*8 + (8*4 + 4) + (4*2*2*8 + 2*2*8)
  True
  >>> peftjax.summary(peftjax.prefix.finalize(tree)).trainable    # 2 * L * p * d
  96
  """
  return Tuned(params, prefix=init(config, n_tokens, **kwargs))


def finalize(tree):
  """Replaces every :class:`PrefixMLP` (and P-tuning encoder) by the plain node it produces.

  Outputs do not change; the MLP's parameters are dropped (see the :func:`apply` example).
  """
  return additive.finalize(tree)


def kv(prefix, batch: int):
  """The model's ``prefix=`` argument ``[layers, 2, batch, p, kv_heads, head_dim]`` for a node or
  an array ``[layers, 2, p, kv_heads, head_dim]``.

  >>> import jax.numpy as jnp, peftjax
  >>> peftjax.prefix.kv(peftjax.prefix.Prefix(kv=jnp.zeros((2, 2, 3, 1, 4))), batch=5).shape
  (2, 2, 5, 3, 1, 4)
  """
  return additive.batch_prefix(nodes_lib.materialize(prefix), batch)


def forward(model):
  """:func:`peftjax.forward`, after checking that ``model`` takes ``prefix=``.

  Raises:
    TypeError: the model has no ``prefix`` argument.

  >>> import jax, jax.numpy as jnp, peftjax
  >>> from peftjax.models import LlamaConfig, LlamaForCausalLM
  >>> cfg = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1,
  ...                   num_heads=2, num_kv_heads=1)
  >>> model = LlamaForCausalLM(cfg)
  >>> params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 3), jnp.int32))["params"]
  >>> tree = peftjax.prefix.apply(params, cfg, 4, hidden=8)
  >>> jax.jit(peftjax.prefix.forward(model))(tree, jnp.ones((2, 3), jnp.int32)).shape
  (2, 3, 16)
  """
  additive.check_hook(model, "prefix", "prefix tuning")
  return tuned_lib.forward(model)


def generate(model, tree, input_ids, attention_mask=None, **kwargs):
  """:func:`peftjax.generate` for a tree with a prefix (a TypeError if it has none)."""
  tuned_lib.require_slot(tree, "prefix", "peftjax.prefix.generate")
  return tuned_lib.generate(model, tree, input_ids, attention_mask, **kwargs)


def _model_config(model) -> dict:
  cfg = getattr(model, "config", None)
  if cfg is None:
    raise TypeError(f"prefix tuning needs a reference model with a config; got "
                    f"{type(model).__name__}")
  return {"config": cfg}


METHOD = method_lib.Method(
    name="prefix", apply=apply,
    description="prefix tuning: trained key/value prefixes in every layer (MLP reparameterized; "
                "--no-projection is P-tuning v2)",
    options=(method_lib.N_TOKENS,
             method_lib.Option("prefix_hidden", 512, "width of the prefix reparameterization MLP",
                               kwarg="hidden", type=method_lib.positive_int),
             method_lib.Option("no_projection", False, "train the prefixes directly, without the "
                               "MLP (P-tuning v2)", kwarg="projection", flag=True,
                               convert=lambda v: not v)),
    forward=tuned_lib.forward, finalize=finalize, mergeable=False, hf_peft_type="PREFIX_TUNING",
    # Through the MLP 1e-3 (Li & Liang train it at 5e-5 to 8e-5 over epochs; 1e-2 diverged on
    # SmolLM2, 1e-3 trained); direct prefixes (P-tuning v2) 1e-2 (Liu et al. 2022: 5e-3 to 1e-2).
    # On MiniLM both are fragile for another reason: see docs/methods.md (its untrained pooler).
    learning_rate=lambda options: 1e-2 if options["no_projection"] else 1e-3,
    model_kwargs=_model_config)
