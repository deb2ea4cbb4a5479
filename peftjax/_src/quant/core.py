"""Blockwise quantization of one kernel, the ``QuantizedWeight`` node and dequantization.

Layout (chosen so that a matmul can dequantize tile by tile)
-----------------------------------------------------------
A kernel of shape ``[*S, *I, *O]`` (``S``: layer axes of ``nn.scan``-stacked kernels, ``I``: input
axes, ``K = prod(I)``, ``O``: output axes, ``N = prod(O)``) is stored *transposed*, one row per
output column, exactly like the flattened row-major ``[out, in]`` torch weight that bitsandbytes
quantizes:

* ``wt = [*S, N, K]`` is cut along ``K`` into ``nb = ceil(K / B)`` blocks of ``B = block_size``
  values; each row is zero-padded to ``Kp = nb * B`` on its own, so a block never straddles two
  columns (when ``K % B == 0``, the usual case, there is no padding and the blocks are
  bitsandbytes' blocks). A matmul tile ``[bn columns, B inputs]`` thus needs one scale per column.
* 4-bit codes are packed two per byte *within* a block: byte ``j < B/2`` of a block holds element
  ``j`` in its low nibble and element ``j + B/2`` in its high nibble. Unpacking a tile gives two
  contiguous half-blocks (no interleave), which a kernel multiplies with two contiguous slices of
  ``x``. ``codes``: ``uint8 [*S, N, Kp/2]`` (``int8 [*S, N, Kp]`` for ``int8``).
* ``scales``: ``float32 [*S, N, nb]``, or, with double quantization (bitsandbytes'
  ``compress_statistics``), per layer: the ``N * nb`` scales minus their mean (``qscales_offset``
  ``[*S]``), zero-padded to a multiple of 256 and quantized blockwise (256) to the 8-bit dynamic map:
  ``qscales`` ``uint8 [*S, P]`` and ``qscales_absmax`` ``float32 [*S, P/256]`` (the block absmax
  rounded up to a power of two: see :func:`_double_quantize`).
* ``zeros``: ``uint8 [*S, N, nb]`` zero points (``int4`` asymmetric only).
* ``mins``: ``float16 [*S, N, nb]`` per-block offsets of GGUF's ``Q4_1`` blocks (``int4`` only):
  an element is ``code * scale + min``, in that order, as llama.cpp and ``gguf`` dequantize
  (:func:`peftjax.io.gguf` maps such blocks as they are, with no requantization).

Every array leaf carries the layer axes first, so slicing all leaves at layer ``l`` (what
``lax.scan`` does) gives the layer-``l`` node; the logical shape is derived from the leaves.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from peftjax._src.nodes import Node, node_dataclass, static_field, is_node
from peftjax._src.quant import formats as F

__all__ = ["QuantizedWeight", "quantize_array", "quantize_layers", "from_blocks", "dequantize_t",
           "dequantize_scales", "KERNELS"]

#: Values of ``QuantizedWeight.kernel``: which matmul implementation the node's rule uses.
#: ``"auto"``: XLA (measured faster than the untuned Pallas kernel on an H200, see
#: docs/measurements/h200-machine_gpu_quant_matmul.txt);
#: ``"xla"``: dequantize with XLA then ``dot_general``; ``"pallas"``: the Pallas kernel (compiled);
#: ``"interpret"``: the Pallas kernel in interpret mode (CPU testing).
KERNELS = ("auto", "xla", "pallas", "interpret")


@node_dataclass
class QuantizedWeight(Node):
  """A frozen kernel stored in 4 or 8 bits; stands for a ``[*S, *I, *O]`` floating array.

  Build with :func:`peftjax.quant.quantize` (trees) or :func:`quantize_array` (one array). See the
  module docstring for the storage layout. All fields are frozen (``trainable_fields = ()``);
  ``LoraWeight(w=QuantizedWeight(...))`` is QLoRA.

  Attributes:
    codes: ``uint8 [*S, N, Kp/2]`` packed 4-bit codes, or ``int8 [*S, N, Kp]``.
    scales: ``float32 [*S, N, nb]`` per-block scales (``float16`` for blocks kept from a GGUF
      file), or ``None`` with double quantization.
    qscales: ``uint8 [*S, P]`` 8-bit codes of ``scales - offset`` (double quantization) or ``None``.
    qscales_absmax: ``float32 [*S, P/256]`` second-level absmax, or ``None``.
    qscales_offset: ``float32 [*S]`` mean of the scales, or ``None``.
    zeros: ``uint8 [*S, N, nb]`` zero points of asymmetric ``int4``, or ``None``.
    mins: ``float16``/``float32 [*S, N, nb]`` block offsets (GGUF ``Q4_1``:
      ``code * scale + min``), or ``None``.
    format: ``"nf4" | "fp4" | "int4" | "int8"``.
    block_size: ``B``, values per block (``Kp = nb * B``).
    in_shape: the input axes ``I`` (``K = prod(I)``; usually one axis).
    out_shape: the output axes ``O`` (``N = prod(O)``).
    dtype_name: the compute dtype the node dequantizes to (its ``dtype``).
    kernel: matmul implementation, one of :data:`KERNELS`.
  """

  codes: Any
  scales: Any = None
  qscales: Any = None
  qscales_absmax: Any = None
  qscales_offset: Any = None
  zeros: Any = None
  mins: Any = None
  format: str = static_field(default="nf4")
  block_size: int = static_field(default=64)
  in_shape: tuple = static_field(default=())
  out_shape: tuple = static_field(default=())
  dtype_name: str = static_field(default="float32")
  kernel: str = static_field(default="auto")

  type_id = "quantized"
  execution_fields = ("kernel",)
  trainable_fields = ()
  wrappable = True

  # -- the array it stands for -------------------------------------------------------------------
  def param_count(self) -> int:
    """The number of values this kernel stands for (its storage is counted in bytes)."""
    return math.prod(self.shape)

  @property
  def stack_shape(self) -> tuple[int, ...]:
    """The layer axes ``S`` (empty for an ordinary kernel)."""
    return tuple(self.codes.shape[:-2])

  @property
  def shape(self) -> tuple[int, ...]:
    return self.stack_shape + tuple(self.in_shape) + tuple(self.out_shape)

  @property
  def dtype(self):
    return jnp.dtype(self.dtype_name)

  @property
  def double_quant(self) -> bool:
    return self.qscales is not None

  @property
  def symmetric(self) -> bool:
    return self.zeros is None and self.mins is None

  @property
  def in_features(self) -> int:
    """``K = prod(in_shape)``."""
    return math.prod(self.in_shape)

  @property
  def n_out(self) -> int:
    return math.prod(self.out_shape)

  @property
  def n_blocks(self) -> int:
    return self.padded_in // self.block_size

  @property
  def padded_in(self) -> int:
    return self.codes.shape[-1] * (2 if self.format in F.FOUR_BIT else 1)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    """Bytes actually stored (all array leaves)."""
    return sum(int(np.prod(l.shape)) * jnp.dtype(l.dtype).itemsize
               for l in jax.tree_util.tree_leaves(self))

  def materialize(self) -> jax.Array:
    """The dequantized kernel, ``[*S, *I, *O]`` in ``self.dtype``."""
    return _materialize(self)

  # -- rules ----------------------------------------------------------------------------------------
  def astype(self, dtype) -> "QuantizedWeight":
    """Changes the compute dtype; the packed codes and scales are left as they are."""
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
      return self.materialize().astype(dtype)
    return self.replace(dtype_name=dtype.name)

  def dot_general(self, x, dimension_numbers, *, precision=None, preferred_element_type=None):
    """``x . deq(self)`` with the dequantizing matmul when ``x`` contracts over the input axis.

    Handled: the node's contracting axes are exactly its input axes ``I`` (in any order) and its
    batch axes are exactly its layer axes ``S`` (in order): Flax ``Dense``
    (``x[..., K] @ W[K, N]``), ``DenseGeneral`` over the input axes, ``vmap`` over layers. Other
    dimension numbers materialize the node.
    """
    from peftjax._src.quant import matmul  # pylint: disable=g-import-not-at-top
    (lc, rc), (lb, rb) = dimension_numbers
    ns, ni = len(self.stack_shape), len(self.in_shape)
    if (tuple(sorted(rc)) != tuple(range(ns, ns + ni)) or tuple(rb) != tuple(range(ns))):
      return super().dot_general(x, dimension_numbers, precision=precision,
                                 preferred_element_type=preferred_element_type)
    x = jnp.asarray(x)
    lc_sorted = [l for _, l in sorted(zip(rc, lc))]
    free = [d for d in range(x.ndim) if d not in lc and d not in lb]
    perm = list(lb) + free + lc_sorted
    xt = x if perm == list(range(x.ndim)) else jnp.transpose(x, perm)
    bshape, fshape = xt.shape[:ns], xt.shape[ns:x.ndim - ni]
    x2 = xt.reshape(bshape + (math.prod(fshape), self.in_features))
    y = matmul.qmatmul(x2, self, precision=precision,
                       preferred_element_type=preferred_element_type)   # [*S, M, N]
    return y.reshape(bshape + fshape + tuple(self.out_shape))


def _nearest_code(v: jax.Array, values: np.ndarray) -> jax.Array:
  """Codes (indices into ``values``) of the nearest codebook value, ties to the smaller value."""
  _, thr, code_of_sorted = F.sorted_codebook(values)
  pos = jnp.searchsorted(jnp.asarray(thr), v, side="left",
                         method="compare_all" if len(thr) <= 16 else "scan")
  return jnp.asarray(code_of_sorted)[pos]


#: ``float32(1/n)``: the step of a ``2n+1``-level grid is ``range * (1/n)``, a multiplication (XLA
#: rewrites division by a constant into multiplication by its rounded reciprocal anyway, so the
#: spec says so explicitly and the NumPy reference can match bit for bit).
_RECIP = {n: np.float32(1.0 / n) for n in (7, 15, 127)}


def _safe_div(a, b):
  """``a * float32(1 / b)`` where ``b != 0``, else ``0`` (all-zero blocks).

  Multiplying by the rounded reciprocal is bitsandbytes' normalization, and what XLA makes of
  ``a / broadcast(b)`` anyway; writing it out keeps the result independent of compiler rewrites.
  """
  nz = b != 0
  inv = jnp.where(nz, 1.0 / jnp.where(nz, b, 1.0), 0.0)
  return a * inv


@functools.partial(jax.jit, static_argnames=("fmt", "block_size", "symmetric", "n_stack", "n_in"))
def _quantize_jit(w, *, fmt, block_size, symmetric, n_stack, n_in):
  """``w [*S, *I, *O]`` -> dict of storage arrays (see module docstring)."""
  s_shape = w.shape[:n_stack]
  k = math.prod(w.shape[n_stack:n_stack + n_in])
  n = math.prod(w.shape[n_stack + n_in:])
  b = block_size
  nb = -(-k // b)
  kp = nb * b
  wt = jnp.swapaxes(w.astype(jnp.float32).reshape(s_shape + (k, n)), -1, -2)  # [*S, N, K]
  wt = jnp.pad(wt, [(0, 0)] * (n_stack + 1) + [(0, kp - k)])
  blocks = wt.reshape(s_shape + (n, nb, b))
  out = {"n_nonfinite": jnp.sum(~jnp.isfinite(w))}
  absmax = jnp.max(jnp.abs(blocks), axis=-1)                                     # [*S, N, nb]
  if fmt in F.CODEBOOK_FORMATS:
    scales = absmax
    codes = _nearest_code(_safe_div(blocks, absmax[..., None]), F.codebook(fmt))
  elif fmt == "int8":
    scales = absmax * _RECIP[127]
    q = jnp.clip(jnp.round(_safe_div(blocks, scales[..., None])), -127, 127)
    codes = q.astype(jnp.int8)
  elif symmetric:  # int4
    scales = absmax * _RECIP[7]
    q = jnp.clip(jnp.round(_safe_div(blocks, scales[..., None])), -8, 7)
    codes = (q + 8).astype(jnp.uint8)
  else:            # int4 asymmetric, zero always representable (GPTQ)
    lo = jnp.minimum(jnp.min(blocks, axis=-1), 0.0)
    hi = jnp.maximum(jnp.max(blocks, axis=-1), 0.0)
    scales = (hi - lo) * _RECIP[15]
    z = jnp.clip(jnp.round(_safe_div(-lo, scales)), 0, 15)
    q = jnp.where(scales[..., None] != 0,
                  jnp.clip(jnp.round(_safe_div(blocks, scales[..., None])) + z[..., None], 0, 15),
                  0.0)
    codes = q.astype(jnp.uint8)
    out["zeros"] = z.astype(jnp.uint8)
  if fmt in F.FOUR_BIT:
    codes = codes.astype(jnp.uint8)
    half = b // 2
    codes = codes[..., :half] | (codes[..., half:] << 4)
  out["codes"] = codes.reshape(s_shape + (n, kp // (2 if fmt in F.FOUR_BIT else 1)))
  out["scales"] = scales
  return out


def pow2_ceil(a):
  """The smallest power of two ``>= a`` (``a >= 0`` float32; ``0`` stays ``0``), exactly."""
  m, e = jnp.frexp(a)                       # a = m * 2**e, m in [0.5, 1)
  return jnp.where((a == 0) | (m == 0.5), a, jnp.ldexp(jnp.ones_like(a), e))


@jax.jit
def _double_quantize(scales, count):
  """``scales [*S, N, nb]`` -> 8-bit dynamic-map codes of ``scales - mean`` in blocks of 256.

  A separate program from :func:`_quantize_jit` on purpose: XLA on CPU contracts ``a * b - c``
  into one FMA (one rounding), so computing the scales and subtracting the offset in one fusion
  would subtract from unrounded scales. Here ``scales`` arrive rounded, and the mean divides by
  ``count`` (a runtime value, so it is not rewritten into a multiplication that could fuse
  with the subtraction): the stored offset is exactly the value subtracted.

  The second-level scale ``qscales_absmax`` is the block's absmax *rounded up to a power of two*
  (bitsandbytes keeps it exact). Then ``code_value * qscales_absmax`` is exact, so a dequantized
  scale ``code_value * qscales_absmax + offset`` has one rounding whether or not a compiler fuses
  the multiply and the add into an FMA: XLA (any fusion), the Pallas kernels and NumPy agree bit
  for bit. It costs at most one of the 8 bits on the scales' residuals; the effect on the weight
  error is below 0.1% (see docs/quant.md).
  """
  s_shape = scales.shape[:-2]
  flat = scales.reshape(s_shape + (-1,))
  f = flat.shape[-1]
  p = -(-f // F.DQ_BLOCK) * F.DQ_BLOCK
  offset = jnp.sum(flat, axis=-1) / count
  r = jnp.pad(flat - offset[..., None], [(0, 0)] * len(s_shape) + [(0, p - f)])
  r = r.reshape(s_shape + (p // F.DQ_BLOCK, F.DQ_BLOCK))
  absmax2 = pow2_ceil(jnp.max(jnp.abs(r), axis=-1))
  codes = _nearest_code(_safe_div(r, absmax2[..., None]), F.DYNAMIC8).astype(jnp.uint8)
  return {"qscales": codes.reshape(s_shape + (p,)), "qscales_absmax": absmax2,
          "qscales_offset": offset}


def _quantize_layer(w, fmt, block_size, symmetric, n_in, double_quant):
  """Storage arrays of one layer ``w [*I, *O]``.

  Layer-stacked kernels are quantized one layer at a time with this same program, so layer ``l``
  of a stacked node is bit-identical to quantizing ``w[l]`` alone (and the float32 temporaries of
  only one layer exist at a time).
  """
  arrays = _quantize_jit(w, fmt=fmt, block_size=block_size, symmetric=symmetric, n_stack=0,
                         n_in=n_in)
  if double_quant:
    scales = arrays.pop("scales")
    count = jnp.asarray(math.prod(scales.shape[-2:]), jnp.float32)
    arrays.update(_double_quantize(scales, count))
  return arrays


@jax.jit
def _materialize(q: QuantizedWeight) -> jax.Array:
  wt = dequantize_t(q)[..., :q.in_features]                  # [*S, N, K] f32
  w = jnp.swapaxes(wt, -1, -2).astype(q.dtype)               # [*S, K, N]
  return w.reshape(q.shape)


@jax.jit
def dequantize_scales(q: QuantizedWeight) -> jax.Array:
  """The per-block scales ``float32 [*S, N, nb]`` (undoing double quantization if present)."""
  if q.qscales is None:
    return q.scales.astype(jnp.float32)   # float16 as a GGUF file stores them: exact
  s_shape = q.qscales.shape[:-1]
  p = q.qscales.shape[-1]
  r = jnp.asarray(F.DYNAMIC8)[q.qscales].reshape(s_shape + (p // F.DQ_BLOCK, F.DQ_BLOCK))
  r = (r * q.qscales_absmax[..., None]).reshape(s_shape + (p,))
  f = q.n_out * q.n_blocks
  return (r[..., :f] + q.qscales_offset[..., None]).reshape(s_shape + (q.n_out, q.n_blocks))


def unpack_codes(q: QuantizedWeight) -> jax.Array:
  """Codes as ``uint8 [*S, N, nb, B]`` (4-bit formats) or ``int8`` (``int8``)."""
  lead = q.codes.shape[:-1]
  b = q.block_size
  if q.format not in F.FOUR_BIT:
    return q.codes.reshape(lead + (q.n_blocks, b))
  p = q.codes.reshape(lead + (q.n_blocks, b // 2))
  return jnp.concatenate([p & 15, p >> 4], axis=-1)


def decode(codes, fmt: str, zeros=None):
  """Element values before scaling: codebook value, ``code - 8``, ``code - z`` or ``q`` (float32)."""
  if fmt in F.CODEBOOK_FORMATS:
    return jnp.asarray(F.codebook(fmt))[codes]
  if fmt == "int8":
    return codes.astype(jnp.float32)
  if zeros is None:
    return codes.astype(jnp.float32) - 8.0
  return codes.astype(jnp.float32) - zeros.astype(jnp.float32)


@jax.jit
def dequantize_t(q: QuantizedWeight) -> jax.Array:
  """The dequantized, transposed, padded kernel ``float32 [*S, N, Kp]``."""
  scales = dequantize_scales(q)                                   # [*S, N, nb]
  if q.mins is not None:  # GGUF Q4_1: code * d + m, the gguf reference's order of operations
    mins = q.mins.astype(jnp.float32)[..., None]
    w = unpack_codes(q).astype(jnp.float32) * scales[..., None] + mins
    return w.reshape(q.codes.shape[:-1] + (q.padded_in,))
  zeros = None if q.zeros is None else q.zeros[..., None]
  v = decode(unpack_codes(q), q.format, zeros)                    # [*S, N, nb, B]
  w = v * scales[..., None]
  return w.reshape(q.codes.shape[:-1] + (q.padded_in,))


def quantize_array(w, *, format: str = "nf4", block_size: int | None = 64,
                   double_quant: bool = True, symmetric: bool = True,
                   layout: tuple[int, int] | None = None, compute_dtype=None, kernel: str = "auto",
                   path: str = "<array>", check_finite: bool = True) -> QuantizedWeight:
  """Quantizes one kernel ``w [*S, *I, *O]`` into a :class:`QuantizedWeight`.

  Args:
    w: floating array, ``ndim >= 2``.
    format: ``"nf4"``, ``"fp4"``, ``"int4"`` or ``"int8"``.
    block_size: values per block along ``K = prod(I)`` (even for 4-bit formats); ``None``: one
      block per output column (per-channel).
    double_quant: quantize the scales to 8 bits (blocks of 256, mean subtracted).
    symmetric: ``int4`` only; ``False`` adds a zero point per block.
    layout: ``(n_batch, n_in)``: the number of leading layer axes ``S`` and of input axes ``I``;
      default :func:`peftjax.lora.default_layout` of ``(path, w.shape)``, the same as LoRA's.
    compute_dtype: dtype the node dequantizes to; default ``w.dtype``.
    kernel: matmul implementation, one of :data:`KERNELS`.
    path: the leaf's path (layout default and error messages).
    check_finite: raise on NaN/Inf (needs concrete values; skipped under tracing).

  Returns:
    The :class:`QuantizedWeight`.

  Raises:
    ValueError, TypeError: bad format/options, non-floating or ``ndim < 2`` input, NaN/Inf values.

  Example:
    >>> import jax
    >>> q = quantize_array(jax.random.normal(jax.random.key(0), (256, 64)))
    >>> q.codes.shape, q.codes.dtype.name, q.shape
    ((64, 128), 'uint8', (256, 64))
  """
  if is_node(w):
    raise TypeError(f"quantize: the leaf at {path!r} is already a {type(w).__name__} node; "
                    f"quantize the original array (or exclude it from targets)")
  if not (hasattr(w, "shape") and hasattr(w, "dtype")):
    raise TypeError(f"quantize: the leaf at {path!r} is not an array: {type(w).__name__}")
  w = w if isinstance(w, jax.core.Tracer) else jnp.asarray(w)
  spec = _plan(tuple(w.shape), w.dtype, format=format, block_size=block_size,
               double_quant=double_quant, symmetric=symmetric, layout=layout,
               compute_dtype=compute_dtype, kernel=kernel, path=path)
  n_stack = spec["n_stack"]
  layers = w.reshape((-1,) + tuple(w.shape[n_stack:])) if n_stack else w[None]
  check = check_finite and not isinstance(w, jax.core.Tracer)
  return _assemble(spec, (layers[i] for i in range(layers.shape[0])), check_finite=check)


def _plan(shape: tuple, dtype, *, format, block_size, double_quant, symmetric, layout,
          compute_dtype, kernel, path) -> dict:
  """Checks the options against a kernel's shape and dtype; the settings :func:`_assemble` uses."""
  F.check_format(format, block_size, symmetric)
  if not isinstance(double_quant, bool):
    raise TypeError(f"quantize: double_quant must be a bool; got {double_quant!r}")
  if kernel not in KERNELS:
    raise ValueError(f"quantize: kernel={kernel!r} is not one of {KERNELS}")
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"quantize: the leaf at {path!r} has dtype {jnp.dtype(dtype).name}; only "
                    f"floating kernels can be quantized")
  if len(shape) < 2:
    raise ValueError(f"quantize: the leaf at {path!r} has shape {tuple(shape)}; a kernel with "
                     f"ndim >= 2 ([..., in, out]) is required")
  if layout is None:
    from peftjax.lora import default_layout  # pylint: disable=g-import-not-at-top
    layout = default_layout(path, tuple(shape))
  n_stack, n_in = layout
  if not (0 <= n_stack and 1 <= n_in and n_stack + n_in < len(shape)):
    raise ValueError(f"quantize: layout (n_batch={n_stack}, n_in={n_in}) for the leaf at {path!r} "
                     f"of shape {tuple(shape)}; need n_batch >= 0, n_in >= 1 and at least one "
                     f"output axis")
  cdtype = jnp.dtype(dtype if compute_dtype is None else compute_dtype)
  if not jnp.issubdtype(cdtype, jnp.floating):
    raise TypeError(f"quantize: compute_dtype={compute_dtype!r} is not a floating dtype")
  if any(d == 0 for d in shape):
    raise ValueError(f"quantize: the leaf at {path!r} has an empty shape {tuple(shape)}")
  in_shape = tuple(shape[n_stack:n_stack + n_in])
  k = math.prod(in_shape)
  b = block_size if block_size is not None else k + (k % 2 if format in F.FOUR_BIT else 0)
  return dict(format=format, block_size=b, symmetric=symmetric, double_quant=double_quant,
              n_stack=n_stack, n_in=n_in, stack=tuple(shape[:n_stack]), in_shape=in_shape,
              out_shape=tuple(shape[n_stack + n_in:]), layer_shape=tuple(shape[n_stack:]),
              dtype_name=cdtype.name, kernel=kernel, path=path)


