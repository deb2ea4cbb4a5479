"""OFT (Qiu et al., 2023): a trained block-diagonal orthogonal rotation of the kernel's input.

For a kernel ``W [d_in, d_out]`` with ``d_in = n_blocks * b``::

    W' = diag(R_1, ..., R_nblocks) @ W,     R_i = cayley(Q_i),  Q_i = S_i - S_i^T

with ``S_i`` strictly upper-triangular, holding ``b(b-1)/2`` trained entries per block (HF PEFT's
``oft_R.weight [n_blocks, b(b-1)/2]``, filled row-major as ``torch.triu_indices(b, b, 1)``).
The Cayley transform is HF PEFT's: by default its truncated Neumann series
``R = I + 2Q + 2Q^2 + ... + 2Q^(t-2) + Q^(t-1)`` (``t = num_cayley_neumann_terms``, 5), or
exactly ``R = (I - Q)(I + Q)^{-1}`` with ``cayley_neumann=False``. ``Q = 0`` at init, so
``R = I`` and the model is unchanged. Under ``lift`` the rule rotates the input instead of the
kernel, ``(x_blocks @ R) @ W``, a cheap batched matmul of ``[.., n_blocks, b]``; the merged
form is exact (``peftjax.merge``). Parameters per kernel: ``d_in (b - 1) / 2``.

HF PEFT format: ``OFT`` with ``oft_block_size``, ``<module>.oft_R.weight``.
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

__all__ = ["OftWeight", "apply", "rotations"]


def rotations(q_vec, block_size: int, neumann: bool = True, terms: int = 5):
  """``[n_blocks, b(b-1)/2]`` -> the blocks' rotations ``[n_blocks, b, b]`` (HF PEFT's
  ``_cayley_batch``), computed in float32.

  >>> import jax.numpy as jnp
  >>> r = rotations(jnp.zeros((2, 3)), 3)
  >>> r.shape, bool((r == jnp.eye(3)).all())
  ((2, 3, 3), True)
  """
  q_vec = q_vec.astype(jnp.float32)
  rows, cols = np.triu_indices(block_size, 1)
  s = jnp.zeros((*q_vec.shape[:-1], block_size, block_size), jnp.float32)
  s = s.at[..., rows, cols].set(q_vec)
  q = s - jnp.swapaxes(s, -1, -2)
  eye = jnp.broadcast_to(jnp.eye(block_size, dtype=jnp.float32), q.shape)
  hi = lax.Precision.HIGHEST
  if not neumann:
    # X (I + Q) = I - Q  ->  X = (I - Q)(I + Q)^{-1}: solve (I + Q)^T X^T = (I - Q)^T.
    xt = jnp.linalg.solve(jnp.swapaxes(eye + q, -1, -2), jnp.swapaxes(eye - q, -1, -2))
    return jnp.swapaxes(xt, -1, -2)
  r = eye
  if terms > 1:
    r = r + 2.0 * q
    if terms > 2:
      q2 = jnp.matmul(q, q, precision=hi)
      r = r + 2.0 * q2
      power = q2
      for _ in range(3, terms - 1):
        power = jnp.matmul(power, q, precision=hi)
        r = r + 2.0 * power
      power = jnp.matmul(power, q, precision=hi)
      r = r + power
  return r


@node_dataclass
class OftWeight(Node):
  """``blockdiag(cayley(Q_1), ..., cayley(Q_n)) @ w`` over the flattened input axes.

  Attributes:
    w: frozen base kernel ``[*batch, *in, *out]`` (an array or a quantized node).
    q: ``[*batch, n_blocks, b(b-1)/2]``: the skew-symmetric generators' upper triangles
      (``n_blocks = 1`` with ``block_share``: one rotation for every block).
    block_size: ``b``; must divide ``prod(in)``.
    n_in: number of input axes (the layer axes are ``q.ndim - 2``).
    neumann: HF PEFT's ``use_cayley_neumann``.
    terms: HF PEFT's ``num_cayley_neumann_terms``.
  """

  w: Any
  q: jax.Array
  block_size: int = static_field(default=32)
  n_in: int = static_field(default=1)
  neumann: bool = static_field(default=True)
  terms: int = static_field(default=5)

  type_id = "oft"
  base_field = "w"
  hf_peft_type = "OFT"
  trainable_fields = ("q",)

  @property
  def n_batch(self) -> int:
    return self.q.ndim - 2

  def _rotations(self, n_blocks):
    """``[n_blocks, b, b]`` for one layer (``block_share`` repeats the single rotation)."""
    r = rotations(self.q, self.block_size, self.neumann, self.terms)
    return jnp.broadcast_to(r, (n_blocks, *r.shape[-2:])) if r.shape[0] == 1 else r

  def materialize(self):
    w = nodes_lib.materialize(self.w)
    nb, bsz = self.n_batch, self.block_size

    def one(node, w):
      w2 = variants.flat(w, 0, node.n_in).astype(jnp.float32)
      k, n = w2.shape
      r = node._rotations(k // bsz)
      out = jnp.einsum("bij,bjn->bin", r, w2.reshape(k // bsz, bsz, n),
                       precision=lax.Precision.HIGHEST)
      return out.reshape(k, n)

    node = self.replace(w=jnp.zeros(self.q.shape[:nb]))
    return variants.per_layer(one, nb, node, w).reshape(self.shape).astype(w.dtype)

  def dot_general(self, x, dimension_numbers, *, precision=None, preferred_element_type=None):
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)

    def rule(x2, node):
      k, bsz = x2.shape[-1], node.block_size
      lead = x2.shape[:-1]
      r = node._rotations(k // bsz).astype(x2.dtype)
      xb = x2.reshape(*lead, k // bsz, bsz)
      nl = len(lead)
      # x_rot[.., i, c] = sum_j x[.., i, j] R_i[j, c]: batch over the block axis
      xr = lax.dot_general(xb, r, (((nl + 1,), (1,)), ((nl,), (0,))), **kw)   # [i, .., c]
      xr = jnp.moveaxis(xr, 0, nl).reshape(*lead, k).astype(x2.dtype)
      return variants.base_dot(xr, node.w, node.n_in, **kw)

    out = variants.plain_dot(self, x, dimension_numbers, rule)
    return super().dot_general(x, dimension_numbers, **kw) if out is None else out

  def astype(self, dtype):
    return self.replace(w=self.w.astype(dtype))

  # -- Hugging Face PEFT -------------------------------------------------------------------------
  hf_peft_parts = ("oft_R.weight",)
  hf_peft_fields = ("r", "oft_block_size", "module_dropout", "target_modules", "fan_in_fan_out",
                    "bias", "exclude_modules", "init_weights", "layers_to_transform",
                    "layers_pattern", "coft", "eps", "block_share", "use_cayley_neumann",
                    "num_cayley_neumann_terms")

  def hf_peft_tensors(self) -> list[dict]:
    q = variants.np_(self.q)
    q = q.reshape(-1, *q.shape[self.n_batch:]) if self.n_batch else q[None]
    return [{"oft_R.weight": q[i]} for i in range(len(q))]

  def hf_peft_settings(self) -> dict:
    return {"block_size": self.block_size, "share": self.q.shape[-2] == 1 and
            math.prod(self.shape[self.n_batch:self.n_batch + self.n_in]) != self.block_size,
            "neumann": self.neumann, "terms": self.terms}

  @classmethod
  def hf_peft_config(cls, nodes, settings) -> tuple[dict, list]:
    for field in ("block_size", "share", "neumann", "terms"):
      vals = {s[field] for s in settings.values()}
      if len(vals) > 1:
        raise ValueError(f"OFT nodes have different {field} values {sorted(vals)}; an HF PEFT OFT "
                         "adapter has one (no per-module pattern): save each separately")
    s = next(iter(settings.values()))
    config = {"peft_type": "OFT", "r": 0, "oft_block_size": s["block_size"],
              "module_dropout": 0.0, "fan_in_fan_out": False, "bias": "none",
              "init_weights": True, "layers_to_transform": None, "layers_pattern": None,
              "exclude_modules": None, "coft": False, "eps": 6e-5, "block_share": s["share"],
              "use_cayley_neumann": s["neumann"], "num_cayley_neumann_terms": s["terms"]}
    return config, []

  @classmethod
  def check_hf_peft_config(cls, cfg: dict, cfg_path):
    if cfg.get("coft"):
      raise ValueError(f"{cfg_path}: coft=True (constrained OFT projects the weights at every "
                       "forward pass) is not supported by peftjax OFT")
    for field in ("r", "oft_block_size"):
      v = cfg.get(field, 0)
      if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{cfg_path}: {field!r} must be an integer >= 0, got {v!r}")
    if (cfg.get("r", 0) == 0) == (cfg.get("oft_block_size", 0) == 0):
      raise ValueError(f"{cfg_path}: exactly one of 'r' and 'oft_block_size' must be non-zero, "
                       f"got r={cfg.get('r')!r}, oft_block_size={cfg.get('oft_block_size')!r}")

  @classmethod
  def hf_peft_parts_for(cls, cfg, module, fan_in, fan_out):
    return cls.hf_peft_parts

  @classmethod
  def from_hf_peft(cls, w, n_batch, n_in, layers, keys, modules, adapter, dtype):
    where, cfg = adapter.weights_path, adapter.config
    shape = tuple(w.shape)
    fan_in = math.prod(shape[n_batch:n_batch + n_in])
    r, bsz = cfg.get("r", 0), cfg.get("oft_block_size", 0)
    if bsz == 0:
      bsz = fan_in // r
    if bsz <= 0 or fan_in % bsz:
      raise ValueError(f"{where}: oft_block_size {bsz} (r={r}) does not divide the {fan_in} "
                       f"inputs of {modules[0]} (HF PEFT adjusts it with a warning; peftjax "
                       "needs the adapter's own block size)")
    n_blocks = 1 if cfg.get("block_share") else fan_in // bsz
    qs = []
    for parts, ks in zip(layers, keys):
      variants.expect_shape(where, ks["oft_R.weight"], parts["oft_R.weight"],
                            (n_blocks, bsz * (bsz - 1) // 2),
                            f"{n_blocks} blocks of size {bsz}")
      qs.append(parts["oft_R.weight"])
    q = np.stack(qs) if n_batch else qs[0]
    return cls(w=w, q=jnp.asarray(q, dtype), block_size=bsz, n_in=n_in,
               neumann=bool(cfg.get("use_cayley_neumann", True)),
               terms=int(cfg.get("num_cayley_neumann_terms", 5)))


def apply(params, block_size: int = 32, *, targets=None, block_share: bool = False,
          cayley_neumann: bool = True, neumann_terms: int = 5, dtype=None,
          layout: Callable[[str, tuple], tuple[int, int]] | None = None):
  """Rewrites the target kernels of ``params`` into :class:`OftWeight` nodes (identity rotations).

  Args:
    params: any parameter pytree.
    block_size: ``b``, the size of each orthogonal block; must divide every target's ``d_in``
      (HF PEFT's ``oft_block_size``, default 32).
    targets: which kernels (:mod:`peftjax._src.targeting`); default every dense kernel of
      attention and MLP blocks. Embedding tables are refused.
    block_share: one rotation shared by all blocks of a kernel.
    cayley_neumann: the truncated Neumann series (HF PEFT's default) instead of the exact
      Cayley transform.
    neumann_terms: terms of the series.
    dtype: dtype of ``Q`` (default: the kernel's; float32 for quantized bases).
    layout: ``(path, shape) -> (n_batch, n_in)``; default :func:`peftjax.lora.default_layout`.

  Returns:
    The tree with target kernels replaced by :class:`OftWeight` nodes with ``Q = 0`` (the model
    is unchanged at init): ``d_in (b - 1) / 2`` trainable parameters per kernel.

  Raises:
    ValueError: a block size that does not divide a target's input size (naming it), a bad
      option, a target spec matching nothing, a target that is not a linear kernel.

  >>> import jax.numpy as jnp, peftjax
  >>> tuned = peftjax.oft.apply({"up_proj": {"kernel": jnp.ones((16, 8))}}, block_size=4)
  >>> tuned["up_proj"]["kernel"].q.shape, peftjax.summary(tuned).trainable   # d_in (b-1)/2
  ((4, 6), 24)
  """
  block_size = variants.check_rank(block_size, "block_size")
  if block_size < 2:
    raise ValueError(f"block_size must be at least 2 (a 1x1 rotation is the identity), got "
                     f"{block_size}")
  neumann_terms = variants.check_rank(neumann_terms, "neumann_terms")

  def check(kernels):
    for k in kernels:
      if k.fan_in % block_size:
        raise ValueError(f"OFT block_size={block_size} does not divide the {k.fan_in} inputs of "
                         f"{k.path} (kernel {list(k.w.shape)}); choose a divisor of every "
                         "target's input size, or narrow `targets`")

  def make(k: variants.Kernel):
    n_blocks = 1 if block_share else k.fan_in // block_size
    q = jnp.zeros((*k.batch_shape, n_blocks, block_size * (block_size - 1) // 2), k.dtype)
    return OftWeight(w=k.w, q=q, block_size=block_size, n_in=k.n_in,
                     neumann=bool(cayley_neumann), terms=neumann_terms)

  return variants.rewrite_kernels(params, targets, None, dtype, layout, (OftWeight,), "OFT",
                                  make, check)


OPTIONS = (
    method_lib.Option("block_size", 32, "OFT block size (must divide every target's d_in)",
                      type=method_lib.positive_int),
    method_lib.TARGETS)

METHOD = method_lib.Method(
    name="oft", apply=apply,
    description="block-diagonal orthogonal (Cayley) rotation of the kernel's input: R W",
    options=OPTIONS, hf_peft_type="OFT", learning_rate=1e-3)
