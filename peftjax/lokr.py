"""LoKr (LyCORIS; Yeh et al., 2023): a Kronecker product of a small full factor and a low-rank one.

For a kernel ``W [d_in, d_out]`` with ``d_in = m*n`` and ``d_out = l*k`` (HF PEFT's
``factorization``: the divisor pair closest to the square root, smaller first)::

    W' = W + s * kron(W1, W2)        (W1 [m, l] full, W2 = A2 @ B2 [n, k], A2 [n, r], B2 [r, k])

HF PEFT's ``kron(lokr_w1, lokr_w2) * scale`` on its ``[out, in]`` weight, transposed
(``kron(X, Y)^T = kron(X^T, Y^T)``): ``W1 = lokr_w1.T``, ``W2 = lokr_w2.T`` or
``A2 = lokr_w2_b.T``, ``B2 = lokr_w2_a.T``; ``s = alpha / r``. As in HF PEFT, ``W2`` is stored
full when ``r >= max(n, k) / 2`` (the low-rank form would not be smaller) and ``W1`` is always
full (``decompose_both=False``). Init: ``W1 = 0``, the rest kaiming-uniform, so the model is
unchanged at init. Under ``lift`` the rule never forms the update:
``x @ kron(W1, W2) = (x.reshape(m, n) @ W2)^T...``, two small contractions of ``x [.., m, n]``.
Parameters per kernel: ``m*l + r*(n + k)`` (or ``+ n*k`` with a full ``W2``). LoKr merges exactly.

HF PEFT format: ``LOKR``, ``<module>.lokr_w1`` and ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from peftjax._src import method as method_lib
from peftjax._src import nodes as nodes_lib
from peftjax._src import variants
from peftjax._src.nodes import Node, node_dataclass, static_field

__all__ = ["LokrWeight", "apply", "factorization"]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
  """HF PEFT's (LyCORIS's) split of ``dimension`` into ``(m, n)``, ``m <= n``, ``m*n = dimension``.

  >>> factorization(256), factorization(128), factorization(127), factorization(128, 4)
  ((16, 16), (8, 16), (1, 127), (4, 32))
  """
  if factor > 0 and dimension % factor == 0:
    return factor, dimension // factor
  if factor == -1:
    factor = dimension
  m, n = 1, dimension
  length = m + n
  while m < n:
    new_m = m + 1
    while dimension % new_m != 0:
      new_m += 1
    new_n = dimension // new_m
    if new_m + new_n > length or new_m > factor:
      break
    m, n = new_m, new_n
  if m > n:
    n, m = m, n
  return m, n


@node_dataclass
class LokrWeight(Node):
  """``w + scale * kron(w1, w2)`` over the flattened ``[K, N]`` kernel, ``w2 = a2 @ b2`` or full.

  Attributes:
    w: frozen base kernel ``[*batch, *in, *out]`` (an array or a quantized node).
    w1: ``[*batch, m, l]``.
    w2: ``[*batch, n, k]`` when stored full, else None.
    a2: ``[*batch, n, r]`` (None when ``w2`` is full).
    b2: ``[*batch, r, k]`` (None when ``w2`` is full).
    scale: ``alpha / r``.
    rank: ``r`` (recorded for the HF config even when ``w2`` is full).
    n_in: number of input axes (the layer axes are ``w1.ndim - 2``).
  """

  w: Any
  w1: jax.Array
  w2: Optional[jax.Array] = None
  a2: Optional[jax.Array] = None
  b2: Optional[jax.Array] = None
  scale: float = static_field(default=1.0)
  rank: int = static_field(default=1)
  n_in: int = static_field(default=1)

  type_id = "lokr"
  base_field = "w"
  hf_peft_type = "LOKR"
  trainable_fields = ("w1", "w2", "a2", "b2")

  @property
  def n_batch(self) -> int:
    return self.w1.ndim - 2

  def _w2(self, dtype):
    if self.w2 is not None:
      return self.w2.astype(dtype)
    return jnp.matmul(self.a2.astype(dtype), self.b2.astype(dtype),
                      precision=lax.Precision.HIGHEST)

  def delta(self, dtype=jnp.float32):
    """``scale * kron(w1, w2)`` with the shape of ``w``."""
    def one(node):
      w1, w2 = node.w1.astype(dtype), node._w2(dtype)
      return jnp.kron(w1, w2) * jnp.asarray(node.scale, dtype)
    node = self.replace(w=jnp.zeros(self.w1.shape[:self.n_batch]))
    return variants.per_layer(one, self.n_batch, node).reshape(self.shape)

  def materialize(self):
    w = nodes_lib.materialize(self.w)
    return (w.astype(jnp.float32) + self.delta()).astype(w.dtype)

  def dot_general(self, x, dimension_numbers, *, precision=None, preferred_element_type=None):
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)

    def rule(x2, node):
      (m, l), n = node.w1.shape, (node.w2.shape[0] if node.w2 is not None else node.a2.shape[0])
      lead = x2.shape[:-1]
      xs = x2.reshape(*lead, m, n)
      nl = len(lead)
      if node.w2 is not None:
        t = lax.dot_general(xs, node.w2.astype(x2.dtype), (((nl + 1,), (0,)), ((), ())), **kw)
      else:                                                         # [.., m, n] @ A2 @ B2
        t = lax.dot_general(xs, node.a2.astype(x2.dtype), (((nl + 1,), (0,)), ((), ())), **kw)
        t = lax.dot_general(t, node.b2.astype(t.dtype), (((nl + 1,), (0,)), ((), ())), **kw)
      # t [.., m, k]; contract m with w1 [m, l] -> [.., k, l]; the output index is l*k_dim + k
      u = lax.dot_general(t, node.w1.astype(t.dtype), (((nl,), (0,)), ((), ())), **kw)
      u = jnp.swapaxes(u, -1, -2).reshape(*lead, -1) * jnp.asarray(node.scale, u.dtype)
      y = variants.base_dot(x2, node.w, node.n_in, **kw)
      return y + u.astype(y.dtype)

    out = variants.plain_dot(self, x, dimension_numbers, rule)
    return super().dot_general(x, dimension_numbers, **kw) if out is None else out

  def astype(self, dtype):
    return self.replace(w=self.w.astype(dtype))

  # -- Hugging Face PEFT -------------------------------------------------------------------------
  hf_peft_parts = ("lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
  hf_peft_fields = ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d",
                    "decompose_both", "decompose_factor", "rank_dropout_scale", "target_modules",
                    "exclude_modules", "init_weights", "layers_to_transform", "layers_pattern",
                    "rank_pattern", "alpha_pattern")

  def hf_peft_tensors(self) -> list[dict]:
    nb = self.n_batch
    layers = lambda x: (lambda v: v.reshape(-1, *v.shape[nb:]) if nb else v[None])(variants.np_(x))
    w1 = layers(self.w1)
    out = [{"lokr_w1": w1[i].T} for i in range(len(w1))]
    if self.w2 is not None:
      for d, w2 in zip(out, layers(self.w2)):
        d["lokr_w2"] = w2.T
    else:
      for d, a2, b2 in zip(out, layers(self.a2), layers(self.b2)):
        d["lokr_w2_a"], d["lokr_w2_b"] = b2.T, a2.T
    return out

  def hf_peft_settings(self) -> dict:
    return {"r": self.rank, "alpha": self.scale * self.rank}

  @classmethod
  def hf_peft_config(cls, nodes, settings) -> tuple[dict, list]:
    config = variants.rank_alpha_config({m: s["r"] for m, s in settings.items()},
                                        {m: s["alpha"] for m, s in settings.items()})
    config.update({"peft_type": "LOKR", "rank_dropout": 0.0, "module_dropout": 0.0,
                   "use_effective_conv2d": False, "decompose_both": False,
                   "decompose_factor": -1, "rank_dropout_scale": False, "init_weights": True,
                   "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None})
    return config, []

  @classmethod
  def check_hf_peft_config(cls, cfg: dict, cfg_path):
    variants.check_lycoris_config(cfg, cfg_path)
    if cfg.get("decompose_both"):
      raise ValueError(f"{cfg_path}: decompose_both=True (a low-rank W1) is not supported by "
                       "peftjax LoKr")
    f = cfg.get("decompose_factor", -1)
    if isinstance(f, bool) or not isinstance(f, int) or (f <= 0 and f != -1):
      raise ValueError(f"{cfg_path}: 'decompose_factor' must be -1 or a positive integer, got "
                       f"{f!r}")

  @classmethod
  def hf_peft_parts_for(cls, cfg, module, fan_in, fan_out):
    r, _ = variants.rank_alpha_of(cfg, module)
    f = cfg.get("decompose_factor", -1)
    n, k = factorization(fan_in, f)[1], factorization(fan_out, f)[1]
    return ("lokr_w1", "lokr_w2") if r >= max(n, k) / 2 else ("lokr_w1", "lokr_w2_a", "lokr_w2_b")

  @classmethod
  def from_hf_peft(cls, w, n_batch, n_in, layers, keys, modules, adapter, dtype):
    where, cfg = adapter.weights_path, adapter.config
    shape = tuple(w.shape)
    fan_in, fan_out = math.prod(shape[n_batch:n_batch + n_in]), math.prod(shape[n_batch + n_in:])
    f = cfg.get("decompose_factor", -1)
    (m, n), (l, k) = factorization(fan_in, f), factorization(fan_out, f)
    out = {"w1": [], "w2": [], "a2": [], "b2": []}
    ranks, scales = [], []
    for parts, ks, mod in zip(layers, keys, modules):
      r, alpha = variants.rank_alpha_of(cfg, mod)
      ranks.append(r)
      scales.append(alpha / r)
      variants.expect_shape(where, ks["lokr_w1"], parts["lokr_w1"], (l, m),
                            f"factors of {fan_out} outputs x {fan_in} inputs")
      out["w1"].append(parts["lokr_w1"].T)
      if "lokr_w2" in parts:
        variants.expect_shape(where, ks["lokr_w2"], parts["lokr_w2"], (k, n))
        out["w2"].append(parts["lokr_w2"].T)
      else:
        variants.expect_shape(where, ks["lokr_w2_a"], parts["lokr_w2_a"], (k, r), f"r={r}")
        variants.expect_shape(where, ks["lokr_w2_b"], parts["lokr_w2_b"], (r, n), f"r={r}")
        out["a2"].append(parts["lokr_w2_b"].T)
        out["b2"].append(parts["lokr_w2_a"].T)
    rank = variants.same_over_layers(ranks, "ranks", where, modules)
    scale = variants.same_over_layers(scales, "scales", where, modules)
    arrs = {f: (jnp.asarray(np.stack(v) if n_batch else v[0], dtype) if v else None)
            for f, v in out.items()}
    return cls(w=w, scale=scale, rank=rank, n_in=n_in, **arrs)


def apply(params, rank: int = 8, *, alpha: float | None = None, targets=None, key=None,
          decompose_factor: int = -1, dtype=None,
          layout: Callable[[str, tuple], tuple[int, int]] | None = None):
  """Rewrites the target kernels of ``params`` into :class:`LokrWeight` nodes.

  Args:
    params: any parameter pytree.
    rank: ``r`` of the second factor (stored full when ``r >= max(n, k) / 2``, as HF PEFT).
    alpha: scale numerator (``scale = alpha / r``); defaults to ``rank``.
    targets: which kernels (:mod:`peftjax._src.targeting`); default every dense kernel of
      attention and MLP blocks. Embedding tables are refused.
    key: PRNG key (per kernel ``fold_in(key, crc32(path))``); default key 0.
    decompose_factor: HF PEFT's ``decompose_factor`` (-1: the divisor pair nearest the square
      root; ``f``: the first factor is ``f`` where it divides).
    dtype: dtype of the factors (default: the kernel's; float32 for quantized bases).
    layout: ``(path, shape) -> (n_batch, n_in)``; default :func:`peftjax.lora.default_layout`.

  Returns:
    The tree with target kernels replaced by :class:`LokrWeight` nodes (``W1 = 0``: the model is
    unchanged at init).

  Raises:
    ValueError: a bad rank, alpha or factor, a target spec matching nothing, a target that is not
      a linear kernel, a kernel that already has LoKr.

  >>> import jax.numpy as jnp, peftjax
  >>> tuned = peftjax.lokr.apply({"up_proj": {"kernel": jnp.ones((64, 128))}}, rank=2)
  >>> node = tuned["up_proj"]["kernel"]
  >>> node.w1.shape, node.a2.shape, node.b2.shape        # 64 = 8*8, 128 = 8*16
  ((8, 8), (8, 2), (2, 16))
  >>> peftjax.summary({"k": node}).trainable             # m*l + r*(n + k)
  112
  """
  rank = variants.check_rank(rank)
  alpha = variants.check_number(rank if alpha is None else alpha, "alpha")
  if isinstance(decompose_factor, bool) or not isinstance(decompose_factor, int) or (
      decompose_factor <= 0 and decompose_factor != -1):
    raise ValueError(f"decompose_factor must be -1 or a positive integer, got {decompose_factor!r}")

  def make(k: variants.Kernel):
    (m, n), (l, kk) = factorization(k.fan_in, decompose_factor), factorization(k.fan_out,
                                                                               decompose_factor)
    full = rank >= max(n, kk) / 2
    w2, a2, b2 = [], [], []
    for key_ in k.layer_keys():
      k1, k2 = jax.random.split(key_)
      if full:                                   # lokr_w2 [k, n]: fan_in = n
        w2.append(variants.kaiming_uniform(k1, (n, kk), n, k.dtype))
      else:                                      # lokr_w2_a [k, r]: fan r; lokr_w2_b [r, n]: fan n
        b2.append(variants.kaiming_uniform(k1, (rank, kk), rank, k.dtype))
        a2.append(variants.kaiming_uniform(k2, (n, rank), n, k.dtype))
    return LokrWeight(w=k.w, w1=jnp.zeros((*k.batch_shape, m, l), k.dtype),
                      w2=k.stack(w2) if full else None, a2=None if full else k.stack(a2),
                      b2=None if full else k.stack(b2), scale=alpha / rank, rank=rank,
                      n_in=k.n_in)

  return variants.rewrite_kernels(params, targets, key, dtype, layout, (LokrWeight,), "LoKr",
                                  make)


OPTIONS = (
    method_lib.Option("rank", 8, "LoKr rank r of the second Kronecker factor",
                      type=method_lib.positive_int),
    method_lib.Option("alpha", 16.0, "scale numerator (scale = alpha/r)",
                      type=method_lib.positive_float),
    method_lib.TARGETS)

METHOD = method_lib.Method(
    name="lokr", apply=apply,
    description="Kronecker product of a small full and a low-rank factor: W + s kron(W1, A2 B2)",
    options=OPTIONS, hf_peft_type="LOKR")
