"""LoRA (Hu et al., 2021): a frozen kernel ``W`` plus a trainable low-rank update ``s * A @ B``.

``apply`` rewrites the target kernels of a parameter tree into :class:`LoraWeight` nodes;
``peftjax.lift(fn)`` runs any model on the rewritten tree, computing ``x@W + s*((x@A)@B)``
without forming ``W + s*A@B``; ``peftjax.merge`` folds the update in for export.

Kernel layout. A kernel's axes are ``[*batch, *in, *out]``: ``batch`` are leading layer axes of
layer-stacked (``nn.scan``) parameters, ``in`` the axes contracted with the input, ``out`` the
output features. ``A`` is ``[*batch, *in, r]`` and ``B`` is ``[*batch, r, *out]``. The layout of
each target is chosen by :func:`default_layout` (override with ``layout=``):

* a 2-D kernel is ``[in, out]`` (``nn.Dense``);
* a kernel under a path component named ``layers``/``blocks``/``scan*``/... (the Flax ``nn.scan``
  convention, see :data:`STACKED_PATH`) has one leading layer axis;
* the remaining axes (``DenseGeneral``: ``[d, heads, head_dim]`` or ``[heads, head_dim, d]``)
  are split where the products of the two sides are closest, so ``[d, H, Dh] -> in=[d]`` and
  ``[H, Dh, d] -> in=[H, Dh]``.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

from peftjax._src import nodes as nodes_lib
from peftjax._src import targeting
from peftjax._src.nodes import Node, is_node, node_dataclass, static_field
from peftjax._src import method as method_lib
from peftjax import lora_init

__all__ = ["LoraWeight", "apply", "default_layout", "set_dropout_key", "unmerge"]

#: Path components that mark layer-stacked (``nn.scan``) parameters.
STACKED_PATH = re.compile(r"(?i)(layers|blocks|stack(ed)?|.*scan.*)")


@node_dataclass
class LoraWeight(Node):
  """``w + scale * A @ B`` (contracting the rank axis), with ``w`` frozen and ``a``, ``b`` trained.

  Attributes:
    w: frozen base kernel ``[*batch, *in, *out]`` (an array or a wrappable node, e.g. quantized).
    a: ``[*batch, *in, r]``.
    b: ``[*batch, r, *out]``.
    dropout_key: ``None`` (no dropout) or raw uint32 key data ``[*batch, 2]`` set by
      :func:`set_dropout_key`; frozen.
    scale: ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA).
    n_in: number of input axes. The number of leading layer axes is derived from the leaves
      (``a.ndim - n_in - 1``), so slicing every leaf on axis 0, as ``lax.scan`` does with a
      layer-stacked node, gives the node of one layer.
    dropout: dropout rate on the adapter's input (used only when ``dropout_key`` is set).
    matmul: how ``lift`` computes ``x @ (w + s*A@B)``: ``"factored"`` (``x@w + s*(x@A)@B``, best
      for few tokens, e.g. decoding), ``"merged"`` (one matmul with the merged kernel, recomputed
      in a custom backward pass that never forms a weight gradient; best for training batches),
      or ``"auto"`` (choose per call by the sizes, see :func:`_merge_is_cheaper`; a merged call
      that is not differentiated computes the factored form, cheaper without a backward pass:
      see :func:`_merged_matmul`). A quantized base or active dropout always uses the factored
      form. Except under ``"factored"``, both forms have custom reverse-mode rules (:func:`_merged_matmul`, :func:`_lowrank_matmul`):
      forward-mode AD (``jvp``, ``jacfwd``, Hessians) needs ``"factored"``.
  """

  w: Any
  a: jax.Array
  b: jax.Array
  dropout_key: Any = None
  scale: float = static_field(default=1.0)
  n_in: int = static_field(default=1)
  dropout: float = static_field(default=0.0)
  matmul: str = static_field(default="auto")

  type_id = "lora"
  base_field = "w"
  rng_field = "dropout_key"
  execution_fields = ("matmul",)
  hf_peft_type = "LORA"
  trainable_fields = ("a", "b")


  @property
  def n_batch(self) -> int:
    return self.a.ndim - self.n_in - 1

  def wants_rng(self) -> bool:
    return self.dropout > 0.0

  @property
  def rank(self) -> int:
    return self.a.shape[-1]

  def delta(self) -> jax.Array:
    """``scale * A @ B`` with the shape of ``w`` (in the adapters' dtype)."""
    return _delta(self.a, self.b, self.scale, self.n_in)

  def materialize(self):
    w = nodes_lib.materialize(self.w)
    return (w + self.delta().astype(w.dtype)).astype(w.dtype)

  def _dropout(self, x, x_batch_axes):
    if self.dropout_key is None or self.dropout <= 0.0:
      return x
    if self.n_batch:
      # Stacked node used outside a scan: keys per layer would need the layer axis in x.
      key = self.dropout_key.reshape(-1, 2)[0]
    else:
      key = self.dropout_key
    key = jax.random.wrap_key_data(key)
    keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)

  def dot_general(self, x, dimension_numbers, *, precision=None, preferred_element_type=None):
    (lc, rc), (lb, rb) = dimension_numbers
    nb, ni = self.n_batch, self.n_in
    batch_axes = tuple(range(nb))
    in_axes = tuple(range(nb, nb + ni))
    out_axes = tuple(range(nb + ni, self.ndim))
    if tuple(sorted(rb)) != batch_axes:
      return super().dot_general(x, dimension_numbers, precision=precision,
                                 preferred_element_type=preferred_element_type)
    dot = lambda u, v, dims: lax.dot_general(u, v, dims, precision=precision,
                                             preferred_element_type=preferred_element_type)
    a = self.a.astype(x.dtype)
    b = self.b.astype(x.dtype)
    dropout_active = self.dropout_key is not None and self.dropout > 0.0
    merge = self.matmul == "merged" or (self.matmul == "auto" and
                                        _merge_is_cheaper(x, self, lc, lb))
    if merge and not is_node(self.w) and not dropout_active and tuple(sorted(rc)) == in_axes:
      return _merged_dot(x, self.w, a, b, self.scale, self.n_in, dimension_numbers, precision,
                         preferred_element_type, eval_factored=self.matmul == "auto")
    base = nodes_lib.dot_general(x, self.w, dimension_numbers, precision=precision,
                                 preferred_element_type=preferred_element_type)
    xd = self._dropout(x, lb)
    if tuple(sorted(rc)) == in_axes and self.matmul != "factored":
      # Not merged (few tokens, active dropout, or a base that cannot absorb the update, e.g. a
      # quantized kernel): the low-rank product with its own (reverse-mode) backward pass.
      upd = _lowrank_dot(xd, a, b, self.scale, self.shape, ni, dimension_numbers, precision,
                         preferred_element_type)
      return base + upd.astype(base.dtype)
    n_lb = len(lb)
    if tuple(sorted(rc)) == in_axes:
      # x W = (x A) B: contract x with A over the input axes (same positions in A as in W).
      t = dot(xd, a, ((lc, rc), (lb, rb)))               # [batch, x_free, r]
      t = t * jnp.asarray(self.scale, t.dtype)
      b_batch = tuple(rb)                                # B's batch axes sit where W's do
      upd = dot(t, b, (((t.ndim - 1,), (nb,)), (tuple(range(n_lb)), b_batch)))
    elif tuple(sorted(rc)) == out_axes:
      # x W^T-like use (tied embeddings): x B^T A^T. W's out axis j sits at j - ni + 1 in B.
      rc_b = tuple(c - ni + 1 for c in rc)
      t = dot(xd, b, ((lc, rc_b), (lb, rb)))             # [batch, x_free, r]
      t = t * jnp.asarray(self.scale, t.dtype)
      upd = dot(t, a, (((t.ndim - 1,), (nb + ni,)), (tuple(range(n_lb)), tuple(rb))))
    else:
      return super().dot_general(x, dimension_numbers, precision=precision,
                                 preferred_element_type=preferred_element_type)
    return base + upd.astype(base.dtype)

  def astype(self, dtype):
    # Only the base is cast here; the rule casts A and B to the input's dtype at the matmul,
    # so f32 adapters on a bf16 model stay f32 in the parameter tree.
    w = self.w.astype(dtype)
    return self.replace(w=w)