def _assemble(spec: dict, layers, *, check_finite: bool = True) -> QuantizedWeight:
  """Quantizes ``layers`` (an iterable of the kernel's layers ``[*I, *O]``, in order, one array
  alive at a time if the iterable reads them lazily) and stacks the storage arrays."""
  per_layer, bad = [], 0
  for layer in layers:
    if tuple(layer.shape) != spec["layer_shape"]:  # a caller bug, not user input
      raise RuntimeError(f"internal: layer of shape {tuple(layer.shape)} for the leaf at "
                         f"{spec['path']!r}, expected {spec['layer_shape']}")
    d = _quantize_layer(layer, spec["format"], spec["block_size"], spec["symmetric"],
                        spec["n_in"], spec["double_quant"])
    n_bad = d.pop("n_nonfinite")
    if check_finite:
      bad += int(n_bad)
    per_layer.append(d)
    del layer
  if bad:
    raise ValueError(f"quantize: the leaf at {spec['path']!r} has {bad} non-finite value(s) "
                     f"(NaN/Inf); quantization needs finite weights")
  return _stacked(spec, per_layer)


def _stacked(spec: dict, per_layer: list) -> QuantizedWeight:
  """The node of ``per_layer`` (one dict of storage arrays per layer) stacked on the layer axes."""
  stack = spec["stack"]
  arrays = {name: jnp.stack([jnp.asarray(d[name]) for d in per_layer]).reshape(
      stack + np.shape(per_layer[0][name])) for name in per_layer[0]}
  return QuantizedWeight(**arrays, format=spec["format"], block_size=spec["block_size"],
                         in_shape=spec["in_shape"], out_shape=spec["out_shape"],
                         dtype_name=spec["dtype_name"], kernel=spec["kernel"])


