"""Token cross-entropy, plain and fused with the LM head.

:func:`cross_entropy` is the reference: ``-log_softmax(logits)[label]`` per token, in float32.

:func:`fused_cross_entropy` computes the same loss from the final hidden states and the LM head's
kernel without ever holding the ``[tokens, vocab]`` logits: the tokens are processed in chunks
(``lax.scan``), each chunk's logits live only inside one step, and when the loss is differentiated
the gradients are formed in the same pass (``d logits = softmax - onehot``, then
``d hidden = d logits @ W^T`` and, only if the kernel is being differentiated, ``d W += h^T d logits``),
so nothing is recomputed and no chunk's logits are saved for the backward pass. This is the
approach of Liger Kernel's fused linear cross-entropy and of Apple's "Cut Your Losses" (CCE), here in
plain JAX so XLA fuses it on every backend. For SmolLM2 (vocabulary 49,152) at 8 x 512 tokens the
plain loss holds 0.8 GB of float32 logits and as much again for their gradient; the fused loss holds
one chunk.

The kernel may be a peftjax node (LoRA on the LM head): under :func:`peftjax.lift` the forward runs
the node's own matmul in every chunk and the gradient reaches the node through its materialized
form.

>>> import jax, jax.numpy as jnp
>>> h = jax.random.normal(jax.random.key(0), (2, 5, 16))
>>> w = jax.random.normal(jax.random.key(1), (16, 40))
>>> y = jnp.array([[1, 2, 3, 4, -100], [5, 6, 7, 8, 9]])
>>> plain = cross_entropy(h @ w, y).sum()
>>> bool(jnp.allclose(fused_cross_entropy(h, w, y, chunk_size=3), plain, rtol=1e-5))
True
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

__all__ = ["cross_entropy", "fused_cross_entropy", "IGNORE_INDEX", "default_chunk_size"]

#: Labels equal to this (or any negative label) contribute nothing, as in PyTorch and HF.
IGNORE_INDEX = -100

# Bytes of float32 logits one chunk may hold (the fused loss's working set).
_CHUNK_BYTES = 8 * 2**20


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Per-token negative log-likelihood ``[...]`` (float32) of ``labels`` under ``logits [..., vocab]``.

  Tokens whose label is negative (:data:`IGNORE_INDEX`) get 0.
  """
  labels = jnp.asarray(labels)
  _check_labels(labels, logits.shape[:-1], "logits")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  keep = labels >= 0
  picked = jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(keep, -picked, 0.0)


