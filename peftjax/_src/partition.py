"""Trainable/frozen partitioning, the optax wrapper, merging and the parameter summary.

What trains is decided by the nodes alone: a leaf inside a node is trainable when its field is in
the node's ``trainable_fields``; every plain array leaf is frozen. Selective methods mark a plain
leaf trainable by wrapping it in a node (``Trainable``), so the mask is always derived, never
stored beside the tree.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax._src.nodes import is_node, materialize
from peftjax._src.targeting import path_str

__all__ = ["trainable_mask", "split", "combine", "optimizer", "merge", "summary", "Summary"]


def _is_none(x) -> bool:
  return x is None


def trainable_mask(tree):
  """A tree of bools with the structure of ``tree``: True at every trainable leaf.

  Usable directly as an ``optax.masked`` mask.

  >>> import jax.numpy as jnp, peftjax
  >>> t = peftjax.lora.apply({"dense": {"kernel": jnp.ones((4, 4))}}, rank=2)
  >>> m = peftjax.trainable_mask(t)
  >>> (m["dense"]["kernel"].w, m["dense"]["kernel"].a, m["dense"]["kernel"].b)
  (False, True, True)
  """
  return jax.tree_util.tree_map(
      lambda x: x.trainable_mask() if is_node(x) else jax.tree_util.tree_map(lambda _: False, x),
      tree, is_leaf=is_node)


def _check_same_structure(a, b, what_a: str, what_b: str):
  ta = jax.tree_util.tree_structure(a, is_leaf=_is_none)
  tb = jax.tree_util.tree_structure(b, is_leaf=_is_none)
  if ta == tb:
    return
  pa = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(a, is_leaf=_is_none)[0]}
  pb = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(b, is_leaf=_is_none)[0]}
  only_a, only_b = sorted(pa - pb)[:5], sorted(pb - pa)[:5]
  detail = ""
  if only_a or only_b:
    detail = f" Paths only in {what_a}: {only_a}; only in {what_b}: {only_b}."
  else:
    detail = f" The paths agree but the node types or metadata differ:\n  {ta}\nvs\n  {tb}"
  raise ValueError(f"{what_a} and {what_b} do not have the same tree structure.{detail}")


def split(tree, mask=None):
  """Splits ``tree`` into ``(trainable, frozen)``: each has ``None`` where the other has a leaf.

  ``combine(*split(tree)) `` rebuilds ``tree`` exactly. ``mask`` defaults to
  :func:`trainable_mask` of ``tree``; ``tree`` may already contain ``None`` leaves (a gradient
  of the trainable part, say).

  >>> import jax.numpy as jnp, peftjax
  >>> t = peftjax.lora.apply({"d": {"kernel": jnp.ones((4, 4))}}, rank=2)
  >>> trainable, frozen = peftjax.split(t)
  >>> trainable["d"]["kernel"].w is None, frozen["d"]["kernel"].a is None
  (True, True)
  >>> peftjax.combine(trainable, frozen)["d"]["kernel"].w.shape
  (4, 4)
  """
  if mask is None:
    mask = trainable_mask(tree)
  trainable = jax.tree_util.tree_map(lambda m, x: x if m else None, mask, tree)
  frozen = jax.tree_util.tree_map(lambda m, x: None if m else x, mask, tree)
  return trainable, frozen


def combine(*trees):
  """Inverse of :func:`split`: at each leaf, the first tree's value that is not ``None``.

  Raises:
    ValueError: if the trees do not have the same structure (naming the differing paths).

  >>> import peftjax
  >>> peftjax.combine({"a": None, "b": 2}, {"a": 1, "b": None})
  {'a': 1, 'b': 2}
  """
  if not trees:
    raise TypeError("combine() needs at least one tree")
  for i, t in enumerate(trees[1:], start=1):
    _check_same_structure(trees[0], t, "tree 0", f"tree {i}")

  def pick(*xs):
    for x in xs:
      if x is not None:
        return x
    return None
  return jax.tree_util.tree_map(pick, *trees, is_leaf=_is_none)


class OptimizerState(NamedTuple):
  inner: Any


def _scale_fields(updates, scales: dict):
  """``updates`` with each ``"type_id.field"`` of ``scales`` multiplied by its factor."""
  by_type: dict = {}
  for name, s in scales.items():
    type_id, _, field = name.partition(".")
    by_type.setdefault(type_id, {})[field] = s

  def f(x):
    fields = by_type.get(getattr(type(x), "type_id", None)) if is_node(x) else None
    if not fields:
      return x
    return x.replace(**{f: jax.tree_util.tree_map(lambda u, s=s: u * jnp.asarray(s, u.dtype),
                                                  getattr(x, f))
                        for f, s in fields.items() if getattr(x, f) is not None})
  return jax.tree_util.tree_map(f, updates, is_leaf=is_node)


def check_field_lr_scales(scales) -> dict:
  """``scales`` as a dict, checked: ``{"type_id.field": factor > 0}`` naming trainable fields
  of registered node types."""
  from peftjax._src.nodes import node_types
  if scales is None:
    return {}
  types = node_types()
  out = {}
  for name, s in dict(scales).items():
    type_id, _, field = str(name).partition(".")
    cls = types.get(type_id)
    if cls is None or field not in cls.trainable_fields:
      known = sorted(f"{t}.{f}" for t, c in types.items() for f in c.trainable_fields)
      raise ValueError(f"field_lr_scales: {name!r} is not 'type_id.field' of a trainable node "
                       f"field (e.g. {', '.join(known[:6])}, ...)")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0:
      raise ValueError(f"field_lr_scales[{name!r}] must be a positive number, got {s!r}")
    out[name] = float(s)
  return out


def optimizer(tx: optax.GradientTransformation, tree, *,
              field_lr_scales: dict | None = None) -> optax.GradientTransformation:
  """Wraps ``tx`` so only the trainable leaves of ``tree`` are updated.

  ``field_lr_scales`` ``{"type_id.field": factor}`` multiplies the updates of one field of one
  node type (a learning-rate multiplier: DiffPruning's gate logits ``diff_pruning.log_alpha``
  move ``factor`` times faster than its difference, see :mod:`peftjax.diff_pruning`).

  The inner transformation sees (and keeps state for) the trainable leaves only; frozen leaves get
  exactly zero updates (``None`` where the incoming update is ``None``), so
  ``optax.apply_updates`` leaves them bit-identical. (``optax.masked(tx, mask)`` alone passes the
  raw gradient through for unmasked leaves: it does not freeze.)

  ``init`` and ``update`` accept the full tree or the trainable part from :func:`split`.

  >>> import jax, jax.numpy as jnp, optax, peftjax
  >>> t = peftjax.lora.apply({"dense": {"kernel": jnp.ones((4, 4))}}, rank=2)
  >>> tx = peftjax.optimizer(optax.adam(1e-2), t)
  >>> state = tx.init(t)
  >>> grads = jax.tree.map(jnp.ones_like, t)
  >>> updates, state = tx.update(grads, state, t)
  >>> bool(jnp.all(updates["dense"]["kernel"].w == 0))
  True
  """
  mask = trainable_mask(tree)
  scales = check_field_lr_scales(field_lr_scales)

  def check(t, what):
    if _structure(t) != _structure(mask):
      _check_same_structure(mask, t, "the tree given to peftjax.optimizer", what)

  def init_fn(params):
    check(params, "params passed to init")
    trainable, _ = split(params, mask)
    return OptimizerState(tx.init(trainable))

  def update_fn(updates, state, params=None):
    check(updates, "updates")
    tu, fu = split(updates, mask)
    tp = split(params, mask)[0] if params is not None else None
    new_tu, inner = tx.update(tu, state.inner, tp)
    if scales:
      new_tu = _scale_fields(new_tu, scales)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, fu)
    return combine(new_tu, zeros), OptimizerState(inner)

  return optax.GradientTransformation(init_fn, update_fn)


def _structure(t):
  # Structure with None leaves as leaves: the full tree and its split halves compare equal.
  return jax.tree_util.tree_structure(t, is_leaf=_is_none)


def merge(tree):
  """Every node replaced by the plain array it stands for (``W + s*B@A`` for LoRA, ...).

  The result is an ordinary parameter tree for export or serving; ``lift(fn)(tree)`` equals
  ``fn(merge(tree))`` for every ``fn``.

  >>> import jax.numpy as jnp, peftjax
  >>> t = peftjax.lora.apply({"d": {"kernel": jnp.zeros((4, 4))}}, rank=2)
  >>> t = {"d": {"kernel": t["d"]["kernel"].replace(b=jnp.ones((2, 4)))}}
  >>> m = peftjax.merge(t)["d"]["kernel"]        # W + (alpha/r) * A @ B
  >>> bool(jnp.allclose(m, t["d"]["kernel"].a @ t["d"]["kernel"].b))
  True
  """
  return jax.tree_util.tree_map(materialize, tree, is_leaf=is_node)


# -- summary ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Summary:
  """Trainable vs total parameters and bytes, and one row per top-level leaf or node."""
  trainable: int
  total: int
  trainable_bytes: int
  total_bytes: int
  rows: tuple  # (path, kind, shape, trainable params, total params, bytes)

  @property
  def fraction(self) -> float:
    return self.trainable / self.total if self.total else 0.0

  def __str__(self):
    return self.table()

  def table(self, *, max_rows: int = 40) -> str:
    hdr = ("path", "kind", "shape", "trainable", "total", "bytes")
    body = [(p, k, "x".join(map(str, s)) or "()", f"{t:,}", f"{n:,}", _fmt_bytes(b))
            for p, k, s, t, n, b in self.rows]
    if len(body) > max_rows:
      hidden = len(body) - max_rows
      body = body[:max_rows] + [(f"... {hidden} more rows", "", "", "", "", "")]
    widths = [max(len(r[i]) for r in [hdr] + body) for i in range(6)]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(hdr), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body]
    lines.append(f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                 f"trainable%: {100 * self.fraction:.4f} || trainable bytes: "
                 f"{_fmt_bytes(self.trainable_bytes)} || all bytes: {_fmt_bytes(self.total_bytes)}")
    return "\n".join(lines)


def _fmt_bytes(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if n < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024


def _nbytes(x) -> int:
  return int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize


def summary(tree) -> Summary:
  """Counts trainable and total parameters (and bytes) of ``tree``; ``print`` it for a table.

  A node's total is :meth:`Node.param_count` (a LoRA node: ``w + a + b``; a quantized kernel:
  the values it stands for, while its bytes are the packed bytes). Integer bookkeeping arrays
  (indices, PRNG key data) are not parameters; typed PRNG keys and non-array leaves are skipped.

  >>> import jax.numpy as jnp, peftjax
  >>> s = peftjax.summary(peftjax.lora.apply({"d": {"kernel": jnp.ones((8, 8))}}, rank=2))
  >>> (s.trainable, s.total)
  (32, 96)
  """
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
    leaves = jax.tree_util.tree_leaves(leaf)
    masks = jax.tree_util.tree_leaves(trainable_mask(leaf))
    arrays = [(x, m) for x, m in zip(leaves, masks)
              if hasattr(x, "shape") and hasattr(x, "dtype")
              and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)]
    if not arrays:
      continue
    train = sum(int(np.prod(x.shape)) for x, m in arrays if m)
    total = leaf.param_count() if is_node(leaf) else sum(int(np.prod(x.shape)) for x, _ in arrays)
    nbytes = sum(_nbytes(x) for x, _ in arrays)
    kind = type(leaf).__name__ if is_node(leaf) else jnp.dtype(leaf.dtype).name
    rows.append((path_str(path), kind, tuple(leaf.shape), train, total, nbytes))
  trainable_bytes = 0
  for x, m in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(trainable_mask(tree))):
    if m and hasattr(x, "dtype"):
      trainable_bytes += _nbytes(x)
  return Summary(trainable=sum(r[3] for r in rows), total=sum(r[4] for r in rows),
                 trainable_bytes=trainable_bytes, total_bytes=sum(r[5] for r in rows),
                 rows=tuple(rows))
