"""LoHa (LyCORIS; Hyeon-Woo et al., 2022, FedPara): the Hadamard product of two low-rank updates.

For a kernel ``W [d_in, d_out]``::

    W' = W + s * (A1 @ B1) * (A2 @ B2)        (A_i [d_in, r], B_i [r, d_out], s = alpha / r)

HF PEFT's ``((w1_a @ w1_b) * (w2_a @ w2_b)) * scale`` on its ``[out, in]`` weight, transposed:
``A1 = hada_w1_b.T``, ``B1 = hada_w1_a.T``, ``A2 = hada_w2_b.T``, ``B2 = hada_w2_a.T``. With
``2r(d_in + d_out)`` parameters the update can reach rank ``r^2``. HF PEFT's init: ``w2_b``
(here ``A2``) zero, the others kaiming-uniform, so the model is unchanged at init. The update
must be formed to apply it (a Hadamard product has no factored matmul); under ``lift`` the rule
computes ``x@W + x@delta``, so no gradient of the frozen ``W`` is formed. LoHa merges exactly.

HF PEFT format: ``LOHA``, ``<module>.hada_w{1,2}_{a,b}``, ``r``/``alpha``/``rank_pattern``/
``alpha_pattern`` as LoRA's.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from peftjax._src import method as method_lib
from peftjax._src import nodes as nodes_lib
from peftjax._src import variants
from peftjax._src.nodes import Node, node_dataclass, static_field

__all__ = ["LohaWeight", "apply"]


@node_dataclass
class LohaWeight(Node):
  """``w + scale * (a1 @ b1) * (a2 @ b2)`` (contracting the rank axes).

  Attributes:
    w: frozen base kernel ``[*batch, *in, *out]`` (an array or a quantized node).
    a1, a2: ``[*batch, *in, r]``.
    b1, b2: ``[*batch, r, *out]``.
    scale: ``alpha / r``.
    n_in: number of input axes (the layer axes are ``a1.ndim - n_in - 1``).
  """

  w: Any
  a1: jax.Array
  b1: jax.Array
  a2: jax.Array
  b2: jax.Array
  scale: float = static_field(default=1.0)
  n_in: int = static_field(default=1)

  type_id = "loha"
  base_field = "w"
  hf_peft_type = "LOHA"
  trainable_fields = ("a1", "b1", "a2", "b2")

  @property
  def n_batch(self) -> int:
    return self.a1.ndim - self.n_in - 1

  @property
  def rank(self) -> int:
    return self.a1.shape[-1]

  def delta(self, dtype=jnp.float32):
    """``scale * (a1 @ b1) * (a2 @ b2)`` with the shape of ``w``."""
    nb, r = self.n_batch, self.rank

    def one(a1, b1, a2, b2):
      mm = lambda a, b: jnp.matmul(a.reshape(-1, r).astype(dtype), b.reshape(r, -1).astype(dtype),
                                   precision=lax.Precision.HIGHEST)
      return mm(a1, b1) * mm(a2, b2) * jnp.asarray(self.scale, dtype)

    return variants.per_layer(one, nb, self.a1, self.b1, self.a2, self.b2).reshape(self.shape)

  def materialize(self):
    w = nodes_lib.materialize(self.w)
    return (w.astype(jnp.float32) + self.delta()).astype(w.dtype)

  def dot_general(self, x, dimension_numbers, *, precision=None, preferred_element_type=None):
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)

    def rule(x2, node):
      r = node.rank
      mm = lambda a, b: jnp.matmul(a.reshape(-1, r).astype(x2.dtype),
                                   b.reshape(r, -1).astype(x2.dtype))
      d = mm(node.a1, node.b1) * mm(node.a2, node.b2) * jnp.asarray(node.scale, x2.dtype)
      y = variants.base_dot(x2, node.w, node.n_in, **kw)
      u = lax.dot_general(x2, d, (((x2.ndim - 1,), (0,)), ((), ())), **kw)
      return y + u.astype(y.dtype)

    out = variants.plain_dot(self, x, dimension_numbers, rule)
    return super().dot_general(x, dimension_numbers, **kw) if out is None else out

  def astype(self, dtype):
    return self.replace(w=self.w.astype(dtype))

  # -- Hugging Face PEFT -------------------------------------------------------------------------
  hf_peft_parts = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
  hf_peft_fields = ("r", "alpha", "rank_dropout", "module_dropout", "use_effective_conv2d",
                    "target_modules", "exclude_modules", "init_weights", "layers_to_transform",
                    "layers_pattern", "rank_pattern", "alpha_pattern")

  def hf_peft_tensors(self) -> list[dict]:
    r, nb = self.rank, self.n_batch
    layers = lambda x: (lambda v: v.reshape(-1, *v.shape[nb:]) if nb else v[None])(variants.np_(x))
    a1, b1, a2, b2 = (layers(v) for v in (self.a1, self.b1, self.a2, self.b2))
    return [{"hada_w1_a": b1[i].reshape(r, -1).T, "hada_w1_b": a1[i].reshape(-1, r).T,
             "hada_w2_a": b2[i].reshape(r, -1).T, "hada_w2_b": a2[i].reshape(-1, r).T}
            for i in range(len(a1))]

  def hf_peft_settings(self) -> dict:
    return {"r": self.rank, "alpha": self.scale * self.rank}

  @classmethod
  def hf_peft_config(cls, nodes, settings) -> tuple[dict, list]:
    config = variants.rank_alpha_config({m: s["r"] for m, s in settings.items()},
                                        {m: s["alpha"] for m, s in settings.items()})
    config.update({"peft_type": "LOHA", "rank_dropout": 0.0, "module_dropout": 0.0,
                   "use_effective_conv2d": False, "init_weights": True,
                   "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None})
    return config, []

  @classmethod
  def check_hf_peft_config(cls, cfg: dict, cfg_path):
    variants.check_lycoris_config(cfg, cfg_path)

  @classmethod
  def hf_peft_parts_for(cls, cfg, module, fan_in, fan_out):
    return cls.hf_peft_parts

  @classmethod
  def from_hf_peft(cls, w, n_batch, n_in, layers, keys, modules, adapter, dtype):
    where = adapter.weights_path
    shape = tuple(w.shape)
    in_shape, out_shape = shape[n_batch:n_batch + n_in], shape[n_batch + n_in:]
    k, n = math.prod(in_shape), math.prod(out_shape)
    out = {f: [] for f in ("a1", "b1", "a2", "b2")}
    ranks, scales = [], []
    for parts, ks, m in zip(layers, keys, modules):
      r, alpha = variants.rank_alpha_of(adapter.config, m)
      ranks.append(r)
      scales.append(alpha / r)
      for i in ("1", "2"):
        ta, tb = parts[f"hada_w{i}_a"], parts[f"hada_w{i}_b"]
        variants.expect_shape(where, ks[f"hada_w{i}_a"], ta, (n, r), f"{n} outputs, r={r}")
        variants.expect_shape(where, ks[f"hada_w{i}_b"], tb, (r, k), f"r={r}, {k} inputs")
        out[f"a{i}"].append(tb.T.reshape(*in_shape, r))
        out[f"b{i}"].append(ta.T.reshape(r, *out_shape))
    variants.same_over_layers(ranks, "ranks", where, modules)
    scale = variants.same_over_layers(scales, "scales", where, modules)
    arrs = {f: jnp.asarray(np.stack(v) if n_batch else v[0], dtype) for f, v in out.items()}
    return cls(w=w, scale=scale, n_in=n_in, **arrs)


def apply(params, rank: int = 8, *, alpha: float | None = None, targets=None, key=None,
          dtype=None, layout: Callable[[str, tuple], tuple[int, int]] | None = None):
  """Rewrites the target kernels of ``params`` into :class:`LohaWeight` nodes.

  Args:
    params: any parameter pytree.
    rank: ``r`` of each of the two factors (the update's rank is at most ``r^2``).
    alpha: scale numerator (``scale = alpha / r``); defaults to ``rank``.
    targets: which kernels (:mod:`peftjax._src.targeting`); default every dense kernel of
      attention and MLP blocks. Embedding tables are refused.
    key: PRNG key (per kernel ``fold_in(key, crc32(path))``); default key 0.
    dtype: dtype of the factors (default: the kernel's; float32 for quantized bases).
    layout: ``(path, shape) -> (n_batch, n_in)``; default :func:`peftjax.lora.default_layout`.

  Returns:
    The tree with the target kernels replaced by :class:`LohaWeight` nodes, initialized as HF
    PEFT does (``A2 = 0``, the others kaiming-uniform), so the model is unchanged at init:
    ``2r(d_in + d_out)`` trainable parameters per kernel.

  Raises:
    ValueError: a bad rank or alpha, a target spec matching nothing, a target that is not a
      linear kernel, a kernel that already has LoHa.

  >>> import jax.numpy as jnp, peftjax
  >>> tuned = peftjax.loha.apply({"up_proj": {"kernel": jnp.ones((16, 8))}}, rank=2)
  >>> peftjax.summary(tuned).trainable                       # 2 r (d_in + d_out)
  96
  """
  rank = variants.check_rank(rank)
  alpha = variants.check_number(rank if alpha is None else alpha, "alpha")

  def make(k: variants.Kernel):
    ku = lambda kk, shape, fan: variants.kaiming_uniform(kk, shape, fan, k.dtype)
    a1, b1, b2 = [], [], []
    for kk in k.layer_keys():
      k1, k2, k3 = jax.random.split(kk, 3)
      a1.append(ku(k1, (*k.in_shape, rank), k.fan_in))     # hada_w1_b [r, in]: fan_in = in
      b1.append(ku(k2, (rank, *k.out_shape), rank))        # hada_w1_a [out, r]: fan_in = r
      b2.append(ku(k3, (rank, *k.out_shape), rank))        # hada_w2_a [out, r]
    return LohaWeight(w=k.w, a1=k.stack(a1), b1=k.stack(b1),
                      a2=jnp.zeros((*k.batch_shape, *k.in_shape, rank), k.dtype), b2=k.stack(b2),
                      scale=alpha / rank, n_in=k.n_in)

  return variants.rewrite_kernels(params, targets, key, dtype, layout, (LohaWeight,), "LoHa",
                                  make)


OPTIONS = (
    method_lib.Option("rank", 8, "LoHa rank r of each factor", type=method_lib.positive_int),
    method_lib.Option("alpha", 16.0, "scale numerator (scale = alpha/r)",
                      type=method_lib.positive_float),
    method_lib.TARGETS)

METHOD = method_lib.Method(
    name="loha", apply=apply,
    description="Hadamard product of two low-rank updates: W + s (A1 B1) * (A2 B2)",
    options=OPTIONS, hf_peft_type="LOHA")
