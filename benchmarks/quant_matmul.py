"""Dequantizing matmul: Pallas kernel vs XLA (dequantize, then dot) vs a dense matmul.

Run on a GPU to time the fused Pallas (Triton) kernel; on CPU it times the XLA path (the kernel
runs there only in interpret mode, which is for testing, not timing) and prints the storage and
error figures::

    python benchmarks/quant_matmul.py                  # default shapes, auto-detected backend
    python benchmarks/quant_matmul.py --quick          # one shape, fewer repeats
    python benchmarks/quant_matmul.py --sweep          # GPU: try several tile configurations
    python benchmarks/quant_matmul.py --m 512 --k 4096 --n 4096 --format nf4

Columns (median wall time of ``--repeats`` jitted calls after a warm-up):
``dense``: ``x @ W`` with ``W`` in the compute dtype (bf16 on GPU, f32 on CPU);
``xla``: dequantize with XLA then ``dot_general`` (peftjax's CPU path);
``pallas``: the fused kernel (GPU only); ``fwd``: ``y = x @ deq(W)``; ``bwd``: ``dx = g @ deq(W)^T``.
Agreement: relative Frobenius difference of the Pallas and XLA results, and an exactness check
(identity input: the kernel's dequantized tiles must equal ``dequantize(W)`` bit for bit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from peftjax import quant  # noqa: E402
from peftjax._src.quant import core, matmul  # noqa: E402
from peftjax._src.quant import pallas_kernel as pk  # noqa: E402

SHAPES = [  # (M = batch*seq, K, N): Llama-7B-like projections
    (16, 4096, 4096),
    (512, 4096, 4096),
    (4096, 4096, 4096),
    (2048, 4096, 11008),
    (2048, 11008, 4096),
]
CONFIGS = [  # (block_m, block_n, num_warps, num_stages)
    (64, 64, 4, 2), (64, 128, 4, 2), (128, 64, 4, 2), (128, 128, 8, 2), (64, 128, 4, 3),
    (16, 128, 4, 2),
]


def timeit(fn, *args, repeats=20):
  out = fn(*args)
  jax.block_until_ready(out)
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t)
  return statistics.median(ts)


def rel(a, b):
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def storage_and_error(k=4096, n=4096):
  """Bytes of each format vs bf16, and its round-trip error on Gaussian weights."""
  w = jax.random.normal(jax.random.key(0), (k, n), jnp.float32) * 0.02
  bf16_bytes = w.size * 2
  print(f"\nstorage and error on a Gaussian [{k}, {n}] kernel (bytes / bf16 bytes, rel. Frobenius "
        f"error, max abs error / std):")
  rows = [("nf4", True, True), ("nf4", True, False), ("fp4", True, True), ("int4", True, True),
          ("int4", False, True), ("int8", True, True), ("int8", True, False)]
  for fmt, sym, dq in rows:
    q = quant.quantize_array(w, format=fmt, symmetric=sym, double_quant=dq)
    d = q.materialize()
    err = float(jnp.linalg.norm(d - w) / jnp.linalg.norm(w))
    mx = float(jnp.max(jnp.abs(d - w))) / 0.02
    name = f"{fmt}{'' if sym else '-asym'}{'+dq' if dq else ''}"
    print(f"  {name:14s} bits/param {quant.bits_per_param(q):6.3f}  bytes/bf16 "
          f"{q.nbytes / bf16_bytes:6.3f}  rel err {err:.4f}  max err {mx:.3f} std")


def bench_shape(m, k, n, fmt, dtype, repeats, sweep, on_gpu):
  kx, kw, kg = jax.random.split(jax.random.key(1), 3)
  w = jax.random.normal(kw, (k, n), jnp.float32) * 0.02
  q = quant.quantize_array(w, format=fmt, compute_dtype=dtype, kernel="xla")
  x = jax.random.normal(kx, (m, k), dtype)
  g = jax.random.normal(kg, (m, n), dtype)
  wd = q.materialize()                                   # [K, N] in the compute dtype
  wdt = wd.T

  dense_f = jax.jit(lambda x, w: x @ w)
  dense_b = jax.jit(lambda g, wt: g @ wt)
  xla_f = jax.jit(lambda x, q: matmul.qmatmul_xla(x, q))
  xla_b = jax.jit(lambda g, q: matmul._xla_dx(g, q, jnp.dtype(dtype), None))
  t = {"dense fwd": timeit(dense_f, x, wd, repeats=repeats),
       "dense bwd": timeit(dense_b, g, wdt, repeats=repeats),
       "xla fwd": timeit(xla_f, x, q, repeats=repeats),
       "xla bwd": timeit(xla_b, g, q, repeats=repeats)}
  line = (f"M={m:5d} K={k:5d} N={n:5d} {fmt} {jnp.dtype(dtype).name}: "
          f"dense fwd {t['dense fwd']*1e3:8.3f} ms  xla fwd {t['xla fwd']*1e3:8.3f} ms "
          f"({t['xla fwd']/t['dense fwd']:.2f}x)  dense bwd {t['dense bwd']*1e3:8.3f} ms  "
          f"xla bwd {t['xla bwd']*1e3:8.3f} ms ({t['xla bwd']/t['dense bwd']:.2f}x)")
  print(line)
  if not on_gpu:
    return t
  why = pk.supported(q, m)
  if why is not None:
    print(f"    pallas: not supported: {why}")
    return t
  scales = core.dequantize_scales(q)
  common = dict(fmt=q.format, block_size=q.block_size, in_features=k,
                compute_dtype=jnp.dtype(dtype), out_dtype=jnp.dtype(dtype))
  y_ref = xla_f(x, q)
  dx_ref = xla_b(g, q)
  best = {}
  for cfg in (CONFIGS if sweep else CONFIGS[:1]):
    bm, bn, warps, stages = cfg
    if n % bn:
      continue
    tile = dict(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
    try:
      pf = jax.jit(lambda x, c, s, z: pk.qmatmul_fwd(x, c, s, z, **common, **tile))
      pb = jax.jit(lambda g, c, s, z: pk.qmatmul_bwd(g, c, s, z, **common, **tile))
      tf = timeit(pf, x, q.codes, scales, q.zeros, repeats=repeats)
      tb = timeit(pb, g, q.codes, scales, q.zeros, repeats=repeats)
      ef = rel(pf(x, q.codes, scales, q.zeros), y_ref)
      eb = rel(pb(g, q.codes, scales, q.zeros), dx_ref)
    except Exception as e:  # a tile config the compiler rejects: report and go on
      print(f"    pallas {cfg}: failed: {type(e).__name__}: {str(e)[:200]}")
      continue
    print(f"    pallas bm={bm:3d} bn={bn:3d} warps={warps} stages={stages}: fwd {tf*1e3:8.3f} ms "
          f"({tf/t['dense fwd']:.2f}x dense, {tf/t['xla fwd']:.2f}x xla)  bwd {tb*1e3:8.3f} ms "
          f"({tb/t['dense bwd']:.2f}x dense, {tb/t['xla bwd']:.2f}x xla)  rel diff vs xla "
          f"fwd {ef:.1e} bwd {eb:.1e}")
    if not best or tf + tb < best["t"]:
      best = {"t": tf + tb, "cfg": cfg}
  if best:
    print(f"    best pallas config {best['cfg']}")
  return t


def exactness_check(fmt, dtype, on_gpu):
  """Identity input: each output is one product by 1.0, so results must equal deq(W) exactly."""
  k, n = 512, 256
  w = jax.random.normal(jax.random.key(3), (k, n), jnp.float32) * 0.02
  q = quant.quantize_array(w, format=fmt, compute_dtype=dtype)
  want = np.asarray(q.materialize().astype(jnp.float32))
  eye = jnp.eye(k, dtype=dtype)
  kernels = ["xla"] + (["pallas"] if on_gpu else [])
  for kern in kernels:
    qq = q.replace(kernel=kern)
    y, vjp = jax.vjp(lambda x, qq=qq: matmul.qmatmul(x, qq), eye)
    dx = vjp(jnp.eye(k, n, dtype=dtype))[0]
    ok_f = np.array_equal(np.asarray(y.astype(jnp.float32)), want)
    ok_b = np.array_equal(np.asarray(dx.astype(jnp.float32))[:n], want.T)
    print(f"  exact dequantized tiles ({kern}, {fmt}, {jnp.dtype(dtype).name}): fwd {ok_f} bwd {ok_b}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--m", type=int)
  ap.add_argument("--k", type=int)
  ap.add_argument("--n", type=int)
  ap.add_argument("--format", default="nf4", choices=quant.FORMATS)
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--quick", action="store_true", help="one shape, 5 repeats")
  ap.add_argument("--sweep", action="store_true", help="GPU: try several tile configurations")
  ap.add_argument("--no-storage", action="store_true", help="skip the storage/error table")
  args = ap.parse_args()

  backend = jax.default_backend()
  on_gpu = backend == "gpu"
  dtype = jnp.bfloat16 if on_gpu else jnp.float32
  print(f"jax {jax.__version__}, backend {backend}, devices {jax.devices()}")
  if args.m:
    shapes = [(args.m, args.k or 4096, args.n or 4096)]
  elif args.quick:
    shapes = [(512, 4096, 4096)] if on_gpu else [(512, 2048, 2048)]
  else:
    shapes = SHAPES if on_gpu else [(512, 2048, 2048), (512, 2048, 5504), (2048, 1024, 1024)]
  repeats = 5 if args.quick else args.repeats
  print("\nexactness (identity input):")
  for fmt in ("nf4", "int4"):
    exactness_check(fmt, jnp.bfloat16 if on_gpu else jnp.float32, on_gpu)
  print("\ntimings (median):")
  for m, k, n in shapes:
    bench_shape(m, k, n, args.format, dtype, repeats, args.sweep, on_gpu)
  if not args.no_storage:
    storage_and_error(*((4096, 4096) if not args.quick else (1024, 1024)))


if __name__ == "__main__":
  main()