def from_blocks(shape: tuple, dtype, layers, *, format: str, block_size: int, layout=None,
                compute_dtype=None, kernel: str = "auto", path: str = "<array>") -> QuantizedWeight:
  """A :class:`QuantizedWeight` from blocks that are already quantized (a GGUF file's), layer by
  layer, with no rounding of its own.

  Args:
    shape: the kernel's full shape ``[*S, *I, *O]``.
    dtype: its floating dtype (the compute dtype unless ``compute_dtype`` is given).
    layers: the ``prod(S)`` layers in row-major order, each a dict of this node's storage arrays
      for one layer: ``codes [N, Kp/2]`` (``int8 [N, Kp]``), ``scales [N, nb]`` and, for offset
      blocks, ``mins [N, nb]``; every layer with the same fields.
    format, block_size: ``"int4"``/``"int8"`` and the blocks' size along ``K``.
    layout, compute_dtype, kernel, path: as for :func:`quantize_array`.
  """
  spec = _plan(tuple(shape), jnp.dtype(dtype), format=format, block_size=block_size,
               double_quant=False, symmetric=True, layout=layout, compute_dtype=compute_dtype,
               kernel=kernel, path=path)
  return _stacked(spec, list(layers))


def quantize_layers(shape: tuple, dtype, layers, **options) -> QuantizedWeight:
  """Quantizes a kernel of ``shape`` given layer by layer (what a streaming loader holds).

  Args:
    shape: the kernel's full shape ``[*S, *I, *O]``.
    dtype: its floating dtype (the compute dtype unless ``compute_dtype`` is given).
    layers: an iterable over the ``prod(S)`` layers ``[*I, *O]`` in row-major order (one item
      for an unstacked kernel); a generator that reads each layer when asked keeps one layer in
      memory at a time.
    **options: the keywords of :func:`quantize_array` (``format``, ``block_size``, ...).

  Returns:
    The :class:`QuantizedWeight`, bit-identical to ``quantize_array`` of the whole stacked array.
  """
  check_finite = options.pop("check_finite", True)
  opts = dict(format="nf4", block_size=64, double_quant=True, symmetric=True, layout=None,
              compute_dtype=None, kernel="auto", path="<array>")
  unknown = set(options) - set(opts)
  if unknown:
    raise TypeError(f"quantize_layers: unknown option(s) {sorted(unknown)}")
  opts.update(options)
  return _assemble(_plan(tuple(shape), jnp.dtype(dtype), **opts), layers,
                   check_finite=check_finite)
