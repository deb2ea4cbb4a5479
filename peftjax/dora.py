"""DoRA (Liu et al., 2024): weight-decomposed LoRA, a trained magnitude times a LoRA direction.

The kernel is split into a magnitude per output feature and a direction; LoRA trains the direction
and a vector trains the magnitude::

    W' = m * (W + s*A@B) / ||W + s*A@B||_c

with ``||.||_c`` the L2 norm of each output feature's column over the input axes (HF PEFT's
``torch.linalg.norm(W + s*B@A, dim=1)`` on its ``[out, in]`` weight), ``s = alpha / r``, and
``m [*out]`` initialized to ``||W||_c`` so the model is unchanged at init (``B`` starts at zero).
As the paper (section 4.3) and HF PEFT do, the norm is treated as a constant in the backward
pass (``stop_gradient``): it follows the update in the forward pass but receives no gradient.

Under ``peftjax.lift`` the rule computes ``(x@W + s*(x@A)@B) * (m / ||W + s*A@B||_c)``: the
adapter's matmuls stay factored and no weight gradient of ``W`` is formed; the norm needs the
merged kernel once per call (no gradient). DoRA merges exactly (``peftjax.merge``).
Parameters per kernel: ``r * (d_in + d_out) + d_out``.

HF PEFT format: a LoRA adapter with ``use_dora: true`` and a ``lora_magnitude_vector [out]``
tensor per module (:mod:`peftjax.io.hf_peft`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from peftjax._src import method as method_lib
from peftjax._src import nodes as nodes_lib
from peftjax._src import variants
from peftjax._src.nodes import Node, node_dataclass, static_field
from peftjax.lora import LoraWeight, _delta, _init_a

__all__ = ["DoraWeight", "apply"]


@node_dataclass
class DoraWeight(Node):
  """``magnitude * (w + scale*A@B) / stop_gradient(||w + scale*A@B||_c)``.

  Attributes:
    w: frozen base kernel ``[*batch, *in, *out]`` (an array or a quantized node).
    a: ``[*batch, *in, r]``.
    b: ``[*batch, r, *out]``.
    magnitude: ``[*batch, *out]``, trained; ``||w||_c`` at init.
    dropout_key: ``None`` or raw uint32 key data ``[*batch, 2]`` (:func:`peftjax.set_rng`).
    scale: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
    n_in: number of input axes (the layer axes are ``a.ndim - n_in - 1``).
    dropout: HF PEFT's ``lora_dropout`` on the adapter's input while a key is set. As in HF
      PEFT, the dropped input ``x_d`` feeds the adapter and the magnitude's correction:
      ``x W + (f - 1) x_d W + f s (x_d A) B`` with ``f = m / ||W + s A B||_c``.
  """

  w: Any
  a: jax.Array
  b: jax.Array
  magnitude: jax.Array
  dropout_key: Any = None
  scale: float = static_field(default=1.0)
  n_in: int = static_field(default=1)
  dropout: float = static_field(default=0.0)

  type_id = "dora"
  base_field = "w"
  rng_field = "dropout_key"
  hf_peft_type = "LORA"
  trainable_fields = ("a", "b", "magnitude")

  @property
  def n_batch(self) -> int:
    return self.a.ndim - self.n_in - 1

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  def wants_rng(self) -> bool:
    return self.dropout > 0.0

  def _column_factor(self, direction, flat: bool = False):
    """``magnitude / stop_gradient(||direction||_c)``, the norm over the input axes:
    ``[*batch, *out]``, or ``[N]`` for one layer's flattened ``[K, N]`` direction (``flat``)."""
    nb, ni = (0, 1) if flat else (self.n_batch, self.n_in)
    d32 = lax.stop_gradient(direction.astype(jnp.float32))
    norm = jnp.sqrt(jnp.sum(d32 * d32, axis=tuple(range(nb, nb + ni))))
    m = self.magnitude.astype(jnp.float32)
    return (m.reshape(-1) if flat else m) / norm

  def materialize(self):
    w = nodes_lib.materialize(self.w)
    direction = w.astype(jnp.float32) + _delta(self.a, self.b, self.scale, self.n_in).astype(
        jnp.float32)
    f = self._column_factor(direction)
    nb = self.n_batch
    f = f.reshape(*f.shape[:nb], *([1] * self.n_in), *f.shape[nb:])
    return (direction * f).astype(w.dtype)

  def dot_general(self, x, dimension_numbers, *, precision=None, preferred_element_type=None):
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)

    def rule(x2, node):
      k, r = x2.shape[-1], node.rank
      a2 = node.a.reshape(k, r).astype(x2.dtype)
      b2 = node.b.reshape(r, -1).astype(x2.dtype)
      w = nodes_lib.materialize(node.w)
      direction = (variants.flat(w, 0, node.n_in).astype(jnp.float32) +
                   (a2.astype(jnp.float32) @ b2.astype(jnp.float32)) * node.scale)
      f = node._column_factor(direction, flat=True)   # [N]
      y = variants.base_dot(x2, node.w, node.n_in, **kw)
      xd = x2
      if node.dropout_key is not None and node.dropout > 0.0:
        keep = jax.random.bernoulli(jax.random.wrap_key_data(node.dropout_key),
                                    1.0 - node.dropout, x2.shape)
        xd = jnp.where(keep, x2 / (1.0 - node.dropout), 0).astype(x2.dtype)
      t = lax.dot_general(xd, a2, (((xd.ndim - 1,), (0,)), ((), ())), **kw)
      t = t * jnp.asarray(node.scale, t.dtype)
      upd = lax.dot_general(t, b2, (((t.ndim - 1,), (0,)), ((), ())), **kw).astype(y.dtype)
      f = f.astype(y.dtype).reshape((1,) * (y.ndim - 1) + (-1,))
      if xd is x2:
        return ((y + upd) * f).astype(y.dtype)
      yd = variants.base_dot(xd, node.w, node.n_in, **kw)
      return (y + (f - 1) * yd + f * upd).astype(y.dtype)

    out = variants.plain_dot(self, x, dimension_numbers, rule)
    if out is None:
      return super().dot_general(x, dimension_numbers, **kw)
    return out

  def astype(self, dtype):
    return self.replace(w=self.w.astype(dtype))

  # -- Hugging Face PEFT: a LoRA adapter with use_dora and a magnitude vector per module ----------
  hf_peft_flags = {"use_dora": True}

  def hf_peft_tensors(self) -> list[dict]:
    """Per layer, the tensors DoRA adds to LoRA's: ``lora_magnitude_vector [out]``."""
    m = variants.np_(self.magnitude)
    n = math.prod(m.shape[:self.n_batch]) if self.n_batch else 1
    return [{"lora_magnitude_vector": m.reshape(n, -1)[i]} for i in range(n)]

  def as_lora(self) -> LoraWeight:
    """The LoRA part alone (the direction's update), e.g. for tools that read ``a``/``b``."""
    return LoraWeight(w=self.w, a=self.a, b=self.b, scale=self.scale, n_in=self.n_in)


