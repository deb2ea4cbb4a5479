"""Tests of peftjax.quant: formats, packing, double quantization, the dequantizing matmul, kernels.

The NumPy reference below is written from the QLoRA paper's and bitsandbytes' description, not
from peftjax's code: per output column (the torch ``[out, in]`` row), blocks of ``B`` inputs,
absmax scaling, nearest codebook value (ties to the smaller value, decided in float64 with
``argmin``), two codes per byte, and double quantization of the scales (mean subtracted, blocks of
256, 8-bit dynamic map).
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import peftjax
from peftjax._src import jax_compat
from peftjax import quant
from peftjax._src import nodes
from peftjax._src.quant import core, formats, matmul
from peftjax._src.quant import pallas_kernel as pk
from peftjax.quant import QuantizedWeight

# --- published tables (bitsandbytes functional.py, get_4bit_type) ---------------------------------

BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]
# FP4: sign | 2 exponent bits | 1 mantissa bit, bnb's code order, normalized by 12.
BNB_FP4_RAW = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0,
               -2.0, -3.0]


def ref_dynamic_map():
  """Dettmers' dynamic 8-bit type (signed): exponent 10^-6..10^0, linear fraction; + {0, 1}."""
  vals = [0.0, 1.0]
  for e in range(7):
    edges = np.linspace(0.1, 1.0, 2 ** e + 1, dtype=np.float32)
    centers = (edges[1:] + edges[:-1]) / np.float32(2)
    mag = np.float32(10.0 ** (e - 6)) * centers
    vals.extend(mag.astype(np.float32))
    vals.extend((-mag).astype(np.float32))
  return np.sort(np.asarray(vals, np.float32))


def ref_nearest(v, table):
  """Index into ``table`` of the nearest value, ties to the smaller value; +0 wins over -0."""
  table = np.asarray(table, np.float32)
  cand = [i for i in range(len(table)) if not (table[i] == 0 and np.signbit(table[i]))]
  cand.sort(key=lambda i: table[i])
  vals = table[cand].astype(np.float64)
  d = np.abs(v.astype(np.float64)[..., None] - vals)
  return np.asarray(cand)[np.argmin(d, axis=-1)]


def inv(s):
  """float32 reciprocal, 0 for 0 (an all-zero block): values are normalized as x * (1/scale)."""
  s = np.asarray(s, np.float32)
  with np.errstate(divide="ignore"):
    return np.where(s > 0, np.float32(1) / s, np.float32(0)).astype(np.float32)


