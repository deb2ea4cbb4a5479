"""Pallas kernels: unpack, dequantize and multiply tile by tile (Triton backend on GPU).

Storage (see :mod:`core`): ``codes [N, Kp/2]`` uint8, byte ``j`` of block ``kb`` holds the codes of
inputs ``kb*B + j`` (low nibble) and ``kb*B + B/2 + j`` (high nibble) of one output column;
``scales [N, nb]`` float32 (double quantization is undone by XLA before the kernel: it is 1/B of
the weight's size); ``zeros [N, nb]`` uint8 for asymmetric int4.

Forward ``y[M, N] = x[M, Kp] @ deq(W)``, grid ``(M/bm, N/bn)``. Program ``(i, j)`` loops over the
``nb`` blocks of ``K``; per block it loads a ``[bn, B/2]`` byte tile and one scale per column,
unpacks the two nibbles into two ``[bn, B/2]`` half-blocks, dequantizes them in float32 (a 15-select
tree for the NF4/FP4 codebooks, arithmetic for int4/int8), casts to the compute dtype and
accumulates ``x[:, lo-half] @ lo^T + x[:, hi-half] @ hi^T`` into a float32 ``[bm, bn]`` tile. The
dequantized weight only ever exists as one tile in registers.

Backward ``dx[M, Kp] = g[M, N] @ deq(W)^T``, grid ``(M/bm, nb)``: program ``(i, kb)`` loops over
``N`` in ``bn``-column chunks, dequantizes the ``[bn, B/2]`` tiles of block ``kb`` and accumulates
``g[:, chunk] @ lo`` and ``g[:, chunk] @ hi`` into the two halves of the ``[bm, B]`` output block.

Triton needs power-of-two tile shapes, so ``B/2`` must be a power of two >= 16 (``B`` in
32..512) and ``N`` a multiple of 16; ``M`` is padded to ``bm``. :func:`supported` says why a
product cannot use the kernel; the caller then uses XLA. On CPU the kernels run with
``interpret=True`` (tests); on TPU they are not used (Mosaic needs 128-lane tiles; see docs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from peftjax._src.quant import formats as F

__all__ = ["qmatmul_fwd", "qmatmul_bwd", "supported", "decode_tile"]


def _pow2(n: int) -> bool:
  return n > 0 and (n & (n - 1)) == 0


def _pick_bn(n: int, pref: int) -> int | None:
  for bn in (pref, 128, 64, 32, 16):
    if bn <= pref and n % bn == 0:
      return bn
  return None


def _pick_bm(m: int, pref: int) -> int:
  bm = 16
  while bm < min(m, pref):
    bm *= 2
  return bm


def supported(q, m: int) -> str | None:
  """``None`` if the Pallas kernels can run ``x[m, K] @ deq(q)``, else the reason."""
  del m
  if getattr(q, "mins", None) is not None:
    return "block offsets (mins: GGUF Q4_1 blocks) are not in the kernel"
  tile = _geometry(q.format, q.block_size)
  if not _pow2(tile) or not 16 <= tile <= 512:
    what = "block_size" if q.format == "int8" else "block_size/2"
    return (f"{what}={tile} (format {q.format!r}) is not a power of two in [16, 512], "
            f"as Triton tiles must be")
  if _pick_bn(q.n_out, 128) is None:
    return f"the output size N={q.n_out} is not a multiple of 16"
  return None


def decode_tile(c, fmt: str, zeros=None):
  """Element values (float32) of integer codes ``c`` (int32 tile); ``zeros`` broadcastable."""
  if fmt in F.CODEBOOK_FORMATS:
    cb = [float(v) for v in F.codebook(fmt)]
    # 4-level select tree on the code bits: 15 selects, scalar constants only (no gather).
    level = []
    bit0 = (c & 1) != 0
    for i in range(8):
      level.append(jnp.where(bit0, np.float32(cb[2 * i + 1]), np.float32(cb[2 * i])))
    for bit in (2, 4, 8):
      b = (c & bit) != 0
      level = [jnp.where(b, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]
  if fmt == "int8":
    return c.astype(jnp.float32)
  if zeros is None:
    return (c - 8).astype(jnp.float32)
  return c.astype(jnp.float32) - zeros.astype(jnp.float32)


def _tiles(c_raw, s, z, fmt, cdtype):
  """Dequantized ``(lo, hi)`` tiles ``[rows, half]`` (compute dtype) from a raw code tile."""
  if fmt == "int8":
    w = (decode_tile(c_raw.astype(jnp.int32), fmt) * s).astype(cdtype)
    return w, None
  c = c_raw.astype(jnp.int32)
  lo = (decode_tile(c & 15, fmt, z) * s).astype(cdtype)
  hi = (decode_tile(c >> 4, fmt, z) * s).astype(cdtype)
  return lo, hi


_NT = (((1,), (1,)), ((), ()))   # a[m, k] . b[n, k] -> [m, n]
_NN = (((1,), (0,)), ((), ()))   # a[m, k] . b[k, n] -> [m, n]


def _fwd_kernel(*refs, fmt, half, nb, cdtype, precision, has_zeros):
  if has_zeros:
    x_ref, c_ref, s_ref, z_ref, o_ref = refs
  else:
    x_ref, c_ref, s_ref, o_ref = refs
    z_ref = None
  bm, bn = o_ref.shape
  cw = half                                  # code bytes per block
  step = 2 * half if fmt != "int8" else half  # inputs per block

  def body(kb, acc):
    c = c_ref[:, pl.ds(kb * cw, cw)]
    s = s_ref[:, pl.ds(kb, 1)]
    z = None if z_ref is None else z_ref[:, pl.ds(kb, 1)]
    lo, hi = _tiles(c, s, z, fmt, cdtype)
    xl = x_ref[:, pl.ds(kb * step, half)].astype(cdtype)
    acc = acc + lax.dot_general(xl, lo, _NT, precision=precision,
                                preferred_element_type=jnp.float32)
    if hi is not None:
      xh = x_ref[:, pl.ds(kb * step + half, half)].astype(cdtype)
      acc = acc + lax.dot_general(xh, hi, _NT, precision=precision,
                                  preferred_element_type=jnp.float32)
    return acc

  acc = lax.fori_loop(0, nb, body, jnp.zeros((bm, bn), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _bwd_kernel(*refs, fmt, half, n_chunks, bn, cdtype, precision, has_zeros):
  if has_zeros:
    g_ref, c_ref, s_ref, z_ref, o_ref = refs
  else:
    g_ref, c_ref, s_ref, o_ref = refs
    z_ref = None
  bm = o_ref.shape[0]
  four_bit = fmt != "int8"

  def body(j, accs):
    rows = pl.ds(j * bn, bn)
    c = c_ref[rows, :]
    s = s_ref[rows, :]
    z = None if z_ref is None else z_ref[rows, :]
    lo, hi = _tiles(c, s, z, fmt, cdtype)
    g = g_ref[:, rows].astype(cdtype)
    acc_lo = accs[0] + lax.dot_general(g, lo, _NN, precision=precision,
                                       preferred_element_type=jnp.float32)
    if not four_bit:
      return (acc_lo,)
    acc_hi = accs[1] + lax.dot_general(g, hi, _NN, precision=precision,
                                       preferred_element_type=jnp.float32)
    return acc_lo, acc_hi

  init = tuple(jnp.zeros((bm, half), jnp.float32) for _ in range(2 if four_bit else 1))
  accs = lax.fori_loop(0, n_chunks, body, init)
  o_ref[:, pl.ds(0, half)] = accs[0].astype(o_ref.dtype)
  if four_bit:
    o_ref[:, pl.ds(half, half)] = accs[1].astype(o_ref.dtype)


def _compiler_params(num_warps, num_stages):
  from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _geometry(fmt, block_size):
  half = block_size // 2 if fmt in F.FOUR_BIT else block_size
  return half


@functools.partial(jax.jit, static_argnames=(
    "fmt", "block_size", "in_features", "compute_dtype", "out_dtype", "precision", "interpret",
    "block_m", "block_n", "num_warps", "num_stages"))
def qmatmul_fwd(x, codes, scales, zeros, *, fmt, block_size, in_features, compute_dtype,
                out_dtype, precision=None, interpret=False, block_m=64, block_n=64,
                num_warps=4, num_stages=2):
  """``x [M, K] @ deq(W) -> [M, N]`` with the fused kernel.

  Args:
    x: ``[M, K]`` floating.
    codes: ``uint8 [N, Kp/2]`` (4-bit) or ``int8 [N, Kp]``.
    scales: ``float32 [N, nb]`` (already un-double-quantized).
    zeros: ``uint8 [N, nb]`` or ``None``.
    fmt, block_size, in_features: the node's static metadata (``K = in_features``).
    compute_dtype: dtype of the dequantized tiles and of the matmul inputs.
    out_dtype: result dtype (accumulation is float32).
    precision: ``lax.dot_general`` precision of the tile products.
    interpret: run in Pallas interpret mode (CPU).
    block_m, block_n, num_warps, num_stages: tiling (GPU tuning knobs).

  Returns:
    ``[M, N]`` in ``out_dtype``.
  """
  m, k = x.shape
  n = codes.shape[0]
  nb = scales.shape[1]
  kp = nb * block_size
  half = _geometry(fmt, block_size)
  bm = _pick_bm(m, block_m)
  bn = _pick_bn(n, block_n)
  mp = -(-m // bm) * bm
  x = jnp.pad(x, ((0, mp - m), (0, kp - k)))
  has_zeros = zeros is not None
  args = [x, codes, scales] + ([zeros] if has_zeros else [])
  in_specs = [pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
              pl.BlockSpec((bn, codes.shape[1]), lambda i, j: (j, 0)),
              pl.BlockSpec((bn, nb), lambda i, j: (j, 0))]
  if has_zeros:
    in_specs.append(pl.BlockSpec((bn, nb), lambda i, j: (j, 0)))
  kernel = functools.partial(_fwd_kernel, fmt=fmt, half=half, nb=nb,
                             cdtype=jnp.dtype(compute_dtype), precision=precision,
                             has_zeros=has_zeros)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, n), out_dtype),
      grid=(mp // bm, n // bn),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      interpret=interpret,
      compiler_params=None if interpret else _compiler_params(num_warps, num_stages),
      name=f"qmatmul_fwd_{fmt}",
  )(*args)
  return out[:m]


@functools.partial(jax.jit, static_argnames=(
    "fmt", "block_size", "in_features", "compute_dtype", "out_dtype", "precision", "interpret",
    "block_m", "block_n", "num_warps", "num_stages"))
def qmatmul_bwd(g, codes, scales, zeros, *, fmt, block_size, in_features, compute_dtype,
                out_dtype, precision=None, interpret=False, block_m=64, block_n=64,
                num_warps=4, num_stages=2):
  """``g [M, N] @ deq(W)^T -> dx [M, K]`` with the fused kernel (arguments as :func:`qmatmul_fwd`)."""
  m, n = g.shape
  nb = scales.shape[1]
  kp = nb * block_size
  half = _geometry(fmt, block_size)
  bm = _pick_bm(m, block_m)
  bn = _pick_bn(n, block_n)
  mp = -(-m // bm) * bm
  g = jnp.pad(g, ((0, mp - m), (0, 0)))
  has_zeros = zeros is not None
  args = [g, codes, scales] + ([zeros] if has_zeros else [])
  in_specs = [pl.BlockSpec((bm, n), lambda i, kb: (i, 0)),
              pl.BlockSpec((n, half), lambda i, kb: (0, kb)),
              pl.BlockSpec((n, 1), lambda i, kb: (0, kb))]
  if has_zeros:
    in_specs.append(pl.BlockSpec((n, 1), lambda i, kb: (0, kb)))
  kernel = functools.partial(_bwd_kernel, fmt=fmt, half=half, n_chunks=n // bn, bn=bn,
                             cdtype=jnp.dtype(compute_dtype), precision=precision,
                             has_zeros=has_zeros)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, kp), out_dtype),
      grid=(mp // bm, nb),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, block_size), lambda i, kb: (i, kb)),
      interpret=interpret,
      compiler_params=None if interpret else _compiler_params(num_warps, num_stages),
      name=f"qmatmul_bwd_{fmt}",
  )(*args)
  return out[:m, :in_features]
