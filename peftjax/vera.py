"""VeRA (Kopiczko et al., 2024): one frozen random pair ``A``, ``B`` shared by every layer, and two
trained scaling vectors per layer.

For a kernel ``W [d_in, d_out]``::

    W' = W + (A * lambda_d) @ B * lambda_b        (A [d_in, r], B [r, d_out] frozen, shared)

i.e. ``x -> x@W + (((x@A) * lambda_d) @ B) * lambda_b``, HF PEFT's ``lambda_b * linear(lambda_d *
linear(x, A), B)``. As in HF PEFT there is one projection pair for the whole model, sized for the
largest target (``A_shared [r, max d_in]``, ``B_shared [max d_out, r]``, kaiming-uniform with
gain ``sqrt(2)``); each node holds its slice (``A = A_shared[:, :d_in].T``, ``B =
B_shared[:d_out].T``). ``lambda_b`` starts at zero (the model is unchanged at init) and
``lambda_d`` at ``d_initial``. Parameters per kernel: ``r + d_out`` (the smallest of the family;
``r`` is typically large, 256). VeRA merges exactly.

HF PEFT format: ``VERA`` with ``save_projection=True``: ``base_model.vera_A``/``vera_B`` and
``<module>.vera_lambda_b [d_out]``, ``<module>.vera_lambda_d [r]``.
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

__all__ = ["VeraWeight", "apply"]


@node_dataclass
class VeraWeight(Node):
  """``w + ((A * lambda_d) @ B) * lambda_b``; ``A``, ``B`` frozen (shared), the vectors trained.

  Attributes:
    w: frozen base kernel ``[*batch, *in, *out]`` (an array or a quantized node).
    a: frozen ``[*batch, *in, r]``: this kernel's slice of the shared projection.
    b: frozen ``[*batch, r, *out]``.
    lambda_d: ``[*batch, r]``.
    lambda_b: ``[*batch, *out]``.
    n_in: number of input axes (the layer axes are ``lambda_d.ndim - 1``).
  """

  w: Any
  a: jax.Array
  b: jax.Array
  lambda_d: jax.Array
  lambda_b: jax.Array
  n_in: int = static_field(default=1)

  type_id = "vera"
  base_field = "w"
  hf_peft_type = "VERA"
  trainable_fields = ("lambda_d", "lambda_b")

  @property
  def n_batch(self) -> int:
    return self.lambda_d.ndim - 1

  @property
  def rank(self) -> int:
    return self.lambda_d.shape[-1]

  def delta(self):
    """``((A * lambda_d) @ B) * lambda_b`` with the shape of ``w`` (float32)."""
    nb = self.n_batch

    def one(a, b, d, lb):
      a2 = a.reshape(-1, a.shape[-1]).astype(jnp.float32) * d.reshape(1, -1).astype(jnp.float32)
      b2 = b.reshape(b.shape[0], -1).astype(jnp.float32)
      return jnp.matmul(a2, b2, precision=lax.Precision.HIGHEST) * lb.reshape(1, -1).astype(
          jnp.float32)

    d = variants.per_layer(one, nb, self.a, self.b, self.lambda_d, self.lambda_b)
    return d.reshape(self.shape)

  def materialize(self):
    w = nodes_lib.materialize(self.w)
    return (w.astype(jnp.float32) + self.delta()).astype(w.dtype)

  def dot_general(self, x, dimension_numbers, *, precision=None, preferred_element_type=None):
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)

    def rule(x2, node):
      k, r = x2.shape[-1], node.rank
      a2 = node.a.reshape(k, r).astype(x2.dtype)
      b2 = node.b.reshape(r, -1).astype(x2.dtype)
      y = variants.base_dot(x2, node.w, node.n_in, **kw)
      t = lax.dot_general(x2, a2, (((x2.ndim - 1,), (0,)), ((), ())), **kw)
      t = t * node.lambda_d.astype(t.dtype).reshape((1,) * (t.ndim - 1) + (-1,))
      u = lax.dot_general(t, b2, (((t.ndim - 1,), (0,)), ((), ())), **kw)
      u = u * node.lambda_b.reshape((1,) * (u.ndim - 1) + (-1,)).astype(u.dtype)
      return y + u.astype(y.dtype)

    out = variants.plain_dot(self, x, dimension_numbers, rule)
    return super().dot_general(x, dimension_numbers, **kw) if out is None else out

  def astype(self, dtype):
    return self.replace(w=self.w.astype(dtype))

  # -- Hugging Face PEFT -------------------------------------------------------------------------
  hf_peft_parts = ("vera_lambda_b", "vera_lambda_d")
  hf_peft_shared = ("base_model.vera_A", "base_model.vera_B")
  hf_peft_fields = ("r", "target_modules", "projection_prng_key", "save_projection",
                    "vera_dropout", "d_initial", "fan_in_fan_out", "bias", "init_weights",
                    "layers_to_transform", "layers_pattern", "exclude_modules")

  def _layers(self, x, tail: int):
    x = variants.np_(x)
    return x.reshape(-1, *x.shape[self.n_batch:]) if self.n_batch else x[None]

  def hf_peft_tensors(self) -> list[dict]:
    lb, ld = self._layers(self.lambda_b, 1), self._layers(self.lambda_d, 1)
    return [{"vera_lambda_b": lb[i].reshape(-1), "vera_lambda_d": ld[i]} for i in range(len(ld))]

  def hf_peft_settings(self) -> dict:
    return {"r": self.rank}

  @classmethod
  def hf_peft_config(cls, nodes, settings) -> tuple[dict, list]:
    """The config and the shared ``vera_A [r, max d_in]``/``vera_B [max d_out, r]``, rebuilt
    from the nodes' slices (which must agree where they overlap)."""
    ranks = {s["r"] for s in settings.values()}
    if len(ranks) > 1:
      raise ValueError(f"VeRA nodes have different ranks {sorted(ranks)}; HF PEFT's VeRA has one "
                       "r (one shared projection)")
    r = ranks.pop()
    a_sl = [a2 for n in nodes for a2 in n._layers(n.a, 1)]
    b_sl = [b2 for n in nodes for b2 in n._layers(n.b, 1)]
    a_sl = [a.reshape(-1, r) for a in a_sl]       # [d_in, r]
    b_sl = [b.reshape(r, -1) for b in b_sl]       # [r, d_out]
    big_a = max(a_sl, key=lambda a: a.shape[0])
    big_b = max(b_sl, key=lambda b: b.shape[1])
    for a in a_sl:
      if not np.array_equal(a, big_a[:a.shape[0]]):
        raise ValueError("VeRA nodes do not share one projection A (a node's A is not a slice of "
                         "the largest one); build them with one peftjax.vera.apply call")
    for b in b_sl:
      if not np.array_equal(b, big_b[:, :b.shape[1]]):
        raise ValueError("VeRA nodes do not share one projection B; build them with one "
                         "peftjax.vera.apply call")
    config = {"peft_type": "VERA", "r": r, "projection_prng_key": 0, "save_projection": True,
              "vera_dropout": 0.0, "d_initial": 0.1, "fan_in_fan_out": False, "bias": "none",
              "init_weights": True, "layers_to_transform": None, "layers_pattern": None}
    return config, [("base_model.vera_A", big_a.T), ("base_model.vera_B", big_b.T)]

  @classmethod
  def check_hf_peft_config(cls, cfg: dict, cfg_path):
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
      raise ValueError(f"{cfg_path}: 'r' must be a positive integer, got {r!r}")
    if not cfg.get("save_projection", True):
      raise ValueError(f"{cfg_path}: save_projection=False: the shared projection is not in the "
                       "file (HF PEFT regenerates it with torch's PRNG); save the adapter with "
                       "save_projection=True")

  @classmethod
  def hf_peft_parts_for(cls, cfg, module, fan_in, fan_out):
    return cls.hf_peft_parts

  @classmethod
  def from_hf_peft(cls, w, n_batch, n_in, layers, keys, modules, adapter, dtype):
    where = adapter.weights_path
    r = adapter.config["r"]
    shape = tuple(w.shape)
    in_shape, out_shape = shape[n_batch:n_batch + n_in], shape[n_batch + n_in:]
    fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
    for k in cls.hf_peft_shared:
      if k not in adapter.tensors:
        raise ValueError(f"{where}: missing key {k!r} (VeRA's shared projection)")
    A, B = adapter.tensors["base_model.vera_A"], adapter.tensors["base_model.vera_B"]
    if A.ndim != 2 or A.shape[0] != r or A.shape[1] < fan_in:
      raise ValueError(f"{where}: key 'base_model.vera_A' has shape {list(A.shape)}; {modules[0]} "
                       f"needs [{r}, >= {fan_in}] (r from the config)")
    if B.ndim != 2 or B.shape[1] != r or B.shape[0] < fan_out:
      raise ValueError(f"{where}: key 'base_model.vera_B' has shape {list(B.shape)}; {modules[0]} "
                       f"needs [>= {fan_out}, {r}]")
    lb, ld = [], []
    for parts, ks in zip(layers, keys):
      variants.expect_shape(where, ks["vera_lambda_b"], parts["vera_lambda_b"], (fan_out,),
                            "the module's output features")
      variants.expect_shape(where, ks["vera_lambda_d"], parts["vera_lambda_d"], (r,),
                            "r from the config")
      lb.append(parts["vera_lambda_b"].reshape(out_shape))
      ld.append(parts["vera_lambda_d"])
    a = A[:, :fan_in].T.reshape(*in_shape, r)
    b = B[:fan_out, :].T.reshape(r, *out_shape)
    n = len(layers)
    if n_batch:
      a, b = np.broadcast_to(a, (n, *a.shape)), np.broadcast_to(b, (n, *b.shape))
      lb, ld = np.stack(lb), np.stack(ld)
    else:
      lb, ld = lb[0], ld[0]
    return cls(w=w, a=jnp.asarray(a, dtype), b=jnp.asarray(b, dtype),
               lambda_d=jnp.asarray(ld, dtype), lambda_b=jnp.asarray(lb, dtype), n_in=n_in)