def ref_quantize(w, fmt="nf4", block=64, dq=True, symmetric=True, offset=None):
  """NumPy reference for a 2-D Flax kernel ``w [K, N]``. Returns per-element codes ``[N, Kp]``.

  ``offset``: the float32 mean of the scales to use in double quantization (default: the mean
  computed in float64 and rounded). A float32 mean differs from that in the last bits depending on
  summation order; the test checks agreement to 1e-6, then passes the JAX offset here so the rest
  of the pipeline is compared bit for bit.
  """
  wt = np.asarray(w, np.float32).T                       # torch layout [out, in]
  n, k = wt.shape
  nb = -(-k // block)
  rows = np.zeros((n, nb * block), np.float32)
  rows[:, :k] = wt
  blk = rows.reshape(n, nb, block)
  out = {}
  with np.errstate(divide="ignore", invalid="ignore"):
    if fmt in ("nf4", "fp4"):
      table = np.float32(BNB_NF4) if fmt == "nf4" else np.float32(BNB_FP4_RAW) / np.float32(12)
      scale = np.abs(blk).max(-1)
      norm = blk * inv(scale)[..., None]
      codes = ref_nearest(norm, table)
    elif fmt == "int8":
      scale = np.abs(blk).max(-1) * np.float32(1 / 127)
      codes = np.clip(np.round(blk * inv(scale)[..., None]), -127, 127)
    elif symmetric:
      scale = np.abs(blk).max(-1) * np.float32(1 / 7)
      q = np.clip(np.round(blk * inv(scale)[..., None]), -8, 7)
      codes = q + 8
    else:
      lo = np.minimum(blk.min(-1), 0)
      hi = np.maximum(blk.max(-1), 0)
      scale = (hi - lo) * np.float32(1 / 15)
      z = np.clip(np.round(-lo * inv(scale)), 0, 15)
      q = np.where(scale[..., None] > 0,
                   np.clip(np.round(blk * inv(scale)[..., None]) + z[..., None], 0, 15), 0)
      codes = q
      out["zeros"] = z.astype(np.uint8)
  out["codes"] = codes.reshape(n, nb * block).astype(np.int64)
  scale = scale.astype(np.float32)
  if dq:
    flat = scale.reshape(-1)
    offset = np.float32(flat.astype(np.float64).mean()) if offset is None else np.float32(offset)
    r = np.zeros(-(-flat.size // 256) * 256, np.float32)
    r[:flat.size] = flat - offset
    r = r.reshape(-1, 256)
    am = np.abs(r).max(-1)
    mant, ex = np.frexp(am)                  # second-level scale: absmax rounded up to 2**k
    am = np.where((am == 0) | (mant == 0.5), am, np.ldexp(np.float32(1), ex)).astype(np.float32)
    nr = r * inv(am)[:, None]
    out["qscales"] = ref_nearest(nr, ref_dynamic_map()).reshape(-1)
    out["qscales_absmax"] = am
    out["qscales_offset"] = offset
  else:
    out["scales"] = scale
  return out


def ref_pack(codes, block):
  """Two 4-bit codes per byte: within each block, element j (low) with element j + B/2 (high)."""
  n, kp = codes.shape
  c = codes.reshape(n, kp // block, 2, block // 2).astype(np.uint8)
  return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, kp // 2)


def unpack(packed, block):
  """Independent unpacking of ``uint8 [N, Kp/2]`` into codes ``[N, Kp]``."""
  n = packed.shape[0]
  p = np.asarray(packed).reshape(n, -1, block // 2)
  return np.concatenate([p & 15, p >> 4], axis=-1).reshape(n, -1).astype(np.int64)


def ref_for(q, w, fmt="nf4", block=64, dq=True, symmetric=True):
  """The reference for ``w``; with double quantization, checks the offset (mean) to 1 ulp."""
  if not dq:
    return ref_quantize(w, fmt, block, dq, symmetric)
  exact = ref_quantize(w, fmt, block, dq, symmetric)["qscales_offset"]
  np.testing.assert_allclose(np.asarray(q.qscales_offset), exact, rtol=1e-6)   # float32 sum
  return ref_quantize(w, fmt, block, dq, symmetric, offset=np.asarray(q.qscales_offset))


def ref_dequantize(ref, fmt, block, k):
  """Kernel ``[K, N]`` from reference storage: value(code) * scale, scales undone from 8 bits."""
  if "scales" in ref:
    scales = ref["scales"]
  else:
    n = ref["codes"].shape[0]
    table = ref_dynamic_map()[ref["qscales"]].reshape(-1, 256)
    flat = (table * ref["qscales_absmax"][:, None]).reshape(-1) + ref["qscales_offset"]
    scales = flat[:ref["codes"].size // block].reshape(n, -1).astype(np.float32)
  codes = ref["codes"].reshape(scales.shape + (block,))
  if fmt in ("nf4", "fp4"):
    table = np.float32(BNB_NF4) if fmt == "nf4" else np.float32(BNB_FP4_RAW) / np.float32(12)
    v = table[codes]
  elif "zeros" in ref:
    v = (codes - ref["zeros"][..., None]).astype(np.float32)
  elif fmt == "int4":
    v = (codes - 8).astype(np.float32)
  else:
    v = codes.astype(np.float32)
  return (v * scales[..., None]).reshape(scales.shape[0], -1)[:, :k].T


def assert_matches_reference(q, ref, fmt, block):
  if fmt == "int8":
    np.testing.assert_array_equal(np.asarray(q.codes, np.int64), ref["codes"])
  else:
    np.testing.assert_array_equal(unpack(q.codes, block), ref["codes"])
    np.testing.assert_array_equal(np.asarray(q.codes), ref_pack(ref["codes"], block))
  if "zeros" in ref:
    np.testing.assert_array_equal(np.asarray(q.zeros), ref["zeros"])
  if "scales" in ref:
    np.testing.assert_array_equal(np.asarray(q.scales), ref["scales"])
    assert q.qscales is None
  else:
    np.testing.assert_array_equal(np.asarray(q.qscales_offset), ref["qscales_offset"])
    np.testing.assert_array_equal(np.asarray(q.qscales, np.int64), ref["qscales"])
    np.testing.assert_array_equal(np.asarray(q.qscales_absmax), ref["qscales_absmax"])
  deq = np.asarray(jnp.asarray(ref_dequantize(ref, fmt, block, q.in_features)).astype(q.dtype))
  np.testing.assert_array_equal(np.asarray(q.materialize()), deq)
  # the same values inside a matmul (another fusion): x = I gives deq(W) exactly
  eye = jnp.eye(q.in_features, dtype=q.dtype)
  np.testing.assert_array_equal(np.asarray(matmul.qmatmul(eye, q.replace(kernel="xla"))), deq)


# --- formats ----------------------------------------------------------------------------------------

def test_nf4_table_is_bitsandbytes():
  np.testing.assert_array_equal(quant.NF4, np.float32(BNB_NF4))
  assert quant.NF4.dtype == np.float32 and len(set(quant.NF4.tolist())) == 16


def test_fp4_table_is_bitsandbytes():
  np.testing.assert_array_equal(quant.FP4, np.float32(BNB_FP4_RAW) / np.float32(12))
  assert np.signbit(quant.FP4[8]) and quant.FP4[3] == 1.0


def test_dynamic_map():
  d = formats.DYNAMIC8
  np.testing.assert_array_equal(d, ref_dynamic_map())
  assert d.shape == (256,) and d[-1] == 1.0 and 0.0 in d and np.all(np.diff(d) > 0)
  np.testing.assert_allclose(d[0], -0.99296875, rtol=1e-6)


def test_thresholds_round_to_nearest_ties_down():
  for table in (formats.NF4, formats.FP4, formats.DYNAMIC8):
    vals, thr, _ = formats.sorted_codebook(table)
    mid = (vals[:-1].astype(np.float64) + vals[1:]) / 2
    assert np.all(thr.astype(np.float64) <= mid)
    assert np.all(np.nextafter(thr, np.float32(np.inf)).astype(np.float64) > mid)


# --- the quantizer vs the NumPy reference -----------------------------------------------------------

FMT_CASES = [("nf4", True), ("fp4", True), ("int4", True), ("int4", False), ("int8", True)]


def adversarial(k=128, n=24, seed=0):
  """Random columns plus zero, constant, outlier, tiny, exact-codebook and exact-midpoint blocks."""
  r = np.random.default_rng(seed)
  w = r.standard_normal((k, n)).astype(np.float32)
  w[:64, 0] = 0.0                                     # an all-zero block
  w[:, 1] = 0.0                                       # an all-zero column
  w[:64, 2] = 0.37                                    # constant block
  w[:64, 3] = -2.5                                    # negative constant block
  w[5, 4] = 1e30                                      # huge outlier
  w[70, 4] = -3e29
  w[:64, 5] = r.standard_normal(64) * 1e-30           # tiny (normal floats)
  w[:, 6] = np.float32(r.standard_normal(k)) * 1e6    # large
  mids = []
  for table in (formats.NF4, formats.FP4):
    vals, thr, _ = formats.sorted_codebook(table)
    mids += list(thr) + list(np.nextafter(thr, np.float32(np.inf)))
    mids += list((vals[:-1].astype(np.float64) + vals[1:]) / 2)    # exact midpoints (rounded)
  mids = np.asarray(mids, np.float32)
  for col in (7, 8):                                  # absmax 1 -> normalized values are exact
    vals = np.resize(mids, 63) * (1 if col == 7 else -1)
    w[:64, col] = np.concatenate([[1.0], vals])
  w[:64, 9] = np.resize(np.concatenate([formats.NF4, formats.FP4]), 64) * np.float32(3.0)
  w[:64, 10] = np.arange(64, dtype=np.float32) - 32   # exact halves for the int formats
  w[:64, 10] /= np.float32(4.5)
  w[:64, 11] = np.where(np.arange(64) % 2, 1.0, -1.0) * np.float32(0.5)
  return w


@pytest.mark.parametrize("fmt,symmetric", FMT_CASES)
@pytest.mark.parametrize("dq", [False, True])
def test_matches_numpy_reference_bit_for_bit(fmt, symmetric, dq):
  for w, block in ((adversarial(), 64), (adversarial(100, 40, seed=1), 32)):
    q = quant.quantize_array(jnp.asarray(w), format=fmt, block_size=block, double_quant=dq,
                             symmetric=symmetric)
    assert_matches_reference(q, ref_for(q, w, fmt, block, dq, symmetric), fmt, block)


def test_reference_on_random_matrix_and_bf16_input():
  r = np.random.default_rng(3)
  w = (r.standard_normal((256, 96)) * 0.02).astype(np.float32)
  q = quant.quantize_array(jnp.asarray(w))
  assert_matches_reference(q, ref_for(q, w), "nf4", 64)
  wb = jnp.asarray(w, jnp.bfloat16)
  qb = quant.quantize_array(wb)
  assert qb.dtype == jnp.bfloat16 and qb.materialize().dtype == jnp.bfloat16
  assert_matches_reference(qb, ref_for(qb, np.asarray(wb.astype(jnp.float32))), "nf4", 64)


def test_zero_kernel_dequantizes_to_zero():
  for fmt, sym in FMT_CASES:
    q = quant.quantize_array(jnp.zeros((64, 8)), format=fmt, symmetric=sym)
    assert np.all(np.asarray(q.materialize()) == 0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises(bad):
  w = np.ones((64, 4), np.float32)
  w[3, 2] = bad
  with pytest.raises(ValueError, match=r"leaf.*non-finite"):
    quant.quantize_array(jnp.asarray(w), path="layers/q/kernel")
  with pytest.raises(ValueError, match=r"q_proj/kernel.*non-finite"):
    quant.quantize({"q_proj": {"kernel": jnp.asarray(w)}})


# --- layout, shapes, stacking, storage --------------------------------------------------------------

@pytest.mark.parametrize("shape,layout,cases", [
    ((100, 30), None, FMT_CASES), ((3, 70, 5), (1, 1), [("nf4", True), ("int4", False)]),
    ((32, 4, 8), (0, 1), [("nf4", True)]), ((4, 8, 32), (0, 2), [("nf4", True)]),
    ((2, 4, 8, 6), (1, 2), [("int8", True)])])
def test_shape_round_trip(shape, layout, cases):
  w = jax.random.normal(jax.random.key(0), shape)
  for fmt, sym in cases:
    q = quant.quantize_array(w, format=fmt, symmetric=sym, layout=layout)
    assert q.shape == shape and q.materialize().shape == shape
    rel = float(jnp.linalg.norm(q.materialize() - w) / jnp.linalg.norm(w))
    assert rel < (0.02 if fmt == "int8" else 0.2)


def test_layer_stacked_quantized_per_layer():
  w = jax.random.normal(jax.random.key(1), (3, 96, 40)) * jnp.array([1.0, 10.0, 0.1])[:, None, None]
  q = quant.quantize_array(w, layout=(1, 1))
  assert q.stack_shape == (3,)
  for leaf in jax.tree_util.tree_leaves(q):
    assert leaf.shape[0] == 3                         # layer axis first on every leaf
  for l in range(3):
    ql = quant.quantize_array(w[l])
    sliced = jax.tree_util.tree_map(lambda a, l=l: a[l], q)
    assert sliced.shape == (96, 40)
    for a, b in zip(jax.tree_util.tree_leaves(sliced), jax.tree_util.tree_leaves(ql)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(sliced.materialize()), np.asarray(q.materialize()[l]))


def test_bits_per_param_from_bytes():
  w = jax.random.normal(jax.random.key(2), (1024, 1024)) * 0.02
  q = quant.quantize({"mlp": {"kernel": w}}, targets=".*kernel")
  node = q["mlp"]["kernel"]
  real = sum(np.asarray(l).nbytes for l in jax.tree_util.tree_leaves(node))
  assert node.codes.dtype == jnp.uint8 and np.asarray(node.codes).nbytes == w.size // 2
  assert real == node.nbytes
  bits = quant.bits_per_param(q)
  assert bits == pytest.approx(8 * real / w.size)
  assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-4)   # 4.127
  assert quant.bits_per_param(quant.quantize({"k": w}, targets="k", double_quant=False)) == 4.5
  assert quant.bits_per_param(quant.quantize({"k": w}, targets="k", format="int8")) == \
      pytest.approx(8.127, abs=1e-3)
  with pytest.raises(ValueError, match="no QuantizedWeight"):
    quant.bits_per_param({"k": w})


def test_round_trip_error_bounds_and_nf4_beats_int4():
  w = jax.random.normal(jax.random.key(3), (512, 256))
  errs = {}
  for fmt, sym in FMT_CASES:
    for dq in (False, True):
      q = quant.quantize_array(w, format=fmt, symmetric=sym, double_quant=dq)
      deq = np.asarray(q.materialize())
      errs[fmt, sym, dq] = float(np.linalg.norm(deq - w) / np.linalg.norm(w))
      if not dq:  # per-element bound: half the largest gap of the grid times the block scale
        blocks = np.asarray(w).T.reshape(256, 8, 64)
        err = np.abs(deq.T.reshape(256, 8, 64) - blocks)
        absmax = np.abs(blocks).max(-1, keepdims=True)
        if fmt in ("nf4", "fp4"):
          half_gap = np.diff(np.sort(formats.codebook(fmt))).max() / 2
          assert np.all(err <= half_gap * absmax * (1 + 1e-6))
        elif fmt == "int8":
          assert np.all(err <= absmax / 127 * (0.5 + 1e-5))
        elif sym:
          assert np.all(err <= absmax / 7 * (0.5 + 1e-5))
        else:
          rng = np.maximum(blocks.max(-1, keepdims=True), 0) - np.minimum(blocks.min(-1, keepdims=True), 0)
          assert np.all(err <= rng / 15 * (1 + 1e-5))  # rounding of x/s and of the zero point
  # Known Gaussian figures (QLoRA paper: NF4 < FP4 and < Int4); double quantization adds < 1%.
  assert 0.085 < errs["nf4", True, False] < 0.10
  assert errs["nf4", True, False] < errs["int4", True, False] < errs["fp4", True, False]
  assert errs["int8", True, False] < 0.01
  for key in errs:
    if key[2]:  # 8-bit scales: +<1% for 4-bit formats, +<20% for int8 (its own error is tiny)
      assert errs[key] < errs[key[:2] + (False,)] * (1.2 if key[0] == "int8" else 1.01)


def test_astype_keeps_codes():
  q = quant.quantize_array(jax.random.normal(jax.random.key(0), (64, 16)))
  qb = q.astype(jnp.bfloat16)
  assert qb.codes is q.codes and qb.qscales is q.qscales
  assert qb.dtype == jnp.bfloat16 and qb.materialize().dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(qb.materialize()),
                                np.asarray(q.materialize().astype(jnp.bfloat16)))


def test_pytree_and_trainable_mask():
  q = quant.quantize_array(jax.random.normal(jax.random.key(0), (64, 16)))
  leaves, treedef = jax.tree_util.tree_flatten(q)
  assert [l.dtype for l in leaves] == [jnp.uint8, jnp.uint8, jnp.float32, jnp.float32]
  assert jax.tree_util.tree_unflatten(treedef, leaves).shape == (64, 16)
  assert not any(jax.tree_util.tree_leaves(q.trainable_mask()))
  assert q.wrappable and q.trainable_fields == ()


# --- the dequantizing matmul ------------------------------------------------------------------------

def _close(a, b, dtype):
  tol = dict(rtol=2e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("use_jit", [False, True])
def test_qmatmul_value_and_grad_match_reference(dtype, use_jit):
  w = jax.random.normal(jax.random.key(0), (96, 48)) * 0.1
  q = quant.quantize_array(w, compute_dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (2, 5, 96)).astype(dtype)
  dims = (((2,), (0,)), ((), ()))
  f = lambda x: jnp.sum(jnp.sin(nodes.dot_general(x, q, dims)).astype(jnp.float32))
  f0 = lambda x: jnp.sum(jnp.sin(lax.dot_general(x, quant.dequantize(q), dims)).astype(jnp.float32))
  if use_jit:
    f, f0 = jax.jit(f), jax.jit(f0)
  y = nodes.dot_general(x, q, dims)
  assert y.dtype == dtype and y.shape == (2, 5, 48)
  _close(y, lax.dot_general(x, quant.dequantize(q), dims), dtype)
  _close(f(x), f0(x), dtype)
  g, g0 = jax.grad(f)(x), jax.grad(f0)(x)
  assert g.dtype == dtype
  _close(g, g0, dtype)


def test_no_gradient_to_packed_weights_and_no_float_residual():
  from jax._src.ad_checkpoint import saved_residuals
  w = jax.random.normal(jax.random.key(0), (128, 64))
  q = quant.quantize_array(w, double_quant=False)
  x = jnp.ones((4, 128))
  _, vjp = jax.vjp(lambda x, q: matmul.qmatmul(x, q), x, q)
  dx, dq = vjp(jnp.ones((4, 64)))
  assert dq.codes.dtype == jax.dtypes.float0
  assert float(jnp.abs(dq.scales).max()) == 0.0
  res = saved_residuals(lambda x: jnp.sum(jnp.sin(matmul.qmatmul(x, q))), x)
  floats = [a for a, _ in res if jnp.issubdtype(a.dtype, jnp.floating) and a.size >= 128 * 64]
  assert floats == []                 # the backward pass dequantizes again: no float weight saved
  ref = saved_residuals(lambda x: jnp.sum(jnp.sin(x @ q.materialize())), x)
  assert any(a.shape == (128, 64) for a, _ in ref)   # (what a plain dequantize-then-matmul keeps)


def test_rule_dimension_numbers(monkeypatch):
  calls = []
  real = matmul.qmatmul
  monkeypatch.setattr(matmul, "qmatmul", lambda *a, **k: calls.append(1) or real(*a, **k))

  def check(lhs, rhs, dims, uses_rule):
    calls.clear()
    mat = lambda v: v.materialize() if isinstance(v, QuantizedWeight) else v
    got, want = jax.jit(lambda l, r: (nodes.dot_general(l, r, dims),
                                      lax.dot_general(mat(l), mat(r), dims)))(lhs, rhs)
    _close(got, want, jnp.float32)
    assert bool(calls) == uses_rule, dims

  r = jax.random.key(4)
  # DenseGeneral out-projection: [H, Dh, d] contracting (H, Dh), in either order.
  q = quant.quantize_array(jax.random.normal(r, (4, 8, 16)), layout=(0, 2), block_size=32,
                           double_quant=False)
  x = jax.random.normal(r, (3, 5, 4, 8))
  check(x, q, (((2, 3), (0, 1)), ((), ())), True)
  check(x, q, (((3, 2), (1, 0)), ((), ())), True)
  # layer-stacked node with batch dims (vmap over layers), batch dim of x not first.
  qs = quant.quantize_array(jax.random.normal(r, (3, 64, 24)), layout=(1, 1), double_quant=False)
  xs = jax.random.normal(r, (7, 3, 64))
  check(xs, qs, (((2,), (1,)), ((1,), (0,))), True)
  # node on the left: W^T v.
  q2 = quant.quantize_array(jax.random.normal(r, (64, 24)), double_quant=False)
  check(q2, jax.random.normal(r, (64, 5)), (((0,), (0,)), ((), ())), True)
  # contracting the output axis (tied embeddings): falls back to the materialized weight.
  check(jax.random.normal(r, (5, 24)), q2, (((1,), (1,)), ((), ())), False)


def test_lift_dense_and_vmap():
  w = jax.random.normal(jax.random.key(0), (64, 32))
  tree = quant.quantize({"dense": {"kernel": w}}, targets=".*kernel")
  f = lambda p, x: jnp.tanh(x @ p["dense"]["kernel"])
  x = jax.random.normal(jax.random.key(1), (6, 64))
  _close(peftjax.lift(f)(tree, x), f(peftjax.merge(tree), x), jnp.float32)
  _close(jax.jit(peftjax.lift(f))(tree, x), f(peftjax.merge(tree), x), jnp.float32)
  g = jax.grad(lambda x: jnp.sum(peftjax.lift(f)(tree, x)))(x)
  _close(g, jax.grad(lambda x: jnp.sum(f(peftjax.merge(tree), x)))(x), jnp.float32)


# --- Pallas kernels ---------------------------------------------------------------------------------

KERNEL_CASES = [("nf4", True, 64, True), ("fp4", True, 32, False), ("int4", False, 64, True),
                ("int4", True, 128, False), ("int8", True, 32, False)]


@pytest.mark.parametrize("fmt,sym,block,dq", KERNEL_CASES)
def test_pallas_interpret_matches_xla(fmt, sym, block, dq):
  w = jax.random.normal(jax.random.key(0), (100, 48)) * 0.05  # K=100: padded blocks
  q = quant.quantize_array(w, format=fmt, symmetric=sym, block_size=block, double_quant=dq,
                           kernel="xla")
  qi = q.replace(kernel="interpret")
  assert pk.supported(q, 8) is None
  wd = np.asarray(q.materialize())
  # Exact: with identity inputs every output is one product by 1.0, so the dequantized tiles of the
  # kernel must equal XLA's dequantized weight bit for bit (forward and backward).
  eye_k = jnp.eye(100)
  eye_n = jnp.eye(100, 48)                           # g = [I_48; 0]: dx[:48] = W^T
  y_p, vjp_p = jax.vjp(lambda x: matmul.qmatmul(x, qi), eye_k)
  np.testing.assert_array_equal(np.asarray(y_p), np.asarray(matmul.qmatmul(eye_k, q)))
  np.testing.assert_array_equal(np.asarray(y_p), wd)
  np.testing.assert_array_equal(np.asarray(vjp_p(eye_n)[0])[:48], wd.T)
  # Random inputs, values and gradients (accumulation order differs: allclose); bf16 once.
  for dtype in (jnp.float32, jnp.bfloat16) if fmt == "nf4" else (jnp.float32,):
    qd, qid = q.astype(dtype), qi.astype(dtype)
    x = jax.random.normal(jax.random.key(1), (100, 100)).astype(dtype)
    g = jax.random.normal(jax.random.key(2), (100, 48)).astype(dtype)
    y, vjp = jax.vjp(lambda x: matmul.qmatmul(x, qid), x)
    y0, vjp0 = jax.vjp(lambda x: matmul.qmatmul(x, qd), x)
    _close(y, y0, dtype)
    _close(vjp(g)[0], vjp0(g)[0], dtype)


def test_pallas_interpret_stacked_under_vmap():
  ws = jax.random.normal(jax.random.key(0), (2, 64, 32))
  q = quant.quantize_array(ws, layout=(1, 1), block_size=32, kernel="interpret")
  x = jax.random.normal(jax.random.key(1), (2, 9, 64))
  _close(matmul.qmatmul(x, q), matmul.qmatmul(x, q.replace(kernel="xla")), jnp.float32)


def test_pallas_kernel_lowers_to_triton():
  """The kernels lower to Triton IR for CUDA (no GPU needed; catches unsupported ops/shapes)."""
  w = jax.random.normal(jax.random.key(0), (128, 64))
  for fmt, sym in (("nf4", True), ("int4", False)):
    q = quant.quantize_array(w, format=fmt, symmetric=sym, compute_dtype=jnp.bfloat16)
    s = core.dequantize_scales(q)
    kw = dict(fmt=fmt, block_size=64, in_features=128, compute_dtype=jnp.dtype(jnp.bfloat16),
              out_dtype=jnp.dtype(jnp.bfloat16))
    for fn, a in ((pk.qmatmul_fwd, jax.ShapeDtypeStruct((40, 128), jnp.bfloat16)),
                  (pk.qmatmul_bwd, jax.ShapeDtypeStruct((40, 64), jnp.bfloat16))):
      with jax_compat.gpu_target("NVIDIA H100"):
        lowered = jax.jit(lambda a, c, s, z, fn=fn: fn(a, c, s, z, **kw)).trace(
            a, q.codes, s, q.zeros).lower(lowering_platforms=("cuda",))
      assert "triton" in lowered.as_text()


def _fake_node(k, n, block, kernel="auto", fmt="nf4"):
  """A node with the right shapes and dummy contents (kernel selection needs no real weights)."""
  nb = -(-k // block)
  return QuantizedWeight(codes=np.zeros((n, nb * block // 2), np.uint8),
                         scales=np.ones((n, nb), np.float32), format=fmt, block_size=block,
                         in_shape=(k,), out_shape=(n,), kernel=kernel)


def test_kernel_selection():
  q = _fake_node(64, 40, 64)
  assert q.shape == (64, 40)
  assert matmul.resolve_kernel(q, 8) == "xla"  # auto = XLA (measured faster on an H200)
  assert matmul.resolve_kernel(q.replace(kernel="xla"), 8) == "xla"
  odd = _fake_node(64, 40, 24, kernel="interpret")   # B/2 = 12: not a power of 2
  assert "power of two" in pk.supported(odd, 8)
  with pytest.raises(ValueError, match="Pallas kernel cannot run"):
    matmul.qmatmul(jnp.ones((2, 64)), odd)
  assert matmul.resolve_kernel(odd.replace(kernel="auto"), 8) == "xla"
  narrow = _fake_node(64, 10, 64, kernel="pallas")
  assert "multiple of 16" in pk.supported(narrow, 8)
  assert "power of two" in pk.supported(_fake_node(2048, 32, 2048), 8)


# --- errors -----------------------------------------------------------------------------------------

def test_errors():
  w = jnp.ones((64, 8))
  p = {"attn": {"q_proj": {"kernel": w}}}
  with pytest.raises(ValueError, match=r"format='nf5' is not one of"):
    quant.quantize(p, format="nf5")
  with pytest.raises(ValueError, match="block_size must be positive; got 0"):
    quant.quantize(p, block_size=0)
  with pytest.raises(ValueError, match="block_size must be positive; got -64"):
    quant.quantize(p, block_size=-64)
  with pytest.raises(ValueError, match="must be even.*got 33"):
    quant.quantize(p, block_size=33)
  with pytest.raises(TypeError, match="block_size must be a positive even int"):
    quant.quantize(p, block_size=64.0)
  with pytest.raises(TypeError, match="block_size must be a positive even int"):
    quant.quantize(p, block_size=True)
  with pytest.raises(ValueError, match="symmetric=False.*only for format='int4'"):
    quant.quantize(p, format="nf4", symmetric=False)
  with pytest.raises(TypeError, match="symmetric must be a bool"):
    quant.quantize(p, format="int4", symmetric="no")
  with pytest.raises(TypeError, match="double_quant must be a bool"):
    quant.quantize(p, double_quant=1)
  with pytest.raises(TypeError, match="compute_dtype=.*int32.*not a floating"):
    quant.quantize(p, compute_dtype=jnp.int32)
  with pytest.raises(ValueError, match="kernel='cuda' is not one of"):
    quant.quantize(p, kernel="cuda")
  with pytest.raises(ValueError, match="targets='nothing' matched no leaf"):
    quant.quantize(p, targets="nothing")
  with pytest.raises(TypeError, match=r"attn/q_proj/kernel has dtype int32"):
    quant.quantize({"attn": {"q_proj": {"kernel": jnp.ones((4, 4), jnp.int32)}}},
                   targets=".*kernel")
  with pytest.raises(ValueError, match=r"target b/bias has shape \[8\]"):
    quant.quantize({"b": {"bias": jnp.ones(8)}}, targets=".*bias")
  q = quant.quantize(p)
  with pytest.raises(TypeError, match=r"attn/q_proj/kernel is already a QuantizedWeight"):
    quant.quantize(q)
  with pytest.raises(TypeError, match=r"attn/q_proj/kernel is not an array"):
    quant.quantize({"attn": {"q_proj": {"kernel": "w"}}}, targets=".*kernel")
  with pytest.raises(TypeError, match=r"'x/kernel' is already a QuantizedWeight"):
    quant.quantize_array(q["attn"]["q_proj"]["kernel"], path="x/kernel")
  with pytest.raises(TypeError, match=r"'<array>' is not an array"):
    quant.quantize_array([[1.0]])
  with pytest.raises(TypeError, match=r"'<array>' has dtype int8"):
    quant.quantize_array(jnp.ones((4, 4), jnp.int8))
  with pytest.raises(ValueError, match=r"'<array>' has shape \(8,\)"):
    quant.quantize_array(jnp.ones(8))
  with pytest.raises(ValueError, match=r"layout \(n_batch=1, n_in=1\).*shape \(4, 4\)"):
    quant.quantize_array(jnp.ones((4, 4)), layout=(1, 1))
  with pytest.raises(ValueError, match=r"empty shape \(0, 4\)"):
    quant.quantize_array(jnp.ones((0, 4)))
  with pytest.raises(ValueError, match="does not match a node with layer axes"):
    matmul.qmatmul(jnp.ones((2, 3, 64)), q["attn"]["q_proj"]["kernel"])
