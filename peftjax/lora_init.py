"""LoRA initializations that start from the base weight: PiSSA, OLoRA, LoftQ.

:func:`peftjax.lora.apply` takes ``init=`` (see :data:`INITS`). ``"default"``/``"kaiming"`` and
``"gaussian"`` draw ``A`` at random with ``B = 0``, so the model is unchanged. The inits here
instead take ``A`` and ``B`` from a decomposition of the kernel and change the base so that the
model still starts where it was (PiSSA, OLoRA) or closer to the full-precision model than plain
QLoRA does (LoftQ). With ``W`` the kernel as a ``[K, N]`` matrix (``K = prod(in)``,
``N = prod(out)``), ``s`` the LoRA scale (``alpha / r``) and ``r`` the rank; the definitions are HF
PEFT's (``peft/tuners/lora/layer.py``, ``peft/utils/loftq_utils.py``) written in peftjax's kernel
layout (HF's ``lora_A`` is our ``a`` transposed, its ``lora_B`` our ``b`` transposed):

* ``"pissa"`` (Meng et al., 2024): ``W = U S V^T`` (SVD), ``A = U_r sqrt(S_r / s)``,
  ``B = sqrt(S_r / s) V_r^T``, base ``W - s A B`` (the residual, without the principal
  components). ``"pissa_niter_K"``: the top ``r`` singular triplets from a randomized SVD with
  ``K`` subspace iterations (Halko et al. 2011, as ``torch.svd_lowrank``), far cheaper for big
  kernels; the key of the node's path draws the sketch.
* ``"olora"`` (Büyükakyüz, 2024): ``W^T = Q R`` (QR), ``A = R_r^T`` (first ``r`` rows of ``R``),
  ``B = Q_r^T`` (first ``r`` columns of ``Q``), base ``W - s A B``. Unlike PiSSA, HF PEFT does not
  divide by ``s`` here; neither do we.
* ``"loftq"`` (Li et al., 2023), for a quantized base: starting from ``R = W``, ``loftq_iter``
  times: ``Q = quantize(R)``; the best rank-``r`` approximation ``L`` of ``W - deq(Q)`` (SVD);
  ``R = W - L``. The base is the last ``Q``, and ``s A B = L`` with ``A = U_r sqrt(S_r / s)``,
  ``B = sqrt(S_r / s) V_r^T`` from the last SVD. The starting error ``||W - (deq(Q) + s A B)||``
  is below plain QLoRA's ``||W - deq(quantize(W))||`` (already after one iteration: ``L`` is
  the best rank-``r`` fit of exactly that error). HF PEFT's LoftQ puts ``L`` into ``B A``
  without dividing by ``s``, which is exact only for ``alpha = r``; here the scale is divided
  out as for PiSSA, so the error drops for any ``alpha``.

Layer-stacked kernels (``[L, K, N]``) get one decomposition per layer (batched ``svd``/``qr``;
``vmap`` over the layers for the randomized SVD). The decompositions run in float32; the
residual base is cast back to the kernel's dtype, ``A`` and ``B`` to the adapters' dtype.

PiSSA and OLoRA change the base, so an adapter trained from them applies to the *residual* base
only. :func:`convert_to_lora` rewrites a trained tree into plain LoRA on the *original* base
(``A' = [A, A0]``, ``B' = [B; -B0]``, rank ``2r``, as HF PEFT's ``save_pretrained(...,
path_initial_model_for_weight_conversion=...)`` does), which :func:`peftjax.io.hf_peft.save_hf_peft`
then writes as an ordinary LoRA adapter (``r`` and ``lora_alpha`` doubled).

>>> import jax, jax.numpy as jnp, peftjax
>>> w = jax.random.normal(jax.random.key(0), (32, 16))
>>> node = peftjax.lora.apply({"mlp": {"up": {"kernel": w}}}, rank=4, init="pissa")["mlp"]["up"]["kernel"]
>>> bool(jnp.allclose(peftjax.merge(node), w, atol=1e-5))    # residual + adapter == W
True
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax

from peftjax._src import targeting
from peftjax._src.nodes import is_node

__all__ = ["INITS", "check_init", "modifies_base", "initialize", "pissa", "olora", "loftq",
           "convert_to_lora", "quantization_error"]

#: The string values of ``peftjax.lora.apply(init=...)`` (and ``pissa_niter_K`` for K >= 1).
INITS = ("default", "kaiming", "gaussian", "pissa", "pissa_niter_K", "olora", "loftq")

_RANDOM = ("default", "kaiming", "kaiming_uniform", "gaussian")
_NITER = re.compile(r"pissa_niter_(\d+)")
_HI = lax.Precision.HIGHEST

#: How LoftQ quantizes when no ``loftq_quant`` is given: QLoRA's NF4, blocks of 64, double quant.
LOFTQ_QUANT = {"format": "nf4", "block_size": 64, "double_quant": True}


def check_init(init) -> Any:
  """Returns ``init`` if it is a known initialization (a string of :data:`INITS`, ``True`` or a
  callable ``(key, shape, dtype) -> A``).

  Raises:
    ValueError: anything else (naming the accepted values).
  """
  if callable(init) or init is True or init in _RANDOM or init in ("pissa", "olora", "loftq"):
    return init
  if isinstance(init, str):
    m = _NITER.fullmatch(init)
    if m and int(m.group(1)) >= 1:
      return init
  raise ValueError(f"init={init!r} is not supported; use 'kaiming' ('default'), 'gaussian', "
                   f"'pissa', 'pissa_niter_K' (K >= 1 subspace iterations), 'olora', 'loftq' or a "
                   f"callable (key, shape, dtype) -> array")


def modifies_base(init) -> bool:
  """Whether ``init`` takes ``A``, ``B`` from the kernel and changes the base (PiSSA/OLoRA/LoftQ)."""
  return isinstance(init, str) and (init in ("pissa", "olora", "loftq")
                                    or _NITER.fullmatch(init) is not None)


def _matrix(w, n_batch: int, n_in: int):
  """``w [*S, *I, *O]`` as float32 ``[*S, K, N]``."""
  shape = tuple(w.shape)
  k = math.prod(shape[n_batch:n_batch + n_in])
  return jnp.asarray(w, jnp.float32).reshape(*shape[:n_batch], k, math.prod(shape[n_batch + n_in:]))


def _split_sv(u, s_vals, vt, rank: int, scale: float):
  """``A = U_r sqrt(S_r/s)``, ``B = sqrt(S_r/s) V_r^T`` (so ``s A B = U_r S_r V_r^T``)."""
  root = jnp.sqrt(s_vals[..., :rank] / scale)
  return u[..., :, :rank] * root[..., None, :], root[..., :, None] * vt[..., :rank, :]


def _randomized_svd(m, rank: int, niter: int, key):
  """Top ``rank`` singular triplets of one ``[K, N]`` matrix (``torch.svd_lowrank``'s scheme:
  a Gaussian sketch, ``niter`` QR-orthonormalized power iterations, an exact SVD of the small
  projection)."""
  x = jnp.matmul(m, jax.random.normal(key, (m.shape[1], rank), jnp.float32), precision=_HI)
  q = jnp.linalg.qr(x)[0]
  for _ in range(niter):
    q = jnp.linalg.qr(jnp.matmul(m.T, q, precision=_HI))[0]
    q = jnp.linalg.qr(jnp.matmul(m, q, precision=_HI))[0]
  u, s_vals, vt = jnp.linalg.svd(jnp.matmul(q.T, m, precision=_HI), full_matrices=False)
  return jnp.matmul(q, u, precision=_HI), s_vals, vt


def pissa(m, rank: int, scale: float, *, niter: Optional[int] = None, key=None):
  """PiSSA on ``m [*S, K, N]`` (float32): ``(residual, A [*S, K, r], B [*S, r, N])``.

  ``niter=None``: the full SVD; an int: the randomized SVD with that many subspace iterations
  (needs ``key``; one key per layer of a stacked ``m``).
  """
  if niter is None:
    u, s_vals, vt = jnp.linalg.svd(m, full_matrices=False)
  else:
    lead = m.shape[:-2]
    flat = m.reshape(-1, *m.shape[-2:])
    keys = jax.random.split(key, flat.shape[0])
    u, s_vals, vt = jax.vmap(lambda x, k: _randomized_svd(x, rank, niter, k))(flat, keys)
    u, s_vals, vt = (t.reshape(*lead, *t.shape[1:]) for t in (u, s_vals, vt))
  a, b = _split_sv(u, s_vals, vt, rank, scale)
  return m - scale * jnp.matmul(a, b, precision=_HI), a, b


def olora(m, rank: int, scale: float):
  """OLoRA on ``m [*S, K, N]`` (float32): ``(residual, A [*S, K, r], B [*S, r, N])`` with
  ``m^T = Q R``, ``A = R[:r]^T``, ``B = Q[:, :r]^T``."""
  q, r_ = jnp.linalg.qr(jnp.swapaxes(m, -1, -2))             # [*S, N, k], [*S, k, K]
  a = jnp.swapaxes(r_[..., :rank, :], -1, -2)
  b = jnp.swapaxes(q[..., :, :rank], -1, -2)
  return m - scale * jnp.matmul(a, b, precision=_HI), a, b


def loftq(w, rank: int, scale: float, *, n_batch: int, n_in: int, num_iter: int = 1,
          quant: Optional[dict] = None, path: str = "<array>"):
  """LoftQ for one kernel ``w [*S, *I, *O]``: ``(QuantizedWeight, A [*S, K, r], B [*S, r, N])``.

  ``quant``: keywords of :func:`peftjax._src.quant.core.quantize_array` (default
  :data:`LOFTQ_QUANT`); the layout is the node's.
  """
  from peftjax._src.quant.core import quantize_array  # pylint: disable=g-import-not-at-top
  quant = dict(LOFTQ_QUANT if quant is None else quant)
  target = _matrix(w, n_batch, n_in)
  res = target
  for i in range(num_iter):
    q = quantize_array(res.reshape(w.shape).astype(w.dtype), layout=(n_batch, n_in), path=path,
                       **quant)
    a, b = _fit(target - _matrix(q.materialize(), n_batch, n_in), rank=rank, scale=scale)
    if i + 1 < num_iter:
      res = target - scale * jnp.matmul(a, b, precision=_HI)
  return q, a, b


@functools.partial(jax.jit, static_argnames=("init", "rank", "scale", "niter"))
def _decompose(m, key, *, init, rank, scale, niter):
  """PiSSA or OLoRA as one compiled program per kernel shape (eager, each op would compile)."""
  if init == "olora":
    return olora(m, rank, scale)
  return pissa(m, rank, scale, niter=niter, key=key)


@functools.partial(jax.jit, static_argnames=("rank", "scale"))
def _fit(err, *, rank, scale):
  u, s_vals, vt = jnp.linalg.svd(err, full_matrices=False)
  return _split_sv(u, s_vals, vt, rank, scale)


def initialize(init: str, w, *, rank: int, scale: float, layout: tuple[int, int], dtype, key,
               path: str, loftq_iter: int = 1, loftq_quant: Optional[dict] = None):
  """``(base, a, b)`` for one kernel under a base-changing ``init`` (:func:`modifies_base`).

  Args:
    init: ``"pissa"``, ``"pissa_niter_K"``, ``"olora"`` or ``"loftq"``.
    w: the kernel ``[*S, *I, *O]`` (a floating array; LoftQ quantizes it itself).
    rank, scale: the node's rank and scale.
    layout: ``(n_batch, n_in)``.
    dtype: dtype of ``a`` and ``b``.
    key: the node's PRNG key (randomized PiSSA only).
    path: the kernel's path, for messages.
    loftq_iter, loftq_quant: LoftQ's alternating steps and quantization keywords.

  Returns:
    ``(base, a [*S, *I, r], b [*S, r, *O])``: the residual kernel in ``w``'s dtype (PiSSA,
    OLoRA) or a ``QuantizedWeight`` (LoftQ).

  Raises:
    ValueError: a quantized base (these inits need the full-precision kernel), bad
      ``loftq_iter``.
  """
  if is_node(w):
    raise ValueError(
        f"init={init!r} needs the full-precision kernel at {path}, but it is a "
        f"{type(w).__name__}: apply {init} to the unquantized weights (peftjax.qlora.apply(params, "
        f"init={init!r}) quantizes after the init)")
  n_batch, n_in = layout
  shape = tuple(w.shape)
  bshape, in_shape, out_shape = shape[:n_batch], shape[n_batch:n_batch + n_in], shape[n_batch + n_in:]
  if init == "loftq":
    if isinstance(loftq_iter, bool) or not isinstance(loftq_iter, int) or loftq_iter < 1:
      raise ValueError(f"loftq_iter must be an integer >= 1, got {loftq_iter!r}")
    base, a, b = loftq(w, rank, scale, n_batch=n_batch, n_in=n_in, num_iter=loftq_iter,
                       quant=loftq_quant, path=path)
  else:
    niter = _NITER.fullmatch(init)
    res, a, b = _decompose(_matrix(w, n_batch, n_in), key, init="olora" if init == "olora" else
                           "pissa", rank=rank, scale=scale,
                           niter=int(niter.group(1)) if niter else None)
    base = res.reshape(shape).astype(w.dtype)
  a = a.reshape(*bshape, *in_shape, rank).astype(dtype)
  b = b.reshape(*bshape, rank, *out_shape).astype(dtype)
  return base, a, b


def convert_to_lora(tuned, initial, original=None):
  """A trained PiSSA/OLoRA tree as plain LoRA on the original base (HF PEFT's conversion).

  With ``W = W_res + s A0 B0`` at init and ``W_res + s A B`` after training, the change is
  ``s (A B - A0 B0) = s [A, A0] [B; -B0]``: a rank-``2r`` LoRA with the same scale on ``W``.

  Args:
    tuned: the trained tree (LoRA nodes on residual bases).
    initial: the tree as the init returned it (same structure; its ``a``/``b`` are ``A0``/``B0``).
    original: the tree before the init (its kernels become the bases), or None to rebuild
      ``W = W_res + s A0 B0`` from ``initial``.

  Returns:
    ``tuned`` with each LoRA node ``LoraWeight(W, [A, A0], [B; -B0])``; other leaves as in
    ``tuned``. Save it with :func:`peftjax.io.hf_peft.save_hf_peft`.

  Raises:
    ValueError: trees whose LoRA nodes differ in paths or shapes.
  """
  from peftjax.lora import LoraWeight  # pylint: disable=g-import-not-at-top
  t_nodes = dict(_lora_nodes(tuned, LoraWeight))
  i_nodes = dict(_lora_nodes(initial, LoraWeight))
  if set(t_nodes) != set(i_nodes):
    only = sorted(set(t_nodes) ^ set(i_nodes))
    raise ValueError(f"convert_to_lora: tuned and initial trees have different LoRA kernels "
                     f"(e.g. {only[:3]})")
  o_leaves = {}
  if original is not None:
    o_leaves = dict((p, l) for p, l in targeting.leaves_with_paths(original))
    missing = sorted(set(t_nodes) - set(o_leaves))
    if missing:
      raise ValueError(f"convert_to_lora: the original tree has no kernel at {missing[0]}")

  def visit(path, node):
    if not isinstance(node, LoraWeight):
      return node
    p = targeting.path_str(path)
    init = i_nodes[p]
    if (init.a.shape, init.b.shape, init.n_in) != (node.a.shape, node.b.shape, node.n_in):
      raise ValueError(f"convert_to_lora: {p} has A {list(node.a.shape)}, B {list(node.b.shape)} "
                       f"but its initial adapter A {list(init.a.shape)}, B {list(init.b.shape)}")
    if not math.isclose(init.scale, node.scale, rel_tol=1e-12):
      raise ValueError(f"convert_to_lora: {p} has scale {node.scale} but {init.scale} at init")
    if original is not None:
      w = o_leaves[p]
      if tuple(w.shape) != node.shape:
        raise ValueError(f"convert_to_lora: the original kernel at {p} is {list(w.shape)}, the "
                         f"LoRA kernel {list(node.shape)}")
    else:
      w = init.materialize()
    rank_axis_b = node.n_batch
    a = jnp.concatenate([node.a, init.a.astype(node.a.dtype)], axis=-1)
    b = jnp.concatenate([node.b, -init.b.astype(node.b.dtype)], axis=rank_axis_b)
    return node.replace(w=w, a=a, b=b)

  return jax.tree_util.tree_map_with_path(visit, tuned, is_leaf=is_node)


def _lora_nodes(tree, cls):
  return [(p, l) for p, l in targeting.leaves_with_paths(tree) if isinstance(l, cls)]


def quantization_error(tree, original) -> dict:
  """How far each adapted kernel of ``tree`` (``merge(node)``, e.g. ``deq(Q) + s A B``) is from
  the full-precision kernel in ``original``: ``{"paths": {path: rel}, "rel_error": rel}`` with
  ``rel = ||W - merge(node)||_F / ||W||_F`` (over all paths for the total).

  Raises:
    ValueError: no LoRA node in ``tree``, or a node with no kernel of its shape in ``original``.
  """
  from peftjax.lora import LoraWeight  # pylint: disable=g-import-not-at-top
  ref = dict(targeting.leaves_with_paths(original))
  paths, err2, tot2 = {}, 0.0, 0.0
  for p, node in _lora_nodes(tree, LoraWeight):
    w = ref.get(p)
    if w is None or tuple(w.shape) != node.shape:
      raise ValueError(f"quantization_error: original has no kernel of shape {list(node.shape)} "
                       f"at {p}")
    w = jnp.asarray(w, jnp.float32)
    e2 = float(jnp.sum((w - jnp.asarray(node.materialize(), jnp.float32)) ** 2))
    t2 = float(jnp.sum(w ** 2))
    paths[p] = math.sqrt(e2 / t2) if t2 else 0.0
    err2, tot2 = err2 + e2, tot2 + t2
  if not paths:
    raise ValueError("quantization_error: the tree holds no LoRA node")
  return {"paths": paths, "rel_error": math.sqrt(err2 / tot2) if tot2 else 0.0}