def default_chunk_size(vocab: int) -> int:
  """Tokens per chunk so that one chunk's float32 logits take about 8 MiB (at least 16 tokens)."""
  return max(16, _CHUNK_BYTES // (4 * int(vocab)))


def fused_cross_entropy(hidden: Array, kernel, labels: Array, *, transpose: bool = False,
                        chunk_size: Optional[int] = None, weights: Optional[Array] = None) -> Array:
  """Summed cross-entropy of ``hidden @ kernel`` against ``labels``, never holding all logits.

  Args:
    hidden: ``[..., hidden]`` final hidden states (any float dtype; the logits are accumulated in
      float32).
    kernel: the LM head, ``[hidden, vocab]``; or ``[vocab, hidden]`` with ``transpose=True`` (a tied
      embedding table). A peftjax node is accepted under :func:`peftjax.lift`.
    labels: int ``[...]`` (the leading shape of ``hidden``); negative labels are ignored.
    transpose: the kernel is ``[vocab, hidden]``.
    chunk_size: tokens per chunk (default :func:`default_chunk_size`); any value gives the same
      result up to float32 summation order.
    weights: optional float ``[...]`` per-token weights (not differentiated), e.g. ``1 / n_tokens``
      for a mean.

  Returns:
    float32 scalar: ``sum(weights * nll)`` over the tokens with a non-negative label, equal to
    ``(weights * cross_entropy(hidden @ kernel, labels)).sum()``.
  """
  labels = jnp.asarray(labels)
  hidden_size = hidden.shape[-1]
  lead = hidden.shape[:-1]
  _check_labels(labels, lead, "hidden")
  k_in, vocab = (kernel.shape[1], kernel.shape[0]) if transpose else kernel.shape
  if k_in != hidden_size:
    raise ValueError(f"fused_cross_entropy: kernel {tuple(kernel.shape)} does not fit hidden size "
                     f"{hidden_size} (expected {'[vocab, hidden]' if transpose else '[hidden, vocab]'}"
                     f" with hidden = {hidden_size})")
  if weights is None:
    weights = jnp.ones(lead, jnp.float32)
  elif tuple(weights.shape) != tuple(lead):
    raise ValueError(f"fused_cross_entropy: weights shape {tuple(weights.shape)} != the tokens' "
                     f"shape {tuple(lead)}")
  if chunk_size is None:
    chunk_size = default_chunk_size(vocab)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"fused_cross_entropy: chunk_size must be a positive int, got {chunk_size!r}")

  n = 1
  for d in lead:
    n *= d
  chunk = min(chunk_size, max(n, 1))
  n_chunks = -(-n // chunk)
  pad = n_chunks * chunk - n
  h = hidden.reshape(n, hidden_size)
  y = labels.reshape(n).astype(jnp.int32)
  wt = lax.stop_gradient(weights.reshape(n).astype(jnp.float32))
  if pad:
    h = jnp.pad(h, ((0, pad), (0, 0)))
    y = jnp.pad(y, (0, pad), constant_values=IGNORE_INDEX)
    wt = jnp.pad(wt, (0, pad))
  wt = jnp.where(y >= 0, wt, 0.0)
  h = h.reshape(n_chunks, chunk, hidden_size)
  y = y.reshape(n_chunks, chunk)
  wt = wt.reshape(n_chunks, chunk)
  return _fused(h, kernel, y, wt, transpose)


def _check_labels(labels, lead, what):
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
  if tuple(labels.shape) != tuple(lead):
    raise ValueError(f"labels shape {tuple(labels.shape)} != {what}'s leading shape {tuple(lead)}")


def _logits(h, kernel, transpose):
  dims = (((1,), (1,)), ((), ())) if transpose else (((1,), (0,)), ((), ()))
  return lax.dot_general(h, kernel, dims, preferred_element_type=jnp.float32)


def _chunk_nll(h, kernel, y, wt, transpose):
  """``(sum(wt * nll), softmax probabilities, picked mask)`` of one chunk."""
  logits = _logits(h, kernel, transpose)
  m = lax.stop_gradient(logits.max(-1, keepdims=True))
  e = jnp.exp(logits - m)
  z = e.sum(-1, keepdims=True)
  onehot = jnp.arange(logits.shape[-1])[None, :] == y[:, None]
  picked = jnp.where(onehot, logits, 0.0).sum(-1)
  nll = (jnp.log(z[:, 0]) + m[:, 0]) - picked
  return (wt * nll).sum(), e / z, onehot


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused(h, kernel, y, wt, transpose):
  def body(total, xs):
    hc, yc, wc = xs
    return total + _chunk_nll(hc, kernel, yc, wc, transpose)[0], None
  total, _ = lax.scan(body, jnp.zeros((), jnp.float32), (h, y, wt))
  return total


def _fused_fwd(h, kernel, y, wt, transpose):
  kernel_value = kernel.value if hasattr(kernel, "perturbed") else kernel
  want_dk = getattr(kernel, "perturbed", True)
  h_value = h.value if hasattr(h, "perturbed") else h
  y_value = y.value if hasattr(y, "perturbed") else y
  wt_value = wt.value if hasattr(wt, "perturbed") else wt
  cdt = h_value.dtype

  def body(carry, xs):
    total, dk = carry
    hc, yc, wc = xs
    loss, p, onehot = _chunk_nll(hc, kernel_value, yc, wc, transpose)
    dlogits = (wc[:, None] * (p - onehot)).astype(cdt)            # [chunk, vocab]
    if transpose:
      dh = lax.dot_general(dlogits, kernel_value, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)
    else:
      dh = lax.dot_general(dlogits, kernel_value, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)
    if want_dk:
      if transpose:   # dK[v, d] = sum_t dlogits[t, v] h[t, d]
        dk = dk + lax.dot_general(dlogits, hc, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
      else:           # dK[d, v] = sum_t h[t, d] dlogits[t, v]
        dk = dk + lax.dot_general(hc, dlogits, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
    return (total + loss, dk), dh.astype(cdt)

  dk0 = jnp.zeros(kernel_value.shape if want_dk else (), jnp.float32)
  (total, dk), dh = lax.scan(body, (jnp.zeros((), jnp.float32), dk0), (h_value, y_value, wt_value))
  return total, (dh, dk.astype(kernel_value.dtype) if want_dk else None, y_value, wt_value)


def _fused_bwd(transpose, res, g):
  dh, dk, y, wt = res
  dh = (g * dh.astype(jnp.float32)).astype(dh.dtype)
  dk = None if dk is None else (g * dk.astype(jnp.float32)).astype(dk.dtype)
  # labels are integers (float0 cotangent); the weights are not differentiated.
  return dh, dk, None, jnp.zeros_like(wt)


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)
