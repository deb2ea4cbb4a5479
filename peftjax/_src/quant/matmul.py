"""The dequantizing matmul ``x @ deq(Q)`` with a custom VJP that differentiates ``x`` only.

Forward: ``y = x @ deq(Q)``. Backward: ``dx = g @ deq(Q)^T``, dequantizing again instead of keeping
a full-precision copy of the weight as a residual (the residual is the packed node itself); the
packed codes and scales get zero cotangents (they are frozen). Both directions run either through
XLA (dequantize, then ``dot_general``) or through the Pallas kernels of :mod:`pallas_kernel`, chosen
by the node's ``kernel`` field (``"auto"``: XLA everywhere for now, see :func:`resolve_kernel`;
``"pallas"`` opts in to the fused kernel).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from peftjax._src.quant import core
from peftjax._src.quant import pallas_kernel as pk

__all__ = ["qmatmul", "qmatmul_xla", "resolve_kernel"]


def _wt(q: core.QuantizedWeight) -> jax.Array:
  """Dequantized ``[*S, N, K]`` in the compute dtype."""
  return core.dequantize_t(q)[..., :q.in_features].astype(q.dtype)


#: The most float values one dequantized chunk of a kernel may hold on the XLA path (8 MB of
#: float32). A larger kernel is dequantized and multiplied chunk by chunk of output columns in a
#: loop: XLA schedules the dequantization of a whole kernel wherever it likes (in a model, all of
#: them at the start of the program), which kept every layer's float kernel alive at once: a
#: QLoRA step held the whole float32 model in temporaries (measured with
#: ``compiled.memory_analysis()`` and ``benchmarks/memory.py``). In a loop only one chunk exists.
CHUNK_VALUES = 1 << 21


def _n_chunks(q: core.QuantizedWeight) -> int:
  """Chunks of output columns: 1 for a kernel within :data:`CHUNK_VALUES`, else the fewest
  that divide ``N`` and fit."""
  n, kp = q.n_out, q.padded_in
  if n * kp <= CHUNK_VALUES:
    return 1
  for c in range(2, n + 1):
    if n % c == 0 and (n // c) * kp <= CHUNK_VALUES:
      return c
  return n


def _chunked(q: core.QuantizedWeight, c: int):
  """``(codes, scales, zeros, mins)`` with a leading chunk axis ``[c, *S, N/c, ...]``."""
  ns = len(q.stack_shape)

  def split(a):
    if a is None:
      return None
    a = a.reshape(a.shape[:ns] + (c, a.shape[ns] // c) + a.shape[ns + 1:])
    return jnp.moveaxis(a, ns, 0)
  return (split(q.codes), split(core.dequantize_scales(q)), split(q.zeros), split(q.mins))


def _wt_chunk(q: core.QuantizedWeight, codes, scales, zeros, mins) -> jax.Array:
  """One chunk ``[*S, N/c, K]`` dequantized in the compute dtype."""
  part = q.replace(codes=codes, scales=scales, qscales=None, qscales_absmax=None,
                   qscales_offset=None, zeros=zeros, mins=mins, out_shape=(codes.shape[-2],))
  return _wt(part)


@functools.partial(jax.jit, static_argnames=("precision", "preferred_element_type"))
def qmatmul_xla(x, q, *, precision=None, preferred_element_type=None):
  """Reference path: ``x [*S, M, K] @ deq(q) [*S, K, N] -> [*S, M, N]`` via XLA.

  Kernels larger than :data:`CHUNK_VALUES` are dequantized and multiplied in chunks of output
  columns (a loop), so one chunk of float weights exists at a time.
  """
  ns = x.ndim - 2
  dims = (((ns + 1,), (ns + 1,)), (tuple(range(ns)), tuple(range(ns))))
  c = _n_chunks(q)
  if c == 1:
    return lax.dot_general(x, _wt(q), dims, precision=precision,
                           preferred_element_type=preferred_element_type)

  def one(parts):
    return lax.dot_general(x, _wt_chunk(q, *parts), dims, precision=precision,
                           preferred_element_type=preferred_element_type)   # [*S, M, N/c]
  ys = lax.map(one, _chunked(q, c))                                          # [c, *S, M, N/c]
  ys = jnp.moveaxis(ys, 0, -2)                                               # [*S, M, c, N/c]
  return ys.reshape(ys.shape[:-2] + (q.n_out,))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _xla_dx(g, q, x_dtype, precision):
  ns = g.ndim - 2
  dims = (((ns + 1,), (ns,)), (tuple(range(ns)), tuple(range(ns))))
  c = _n_chunks(q)
  if c == 1:
    return lax.dot_general(g, _wt(q), dims, precision=precision).astype(x_dtype)
  gs = g.reshape(g.shape[:-1] + (c, q.n_out // c))
  gs = jnp.moveaxis(gs, -2, 0)                                               # [c, *S, M, N/c]

  def add(acc, parts):
    g_j, *chunk = parts
    return acc + lax.dot_general(g_j, _wt_chunk(q, *chunk), dims,
                                 precision=precision).astype(acc.dtype), None
  out_dtype = jnp.result_type(g.dtype, q.dtype)
  acc0 = jnp.zeros(g.shape[:-1] + (q.in_features,), out_dtype)
  dx, _ = lax.scan(add, acc0, (gs,) + _chunked(q, c))
  return dx.astype(x_dtype)


def resolve_kernel(q: core.QuantizedWeight, m: int) -> str:
  """``"xla"``, ``"pallas"`` or ``"interpret"`` for a product with ``m`` rows."""
  if q.kernel == "xla":
    return "xla"
  if q.kernel == "auto":
    # Measured on an H200 (docs/measurements/h200-machine_gpu_quant_matmul.txt): XLA's fused
    # dequantize + cuBLAS matmul is 1.1-4.7x faster than the Pallas kernel at every tested shape,
    # so "auto" uses XLA everywhere until the kernel is tuned; kernel="pallas" opts in.
    return "xla"
  why = pk.supported(q, m)
  if why is None and q.kernel == "pallas" and jax.default_backend() not in ("gpu", "cuda", "rocm"):
    why = (f"the compiled kernel targets the Triton GPU backend, not {jax.default_backend()!r} "
           f"(kernel='interpret' runs it anywhere, slowly)")
  if why is not None:
    raise ValueError(f"QuantizedWeight(kernel={q.kernel!r}): the Pallas kernel cannot run this "
                     f"product: {why}. Use kernel='auto' or 'xla'.")
  return q.kernel


def _out_dtype(x, q, preferred_element_type):
  return jax.eval_shape(
      lambda a, b: lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                                   preferred_element_type=preferred_element_type),
      jax.ShapeDtypeStruct((1, 1), x.dtype), jax.ShapeDtypeStruct((1, 1), q.dtype)).dtype


def _pallas_fwd(x, q, impl, precision, out_dtype):
  interpret = impl == "interpret"
  scales = core.dequantize_scales(q)

  def one(x2, codes, s, z):
    return pk.qmatmul_fwd(x2, codes, s, z, fmt=q.format, block_size=q.block_size,
                          in_features=q.in_features, compute_dtype=q.dtype, out_dtype=out_dtype,
                          precision=precision, interpret=interpret)

  fn = one
  for _ in range(x.ndim - 2):
    fn = jax.vmap(fn)
  return fn(x, q.codes, scales, q.zeros)


def _pallas_bwd(g, q, impl, precision, x_dtype):
  interpret = impl == "interpret"
  scales = core.dequantize_scales(q)

  def one(g2, codes, s, z):
    return pk.qmatmul_bwd(g2, codes, s, z, fmt=q.format, block_size=q.block_size,
                          in_features=q.in_features, compute_dtype=q.dtype, out_dtype=x_dtype,
                          precision=precision, interpret=interpret)

  fn = one
  for _ in range(g.ndim - 2):
    fn = jax.vmap(fn)
  return fn(g, q.codes, scales, q.zeros)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _qmm(x, q, precision, preferred_element_type, impl):
  if impl == "xla":
    return qmatmul_xla(x, q, precision=precision, preferred_element_type=preferred_element_type)
  return _pallas_fwd(x, q, impl, precision, _out_dtype(x, q, preferred_element_type))


def _qmm_fwd(x, q, precision, preferred_element_type, impl):
  y = _qmm(x, q, precision, preferred_element_type, impl)
  # Residuals: the packed node (no float copy of the weight) and a 0-size tag carrying x's dtype.
  return y, (q, jnp.zeros((0,), x.dtype))


def _zero_cotangent(leaf):
  if jnp.issubdtype(leaf.dtype, jnp.floating):
    return jnp.zeros_like(leaf)
  return np.zeros(leaf.shape, dtype=jax.dtypes.float0)


def _qmm_bwd(precision, preferred_element_type, impl, res, g):
  del preferred_element_type
  q, tag = res
  if impl == "xla":
    dx = _xla_dx(g, q, tag.dtype, precision)
  else:
    dx = _pallas_bwd(g, q, impl, precision, tag.dtype)
  return dx, jax.tree_util.tree_map(_zero_cotangent, q)


_qmm.defvjp(_qmm_fwd, _qmm_bwd)


def qmatmul(x, q, *, precision=None, preferred_element_type=None):
  """``x [*S, M, K] @ deq(q) [*S, K, N] -> [*S, M, N]``, differentiable in ``x`` only.

  Args:
    x: floating ``[*S, M, K]``; ``S`` are ``q``'s layer axes (empty for a plain kernel).
    q: a :class:`~peftjax._src.quant.core.QuantizedWeight` with ``out_shape`` flattened to ``N``.
    precision, preferred_element_type: as for ``lax.dot_general``.

  Returns:
    ``[*S, M, N]`` with ``lax.dot_general``'s result dtype for ``(x.dtype, q.dtype)``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from peftjax._src.quant import core, matmul
    >>> w = jax.random.normal(jax.random.key(0), (128, 32))
    >>> q = core.quantize_array(w)
    >>> matmul.qmatmul(jnp.ones((4, 128)), q).shape
    (4, 32)
  """
  if x.ndim != len(q.stack_shape) + 2:
    raise ValueError(f"qmatmul: x of shape {x.shape} does not match a node with layer axes "
                     f"{q.stack_shape}; expected [*S, M, {q.in_features}]")
  impl = resolve_kernel(q, x.shape[-2])
  return _qmm(x, q, precision, preferred_element_type, impl)