def apply(params, rank: int = 256, *, targets=None, key=None, d_initial: float = 0.1, dtype=None,
          layout: Callable[[str, tuple], tuple[int, int]] | None = None):
  """Rewrites the target kernels of ``params`` into :class:`VeraWeight` nodes (one projection).

  Args:
    params: any parameter pytree.
    rank: ``r``, the width of the shared projection (HF PEFT's default 256; it may exceed the
      kernels' dimensions).
    targets: which kernels (:mod:`peftjax._src.targeting`); default every dense kernel of
      attention and MLP blocks. Embedding tables are refused.
    key: PRNG key of the shared projection (one draw for the whole tree); default key 0.
    d_initial: the initial value of every ``lambda_d``.
    dtype: dtype of the projection slices and vectors (default: the kernel's; float32 for
      quantized bases).
    layout: ``(path, shape) -> (n_batch, n_in)``; default :func:`peftjax.lora.default_layout`.

  Returns:
    The tree with target kernels replaced by :class:`VeraWeight` nodes, equal to the base model
    at init (``lambda_b = 0``): ``r + d_out`` trainable parameters per kernel (per layer).

  Raises:
    ValueError: a bad rank or ``d_initial``, a target spec matching nothing, a target that is not
      a linear kernel, a kernel that already has VeRA.

  >>> import jax.numpy as jnp, peftjax
  >>> params = {"q_proj": {"kernel": jnp.ones((16, 8))}, "v_proj": {"kernel": jnp.ones((8, 4))}}
  >>> tuned = peftjax.vera.apply(params, rank=32, targets=["q_proj", "v_proj"])
  >>> q, v = tuned["q_proj"]["kernel"], tuned["v_proj"]["kernel"]
  >>> q.a.shape, v.a.shape, bool((q.a[:8] == v.a).all())       # slices of one projection
  ((16, 32), (8, 32), True)
  >>> peftjax.summary(tuned).trainable                          # (r + d_out) per kernel
  76
  """
  rank = variants.check_rank(rank)
  d_initial = variants.check_number(d_initial, "d_initial")
  from peftjax._src.additive import as_key
  key = as_key(key)
  shared = {}

  def check(kernels):
    if not kernels:
      return
    max_in = max(k.fan_in for k in kernels)
    max_out = max(k.fan_out for k in kernels)
    ka, kb = jax.random.split(key)
    # torch's kaiming_uniform_ with gain sqrt(2), fan_in = the matrix's second axis (HF PEFT)
    shared["a"] = variants.kaiming_uniform(ka, (rank, max_in), max_in, jnp.float32,
                                           gain=math.sqrt(6.0))
    shared["b"] = variants.kaiming_uniform(kb, (max_out, rank), rank, jnp.float32,
                                           gain=math.sqrt(6.0))

  def make(k: variants.Kernel):
    a = shared["a"][:, :k.fan_in].T.reshape(*k.in_shape, rank).astype(k.dtype)
    b = shared["b"][:k.fan_out, :].T.reshape(rank, *k.out_shape).astype(k.dtype)
    bs = k.batch_shape
    return VeraWeight(w=k.w, a=jnp.broadcast_to(a, (*bs, *a.shape)),
                      b=jnp.broadcast_to(b, (*bs, *b.shape)),
                      lambda_d=jnp.full((*bs, rank), d_initial, k.dtype),
                      lambda_b=jnp.zeros((*bs, *k.out_shape), k.dtype), n_in=k.n_in)

  return variants.rewrite_kernels(params, targets, key, dtype, layout, (VeraWeight,), "VeRA",
                                  make, check)


OPTIONS = (
    method_lib.Option("rank", 256, "VeRA rank r (width of the shared random projection)",
                      type=method_lib.positive_int),
    method_lib.TARGETS)

METHOD = method_lib.Method(
    name="vera", apply=apply,
    description="shared frozen random A, B with trained scaling vectors: W + (A*d) B * b",
    options=OPTIONS, hf_peft_type="VERA", learning_rate=1e-2)
