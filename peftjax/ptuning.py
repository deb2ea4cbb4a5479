"""P-tuning (Liu et al., 2021) and P-tuning v2 (Liu et al., 2022).

**P-tuning** learns virtual tokens through a *prompt encoder*: trainable embeddings
``E [n_tokens, hidden]`` pass through a bidirectional LSTM and an MLP head, or through an MLP, and
the encoder's output ``[n_tokens, hidden]`` is prepended to the input embeddings like a soft prompt.
:class:`PromptEncoder` is a node standing for that output, so it sits in the ``"prompt"`` slot of
the tree and :func:`peftjax.prompt.forward` / :func:`peftjax.prompt.generate` use it as they use
a :class:`~peftjax.prompt.SoftPrompt`; :func:`finalize` evaluates the encoder once and leaves a
plain ``SoftPrompt`` (the encoder is only needed to train)::

  tree = peftjax.ptuning.apply(params, n_tokens=20, encoder="lstm")
  logits = peftjax.prompt.forward(model)(tree, ids, mask)
  tree = peftjax.ptuning.finalize(tree)

The encoders follow Hugging Face PEFT's ``PromptEncoder``: ``"mlp"`` is
``Linear(d, h) -> ReLU -> Linear(h, h) -> ReLU -> Linear(h, d)``; ``"lstm"`` is a 2-layer
bidirectional LSTM of width ``h`` then ``Linear(2h, 2h) -> ReLU -> Linear(2h, d)`` (one bias per
LSTM gate set where PyTorch keeps two).

**P-tuning v2** puts trained prompts in every layer, as key/value prefixes, without
reparameterization: :func:`apply_v2` gives ``{"params", "prefix": Prefix}`` with ``2 * L * p * d``
parameters, run with :func:`peftjax.prefix.forward` / :func:`peftjax.prefix.generate`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from peftjax import prefix as prefix_lib
from peftjax._src import additive
from peftjax._src.additive import SoftPrompt
from peftjax._src.nodes import Node, node_dataclass, static_field
from peftjax._src import method as method_lib
from peftjax._src import tuned as tuned_lib
from peftjax._src.tuned import Tuned

__all__ = ["PromptEncoder", "apply", "apply_v2", "finalize", "ENCODERS"]

ENCODERS = ("mlp", "lstm")


def _linear(x, p, name):
  return x @ p[f"{name}_w"] + p[f"{name}_b"][None]


def _lstm_direction(x, p, reverse: bool):
  """One LSTM direction over ``x [p, in]`` -> ``[p, h]``; gates ordered (i, f, g, o)."""
  h_dim = p["w_hh"].shape[0]
  gates_x = x @ p["w_ih"] + p["b"][None]                           # [p, 4h]

  def step(carry, g):
    h, c = carry
    g = g + h @ p["w_hh"]
    i, f, gg, o = jnp.split(g, 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(gg)
    h = jax.nn.sigmoid(o) * jnp.tanh(c)
    return (h, c), h

  zeros = jnp.zeros((h_dim,), x.dtype)
  _, hs = lax.scan(step, (zeros, zeros), gates_x, reverse=reverse)
  return hs


@node_dataclass
class PromptEncoder(Node):
  """Virtual tokens ``[n_tokens, hidden] = encoder(embedding)`` (P-tuning); every field trains.

  Attributes:
    embedding: ``[n_tokens, hidden]`` input embeddings of the encoder.
    params: the encoder's weights, a dict of arrays (see the module docstring).
    kind: ``"mlp"`` or ``"lstm"``.
  """

  embedding: jax.Array
  params: Any
  kind: str = static_field(default="mlp")

  type_id = "prompt_encoder"
  base_field = "embedding"
  trainable_fields = ("embedding", "params")


  def materialize(self):
    p, x = self.params, self.embedding
    if self.kind == "mlp":
      x = jax.nn.relu(_linear(x, p, "mlp0"))
      x = jax.nn.relu(_linear(x, p, "mlp1"))
      return _linear(x, p, "mlp2").astype(self.dtype)
    for layer in p["lstm"]:
      x = jnp.concatenate([_lstm_direction(x, layer["fw"], False),
                           _lstm_direction(x, layer["bw"], True)], axis=-1)
    x = jax.nn.relu(_linear(x, p, "head0"))
    return _linear(x, p, "head1").astype(self.dtype)

  def finalized(self) -> SoftPrompt:
    """The plain :class:`~peftjax.prompt.SoftPrompt` the encoder produces now."""
    return SoftPrompt(tokens=self.materialize())


def apply(params, n_tokens: int, *, encoder: str = "mlp", hidden: Optional[int] = None,
          lstm_layers: int = 2, key=None, embedding_path: Optional[str] = None,
          dtype=None) -> Tuned:
  """``Tuned(params, prompt=PromptEncoder)``: P-tuning's virtual tokens to train.

  Args:
    params: the model's parameters (the hidden size is read from its token embedding table).
    n_tokens: number of virtual tokens ``p`` (> 0).
    encoder: ``"mlp"`` or ``"lstm"``.
    hidden: encoder width ``h`` (default the model's hidden size ``d``).
    lstm_layers: LSTM depth (``"lstm"`` only).
    key: PRNG key (default ``key(0)``).
    embedding_path: where the token embedding table is, if not at a usual path.
    dtype: parameter dtype (default the table's).

  Returns:
    The tree to train: ``p*d`` embedding parameters plus the encoder's (``"mlp"``:
    ``d*h + h + h*h + h + h*d + d``).

  Raises:
    ValueError: ``n_tokens``, ``hidden`` or ``lstm_layers`` not positive, an unknown encoder, no
      embedding table.

  >>> import jax.numpy as jnp, peftjax
  >>> params = {"embed_tokens": {"embedding": jnp.ones((10, 4))}}
  >>> tree = peftjax.ptuning.apply(params, 3, hidden=2)
  >>> tree.prompt.shape, peftjax.summary(tree).trainable    # 3*4 + (4*2+2) + (2*2+2) + (2*4+4)
  ((3, 4), 40)
  >>> peftjax.ptuning.finalize(tree).prompt.tokens.shape
  (3, 4)
  """
  p = additive.check_positive_int(n_tokens, "n_tokens")
  if encoder not in ENCODERS:
    raise ValueError(f"encoder={encoder!r} is not one of {ENCODERS}")
  _, table = additive.find_embedding(params, embedding_path)
  d = table.shape[1]
  h = additive.check_positive_int(d if hidden is None else hidden, "hidden")
  n_lstm = additive.check_positive_int(lstm_layers, "lstm_layers")
  dtype = jnp.dtype(dtype or table.dtype)
  emb, enc = _encoder_arrays(additive.as_key(key), p, d, h, n_lstm, encoder, dtype)
  return Tuned(params, prompt=PromptEncoder(embedding=emb, params=enc, kind=encoder))


def _encoder_arrays(key, p, d, h, n_lstm, encoder, dtype):
  # torch's defaults: U(+-1/sqrt(fan_in)) for Linear, U(+-1/sqrt(h)) for LSTM; N(0, 1) embedding
  specs, names = [((p, d), "normal", 1.0)], [("embedding",)]

  def linear(name, n_in, n_out):
    b = 1.0 / math.sqrt(n_in)
    specs.extend([((n_in, n_out), "uniform", b), ((n_out,), "uniform", b)])
    names.extend([(f"{name}_w",), (f"{name}_b",)])

  if encoder == "mlp":
    linear("mlp0", d, h), linear("mlp1", h, h), linear("mlp2", h, d)
  else:
    width, b = d, 1.0 / math.sqrt(h)
    for i in range(n_lstm):
      for side in ("fw", "bw"):
        specs.extend([((width, 4 * h), "uniform", b), ((h, 4 * h), "uniform", b),
                      ((4 * h,), "uniform", b)])
        names.extend([("lstm", i, side, "w_ih"), ("lstm", i, side, "w_hh"), ("lstm", i, side, "b")])
      width = 2 * h
    linear("head0", 2 * h, 2 * h), linear("head1", 2 * h, d)
  arrays = additive.random_arrays(key, tuple(specs), dtype)
  enc = {"lstm": [{"fw": {}, "bw": {}} for _ in range(n_lstm)]} if encoder == "lstm" else {}
  emb = None
  for name, a in zip(names, arrays):
    if name == ("embedding",):
      emb = a
    elif name[0] == "lstm":
      enc["lstm"][name[1]][name[2]][name[3]] = a
    else:
      enc[name[0]] = a
  return emb, enc


def apply_v2(params, config, n_tokens: int, *, key=None, init_std: float = 1.0,
             dtype=jnp.float32) -> Tuned:
  """P-tuning v2: ``Tuned(params, prefix=Prefix)``, deep prompts without reparameterization.

  Run with :func:`peftjax.forward` and :func:`peftjax.generate`. Same as
  ``peftjax.prefix.apply(params, config, n_tokens, projection=False, ...)``.

  >>> import peftjax
  >>> from peftjax.models import BertConfig
  >>> cfg = BertConfig(vocab_size=16, hidden_size=8, num_layers=2, num_heads=2,
  ...                  intermediate_size=16)
  >>> peftjax.summary(peftjax.ptuning.apply_v2({}, cfg, 3)).trainable    # 2 * L * p * d
  96
  """
  return prefix_lib.apply(params, config, n_tokens, projection=False, key=key, init_std=init_std,
                          dtype=dtype)


def finalize(tree):
  """Replaces every :class:`PromptEncoder` by the :class:`~peftjax.prompt.SoftPrompt` it
  produces (and any prefix MLP by its prefix); outputs do not change."""
  return additive.finalize(tree)


METHOD = method_lib.Method(
    name="ptuning", apply=apply,
    description="P-tuning: virtual tokens from an MLP/LSTM prompt encoder",
    options=(method_lib.N_TOKENS,
             method_lib.Option("encoder", "mlp", "P-tuning prompt encoder", choices=ENCODERS),
             method_lib.Option("encoder_hidden", None, "prompt encoder width (default: the model's "
                               "hidden size)", kwarg="hidden", type=method_lib.positive_int)),
    forward=tuned_lib.forward, finalize=finalize, mergeable=False, hf_peft_type="PROMPT_TUNING",
    learning_rate=1e-2)
