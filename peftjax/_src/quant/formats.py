"""Number formats of the quantizer: codebooks, rounding thresholds and argument checks.

Four element formats are supported; every one stores one scale per *block* of ``block_size``
consecutive input-dimension values of one output column (see :mod:`peftjax._src.quant.core` for the
layout):

=========  ===========================================================  ================================
format     element value                                                storage per element
=========  ===========================================================  ================================
``nf4``    ``NF4[code] * absmax`` (NormalFloat, QLoRA paper / bnb)      4 bits (two codes per ``uint8``)
``fp4``    ``FP4[code] * absmax`` (bitsandbytes' FP4, e2m1 + bias)      4 bits
``int4``   ``(code - 8) * s`` (symmetric, ``s = absmax * f32(1/7)``) or 4 bits
           ``(code - z) * s`` (asymmetric, ``s = (max - min) * f32(1/15)``
           with ``min <= 0 <= max``, ``z`` = 8-bit zero point per block,
           GPTQ style)
``int8``   ``q * s``, ``s = absmax * f32(1/127)``, ``q`` in [-127, 127]   8 bits (``int8``)
=========  ===========================================================  ================================

Values are normalized as ``x * float32(1 / scale)`` (bitsandbytes' order); int formats then round
half to even. Rounding rule of the codebook formats (``nf4``, ``fp4`` and the 8-bit dynamic map of double
quantization): the *nearest* codebook value, ties going to the smaller value. It is implemented with
thresholds: ``code = #{i : t_i < v}`` where ``t_i`` is the exact midpoint of neighbouring codebook
values rounded *down* to float32. For a float32 ``v`` this is exactly "nearest, ties down" (no
float32 lies strictly between the rounded-down threshold and the exact midpoint).
"""

from __future__ import annotations

import numpy as np

FORMATS = ("nf4", "fp4", "int4", "int8")
FOUR_BIT = ("nf4", "fp4", "int4")
CODEBOOK_FORMATS = ("nf4", "fp4")

#: Block size of the second-level (double) quantization of the scales, as in bitsandbytes.
DQ_BLOCK = 256

#: The 16 NF4 values of bitsandbytes (``get_4bit_type("nf4")``; QLoRA, Dettmers et al. 2023).
NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)

#: bitsandbytes' FP4 (``get_4bit_type("fp4")``): sign bit, 2 exponent bits, 1 mantissa bit, in bnb's
#: code order, divided by its absmax 12. Code 8 is ``-0.0``.
FP4 = (np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0,
                 -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0], dtype=np.float32)
       / np.float32(12.0)).astype(np.float32)


def dynamic_map() -> np.ndarray:
  """bitsandbytes' signed 8-bit dynamic quantization map (``create_dynamic_map(signed=True)``).

  Dettmers 2015: a sign bit, a unary exponent ``10**-6 .. 10**0`` and linear fraction bits filling the
  rest; 254 such values plus ``0`` and ``1``, sorted ascending. Computed in float32 (``linspace`` in
  float32 as torch does), so values may differ from bnb's in the last ulp.

  Returns:
    float32 ``[256]``, strictly increasing, ``min = -0.99297``, ``max = 1``.
  """
  data = []
  max_exp, non_sign = 7, 7
  for i in range(max_exp):
    items = 2 ** (i + non_sign - max_exp) + 1
    bounds = np.linspace(0.1, 1, items, dtype=np.float32)
    means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
    scale = 10.0 ** (-(max_exp - 1) + i)
    data += (np.float32(scale) * means).astype(np.float32).tolist()
    data += (np.float32(-scale) * means).astype(np.float32).tolist()
  data += [0.0, 1.0]
  out = np.sort(np.array(data, dtype=np.float32))
  if out.shape != (256,) or not np.all(np.diff(out) > 0):
    raise AssertionError("dynamic map construction is broken")  # internal invariant
  return out


DYNAMIC8 = dynamic_map()


def codebook(fmt: str) -> np.ndarray:
  """The float32 codebook of a codebook format (``nf4``, ``fp4``) by code index."""
  return {"nf4": NF4, "fp4": FP4}[fmt]


def sorted_codebook(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``(sorted_values, thresholds, code_of_sorted)`` for nearest-ties-down rounding.

  ``-0.0`` (FP4 code 8) is dropped in favour of ``+0.0`` (code 0), so zero always gets code 0.

  Returns:
    sorted float32 values ``[V]``, float32 thresholds ``[V-1]`` (exact midpoints rounded down to
    float32), and the code (index into ``values``) of each sorted value ``[V]``.
  """
  codes = np.arange(len(values))
  keep = ~((values == 0) & np.signbit(values))
  vals, codes = values[keep], codes[keep]
  order = np.argsort(vals, kind="stable")
  vals, codes = vals[order], codes[order]
  if not np.all(np.diff(vals) > 0):
    raise AssertionError("codebook has duplicate values")  # internal invariant
  mid = (vals[:-1].astype(np.float64) + vals[1:].astype(np.float64)) / 2.0
  thr = mid.astype(np.float32)
  down = thr.astype(np.float64) > mid
  thr[down] = np.nextafter(thr[down], np.float32(-np.inf))
  return vals.astype(np.float32), thr, codes.astype(np.uint8)


def check_format(fmt, block_size, symmetric, *, where: str = "quantize") -> None:
  """Raises ``ValueError``/``TypeError`` for an unknown format or a bad block size."""
  if not isinstance(fmt, str) or fmt not in FORMATS:
    raise ValueError(f"{where}: format={fmt!r} is not one of {', '.join(map(repr, FORMATS))}")
  if block_size is not None:
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
      raise TypeError(f"{where}: block_size must be a positive even int or None (one block per "
                      f"output channel); got {type(block_size).__name__}: {block_size!r}")
    if block_size <= 0:
      raise ValueError(f"{where}: block_size must be positive; got {block_size}")
    if fmt in FOUR_BIT and block_size % 2:
      raise ValueError(f"{where}: block_size must be even for 4-bit format {fmt!r} (two codes per "
                       f"byte, paired inside a block); got {block_size}")
  if not isinstance(symmetric, bool):
    raise TypeError(f"{where}: symmetric must be a bool; got {symmetric!r}")
  if not symmetric and fmt != "int4":
    raise ValueError(f"{where}: symmetric=False (zero points) exists only for format='int4'; "
                     f"got format={fmt!r}")