# -- the matmul rules ---------------------------------------------------------------------------

def _delta(a, b, scale, n_in):
  """``scale * A @ B`` contracting the rank axis: shape ``[*batch, *in, *out]``."""
  n_batch = a.ndim - n_in - 1
  bshape = a.shape[:n_batch]
  in_shape, out_shape = a.shape[n_batch:n_batch + n_in], b.shape[n_batch + 1:]
  rank = a.shape[-1]
  a2 = a.reshape(*bshape, math.prod(in_shape), rank)
  b2 = b.reshape(*bshape, rank, math.prod(out_shape))
  d = jnp.matmul(a2, b2, precision=lax.Precision.HIGHEST) * scale
  return d.reshape(*bshape, *in_shape, *out_shape)


def _merge_is_cheaper(x, node, lc, lb) -> bool:
  """Whether forming ``W + s*A@B`` beats the factored form in memory traffic.

  The factored form moves a few activation-sized arrays per kernel (``x@A``, ``(x@A)@B``, the
  sum, and their transposes in the backward pass: about ``N*(d_in + d_out)`` elements each); the
  merged form moves weight-sized ones (``d_in*d_out``). Training batches (``N`` = tokens in the
  batch, large) favour merging; decoding a few tokens favours the factored form.
  """
  n_batch = node.n_batch
  d_in = math.prod(node.shape[n_batch:n_batch + node.n_in])
  d_out = math.prod(node.shape[n_batch + node.n_in:])
  used = set(lc) | set(lb)
  n_tokens = math.prod(d for i, d in enumerate(x.shape) if i not in used)
  return d_in * d_out <= n_tokens * (d_in + d_out)


