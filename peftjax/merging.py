"""Adapter arithmetic: several trained LoRA adapters on one base combined into one LoRA tree.

:func:`merge_adapters` is HF PEFT's ``add_weighted_adapter`` (``peft/tuners/lora/model.py``,
``peft/utils/merge_utils.py``) for peftjax trees. Per target kernel, with adapter ``i`` giving
``s_i A_i B_i`` and weight ``w_i``:

* ``"cat"``: ``A = [w_1 s_1 A_1, ..., w_n s_n A_n]``, ``B = [B_1; ...; B_n]``: exactly
  ``sum_i w_i s_i A_i B_i``, rank ``sum_i r_i``.
* ``"svd"``: ``Delta = sum_i w_i s_i A_i B_i``, then its best rank-``svd_rank`` factorization
  (``Delta = U S V^T``, ``A = U_k``, ``B = S_k V_k^T``; ``svd_rank`` defaults to the largest
  ``r_i``). ``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``,
  ``"magnitude_prune_svd"`` combine the ``s_i A_i B_i`` with the rule of that name (below)
  before the SVD.
* ``"linear"``, ``"ties"``, ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"`` (equal
  ranks): the rule combines the ``A_i`` with weights ``sign(w_i) sqrt(|w_i s_i|)`` and, on its
  own, the ``B_i`` with weights ``sqrt(|w_i s_i|)``. ``linear`` is ``sum_i c_i X_i`` -- a rough
  approximation of the weighted sum of updates, as HF PEFT warns; ``cat`` and ``svd`` are
  the precise ones.

The rules on task tensors ``X_i`` (per kernel and per layer of a layer-stacked kernel):

* ``magnitude_prune``: keep the ``int(density * size)`` largest ``|X_i|`` of each ``X_i``, then
  ``sum_i c_i X_i``;
* ``ties`` (Yadav et al., 2023): magnitude-prune each ``X_i``; elect a sign per entry,
  ``sign(sum_i X_i)`` (``majority_sign_method="total"``) or ``sign(sum_i sign(X_i))``
  (``"frequency"``), ties to ``+``; ``sum_i c_i X_i [sign(X_i) = elected] / max(1, #agreeing)``;
* ``dare_linear`` / ``dare_ties`` (Yu et al., 2024): keep each entry with probability
  ``density`` and divide by ``density`` (Bernoulli masks from ``key``, see :func:`dare_masks`),
  then the linear sum / ``ties``' sign election and disjoint mean.

The merged nodes have scale 1 (HF PEFT sets ``lora_alpha = r``). With one adapter every method
is ``linear`` (as in HF PEFT).

>>> import jax, jax.numpy as jnp, peftjax
>>> p = {"mlp": {"up": {"kernel": jnp.zeros((8, 8))}}}
>>> t1 = peftjax.lora.apply(p, rank=2, key=jax.random.key(1))
>>> t2 = peftjax.lora.apply(p, rank=3, key=jax.random.key(2))
>>> peftjax.merge_adapters({"x": t1, "y": t2}, [1.0, 0.5], method="cat")["mlp"]["up"]["kernel"].rank
5
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from peftjax._src import targeting
from peftjax._src.nodes import is_node
from peftjax.lora import LoraWeight, _delta

__all__ = ["METHODS", "merge_adapters", "dare_masks"]

_FACTOR = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
#: The ``method`` values of :func:`merge_adapters`.
METHODS = ("cat",) + _SVD + _FACTOR
_HI = lax.Precision.HIGHEST


def _mask_layout(paths, meta, factors, rule):
  """``[(path, index, part, shape)]`` of every DARE mask of a merge, in drawing order: the
  first tree's LoRA kernels in its flatten order, then the adapters in the mapping's order, then
  ``a`` and ``b`` (or the kernel-shaped ``delta`` for the ``*_svd`` rules)."""
  out = []
  for p, m, abs_ in zip(paths, meta, factors):
    for i, (a, b) in enumerate(abs_):
      if rule.endswith("_svd"):
        nb = a.ndim - m[i][1] - 1
        out.append((p, i, "delta", tuple(a.shape[:-1]) + tuple(b.shape[nb + 1:])))
      else:
        out.extend([(p, i, "a", tuple(a.shape)), (p, i, "b", tuple(b.shape))])
  return out


def dare_masks(adapters: Mapping[str, Any], *, method: str, density: float, key) -> dict:
  """The DARE keep masks :func:`merge_adapters` draws for these arguments (to reproduce or
  inspect a merge): ``{path: [{"a": mask, "b": mask} or {"delta": mask} per adapter]}``.

  All masks of one merge come from one ``jax.random.bernoulli(key, density, (N,))``, cut in the
  order of :func:`_mask_layout`.
  """
  if not str(method).startswith("dare"):
    raise ValueError(f"dare_masks: method {method!r} draws no masks; use one of "
                     f"{[m for m in METHODS if m.startswith('dare')]}")
  names = list(adapters)
  nodes = [dict(_nodes(adapters[n], n)) for n in names]
  paths = list(nodes[0])
  meta = [[(nd[p].scale, nd[p].n_in) for nd in nodes] for p in paths]
  factors = [[(nd[p].a, nd[p].b) for nd in nodes] for p in paths]
  drawn = _draw(_as_key(key), _mask_layout(paths, meta, factors, method), density)
  out = {p: [{} for _ in names] for p in paths}
  for (p, i, part), m in drawn.items():
    out[p][i][part] = m
  return out


def _as_key(key):
  if isinstance(key, jax.Array) and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.wrap_key_data(key)
  return key


def _draw(key, layout, density):
  """One Bernoulli draw for all masks of a merge (one random call compiles far faster than one
  per mask), cut into the masks: ``{(path, index, part): mask}``."""
  sizes = [math.prod(shape) for *_, shape in layout]
  keep = jax.random.bernoulli(key, density, (sum(sizes),))
  out, off = {}, 0
  for (p, i, part, shape), n in zip(layout, sizes):
    out[p, i, part] = keep[off:off + n].reshape(shape)
    off += n
  return out


# -- the rules on task tensors ------------------------------------------------------------------

def _magnitude(x, density: float, n_batch: int):
  """Keeps the ``int(density * size)`` largest ``|x|`` of each layer of ``x``."""
  if density >= 1:
    return x
  lead = x.shape[:n_batch]
  flat = x.reshape(math.prod(lead), -1)
  k = int(density * flat.shape[1])
  if k == 0:
    return jnp.zeros_like(x)
  _, idx = lax.top_k(jnp.abs(flat), k)
  mask = jnp.zeros(flat.shape, bool).at[jnp.arange(flat.shape[0])[:, None], idx].set(True)
  return jnp.where(mask, flat, 0).reshape(x.shape)


def _random(x, density: float, keep):
  if density >= 1:
    return x
  return jnp.where(keep, x, 0) / density


def _disjoint(stacked, weighted, majority_sign_method: str):
  sign = jnp.sign(stacked)
  total = stacked.sum(0) if majority_sign_method == "total" else sign.sum(0)
  elected = jnp.where(total >= 0, 1.0, -1.0)
  agree = sign == elected[None]
  kept = jnp.where(agree, weighted, 0).sum(0)
  return kept / jnp.maximum(agree.sum(0), 1).astype(kept.dtype)


def _combine(rule: str, tensors, coeffs, *, density, majority_sign_method, n_batch, keeps):
  """``rule`` on float32 task tensors ``tensors[i]`` with coefficients ``coeffs[i]``."""
  if rule in ("ties", "magnitude_prune"):
    tensors = [_magnitude(x, density, n_batch) for x in tensors]
  elif rule in ("dare_linear", "dare_ties"):
    tensors = [_random(x, density, keep) for x, keep in zip(tensors, keeps)]
  stacked = jnp.stack(tensors)
  weighted = stacked * jnp.asarray(coeffs, jnp.float32).reshape(-1, *([1] * (stacked.ndim - 1)))
  if rule in ("ties", "dare_ties"):
    return _disjoint(stacked, weighted, majority_sign_method)
  return weighted.sum(0)


# -- merge_adapters -----------------------------------------------------------------------------

def merge_adapters(adapters: Mapping[str, Any], weights, *, method: str = "svd",
                   svd_rank: Optional[int] = None, density: Optional[float] = None,
                   majority_sign_method: str = "total", key=None):
  """Combines LoRA adapters trained on one base into a new LoRA tree (``add_weighted_adapter``).

  Args:
    adapters: ``{name: tree}``, each a LoRA tree (``peftjax.lora.apply``, trained) on the same
      base with the same target kernels.
    weights: one number per adapter (a sequence in the mapping's order, or ``{name: weight}``);
      negative weights subtract an adapter.
    method: one of :data:`METHODS` (see the module docstring). Default ``"svd"``, as HF PEFT.
    svd_rank: the ``*svd`` methods' output rank (default: the largest input rank of each kernel).
    density: the fraction of entries kept, in ``[0, 1]``: needed by ``ties``, ``dare_*`` and
      ``magnitude_prune`` (and their ``_svd`` forms).
    majority_sign_method: ``"total"`` or ``"frequency"``, for the ``ties`` rules.
    key: PRNG key of the DARE masks (:func:`dare_masks`); needed by the ``dare_*`` methods.

  Returns:
    The first adapter's tree with every LoRA node replaced by the merged node (scale 1; rank:
    the common rank for the factor rules, the sum for ``cat``, ``svd_rank`` for ``*svd``); all
    other leaves (the base) are the first tree's.

  Raises:
    ValueError: no adapters, weights that do not match them, an unknown method or
      ``majority_sign_method``, a missing or bad ``density``/``key``/``svd_rank``, adapters with
      different target kernels (the path and the adapter lacking it named), kernels of different
      shapes, or different ranks where the method needs equal ones.
    TypeError: a tree holding another kind of adapter node.

  >>> import jax, jax.numpy as jnp, peftjax
  >>> p = {"q": {"kernel": jnp.zeros((8, 8))}}
  >>> ts = {n: peftjax.lora.apply(p, rank=2, key=jax.random.key(i)) for i, n in enumerate("xy")}
  >>> ts = {n: jax.tree.map(lambda x: x + 0.1, t) for n, t in ts.items()}  # "trained": B != 0
  >>> m = peftjax.merge_adapters(ts, [0.5, 0.5], method="svd", svd_rank=3)
  >>> m["q"]["kernel"].rank, m["q"]["kernel"].scale
  (3, 1.0)
  """
  names, trees, coeffs, key = _check_inputs(adapters, weights, method, density,
                                            majority_sign_method, key, svd_rank)
  rule = "linear" if len(names) == 1 else method
  density = None if density is None else float(density)
  nodes = [dict(_nodes(t, n)) for n, t in zip(names, trees)]
  paths = list(nodes[0])
  for n, nd in zip(names[1:], nodes[1:]):
    for p in paths:
      if p not in nd:
        raise ValueError(f"merge_adapters: adapter {n!r} has no LoRA at {p} (adapter "
                         f"{names[0]!r} has); merge adapters with the same target kernels")
    for p in nd:
      if p not in nodes[0]:
        raise ValueError(f"merge_adapters: adapter {n!r} has LoRA at {p}, adapter "
                         f"{names[0]!r} has not; merge adapters with the same target kernels")
  if not paths:
    raise ValueError(f"merge_adapters: adapter {names[0]!r} holds no LoRA node")

  per_path = [[nd[p] for nd in nodes] for p in paths]
  for p, nds in zip(paths, per_path):
    _check_nodes(p, nds, names, rule, svd_rank)
  meta = tuple(tuple((nd.scale, nd.n_in) for nd in nds) for nds in per_path)
  factors = [[(nd.a, nd.b) for nd in nds] for nds in per_path]
  out = _merge_all(tuple(paths), meta, tuple(coeffs), rule, svd_rank, density,
                   majority_sign_method, factors, key)
  merged = {p: nds[0].replace(a=a, b=b, scale=1.0) for p, nds, (a, b) in
            zip(paths, per_path, out)}

  def visit(path, leaf):
    return merged.get(targeting.path_str(path), leaf) if isinstance(leaf, LoraWeight) else leaf
  return jax.tree_util.tree_map_with_path(visit, trees[0], is_leaf=is_node)


def _check_inputs(adapters, weights, method, density, majority_sign_method, key, svd_rank):
  if not isinstance(adapters, Mapping) or not adapters:
    raise ValueError(f"merge_adapters: adapters must be a non-empty {{name: tree}} mapping, got "
                     f"{type(adapters).__name__}{' (empty)' if isinstance(adapters, Mapping) else ''}")
  names = list(adapters)
  if isinstance(weights, Mapping):
    if set(weights) != set(names):
      raise ValueError(f"merge_adapters: weights are for {sorted(weights)}, adapters are "
                       f"{sorted(names)}")
    coeffs = [weights[n] for n in names]
  elif isinstance(weights, (Sequence, np.ndarray)) and not isinstance(weights, str):
    coeffs = [w.item() if isinstance(w, np.generic) else w for w in list(weights)]
    if len(coeffs) != len(names):
      raise ValueError(f"merge_adapters: {len(coeffs)} weights for {len(names)} adapters "
                       f"({names})")
  else:
    raise ValueError(f"merge_adapters: weights must be a sequence or a {{name: weight}} mapping, "
                     f"got {type(weights).__name__}")
  for n, c in zip(names, coeffs):
    if isinstance(c, bool) or not isinstance(c, numbers.Real) or not math.isfinite(c):
      raise ValueError(f"merge_adapters: the weight of {n!r} must be a finite number, got {c!r}")
  if method not in METHODS:
    raise ValueError(f"merge_adapters: unknown method {method!r}; use one of {list(METHODS)}")
  needs_density = method not in ("cat", "svd", "linear")
  if needs_density and (density is None or isinstance(density, bool)
                        or not isinstance(density, numbers.Real) or not 0 <= density <= 1):
    raise ValueError(f"merge_adapters: method {method!r} needs density in [0, 1] (the fraction of "
                     f"entries kept), got {density!r}")
  if method.startswith("dare") and density == 0:
    raise ValueError(f"merge_adapters: method {method!r} rescales by 1/density; density must be "
                     f"> 0, got {density!r}")
  if majority_sign_method not in ("total", "frequency"):
    raise ValueError(f"merge_adapters: majority_sign_method must be 'total' or 'frequency', got "
                     f"{majority_sign_method!r}")
  if method.startswith("dare") and key is None and len(names) > 1:
    raise ValueError(f"merge_adapters: method {method!r} draws random masks: pass key= "
                     f"(a jax.random key)")
  if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int)
                               or svd_rank < 1):
    raise ValueError(f"merge_adapters: svd_rank must be a positive integer, got {svd_rank!r}")
  if key is not None:
    key = _as_key(key)
  return names, [adapters[n] for n in names], [float(c) for c in coeffs], key


def _nodes(tree, name):
  out = []
  for p, leaf in targeting.leaves_with_paths(tree):
    if isinstance(leaf, LoraWeight):
      out.append((p, leaf))
    elif is_node(leaf) and type(leaf).trainable_fields:
      raise TypeError(f"merge_adapters merges LoRA adapters; adapter {name!r} has a "
                      f"{type(leaf).__name__} at {p}")
  return out


def _check_nodes(path, nodes, names, rule, svd_rank):
  first = nodes[0]
  for n, node in zip(names[1:], nodes[1:]):
    if node.shape != first.shape or node.n_in != first.n_in or node.n_batch != first.n_batch:
      raise ValueError(f"merge_adapters: {path} is {list(node.shape)} (n_in={node.n_in}) in "
                       f"adapter {n!r} but {list(first.shape)} (n_in={first.n_in}) in "
                       f"{names[0]!r}")
  ranks = [node.rank for node in nodes]
  if rule in _FACTOR and len(set(ranks)) != 1:
    raise ValueError(f"merge_adapters: method {rule!r} needs equal ranks, but {path} has "
                     f"{dict(zip(names, ranks))}; use 'cat' or 'svd'")
  if rule in _SVD:
    nb, ni = first.n_batch, first.n_in
    k_dim, n_dim = math.prod(first.shape[nb:nb + ni]), math.prod(first.shape[nb + ni:])
    new_rank = svd_rank or max(ranks)
    if new_rank > min(k_dim, n_dim):
      raise ValueError(f"merge_adapters: svd_rank={new_rank} is larger than {path} allows: it maps "
                       f"{k_dim} inputs to {n_dim} outputs, so rank <= {min(k_dim, n_dim)}")


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4, 5, 6))
def _merge_all(paths, meta, coeffs, rule, svd_rank, density, majority_sign_method, factors, key):
  """Every kernel's merged ``(a, b)``, compiled as one program (eager op-by-op would compile
  each op for each shape)."""
  masks = (_draw(key, _mask_layout(paths, meta, factors, rule), density)
           if rule.startswith("dare") and density < 1 else None)
  return [_merge_one(p, m, ab, coeffs, rule, svd_rank=svd_rank, density=density,
                     majority_sign_method=majority_sign_method, masks=masks)
          for p, m, ab in zip(paths, meta, factors)]


def _merge_one(path, meta, factors, coeffs, rule, *, svd_rank, density, majority_sign_method,
               masks):
  """``(a, b)`` of one kernel from the adapters' ``(a, b)`` and static ``(scale, n_in)``."""
  n_in = meta[0][1]
  a0, b0 = factors[0]
  nb = a0.ndim - n_in - 1
  dtype = a0.dtype
  scales = [sc for sc, _ in meta]
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  if rule == "cat":
    a = jnp.concatenate([f32(a_) * (c * sc) for (a_, _), c, sc in zip(factors, coeffs, scales)],
                        axis=-1)
    b = jnp.concatenate([f32(b_) for _, b_ in factors], axis=nb)
  elif rule in _FACTOR:
    ws = [c * sc for c, sc in zip(coeffs, scales)]
    ca = [math.copysign(math.sqrt(abs(w)), 1.0 if w >= 0 else -1.0) for w in ws]
    cb = [math.sqrt(abs(w)) for w in ws]
    opts = dict(density=density, majority_sign_method=majority_sign_method, n_batch=nb)
    keeps = lambda part: ([masks[path, i, part] for i in range(len(factors))]
                          if masks is not None else None)
    a = _combine(rule, [f32(a_) for a_, _ in factors], ca, keeps=keeps("a"), **opts)
    b = _combine(rule, [f32(b_) for _, b_ in factors], cb, keeps=keeps("b"), **opts)
  else:
    in_shape, out_shape = a0.shape[nb:nb + n_in], b0.shape[nb + 1:]
    bshape = a0.shape[:nb]
    k_dim, n_dim = math.prod(in_shape), math.prod(out_shape)
    new_rank = svd_rank or max(a_.shape[-1] for a_, _ in factors)
    deltas = [_delta(f32(a_), f32(b_), sc, n_in) for (a_, b_), sc in zip(factors, scales)]
    sub = rule[:-len("_svd")] if rule != "svd" else "linear"
    keeps = ([masks[path, i, "delta"] for i in range(len(factors))]
             if masks is not None else None)
    delta = _combine(sub, deltas, coeffs, density=density,
                     majority_sign_method=majority_sign_method, n_batch=nb, keeps=keeps)
    u, s_vals, vt = jnp.linalg.svd(delta.reshape(*bshape, k_dim, n_dim), full_matrices=False)
    a = u[..., :, :new_rank].reshape(*bshape, *in_shape, new_rank)
    b = (s_vals[..., :new_rank, None] * vt[..., :new_rank, :]).reshape(*bshape, new_rank,
                                                                       *out_shape)
  return a.astype(dtype), b.astype(dtype)
