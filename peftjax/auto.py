"""Automatic selection under a budget: decide *what* to tune from data.

Two tools:

1. **Importance-based selection** (a FISH-mask-like procedure, Sung et al., 2021).
   :func:`importance` scores every entry of the candidate leaves from a few batches of gradients
   (empirical Fisher ``mean g^2``, or ``|w * mean g|``); :func:`select` turns scores into a tree
   that trains at most ``budget`` parameters, at the granularity of single entries
   (``SparseDelta`` nodes: exactly ``budget`` trainable entries), rows (``SliceTrainable``:
   vectors along the last axis, e.g. one input feature of a kernel or one token's embedding) or
   whole leaves (``Trainable``). :func:`random_scores` gives the random selection of the same
   budget, the baseline it should beat.

2. **Rank allocation** (AdaLoRA's idea, Zhang et al., 2023). Start LoRA with a larger rank
   everywhere, train a little, then :func:`allocate_ranks` keeps the most important singular
   directions of every update ``s * A @ B`` across all modules until a total rank (or parameter)
   budget is met, and rewrites each node at its new rank with the update kept in its top
   directions (the SVD is taken through QR factors of ``A`` and ``B``: never an ``in x out``
   matrix).

Everything is deterministic: the scores depend only on the batches, :func:`random_scores` only on
its key, and ties are broken by path order.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from peftjax._src import selective, targeting
from peftjax._src.nodes import is_node
from peftjax._src.selective import (SliceTrainable, SparseDelta, Trainable, check_plain_float,
                                    leaf_predicate)
from peftjax.lora import LoraWeight

__all__ = ["importance", "random_scores", "select", "allocate_ranks", "ranks"]

_KINDS = ("fisher", "grad_weight")
_UNITS = ("element", "row", "leaf")


def _is_float_array(x) -> bool:
  return targeting.is_array(x) and jnp.issubdtype(x.dtype, jnp.floating)


def _candidates(params, targets) -> list[tuple[str, Any]]:
  pred = leaf_predicate(targets)
  pairs = targeting.leaves_with_paths(params)
  chosen = [(p, x) for p, x in pairs if _is_float_array(x) and pred(p, x)]
  if not chosen:
    raise ValueError(f"targets={targets!r} matched no plain floating leaf of the tree. Some of "
                     f"its paths:\n{targeting.describe_paths(pairs)}")
  return chosen


def _scores_tree(params, scores: dict):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: scores.get(targeting.path_str(p)), params, is_leaf=is_node)


def importance(loss_fn: Callable, params, batches: Iterable, *, kind: str = "fisher",
               targets=None):
  """Per-entry importance of the candidate leaves, from a few batches of gradients.

  Args:
    loss_fn: ``(params, batch) -> scalar``; wrap with :func:`peftjax.lift` if ``params`` holds
      nodes elsewhere.
    params: the parameter tree; its plain floating leaves (chosen by ``targets``) are scored.
    batches: an iterable of batches (at least one), each passed to ``loss_fn`` as is.
    kind: ``"fisher"``: the empirical Fisher diagonal ``mean_b g_b^2`` (how much the loss can
      drop by moving the entry); ``"grad_weight"``: ``|w * mean_b g_b|``, the first-order
      change of the loss when the entry is removed.
    targets: which leaves to score: ``None`` = every plain floating leaf, a regex over paths,
      a list of names (a path component), or a callable ``(path, leaf) -> bool``.

  Returns:
    A tree with the structure of ``params``: float32 scores (shape of the leaf) at the candidate
    leaves, ``None`` elsewhere.

  Raises:
    ValueError: bad ``kind``, no batches, or ``targets`` matching no plain floating leaf.

  >>> import jax.numpy as jnp, peftjax
  >>> params = {"w": jnp.array([1.0, 2.0])}
  >>> loss = lambda p, x: jnp.sum(p["w"] * x)
  >>> peftjax.auto.importance(loss, params, [jnp.array([1.0, 0.0]), jnp.array([3.0, 0.0])])["w"]
  Array([5., 0.], dtype=float32)
  """
  if kind not in _KINDS:
    raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
  cands = _candidates(params, targets)
  paths = [p for p, _ in cands]
  flat, treedef = jax.tree_util.tree_flatten(params, is_leaf=is_node)
  pos = {targeting.path_str(p): i
         for i, (p, _) in enumerate(jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0])}
  where = [pos[p] for p in paths]

  def grads(xs, batch):
    def f(xs):
      full = list(flat)
      for i, x in zip(where, xs):
        full[i] = x
      return loss_fn(jax.tree_util.tree_unflatten(treedef, full), batch)
    return [g.astype(jnp.float32) for g in jax.grad(f)(xs)]

  @jax.jit
  def accumulate(acc, xs, batch):
    g = grads(xs, batch)
    return [a + (jnp.square(gi) if kind == "fisher" else gi) for a, gi in zip(acc, g)]

  @jax.jit
  def finish(acc, xs, n):
    acc = [a / n for a in acc]
    if kind == "grad_weight":
      acc = [jnp.abs(a * x.astype(jnp.float32)) for a, x in zip(acc, xs)]
    return acc

  xs = [x for _, x in cands]
  acc = jax.jit(lambda xs: [jnp.zeros(x.shape, jnp.float32) for x in xs])(xs)
  n = 0
  for batch in batches:
    acc = accumulate(acc, xs, batch)
    n += 1
  if n == 0:
    raise ValueError("importance needs at least one batch; `batches` was empty")
  acc = finish(acc, xs, n)
  return _scores_tree(params, dict(zip(paths, acc)))


def random_scores(params, key, *, targets=None):
  """Uniform random scores for the candidate leaves: ``select`` on them is a random selection.

  Each leaf's scores come from ``fold_in(key, crc32(path))``, so they do not depend on the
  traversal order.

  >>> import jax, jax.numpy as jnp, peftjax
  >>> s = peftjax.auto.random_scores({"w": jnp.ones(3)}, jax.random.key(0))
  >>> s["w"].shape
  (3,)
  """
  if not (isinstance(key, jax.Array) and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or
                                          key.shape == (2,))):
    raise TypeError(f"key must be a PRNG key (jax.random.key), got {key!r}")
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  cands = _candidates(params, targets)
  paths = [p for p, _ in cands]
  shapes = [tuple(x.shape) for _, x in cands]
  draw = jax.jit(lambda key: [jax.random.uniform(targeting.path_key(key, p), shape, jnp.float32)
                              for p, shape in zip(paths, shapes)])
  return _scores_tree(params, dict(zip([p for p, _ in cands], draw(key))))


def _check_budget(budget, total: int, what: str):
  if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
    raise ValueError(f"budget must be a positive integer ({what}), got {budget!r}")
  if budget > total:
    raise ValueError(f"budget={budget} is larger than the {total} {what} available; use at most "
                     f"{total}")
  return int(budget)


def select(params, scores, budget: int, *, unit: str = "element"):
  """Marks the most important parameters trainable, at most ``budget`` of them.

  Args:
    params: the parameter tree scored by :func:`importance` (or :func:`random_scores`).
    scores: a tree like ``params`` with per-entry scores at candidate leaves, ``None``
      elsewhere.
    budget: number of trainable parameters (``1 <= budget <=`` the candidates' size).
    unit: ``"element"``: the ``budget`` highest-scoring entries overall become
      ``SparseDelta(w, indices, values=0)`` nodes (exactly ``budget`` trainable); ``"row"``:
      vectors along the last axis (one input row of a kernel ``[in, out]``, one token of an
      embedding; a 0-/1-D leaf is one unit) ranked by mean score, taken greedily while they fit
      (``SliceTrainable``/``Trainable``); ``"leaf"``: whole leaves ranked by mean score, greedily
      (``Trainable``).

  Returns:
    The tree with the selection rewritten into nodes (the model is unchanged:
    ``merge(result) == params``); the trainable count is ``budget`` for ``"element"`` and at
    most ``budget`` (greedy fill) otherwise.

  Raises:
    ValueError: bad ``unit``; ``budget`` <= 0 or above the candidates' size; scores whose shape
      differs from their leaf, or a scored leaf that is not a plain floating array.
    TypeError: a non-integer budget.

  >>> import jax.numpy as jnp, peftjax
  >>> params = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(3)}
  >>> scores = {"a": jnp.array([[1.0, 9.0, 0.0], [0.0, 0.0, 8.0]]), "b": jnp.array([0.0, 7.0, 0.0])}
  >>> t = peftjax.auto.select(params, scores, budget=3)
  >>> t["a"].indices.tolist(), t["b"].indices.tolist(), peftjax.summary(t).trainable
  ([1, 5], [1], 3)
  >>> t = peftjax.auto.select(params, scores, budget=3, unit="row")
  >>> type(t["a"]).__name__, t["a"].index, peftjax.summary(t).trainable
  ('SliceTrainable', (0,), 3)
  """
  if unit not in _UNITS:
    raise ValueError(f"unit must be one of {_UNITS}, got {unit!r}")
  leaves = dict(targeting.leaves_with_paths(params))
  scored = [(p, s) for p, s in targeting.leaves_with_paths(scores) if s is not None]
  if not scored:
    raise ValueError("scores has no scored leaf; compute it with peftjax.auto.importance or "
                     "peftjax.auto.random_scores on the same tree")
  for p, s in scored:
    if p not in leaves:
      raise ValueError(f"scores has a leaf at {p}, which params does not have")
    check_plain_float(p, leaves[p], "auto.select")
    if tuple(np.shape(s)) != tuple(leaves[p].shape):
      raise ValueError(f"scores at {p} have shape {list(np.shape(s))}, but the leaf is "
                       f"{list(leaves[p].shape)}")
  total = sum(int(np.prod(np.shape(s))) for _, s in scored)
  budget = _check_budget(budget, total, "candidate parameters")
  mags = [np.nan_to_num(np.asarray(jax.device_get(s), np.float32).ravel(), nan=-np.inf)
          for _, s in scored]
  new: dict[str, Any] = {}

  if unit == "element":
    keep = selective.top_k(np.concatenate(mags), budget)
    offsets = np.cumsum([0] + [m.size for m in mags])
    for (p, _), lo, hi in zip(scored, offsets[:-1], offsets[1:]):
      idx = keep[(keep >= lo) & (keep < hi)] - lo
      if idx.size:
        w = leaves[p]
        # numpy-side casts: only transfers, no per-shape device kernels to compile
        new[p] = SparseDelta(w=w, indices=jnp.asarray(idx.astype(np.int32)),
                             values=jnp.asarray(np.zeros(idx.size, w.dtype)))
  else:
    # Units: (density, -leaf order, -row, size, leaf, row); greedy by density, ties by order.
    units = []
    for li, ((p, _), m) in enumerate(zip(scored, mags)):
      shape = tuple(leaves[p].shape)
      if unit == "leaf" or len(shape) <= 1:
        units.append((float(np.mean(m)) if m.size else 0.0, li, 0, m.size))
      else:
        rows = m.reshape(-1, shape[-1])
        for r, d in enumerate(rows.mean(axis=1)):
          units.append((float(d), li, r, shape[-1]))
    order = sorted(range(len(units)), key=lambda u: (-units[u][0], units[u][1], units[u][2]))
    left, picked = budget, {}
    for u in order:
      _, li, r, size = units[u]
      if size <= left:
        picked.setdefault(li, []).append(r)
        left -= size
      if left == 0:
        break
    for li, rows in picked.items():
      p = scored[li][0]
      w = leaves[p]
      n_rows = int(np.prod(w.shape[:-1])) if w.ndim > 1 else 1
      if unit == "leaf" or w.ndim <= 1 or len(rows) == n_rows:
        new[p] = Trainable(w)
      else:
        idx = tuple(sorted(rows))
        flat = w.reshape(n_rows, w.shape[-1])
        new[p] = SliceTrainable(frozen=w, value=flat[np.asarray(idx)], index=idx,
                                n_lead=w.ndim - 1)
  return targeting.map_selected(lambda p, x: new[p], params, set(new))


# -- AdaLoRA-style rank allocation ---------------------------------------------------------------

def ranks(tree) -> dict[str, int]:
  """The rank of every ``LoraWeight`` node, by path.

  >>> import jax.numpy as jnp, peftjax
  >>> peftjax.auto.ranks(peftjax.lora.apply({"d": {"kernel": jnp.ones((8, 8))}}, rank=3))
  {'d/kernel': 3}
  """
  return {p: x.rank for p, x in targeting.leaves_with_paths(tree) if isinstance(x, LoraWeight)}


def _svd_factors(node: LoraWeight):
  """``U [*b, in, r], S [*b, r], Vt [*b, r, out]`` with ``scale * A @ B = U diag(S) Vt``."""
  nb, ni, r = node.n_batch, node.n_in, node.rank
  bshape = node.a.shape[:nb]
  in_shape, out_shape = node.a.shape[nb:nb + ni], node.b.shape[nb + 1:]
  a = node.a.astype(jnp.float32).reshape(*bshape, math.prod(in_shape), r)
  b = node.b.astype(jnp.float32).reshape(*bshape, r, math.prod(out_shape))
  qa, ra = jnp.linalg.qr(a)                                   # a = qa ra,  [*, in, r] [*, r, r]
  qb, rb = jnp.linalg.qr(jnp.swapaxes(b, -1, -2))             # b^T = qb rb
  core = node.scale * ra @ jnp.swapaxes(rb, -1, -2)           # [*, r, r]
  u, s, vt = jnp.linalg.svd(core)
  return qa @ u, s, vt @ jnp.swapaxes(qb, -1, -2), bshape, in_shape, out_shape


def allocate_ranks(tree, budget: int, *, unit: str = "rank", targets=None):
  """Prunes singular directions of LoRA updates across modules to meet a budget.

  Every update ``s * A @ B`` is decomposed as ``U diag(S) Vt``; its directions are ranked by
  singular value across all chosen nodes (for a layer-stacked node, one direction is shared by
  its layers and scored by the sum over layers, so the node keeps one rank), and the best are
  kept while they fit. Each node is rewritten at its new rank ``r'`` with ``A = U sqrt(S/s)``,
  ``B = sqrt(S/s) Vt`` over the kept directions, so its update is the best rank-``r'``
  approximation of the old one; a node left with no direction becomes its plain frozen ``w``.

  Args:
    tree: a tree with ``LoraWeight`` nodes, typically after a short training at a generous rank.
    budget: ``unit="rank"``: the total rank (sum of the nodes' ranks), met exactly;
      ``unit="params"``: the number of LoRA parameters, filled greedily (at most ``budget``).
    unit: ``"rank"`` or ``"params"``.
    targets: which ``LoraWeight`` nodes take part (a regex, names or callable over paths);
      default all.

  Returns:
    The tree with every participating node at its allocated rank (``scale`` unchanged).

  Raises:
    ValueError: bad ``unit``; no LoRA nodes; ``budget`` <= 0 or above the current total.

  >>> import jax, jax.numpy as jnp, peftjax
  >>> t = peftjax.lora.apply({"q": {"kernel": jnp.zeros((8, 8))}, "v": {"kernel": jnp.zeros((8, 8))}},
  ...                        rank=4, key=jax.random.key(0))
  >>> t = jax.tree.map(lambda x: x.replace(b=jnp.ones((4, 8))), t, is_leaf=peftjax.is_node)
  >>> peftjax.auto.ranks(peftjax.auto.allocate_ranks(t, budget=2))  # each update has rank 1
  {'q/kernel': 1, 'v/kernel': 1}
  """
  if unit not in ("rank", "params"):
    raise ValueError(f"unit must be 'rank' or 'params', got {unit!r}")
  pred = leaf_predicate(targets)
  nodes = [(p, x) for p, x in targeting.leaves_with_paths(tree)
           if isinstance(x, LoraWeight) and pred(p, x)]
  if not nodes:
    raise ValueError("allocate_ranks found no LoraWeight node"
                     f"{'' if targets is None else f' matching targets={targets!r}'}; apply "
                     f"peftjax.lora.apply (with a generous rank) first")
  facts, dirs = {}, []
  for li, (p, x) in enumerate(nodes):
    u, s, vt, bshape, in_shape, out_shape = _svd_factors(x)
    facts[p] = (u, s, vt, bshape, in_shape, out_shape)
    score = np.asarray(jax.device_get(s), np.float64).reshape(-1, x.rank).sum(axis=0)
    cost = 1 if unit == "rank" else math.prod(bshape) * (math.prod(in_shape) + math.prod(out_shape))
    for i in range(x.rank):
      dirs.append((-score[i], li, i, cost))
  total = sum(d[3] for d in dirs)
  budget = _check_budget(budget, total, "LoRA ranks" if unit == "rank" else "LoRA parameters")
  dirs.sort()
  left, keep = budget, [0] * len(nodes)
  for _, li, i, cost in dirs:
    if cost <= left and keep[li] == i:  # directions of a node are kept as a prefix
      keep[li] += 1
      left -= cost
  new = {}
  for li, (p, x) in enumerate(nodes):
    r = keep[li]
    if r == 0:
      new[p] = x.w
      continue
    u, s, vt, bshape, in_shape, out_shape = facts[p]
    root = jnp.sqrt(s[..., :r] / abs(x.scale))
    a = (u[..., :r] * root[..., None, :] * np.sign(x.scale)).reshape(*bshape, *in_shape, r).astype(x.a.dtype)
    b = (root[..., :, None] * vt[..., :r, :]).reshape(*bshape, r, *out_shape).astype(x.b.dtype)
    new[p] = x.replace(a=a, b=b)
  return targeting.map_selected(lambda p, x: new[p], tree, set(new))