def _merged_kernel(w, a, b, scale, n_in, dtype):
  return (w + _delta(a, b, scale, n_in).astype(w.dtype)).astype(dtype)


def _as_matrices(x, w_shape, n_in, dims):
  """``x`` in the canonical ``[M, K]`` form (``[B, M, K]`` with layer-batch axes) for
  ``dot_general(x, w, dims)`` where ``dims`` contracts every input axis of ``w`` (shape
  ``w_shape``) and batches every batch axis: batch axes first, then the free axes, then the
  contracted axes in ``w``'s order (a no-op for the usual ``x[..., d_in] @ w[d_in, d_out]``).

  Returns ``(x2, lead, k, n, back)``: ``lead`` is ``(B,)`` or ``()``, ``k``/``n`` the flattened
  input/output sizes, and ``back`` turns a ``[*lead, M, N]`` result into what ``dot_general``
  returns.
  """
  (lc, rc), (lb, rb) = dims
  nb = len(rb)
  order_b = sorted(range(nb), key=lambda i: rb[i])          # pairs in w's batch-axis order
  order_c = sorted(range(len(rc)), key=lambda i: rc[i])     # pairs in w's input-axis order
  used = set(lc) | set(lb)
  x_free = [d for d in range(x.ndim) if d not in used]
  perm = [lb[i] for i in order_b] + x_free + [lc[i] for i in order_c]
  xt = x if perm == list(range(x.ndim)) else jnp.transpose(x, perm)
  bshape = tuple(w_shape[:nb])
  in_shape, out_shape = tuple(w_shape[nb:nb + n_in]), tuple(w_shape[nb + n_in:])
  free_shape = tuple(x.shape[d] for d in x_free)
  lead = (math.prod(bshape),) if nb else ()
  k, n, m = math.prod(in_shape), math.prod(out_shape), math.prod(free_shape)

  def back(y):
    y = y.reshape(*bshape, *free_shape, *out_shape)
    if order_b != list(range(nb)):  # dot_general orders batch axes as the (lb, rb) pairs are listed
      y = jnp.transpose(y, [*np.argsort(order_b), *range(nb, y.ndim)])
    return y
  return xt.reshape(*lead, m, k), lead, k, n, back


