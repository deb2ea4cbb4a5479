"""Small Flax models for tests, examples and the quickstart.

``TinyTransformer`` is a pre-LN causal transformer in Flax linen with the structures PEFT code
must handle: ``nn.Dense`` or ``nn.DenseGeneral`` attention projections (3-D kernels), a SwiGLU MLP,
``nn.scan`` over layers (layer-stacked ``[L, ...]`` parameters) and ``nn.remat``.
``TinyNNX`` is the same idea in Flax NNX. The real models live in :mod:`peftjax.models`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx


class Attention(nn.Module):
  dim: int
  heads: int
  dense_general: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    hd = self.dim // self.heads
    b, t, _ = x.shape
    if self.dense_general:
      proj = lambda name: nn.DenseGeneral((self.heads, hd), use_bias=False, dtype=self.dtype,
                                          name=name)(x)
      q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
    else:
      proj = lambda name: nn.Dense(self.dim, use_bias=False, dtype=self.dtype, name=name)(x)
      q, k, v = (proj(n).reshape(b, t, self.heads, hd) for n in ("q_proj", "k_proj", "v_proj"))
    att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd).astype(self.dtype)
    mask = jnp.tril(jnp.ones((t, t), bool))
    att = jax.nn.softmax(jnp.where(mask, att, -1e9).astype(jnp.float32), axis=-1).astype(self.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, v)
    if self.dense_general:
      return nn.DenseGeneral(self.dim, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                             name="o_proj")(o)
    return nn.Dense(self.dim, use_bias=False, dtype=self.dtype, name="o_proj")(o.reshape(b, t, -1))


class Block(nn.Module):
  dim: int
  heads: int
  ffn: int
  dense_general: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, _=None):
    h = nn.RMSNorm(dtype=self.dtype, name="attn_norm")(x)
    x = x + Attention(self.dim, self.heads, self.dense_general, self.dtype, name="attn")(h)
    h = nn.RMSNorm(dtype=self.dtype, name="mlp_norm")(x)
    gate = nn.Dense(self.ffn, use_bias=False, dtype=self.dtype, name="gate_proj")(h)
    up = nn.Dense(self.ffn, use_bias=True, dtype=self.dtype, name="up_proj")(h)
    x = x + nn.Dense(self.dim, use_bias=False, dtype=self.dtype, name="down_proj")(
        jax.nn.silu(gate) * up)
    return x, None


class TinyTransformer(nn.Module):
  """A causal LM: ``tokens [B, T] int32 -> logits [B, T, vocab]``."""
  vocab: int = 64
  dim: int = 32
  heads: int = 4
  ffn: int = 64
  layers: int = 2
  dense_general: bool = False
  scan: bool = False
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.dim, name="embed")(tokens).astype(self.dtype)
    block = nn.remat(Block) if self.remat else Block
    args = (self.dim, self.heads, self.ffn, self.dense_general, self.dtype)
    if self.scan:
      x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=self.layers)(*args, name="layers")(x, None)
    else:
      for i in range(self.layers):
        x, _ = block(*args, name=f"layers_{i}")(x)
    x = nn.RMSNorm(dtype=self.dtype, name="final_norm")(x)
    return nn.Dense(self.vocab, use_bias=False, dtype=self.dtype, name="lm_head")(x)


class TinyNNX(nnx.Module):
  """A two-layer MLP language model in Flax NNX: ``tokens [B, T] -> logits [B, T, vocab]``."""

  def __init__(self, vocab: int = 64, dim: int = 32, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    self.fc1 = nnx.Linear(dim, 2 * dim, rngs=rngs)
    self.fc2 = nnx.Linear(2 * dim, dim, rngs=rngs)
    self.lm_head = nnx.Linear(dim, vocab, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.fc2(jax.nn.gelu(self.fc1(x)))
    return self.lm_head(x)


def next_token_loss(logits, tokens):
  """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
