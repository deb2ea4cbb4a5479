"""Pieces shared by the reference models: norms, rotary embeddings, masks, attention, remat/scan.

Everything here is a pure function of arrays (or a tiny Flax module), written so that

* every projection is an ``nn.Dense`` with a 2-D ``[in, out]`` kernel, which reaches
  ``lax.dot_general`` unchanged -- the primitive :func:`peftjax.lift` intercepts for
  LoRA/QLoRA/adapter nodes;
* norms and softmax compute in float32 whatever the compute dtype (as Hugging Face does), so bf16
  compute stays stable;
* masks are boolean ``[batch, queries, keys]`` arrays built once per forward, shared by all layers.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

Array = jax.Array
Dtype = Any

__all__ = [
    "RMSNorm",
    "rope_inv_freq",
    "rope_cos_sin",
    "apply_rope",
    "attention",
    "positions_from_mask",
    "constrain",
    "layer_stack",
    "ACTIVATIONS",
    "TensorSpec",
    "Embed",
]


class RMSNorm(nn.Module):
  """Root-mean-square norm (Llama): ``x / sqrt(mean(x^2) + eps) * scale``, computed in float32.

  Attributes:
    eps: added to the mean square.
    dtype: output dtype (the compute dtype).
    param_dtype: dtype of the ``scale`` parameter ``[hidden]``.
  """
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # Hugging Face: weight * hidden.to(input_dtype) -- cast before scaling.
    scale = jnp.asarray(scale, self.dtype).reshape((1,) * (x.ndim - 1) + (-1,))
    return (scale * x32.astype(self.dtype)).astype(self.dtype)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
}


# ------------------------------------------------------------------------------------------------
# Rotary position embeddings (Hugging Face "rotate_half" convention)
# ------------------------------------------------------------------------------------------------

def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict] = None) -> jax.Array:
  """Inverse frequencies ``[head_dim // 2]`` (float32), with optional scaling.

  Args:
    head_dim: rotary dimension (even).
    theta: the RoPE base (``rope_theta``).
    scaling: ``None``/``{"rope_type": "default"}``, ``{"rope_type": "linear", "factor": f}``,
      ``{"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
      "original_max_position_embeddings"}`` or ``{"rope_type": "freq_factors", "factors": [...]}``
      (llama.cpp's ``rope_freqs`` tensor: inverse frequencies are divided by the factors).

  Returns:
    ``inv_freq[i] = theta ** (-2i / head_dim)``, rescaled as the scaling asks.
  """
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  kind = (scaling or {}).get("rope_type", "default")
  if kind == "default":
    return inv
  if kind == "linear":
    return inv / float(scaling["factor"])
  if kind == "llama3":
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    inv_llama = jnp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, inv_llama)
  if kind == "freq_factors":
    return inv / jnp.asarray(scaling["factors"], jnp.float32)
  raise ValueError(f"unsupported rope scaling {kind!r}; supported: default, linear, llama3, "
                   "freq_factors")


def rope_cos_sin(positions: Array, inv_freq: Array) -> tuple[Array, Array]:
  """``cos, sin`` ``[batch, seq, head_dim]`` (float32) for integer ``positions [batch, seq]``."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates ``x [batch, seq, heads, head_dim]`` by ``cos, sin [batch, seq, head_dim]``."""
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rot * sin


# ------------------------------------------------------------------------------------------------
# Masks and attention
# ------------------------------------------------------------------------------------------------

def positions_from_mask(mask: Array) -> Array:
  """Position ids ``[batch, seq]`` that count only real tokens: ``cumsum(mask) - 1``, clipped at 0.

  Left (or interior) padding therefore does not shift the positions of the real tokens.
  """
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention(q: Array, k: Array, v: Array, mask: Array, *,
              dropout: Optional[Callable[[Array], Array]] = None,
              heads_major: bool = False) -> Array:
  """Scaled dot-product attention with grouped-query heads.

  Args:
    q: ``[batch, q_len, heads, head_dim]``.
    k: ``[batch, kv_len, kv_heads, head_dim]``; ``heads`` must be a multiple of ``kv_heads``.
      With ``heads_major``, ``[batch, kv_heads, kv_len, head_dim]`` (a KV cache's layout).
    v: as ``k``.
    mask: bool, broadcastable to ``[batch, q_len, kv_len]``; True where a query may see a key.
      A query that sees no key gets uniform weights (finite, never NaN).
    dropout: optional function applied to the attention probabilities.
    heads_major: ``k`` and ``v`` have their heads before their positions. The dots then need no
      transpose of the keys and values: XLA:CPU otherwise copies every layer's whole cache into
      that layout at every decoding step (14x the time of the attention itself at 1024 cached
      positions).

  Returns:
    ``[batch, q_len, heads * head_dim]`` in ``v``'s dtype. Scores and softmax are float32.
  """
  b, t, h, d = q.shape
  kvh, s = (k.shape[1], k.shape[2]) if heads_major else (k.shape[2], k.shape[1])
  g = h // kvh
  mask = jnp.broadcast_to(mask, (b, t, s))
  kv = "bhsd" if heads_major else "bshd"
  if g == 1:
    # Multi-head attention: plain 4-D batched dots. (The grouped form below with a group axis of
    # size 1 is lowered by XLA:CPU to slower dots: 28% more time for this function, fwd + bwd.)
    scores = jnp.einsum(f"bthd,{kv}->bhts", q, k, preferred_element_type=jnp.float32)
    mask = mask[:, None, :, :]
  else:
    kv = kv.replace("h", "k")
    q = q.reshape(b, t, kvh, g, d)
    scores = jnp.einsum(f"btkgd,{kv}->bkgts", q, k, preferred_element_type=jnp.float32)
    mask = mask[:, None, None, :, :]
  scores = scores * (1.0 / math.sqrt(d))
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  if dropout is not None:
    probs = dropout(probs)
  if g == 1:
    out = jnp.einsum(f"bhts,{kv}->bthd", probs.astype(v.dtype), v)
  else:
    out = jnp.einsum(f"bkgts,{kv}->btkgd", probs.astype(v.dtype), v)
  return out.reshape(b, t, h * d)


def expand_prefix(prefix: Optional[Array], num_layers: int, batch: int, kv_heads: int,
                  head_dim: int) -> Optional[Array]:
  """Validates a prefix key/value array and broadcasts its batch axis.

  Args:
    prefix: ``[layers, 2, batch or 1, n_prefix, kv_heads, head_dim]`` (index 0 keys, 1 values) or
      ``[layers, 2, n_prefix, kv_heads, head_dim]`` (shared by the batch), or None.

  Returns:
    ``[layers, 2, batch, n_prefix, kv_heads, head_dim]`` or None.
  """
  if prefix is None:
    return None
  if prefix.ndim == 5:
    prefix = prefix[:, :, None]
  if prefix.ndim != 6:
    raise ValueError(f"prefix must be [layers, 2, batch, n_prefix, kv_heads, head_dim], got shape "
                     f"{tuple(prefix.shape)}")
  want = (num_layers, 2, None, None, kv_heads, head_dim)
  if any(w is not None and w != s for w, s in zip(want, prefix.shape)) or \
      prefix.shape[2] not in (1, batch):
    raise ValueError(f"prefix has shape {tuple(prefix.shape)}; expected "
                     f"[{num_layers}, 2, {batch} (or 1), n_prefix, {kv_heads}, {head_dim}]")
  return jnp.broadcast_to(prefix, prefix.shape[:2] + (batch,) + prefix.shape[3:])


# ------------------------------------------------------------------------------------------------
# Sharding constraints on activations (no-op unless a mesh is set with jax.set_mesh)
# ------------------------------------------------------------------------------------------------

def constrain(x: Array, names: Sequence[Optional[str]]) -> Array:
  """``with_sharding_constraint`` by logical axis names, under the mesh set by ``jax.set_mesh``.

  Without a mesh in context (the usual single-device case) this returns ``x`` unchanged. Logical
  names map to mesh axes through :data:`peftjax.models.sharding.DEFAULT_RULES` (or the rules set
  with :func:`peftjax.models.sharding.axis_rules`); axes that do not divide the dimension are left
  unsharded. Meshes whose axes are ``Explicit`` are left to JAX's own sharding-in-types.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  if any(t != jax.sharding.AxisType.Auto for t in mesh.axis_types):
    return x
  from peftjax.models import sharding  # local: sharding imports this module
  spec = sharding.spec_for(names, x.shape, dict(mesh.shape))
  return lax.with_sharding_constraint(x, spec)


# ------------------------------------------------------------------------------------------------
# Layer stacks: a python loop (layers_0, layers_1, ...) or nn.scan (layers, stacked on axis 0)
# ------------------------------------------------------------------------------------------------

def remat_policy(remat: Any):
  """The ``jax.checkpoint`` policy for a ``remat`` option: bool, a policy name, or a callable."""
  if remat is True or remat in ("full", "nothing_saveable"):
    return None  # save nothing: recompute everything
  if isinstance(remat, str):
    policy = getattr(jax.checkpoint_policies, remat, None)
    if policy is None:
      raise ValueError(f"unknown remat policy {remat!r}; use True, 'full' or a name in "
                       "jax.checkpoint_policies, e.g. 'dots_with_no_batch_dims_saveable'")
    return policy
  if callable(remat):
    return remat
  raise ValueError(f"remat must be a bool, a policy name or a callable, got {remat!r}")


def layer_stack(block_cls, *, num_layers: int, scan: bool, remat: Any, block_kwargs: dict,
                x: Any, xs: Any, ctx: Any, name_prefix: str = "layers"):
  """Runs ``num_layers`` blocks ``block_cls(**block_kwargs)(x, xs_i, ctx) -> (x, y_i)``.

  Must be called inside a compact method. With ``scan`` the parameters live under one submodule
  named ``layers`` with every leaf stacked on axis 0 (``[num_layers, ...]``); without it they live
  under ``layers_0 ... layers_{L-1}``. ``x`` is the carry (an array or a pytree: the Llama
  blocks carry their KV cache with it). ``xs`` is a pytree of per-layer inputs with a leading
  layer axis (or None leaves); ``ctx`` is broadcast to every layer. Returns ``(x, ys)`` with ``ys``
  stacked on axis 0 (None if the blocks return None).
  """
  cls = block_cls
  if remat:
    cls = nn.remat(cls, policy=remat_policy(remat), prevent_cse=not scan)
  if scan:
    scanned = nn.scan(cls, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast), out_axes=0, length=num_layers)
    return scanned(**block_kwargs, name=name_prefix)(x, xs, ctx)
  ys = []
  for i in range(num_layers):
    xs_i = jax.tree_util.tree_map(lambda a, i=i: a[i], xs)
    x, y = cls(**block_kwargs, name=f"{name_prefix}_{i}")(x, xs_i, ctx)
    ys.append(y)
  if all(y is None for y in ys):
    return x, None
  return x, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ys)


# ------------------------------------------------------------------------------------------------
# Checkpoint layout: which Hugging Face tensor fills which parameter
# ------------------------------------------------------------------------------------------------

class TensorSpec(NamedTuple):
  """One parameter of a reference model and the Hugging Face tensor it comes from.

  Attributes:
    path: parameter path; for ``layer`` entries it is relative to the layer (``layers_i`` or the
      scanned ``layers`` subtree).
    hf_name: tensor name in the checkpoint; ``{p}`` stands for the base-model prefix (``model.``,
      ``bert.``, ...), ``{i}`` for the layer index.
    kind: ``"linear"`` (HF ``[out, in]`` weight, transposed to an ``[in, out]`` kernel) or
      ``"copy"``.
    layer: one tensor per layer (stacked on axis 0 under scan).
    head: a task head that may be initialized when the checkpoint lacks it.
  """
  path: tuple
  hf_name: str
  kind: str = "copy"
  layer: bool = False
  head: bool = False


class Embed(nn.Embed):
  """``nn.Embed`` whose table is gathered whole before the lookup under a mesh.

  Parameters are unchanged (``embedding [num_embeddings, features]``). Under ``jax.set_mesh`` the
  table is constrained to be replicated at the lookup (the FSDP all-gather; its gradient becomes a
  reduce-scatter), which lets XLA produce batch-sharded embeddings without replicating them first.
  """

  def __call__(self, inputs: Array) -> Array:
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise ValueError(f"token ids must be integers, got {inputs.dtype}")
    # Gather, then cast: casting the table first made a compute-dtype copy of the whole table
    # in every step (bf16 embeddings under f32 compute, as QLoRA loads them: 0.26 GB at vocab
    # 32000 x 2048).
    table = constrain(self.embedding, (None, None))
    return jnp.asarray(jnp.take(table, inputs, axis=0), self.dtype)