def _merged_dot(x, w, a, b, scale, n_in, dims, precision, preferred_element_type, *,
                eval_factored=False):
  """``dot_general(x, w + scale*A@B, dims)``: one big matmul instead of three.

  ``x`` is brought to the canonical form by :func:`_as_matrices`, ``w``, ``A``, ``B`` to
  ``[K, N]``, ``[K, r]``, ``[r, N]`` by reshapes, and :func:`_merged_matmul` does the work with
  fixed dimension orders (``eval_factored``: see there).
  """
  x2, lead, k, n, back = _as_matrices(x, w.shape, n_in, dims)
  r = a.shape[-1]
  return back(_merged_matmul(x2, w.reshape(*lead, k, n), a.reshape(*lead, k, r),
                             b.reshape(*lead, r, n), scale, precision, preferred_element_type,
                             eval_factored))


def _lowrank_dot(x, a, b, scale, w_shape, n_in, dims, precision, preferred_element_type):
  """``dot_general(x, scale*A@B, dims)`` as ``scale*(x@A)@B`` in the canonical form, by
  :func:`_lowrank_matmul` (the update of an unmerged call: few tokens, active dropout, or a base
  that cannot absorb it, e.g. a quantized kernel)."""
  x2, lead, k, n, back = _as_matrices(x, w_shape, n_in, dims)
  r = a.shape[-1]
  return back(_lowrank_matmul(x2, a.reshape(*lead, k, r), b.reshape(*lead, r, n), scale,
                              precision, preferred_element_type))


def _merged_kernel2(w, a, b, scale, dtype):
  """``w + scale * a@b`` for ``[.., K, N]``, ``[.., K, r]``, ``[.., r, N]``, cast to ``dtype``."""
  d = _mm(a, b, 1, 0, lax.Precision.HIGHEST, None) * scale
  return (w + d.astype(w.dtype)).astype(dtype)


def _mm(u, v, cu, cv, precision, preferred_element_type):
  """``u @ v`` contracting axis ``cu`` of ``u`` with ``cv`` of ``v``, for ``[M, K]`` matrices or
  ``[B, M, K]`` stacks of them (axis numbers count from the matrix, after the batch axis)."""
  nbd = u.ndim - 2
  batch = ((0,), (0,)) if nbd else ((), ())
  return lax.dot_general(u, v, (((cu + nbd,), (cv + nbd,)), batch), precision=precision,
                         preferred_element_type=preferred_element_type)


def _t_in(u):
  """A small (batch of) matrix transposed *before* it enters a dot, as an array of its own: the
  barrier stops XLA from folding the transpose into the dot's dimension numbers, after which its
  layout assignment would transpose the dot's *large* operand instead (docs/performance.md)."""
  return lax.optimization_barrier(jnp.swapaxes(u, -1, -2))