def column_norm(w, n_batch: int, n_in: int):
  """``||w||_c``: the L2 norm over the input axes, ``[*batch, *out]`` in float32."""
  w32 = nodes_lib.materialize(w).astype(jnp.float32)
  return jnp.sqrt(jnp.sum(w32 * w32, axis=tuple(range(n_batch, n_batch + n_in))))


def apply(params, rank: int = 8, *, alpha: float | None = None, targets=None, key=None,
          dropout: float = 0.0, init: Any = "kaiming", rslora: bool = False, dtype=None,
          layout: Callable[[str, tuple], tuple[int, int]] | None = None):
  """Rewrites the target kernels of ``params`` into :class:`DoraWeight` nodes.

  Args:
    params: any parameter pytree.
    rank: LoRA rank ``r`` of the direction's update.
    alpha: scale numerator (``scale = alpha / r``); defaults to ``rank``.
    targets: which kernels (:mod:`peftjax._src.targeting`); default every dense kernel of
      attention and MLP blocks. Embedding tables are refused.
    key: PRNG key for ``A`` (per kernel ``fold_in(key, crc32(path))``); default key 0.
    dropout: dropout rate on the adapter's input, active once :func:`peftjax.set_rng` gives the
      nodes a key (training).
    init: ``A``'s init as in :func:`peftjax.lora.apply`; ``B`` is zero.
    rslora: scale ``alpha / sqrt(r)``.
    dtype: dtype of ``A``, ``B`` and the magnitude (default: the kernel's; float32 for
      quantized bases).
    layout: ``(path, shape) -> (n_batch, n_in)``; default :func:`peftjax.lora.default_layout`.

  Returns:
    The tree with the target kernels replaced by :class:`DoraWeight` nodes, equal to the base
    model at init (``magnitude = ||W||_c``, ``B = 0``).

  Raises:
    ValueError: a bad rank or alpha, a target spec matching nothing, a target that is not a
      linear kernel (embeddings included), a kernel that already has DoRA or LoRA, a rank above
      ``min(d_in, d_out)``.

  >>> import jax.numpy as jnp, peftjax
  >>> params = {"mlp": {"up_proj": {"kernel": jnp.ones((16, 8))}}}
  >>> node = peftjax.dora.apply(params, rank=2)["mlp"]["up_proj"]["kernel"]
  >>> node.a.shape, node.b.shape, node.magnitude.shape, float(node.magnitude[0])
  ((16, 2), (2, 8), (8,), 4.0)
  >>> peftjax.summary(peftjax.dora.apply(params, rank=2)).trainable   # r*(d_in+d_out) + d_out
  56
  """
  rank = variants.check_rank(rank)
  alpha = variants.check_number(rank if alpha is None else alpha, "alpha")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
  scale = alpha / math.sqrt(rank) if rslora else alpha / rank

  def make(k: variants.Kernel):
    if rank > min(k.fan_in, k.fan_out):
      raise ValueError(f"rank={rank} is larger than {k.path} allows: its kernel "
                       f"{list(k.w.shape)} maps {k.fan_in} inputs to {k.fan_out} outputs")
    a = k.stack([_init_a(init, kk, (*k.in_shape, rank), k.fan_in, rank, k.dtype)
                 for kk in k.layer_keys()])
    b = jnp.zeros((*k.batch_shape, rank, *k.out_shape), k.dtype)
    m = column_norm(k.w, k.n_batch, k.n_in).astype(k.dtype)
    return DoraWeight(w=k.w, a=a, b=b, magnitude=m, scale=scale, n_in=k.n_in, dropout=dropout)

  return variants.rewrite_kernels(params, targets, key, dtype, layout,
                                  (DoraWeight, LoraWeight), "DoRA", make)


OPTIONS = (
    method_lib.Option("rank", 8, "LoRA rank r", type=method_lib.positive_int),
    method_lib.Option("alpha", 16.0, "LoRA scale numerator (scale = alpha/r)",
                      type=method_lib.positive_float),
    method_lib.Option("lora_dropout", 0.0, "dropout on the LoRA input while training",
                      kwarg="dropout", type=method_lib.rate),
    method_lib.TARGETS)

METHOD = method_lib.Method(
    name="dora", apply=apply,
    description="weight-decomposed LoRA: trained magnitude x normalized W + (alpha/r) A B",
    options=OPTIONS, step_hook=nodes_lib.set_rng, hf_peft_type="LORA")