def _t_out(u):
  """A small dot result transposed *after* the dot (the barrier keeps the dot's orientation)."""
  return jnp.swapaxes(lax.optimization_barrier(u), -1, -2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _merged_matmul(x, w, a, b, scale, precision, preferred_element_type, eval_factored):
  """``x @ (w + scale*a@b)`` for ``x [.., M, K]``, ``w [.., K, N]``, ``a [.., K, r]``, ``b [.., r, N]``.

  Custom backward pass, every product in the orientation XLA:CPU runs fastest:

  * ``dx = g @ W'^T`` with ``W' = w + s*A@B`` recomputed (XLA may keep it from the forward);
  * ``dt = g @ (s*B)^T`` (``[M, r]``), ``dB = s * t^T @ g`` with ``t = x@A`` saved from the forward,
    ``dA = (dt^T @ x)^T``: the rank-``r`` factor is the small *left* operand (transposed
    explicitly, ``[r, M]``), so no activation-sized array is transposed or scaled;
  * no ``[K, N]`` weight gradient, unless ``w`` itself is differentiated (``dw = x^T g``).

  Being a ``custom_vjp``, it supports reverse mode (and ``vmap`` of it) but not forward mode:
  use ``matmul="factored"`` for ``jvp``/``jacfwd``/Hessians.

  Merging pays for itself through the backward pass (one ``dx`` matmul instead of three). A call
  that is not differentiated (evaluation, generation) with ``eval_factored`` computes
  ``x@w + (x@a)@(s*b)`` instead, which is cheaper without a backward pass: forming ``W'`` writes a
  weight-sized array per kernel and per call (``matmul="auto"`` sets it; ``"merged"`` keeps the
  merged form everywhere).
  """
  if eval_factored:
    upd, _ = _lowrank_y(x, a, b, scale, precision, preferred_element_type)
    return _mm(x, w.astype(x.dtype), 1, 0, precision, preferred_element_type) + upd
  return _merged_y(x, w, a, b, scale, precision, preferred_element_type)


def _merged_y(x, w, a, b, scale, precision, preferred_element_type):
  wm = _merged_kernel2(w, a, b, scale, x.dtype)
  return _mm(x, wm, 1, 0, precision, preferred_element_type)


def _merged_matmul_fwd(x, w, a, b, scale, precision, preferred_element_type, eval_factored):
  xv, wv, av, bv = x.value, w.value, a.value, b.value
  y = _merged_y(xv, wv, av, bv, scale, precision, preferred_element_type)
  ab = a.perturbed or b.perturbed
  t = _mm(xv, av, 1, 0, precision, preferred_element_type) if ab else None
  # Which inputs need a cotangent rides along as present-or-None residuals.
  return y, (xv, wv, av, bv, t, True if x.perturbed else None, True if w.perturbed else None)


def _merged_matmul_bwd(scale, precision, preferred_element_type, eval_factored, res, g):
  x, w, a, b, t, x_perturbed, w_perturbed = res
  if isinstance(g, SymbolicZero):
    return None, None, None, None
  mm = functools.partial(_mm, precision=precision, preferred_element_type=preferred_element_type)
  g = g.astype(x.dtype)
  dx = dw = da = db = None
  if x_perturbed is not None:
    wm = _merged_kernel2(w, a, b, scale, x.dtype)
    dx = mm(g, wm, 1, 1).astype(x.dtype)                              # g @ W'^T   [M, K]
  if w_perturbed is not None:
    dw = mm(x, g, 0, 0).astype(w.dtype)                               # x^T @ g    [K, N]
  if t is not None:
    s = jnp.asarray(scale, x.dtype)
    dt = mm(g, b * s, 1, 1)                                           # g @ (sB)^T [M, r]
    db = (mm(_t_in(t.astype(x.dtype)), g, 1, 0) * s).astype(b.dtype)      # s t^T @ g  [r, N]
    da = _t_out(mm(_t_in(dt.astype(x.dtype)), x, 1, 0)).astype(a.dtype)   # (dt^T @ x)^T [K, r]
  return dx, dw, da, db


_merged_matmul.defvjp(_merged_matmul_fwd, _merged_matmul_bwd, symbolic_zeros=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _lowrank_matmul(x, a, b, scale, precision, preferred_element_type):
  """``scale * (x @ a) @ b`` for ``x [.., M, K]``, ``a [.., K, r]``, ``b [.., r, N]``.

  The backward pass of :func:`_merged_matmul` without the base: ``dt = g @ (s*B)^T``,
  ``dx = dt @ A^T``, ``dB = s * t^T @ g``, ``dA = (dt^T @ x)^T`` with the rank-``r`` factor as the
  small left operand, so the ``[M, N]`` cotangent is never written transposed (with plain autodiff
  XLA:CPU wrote it transposed for ``dB``, fused into the activation's backward: 13 ms per MLP
  kernel, the QLoRA step's largest op; docs/performance.md). Reverse mode only, like the merged
  rule.
  """
  return _lowrank_y(x, a, b, scale, precision, preferred_element_type)[0]


def _lowrank_y(x, a, b, scale, precision, preferred_element_type):
  """``(scale * t @ b, t)`` with ``t = x @ a``, both factors in ``x``'s dtype."""
  t = _mm(x, a.astype(x.dtype), 1, 0, precision, preferred_element_type)
  y = _mm(t.astype(x.dtype), b.astype(x.dtype) * jnp.asarray(scale, x.dtype), 1, 0, precision,
          preferred_element_type)
  return y, t


def _lowrank_matmul_fwd(x, a, b, scale, precision, preferred_element_type):
  xv, av, bv = x.value, a.value, b.value
  y, t = _lowrank_y(xv, av, bv, scale, precision, preferred_element_type)
  return y, (xv, av, bv, t, True if x.perturbed else None,
             True if (a.perturbed or b.perturbed) else None)


def _lowrank_matmul_bwd(scale, precision, preferred_element_type, res, g):
  x, a, b, t, x_perturbed, ab_perturbed = res
  if isinstance(g, SymbolicZero):
    return None, None, None
  mm = functools.partial(_mm, precision=precision, preferred_element_type=preferred_element_type)
  g = g.astype(x.dtype)
  s = jnp.asarray(scale, x.dtype)
  dt = mm(g, b.astype(x.dtype) * s, 1, 1).astype(x.dtype)               # g @ (sB)^T [M, r]
  dx = da = db = None
  if x_perturbed is not None:
    dx = mm(dt, a.astype(x.dtype), 1, 1).astype(x.dtype)                 # dt @ A^T   [M, K]
  if ab_perturbed is not None:
    db = (mm(_t_in(t.astype(x.dtype)), g, 1, 0) * s).astype(b.dtype)    # s t^T @ g  [r, N]
    da = _t_out(mm(_t_in(dt), x, 1, 0)).astype(a.dtype)                 # (dt^T @ x)^T [K, r]
  return dx, da, db


_lowrank_matmul.defvjp(_lowrank_matmul_fwd, _lowrank_matmul_bwd, symbolic_zeros=True)


# -- layout -----------------------------------------------------------------------------------

def checked_layout(layout, path: str, shape: tuple[int, ...]) -> tuple[int, int]:
  """``layout(path, shape)``, checked: ``n_batch >= 0``, ``n_in >= 1`` and an output axis left.

  Raises:
    ValueError: a layout that does not fit the kernel (naming the path, shape and values).
  """
  n_batch, n_in = layout(path, shape)
  if not (0 <= n_batch and 1 <= n_in and n_batch + n_in < len(shape)):
    raise ValueError(f"layout for {path} {list(shape)} gave n_batch={n_batch}, n_in={n_in}; "
                     f"need n_batch >= 0, n_in >= 1 and at least one output axis")
  return n_batch, n_in


def default_layout(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
  """``(n_batch, n_in)`` for a kernel: see the module docstring."""
  ndim = len(shape)
  n_batch = 0
  if ndim >= 3 and any(STACKED_PATH.fullmatch(c) for c in path.split("/")[:-1]):
    n_batch = 1
  rest = shape[n_batch:]
  if len(rest) == 2:
    return n_batch, 1
  best = min(range(1, len(rest)),
             key=lambda i: (abs(math.log(math.prod(rest[:i])) - math.log(math.prod(rest[i:]))), i))
  return n_batch, best




def _init_a(init, key, shape, fan_in, rank, dtype):
  if callable(init):
    return jnp.asarray(init(key, shape, dtype), dtype)
  if init in ("kaiming", "kaiming_uniform", True, "default"):
    # torch's kaiming_uniform_(a=sqrt(5)) as in HF PEFT: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)
  if init == "gaussian":
    return (jax.random.normal(key, shape, jnp.float32) / rank).astype(dtype)
  raise ValueError(f"init={init!r} is not supported; use 'kaiming', 'gaussian' or a callable "
                   f"(key, shape, dtype) -> array")


def apply(params, rank: int = 8, *, alpha: float | None = None, targets=None, key=None,
          dropout: float = 0.0, init: Any = "kaiming", rslora: bool = False, dtype=None,
          layout: Callable[[str, tuple], tuple[int, int]] | None = None, matmul: str = "auto",
          loftq_iter: int = 1, loftq_quant: dict | None = None):
  """Rewrites the target kernels of ``params`` into :class:`LoraWeight` nodes.

  Args:
    params: any parameter pytree (Flax linen ``variables``/``params``, NNX ``State``, dicts).
    rank: LoRA rank ``r`` (> 0, at most ``min(prod(in), prod(out))`` of every target).
    alpha: scale numerator; the update is ``(alpha / r) * A @ B``. Defaults to ``rank``.
    targets: which kernels (see :mod:`peftjax._src.targeting`): ``None`` = every dense kernel of
      attention and MLP blocks; a regex over ``"a/b/kernel"`` paths; module names; a callable.
    key: PRNG key for ``A``; each kernel's key is ``fold_in(key, crc32(path))``. Default key 0.
    dropout: dropout rate on the adapter's input, active once :func:`set_dropout_key` gives the
      nodes a key (training), inactive otherwise (evaluation).
    init: ``"kaiming"`` or ``"default"`` (HF PEFT's default, ``U(+-1/sqrt(fan_in))``),
      ``"gaussian"`` (``N(0, 1/r^2)``) or a callable ``(key, shape, dtype)``: ``B`` is zero, so
      the model is unchanged at init. ``"pissa"``, ``"pissa_niter_K"``, ``"olora"``: ``A``, ``B``
      from the kernel's SVD / QR and the base replaced by the residual ``W - s A B`` (the model
      is unchanged); ``"loftq"``: the base quantized and ``A``, ``B`` fitted to the quantization
      error (see :mod:`peftjax.lora_init`).
    loftq_iter: LoftQ's alternating quantize / low-rank steps (``init="loftq"`` only).
    loftq_quant: how LoftQ quantizes: keywords of :func:`peftjax.quant.quantize` (``format``,
      ``block_size``, ``double_quant``, ``compute_dtype``, ...); default NF4, blocks of 64.
    rslora: scale ``alpha / sqrt(r)`` (Kalajdzievski, 2023) instead of ``alpha / r``.
    dtype: dtype of ``A`` and ``B``; defaults to the kernel's dtype (float32 for quantized bases
      and LoftQ).
    layout: ``(path, shape) -> (n_batch, n_in)``; defaults to :func:`default_layout`.
    matmul: ``"auto"``, ``"factored"`` or ``"merged"``: see :class:`LoraWeight`.

  Returns:
    The same tree with target kernels replaced by :class:`LoraWeight` nodes.

  Raises:
    ValueError: bad rank/alpha/dropout/init, a target that matches nothing, a target that is not
      a kernel, a kernel that already has LoRA, or PiSSA/OLoRA/LoftQ on a quantized kernel.

  >>> import jax.numpy as jnp, peftjax
  >>> params = {"attn": {"q_proj": {"kernel": jnp.zeros((16, 16))}}, "norm": {"scale": jnp.ones(16)}}
  >>> tuned = peftjax.lora.apply(params, rank=4)
  >>> tuned["attn"]["q_proj"]["kernel"].a.shape, tuned["attn"]["q_proj"]["kernel"].b.shape
  ((16, 4), (4, 16))
  """
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
    raise ValueError(f"rank must be a positive integer, got {rank!r}")
  alpha = float(rank if alpha is None else alpha)
  if not math.isfinite(alpha):
    raise ValueError(f"alpha must be a finite number, got {alpha!r}")
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
  if matmul not in ("auto", "factored", "merged"):
    raise ValueError(f"matmul must be 'auto', 'factored' or 'merged', got {matmul!r}")
  lora_init.check_init(init)
  scale = alpha / math.sqrt(rank) if rslora else alpha / rank
  key = jax.random.key(0) if key is None else key
  if isinstance(key, jax.Array) and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  layout = layout or default_layout

  chosen = targeting.select(params, targets)
  for path, leaf in chosen:
    if isinstance(leaf, LoraWeight):
      raise ValueError(f"{path} already has LoRA (rank {leaf.rank}); apply LoRA once per kernel, "
                       f"or merge first with peftjax.merge")
    if not targeting.is_kernel_like(leaf):
      raise ValueError(f"target {path} is not a kernel (a floating array with ndim >= 2): got "
                       f"{targeting.describe_leaf(leaf)}; narrow `targets`")

  def rewrite(path, w):
    shape = tuple(w.shape)
    n_batch, n_in = checked_layout(layout, path, shape)
    bshape = shape[:n_batch]
    in_shape, out_shape = shape[n_batch:n_batch + n_in], shape[n_batch + n_in:]
    fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
    if rank > min(fan_in, fan_out):
      raise ValueError(f"rank={rank} is larger than {path} allows: its kernel {list(shape)} maps "
                       f"{fan_in} inputs to {fan_out} outputs, so rank <= {min(fan_in, fan_out)}")
    adt = jnp.dtype(dtype) if dtype is not None else (
        jnp.dtype(w.dtype) if jnp.issubdtype(w.dtype, jnp.floating) and not is_node(w)
        and init != "loftq" else jnp.dtype(jnp.float32))
    k = targeting.path_key(key, path)
    if lora_init.modifies_base(init):
      w, a, b = lora_init.initialize(init, w, rank=rank, scale=scale, layout=(n_batch, n_in),
                                     dtype=adt, key=k, path=path, loftq_iter=loftq_iter,
                                     loftq_quant=loftq_quant)
      return LoraWeight(w=w, a=a, b=b, scale=scale, n_in=n_in, dropout=dropout, matmul=matmul)
    n_layers = math.prod(bshape)
    ks = jax.random.split(k, n_layers) if n_batch else k[None]
    a = jnp.stack([_init_a(init, kk, (*in_shape, rank), fan_in, rank, adt) for kk in ks])
    a = a.reshape(*bshape, *in_shape, rank)
    b = jnp.zeros((*bshape, rank, *out_shape), adt)
    return LoraWeight(w=w, a=a, b=b, scale=scale, n_in=n_in, dropout=dropout, matmul=matmul)

  return targeting.map_selected(rewrite, params, {p for p, _ in chosen})


#: Gives every :class:`LoraWeight` with ``dropout > 0`` a fresh dropout key (per node, per layer);
#: ``key=None`` for evaluation. The same function as :func:`peftjax.set_rng`.
set_dropout_key = nodes_lib.set_rng


def unmerge(merged, tuned):
  """Recovers the LoRA tree from merged kernels: ``w = merged - scale * A @ B``.

  Args:
    merged: a plain tree as produced by ``peftjax.merge(tuned)`` (possibly modified elsewhere).
    tuned: the LoRA tree whose adapters were merged.

  Returns:
    ``tuned`` with every ``LoraWeight.w`` replaced by ``merged - delta`` (other leaves from
    ``merged``).
  """
  def visit(m, t):
    if isinstance(t, LoraWeight):
      if tuple(m.shape) != t.shape:
        raise ValueError(f"merged kernel shape {list(m.shape)} != LoRA kernel shape {list(t.shape)}")
      if is_node(t.w):
        raise ValueError("unmerge needs a plain base kernel; for quantized bases use "
                         "peftjax.qlora.merge_requantized")
      return t.replace(w=(m - t.delta().astype(m.dtype)).astype(m.dtype))
    return m
  return jax.tree_util.tree_map(visit, merged, tuned, is_leaf=is_node)


#: LoRA's command-line options (QLoRA shares them).
OPTIONS = (
    method_lib.Option("rank", 8, "LoRA rank r", type=method_lib.positive_int),
    method_lib.Option("alpha", 16.0, "LoRA scale numerator (scale = alpha/r)",
                      type=method_lib.positive_float),
    method_lib.Option("lora_dropout", 0.0, "dropout on the LoRA input while training",
                      kwarg="dropout", type=method_lib.rate),
    method_lib.Option("init", "default", "LoRA initialization: default, gaussian, pissa, "
                      "pissa_niter_K, olora, loftq (see peftjax.lora_init)",
                      type=lora_init.check_init),
    method_lib.Option("loftq_iter", 1, "LoftQ's alternating quantize / low-rank steps",
                      type=method_lib.positive_int),
    method_lib.TARGETS)

METHOD = method_lib.Method(
    name="lora", apply=apply, description="low-rank update W + (alpha/r) A B on the linear layers",
    options=OPTIONS, step_hook=nodes_lib.set_rng, hf_peft_type="LORA")
