"""Adapter pools: many adapters on one frozen base, a different adapter for every row of a batch.

:func:`stack` turns several tuned trees of one base model (``peftjax.lora.apply``/QLoRA/IA3
trees, HF PEFT adapters loaded with :func:`peftjax.io.hf_peft.load_hf_peft`) into **one** tree
whose adapted kernels are pool nodes: the base kernel once, the adapters stacked on a slot axis.
:func:`route` says which slot each row of the next batch uses; ``peftjax.lift(model.apply)`` then
runs the unchanged model, and each pooled kernel computes, for every row ``i`` with slot
``k = ids[i]``::

  LoRA:  y_i = x_i @ W + scale[k] * (x_i @ A[k]) @ B[k]      (LoraPool)
  IA3:   y_i = (x_i @ W) * l[k]     or     (x_i * l[k]) @ W   (IA3Pool)

The base matmul runs once for the whole batch; the adapters' factors are *gathered* per row
(``A[ids]``, ``B[ids]``) and applied in one batched matmul (the BGMV form of Punica/S-LoRA):
no Python loop over adapters, no merged kernel per adapter. With few slots and few tokens per
row (:data:`ONE_HOT_MAX`: decoding with a small pool) a LoRA pool instead multiplies by all its
slots' factors at once and keeps each row's own (one-hot routing: two dense matmuls, cheaper
there than a small matmul per row). Slot 0 is "no adapter" (zeros for LoRA, ones for IA3), so
rows routed to 0 get the base model.

Shapes. For a kernel ``W [*batch, *in, *out]`` (``batch``: the layer axes of a layer-stacked,
``nn.scan`` kernel, leading, as in :class:`peftjax.lora.LoraWeight`) and ``S`` slots of padded rank
``R``: ``a [*batch, S, *in, R]``, ``b [*batch, S, R, *out]``, ``scales``/``ranks [*batch, S]``,
``names uint8[*batch, S, 48]`` (the slot names, as data so renaming a slot changes no static
metadata), ``ids int32[*batch, rows]``. Every leaf carries the layer axes, so ``lax.scan`` slicing
gives one layer's pool. Ranks are zero-padded to ``R`` (exact: the padded columns add zeros);
scales are an array, so loading another adapter into a slot (:func:`load`, :func:`remove`)
changes values, never shapes or static fields, and a jitted function does not recompile.

Routing. ``ids`` has one entry per *row*: the first axis of the input ``x`` that the kernel does
not contract (``[batch, seq, d] @ W``: the batch axis; in KV-cache decoding ``[batch, 1, d]``).
An input whose row axis has ``rows * k`` entries (tokens flattened row-major, ``[batch*seq, d]``)
gives each id to ``k`` consecutive entries.

Training. The pool's ``a``/``b`` are its trainable fields (``peftjax.split``/``optimizer`` see
them as any node's); ``w``, ``scales``, ``ranks``, ``names`` and ``ids`` are frozen. The gradient
of slot ``k`` is the sum over the rows routed to ``k``, so a loss that is a *per-adapter* mean
(:func:`per_adapter_mean`: each adapter's mean over its own rows, summed over adapters) gives
every adapter exactly the gradient it would get trained alone on its rows; with an elementwise
optimizer (Adam, AdamW, SGD; not global-norm clipping, which couples the slots) one step on the
pool is one step of each adapter. Slot 0 and empty slots have zero factors and zero scale, so
their gradient is zero. Dropout is not applied in a pool.

>>> import jax, jax.numpy as jnp, peftjax
>>> base = {"mlp": {"up": {"kernel": jnp.ones((4, 3))}}}
>>> t1 = peftjax.lora.apply(base, rank=1)
>>> t2 = peftjax.lora.apply(base, rank=2, key=jax.random.key(1))
>>> pool = stack({"one": t1, "two": t2})
>>> slot_names(pool)
(None, 'one', 'two')
>>> pool["mlp"]["up"]["kernel"].a.shape          # 3 slots, rank padded to 2
(3, 4, 2)
>>> y = peftjax.lift(lambda p, x: x @ p["mlp"]["up"]["kernel"])(route(pool, [0, "two"]),
...                                                              jnp.ones((2, 4)))
>>> y.shape
(2, 3)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from peftjax._src import additive
from peftjax._src import nodes as nodes_lib
from peftjax._src import targeting
from peftjax._src.nodes import Node, is_node, node_dataclass, static_field
from peftjax.ia3 import IA3Weight
from peftjax.lora import LoraWeight

__all__ = ["LoraPool", "IA3Pool", "stack", "route", "slot_names", "unstack", "load", "remove",
           "per_adapter_mean", "base_params", "NAME_BYTES", "ONE_HOT_MAX"]

#: Longest slot name, in UTF-8 bytes (names are stored as ``uint8[..., NAME_BYTES]``).
NAME_BYTES = 48

#: A LoRA pool computes its update with dense matmuls over all its slots (one-hot routing) when
#: ``slots x tokens per row`` is at most this, else by gathering each row's factors (BGMV). On
#: CPU at decoding (one token per row, 32 rows, hidden 512) one-hot costs ~6 us per slot per
#: kernel against a flat ~270 us for the gather: the two cross at ~40 slots.
ONE_HOT_MAX = 32


# ------------------------------------------------------------------------------------------------
# the pool nodes
# ------------------------------------------------------------------------------------------------

def _gather(table, ids, nb: int):
  """``table[*batch, S, ...]`` indexed per layer by ``ids[*batch, rows]``: ``[*batch, rows, ...]``.

  An id outside ``[0, S)`` gives NaN rows (``jnp.take``'s fill mode); :func:`route` checks
  concrete ids.
  """
  if nb == 0:
    return jnp.take(table, ids, axis=0)
  lead = table.shape[:nb]
  t = table.reshape(-1, *table.shape[nb:])
  i = ids.reshape(-1, ids.shape[-1])
  g = jax.vmap(lambda tt, ii: jnp.take(tt, ii, axis=0))(t, i)
  return g.reshape(*lead, *g.shape[1:])


def _split_rows(node, x, lc, lb, rows: int):
  """``x`` with its row axis (first free axis) split into ``[rows, k]``, and the moved axes.

  Returns ``(x2, lc2, lb2, row, k)``.
  """
  free = nodes_lib._free_dims(x.ndim, lc, lb)
  if not free:
    raise ValueError(f"a {type(node).__name__} on a {list(node.shape)} kernel needs an input with "
                     f"a row axis; got an input of shape {list(x.shape)} that is fully contracted")
  row = free[0]
  n = x.shape[row]
  if n == rows:
    return x, tuple(lc), tuple(lb), row, 1
  if rows == 0 or n % rows:
    raise ValueError(f"the {type(node).__name__} on a {list(node.shape)} kernel is routed for "
                     f"{rows} rows, but it multiplies an input of shape {list(x.shape)} whose row "
                     f"axis {row} has {n} entries; call peftjax.multi.route(pool, ids) with one "
                     f"id per row of this batch")
  k = n // rows
  x2 = x.reshape(*x.shape[:row], rows, k, *x.shape[row + 1:])
  shift = lambda axes: tuple(d + 1 if d > row else d for d in axes)
  return x2, shift(lc), shift(lb), row, k


def _not_mergeable(node, why: str):
  return TypeError(
      f"a {type(node).__name__} ({node.n_slots} slots) on a {list(node.shape)} kernel {why}: it "
      f"computes a different kernel for every row of the batch, so it has no merged form. Run "
      f"the model with peftjax.lift(fn) (only the pool's matmul rule for kernels used as x @ W "
      f"is defined); peftjax.multi.unstack(pool, name) gives one adapter's own tree, which merges")


class _Pool(Node):
  """What the two pool nodes share: slots, names, routing."""

  base_field = "w"
  mergeable = False
  hf_peft_type = None

  @property
  def n_batch(self) -> int:
    return self.ranks.ndim - 1

  @property
  def n_slots(self) -> int:
    return self.ranks.shape[-1]

  def materialize(self):
    raise _not_mergeable(self, "cannot be materialized (peftjax.merge, or a use other than x @ W)")

  def _routing(self):
    if self.ids is None:
      raise ValueError(f"the {type(self).__name__} on a {list(self.shape)} kernel has no routing: "
                       f"call peftjax.multi.route(pool, ids) with one adapter slot per batch row "
                       f"before running the model")
    return self.ids

  def _check_use(self, dimension_numbers, ni):
    if not additive.plain_use(dimension_numbers, self.n_batch, ni, self.ndim):
      raise _not_mergeable(self, f"is used by a dot_general {dimension_numbers} that does not "
                                 f"contract exactly its input axes")

  def astype(self, dtype):
    # Only the base is cast; the rule casts the adapters to the input's dtype at the matmul.
    return self.replace(w=self.w.astype(dtype))


@node_dataclass
class LoraPool(_Pool):
  """LoRA adapters of one kernel stacked on a slot axis: row ``i`` computes
  ``x_i @ w + scales[ids[i]] * (x_i @ a[ids[i]]) @ b[ids[i]]``.

  Attributes:
    w: frozen base kernel ``[*batch, *in, *out]`` (an array or a wrappable node: QLoRA's
      quantized base).
    a: ``[*batch, S, *in, R]``, each slot zero-padded from its own rank to ``R``.
    b: ``[*batch, S, R, *out]``.
    scales: float32 ``[*batch, S]``: each slot's ``alpha / r`` (0 for slot 0 and empty slots).
    ranks: int32 ``[*batch, S]``: each slot's own rank (0: no adapter on this kernel).
    names: uint8 ``[*batch, S, NAME_BYTES]``: slot names, UTF-8, zero-padded (see
      :func:`slot_names`).
    ids: None (not routed) or int32 ``[*batch, rows]``: the slot of every row (:func:`route`).
    n_in: number of input axes of ``w``.
  """

  w: Any
  a: jax.Array
  b: jax.Array
  scales: jax.Array
  ranks: jax.Array
  names: jax.Array
  ids: Any = None
  n_in: int = static_field(default=1)

  type_id = "lora_pool"
  trainable_fields = ("a", "b")

  @property
  def max_rank(self) -> int:
    return self.a.shape[-1]

  def dot_general(self, x, dimension_numbers, *, precision=None, preferred_element_type=None):
    nb, ni = self.n_batch, self.n_in
    self._check_use(dimension_numbers, ni)
    ids = self._routing()
    (lc, rc), (lb, rb) = dimension_numbers
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)
    base = nodes_lib.dot_general(x, self.w, dimension_numbers, **kw)
    x2, lc2, lb2, row, k = _split_rows(self, x, lc, lb, ids.shape[-1])
    if nb == 0 and self.n_slots * k <= ONE_HOT_MAX:
      return base + self._one_hot_update(x2, lc2, rc, ids, kw).reshape(base.shape).astype(
          base.dtype)
    ag = _gather(self.a, ids, nb).astype(x.dtype)          # [*batch, rows, *in, R]
    bg = _gather(self.b, ids, nb).astype(x.dtype)          # [*batch, rows, R, *out]
    sg = _gather(self.scales, ids, nb)                     # [*batch, rows]
    # t = x_i @ A[ids[i]]: batched over the layer axes and the row axis.
    dims = ((lc2, tuple(c + 1 for c in rc)), (lb2 + (row,), tuple(rb) + (nb,)))
    t = lax.dot_general(x2, ag, dims, **kw)               # [batch (rb order), rows, rest, R]
    if nb:
      sg = jnp.transpose(sg, (*rb, nb))
    t = t * sg.reshape(*sg.shape, *(1,) * (t.ndim - sg.ndim)).astype(t.dtype)
    bdims = tuple(range(nb + 1))
    upd = lax.dot_general(t, bg, (((t.ndim - 1,), (nb + 1,)), (bdims, tuple(rb) + (nb,))), **kw)
    return base + upd.reshape(base.shape).astype(base.dtype)

  def _one_hot_update(self, x2, lc2, rc, ids, kw):
    """The adapters' update by dense matmuls over all slots, no per-row gather:
    ``t = x @ [A_0 .. A_S-1]`` (``[rows, ..., S, R]``), zeroed but for each row's own slot (and
    scaled), then ``t @ [B_0; ..; B_S-1]``. Exact (the other slots' terms are zeros) and, for a
    few slots and few tokens per row (decoding), faster than gathering every row's ``A``/``B`` and
    running one small matmul per row; its work grows with the number of slots."""
    n_slots = self.n_slots
    t = lax.dot_general(x2, self.a.astype(x2.dtype), ((lc2, tuple(c + 1 for c in rc)), ((), ())),
                        **kw)                                  # [rows, (k), rest, S, R]
    m = jax.nn.one_hot(ids, n_slots, dtype=t.dtype) * self.scales[ids][:, None].astype(t.dtype)
    t = t * m.reshape(m.shape[0], *(1,) * (t.ndim - 3), n_slots, 1)
    return lax.dot_general(t, self.b.astype(x2.dtype), (((t.ndim - 2, t.ndim - 1), (0, 1)),
                                                         ((), ())), **kw)


@node_dataclass
class IA3Pool(_Pool):
  """IA3 vectors of one kernel stacked on a slot axis: row ``i`` scales by ``vector[ids[i]]``.

  Attributes:
    w: frozen base kernel ``[*batch, *in, *out]`` (an array or a node).
    vector: ``[*batch, S, *axes]`` (ones for slot 0 and for slots without IA3 here).
    ranks: int32 ``[*batch, S]``: 1 where the slot has IA3 on this kernel, else 0.
    names: uint8 ``[*batch, S, NAME_BYTES]``: slot names (see :func:`slot_names`).
    ids: None or int32 ``[*batch, rows]``.
    side: ``"out"`` scales the projection's output axes, ``"in"`` its input axes.
    n_axes: number of scaled axes.
  """

  w: Any
  vector: jax.Array
  ranks: jax.Array
  names: jax.Array
  ids: Any = None
  side: str = static_field(default="out")
  n_axes: int = static_field(default=1)

  type_id = "ia3_pool"
  trainable_fields = ("vector",)

  @property
  def n_in(self) -> int:
    return self.n_axes if self.side == "in" else self.ndim - self.n_batch - self.n_axes

  def dot_general(self, x, dimension_numbers, *, precision=None, preferred_element_type=None):
    nb, ni = self.n_batch, self.n_in
    self._check_use(dimension_numbers, ni)
    ids = self._routing()
    (lc, rc), (lb, rb) = dimension_numbers
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)
    rows = ids.shape[-1]
    vg = _gather(self.vector, ids, nb)                     # [*batch, rows, *axes]
    if self.side == "in":
      x2, lc2, lb2, row, _ = _split_rows(self, x, lc, lb, rows)
      axes = ([lb2[list(rb).index(j)] for j in range(nb)] + [row] +
              [lc2[list(rc).index(nb + i)] for i in range(ni)])
      xs = (x2 * additive.place_on(vg.astype(x.dtype), axes, x2.ndim)).reshape(x.shape)
      return nodes_lib.dot_general(xs, self.w, dimension_numbers, **kw)
    y = nodes_lib.dot_general(x, self.w, dimension_numbers, **kw)
    _split_rows(self, x, lc, lb, rows)                     # checks the row count
    n = y.shape[nb]
    y2 = y.reshape(*y.shape[:nb], rows, n // rows, *y.shape[nb + 1:])
    axes = ([list(rb).index(j) for j in range(nb)] + [nb] +
            list(range(y2.ndim - self.n_axes, y2.ndim)))
    return (y2 * additive.place_on(vg.astype(y.dtype), axes, y2.ndim)).reshape(y.shape)


_POOLS = (LoraPool, IA3Pool)


def _is_pool(x) -> bool:
  return isinstance(x, _POOLS)


# ------------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------------

def _check_name(name) -> str:
  if not isinstance(name, str) or not name:
    raise ValueError(f"an adapter name must be a non-empty string, got {name!r}")
  if len(name.encode()) > NAME_BYTES:
    raise ValueError(f"adapter name {name!r} is longer than {NAME_BYTES} UTF-8 bytes")
  if "\x00" in name:
    raise ValueError(f"adapter name {name!r} contains a NUL character")
  return name


def _encode_names(names: Sequence[Optional[str]]) -> np.ndarray:
  out = np.zeros((len(names), NAME_BYTES), np.uint8)
  for i, n in enumerate(names):
    if n:
      raw = n.encode()
      out[i, :len(raw)] = np.frombuffer(raw, np.uint8)
  return out


def _decode_names(arr) -> tuple:
  arr = np.asarray(arr)
  arr = arr.reshape(-1, *arr.shape[-2:])[0]
  out = []
  for row in arr:
    raw = bytes(row.tolist()).rstrip(b"\x00")
    out.append(raw.decode() if raw else None)
  return tuple(out)


def _pools(tree) -> list:
  """``[(path, pool node)]`` of ``tree``; a ValueError when it has none."""
  found = [(p, x) for p, x in targeting.leaves_with_paths(tree) if _is_pool(x)]
  if not found:
    raise ValueError("the tree has no adapter pool (LoraPool/IA3Pool nodes); build one with "
                     "peftjax.multi.stack({name: tuned_tree, ...})")
  return found


def slot_names(pool) -> tuple:
  """The adapter name in every slot of ``pool``: a tuple of length ``slots``, ``None`` for slot 0
  ("no adapter") and for empty slots.

  Raises:
    ValueError: ``pool`` has no pool nodes.
  """
  return _decode_names(_pools(pool)[0][1].names)


def _slot_of(pool, name) -> int:
  names = slot_names(pool)
  if isinstance(name, str) and name in names:
    return names.index(name)
  known = [n for n in names if n is not None]
  raise ValueError(f"no adapter called {name!r} in the pool; its adapters: {known}")


# ------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------

def _layer_shape(node) -> tuple:
  return tuple(node.shape[:node.n_batch])


def _adapter_nodes(name: str, tree) -> dict:
  """``{path: LoraWeight | IA3Weight}`` of one adapter's tree (other nodes are an error)."""
  from peftjax._src.tuned import as_tuned
  tuned = as_tuned(tree)
  if tuned.slots():
    raise TypeError(f"adapter {name!r} has a {'/'.join(tuned.slots())}: soft prompts and "
                    f"prefixes cannot be pooled (only LoRA, QLoRA and IA3 adapters)")
  tree = tuned.params
  out = {}
  for p, x in targeting.leaves_with_paths(tree):
    if isinstance(x, (LoraWeight, IA3Weight)):
      out[p] = x
    elif is_node(x) and x.trainable_fields:
      raise TypeError(f"adapter {name!r} has a {type(x).__name__} at {p}: only LoRA, QLoRA and "
                      f"IA3 adapters can be pooled")
  if not out:
    raise ValueError(f"adapter {name!r} has no LoRA or IA3 node: pass trees made by "
                     f"peftjax.lora.apply / qlora.apply / ia3.apply or load_hf_peft")
  return out


def _unwrap(tree):
  from peftjax._src.tuned import as_tuned
  return as_tuned(tree).params


def _signature(tree) -> dict:
  return {p: (type(x).__name__, tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", "")))
          for p, x in targeting.leaves_with_paths(tree)}


def _check_base_tree(who: str, tree, base_tree):
  """The base under adapter ``who`` must have ``base_tree``'s paths, types, shapes and dtypes."""
  have, want = _signature(_base_tree(tree)), _signature(base_tree)
  for p in sorted(set(have) | set(want)):
    if have.get(p) != want.get(p):
      h = "nothing" if p not in have else "{}{} {}".format(*have[p])
      w = "nothing" if p not in want else "{}{} {}".format(*want[p])
      raise ValueError(f"{p}: adapter {who!r} has {h} as its base, the pool {w}: all adapters "
                       f"of a pool must share one base model")


def _base_tree(tree):
  """``tree`` with every LoRA/IA3/pool node replaced by its base ``w``."""
  return jax.tree_util.tree_map(
      lambda x: x.w if isinstance(x, (LoraWeight, IA3Weight, *_POOLS)) else x, _unwrap(tree),
      is_leaf=is_node)


def base_params(pool):
  """The base model's parameter tree under ``pool`` (every pool node replaced by its ``w``):
  what :func:`peftjax.io.hf_peft.load_hf_peft` or ``restore_adapter`` load an adapter onto."""
  return _base_tree(pool)


def _lora_slot(path, node: LoraWeight, pool_like, max_rank: int, who: str):
  """``(a, b)`` of one adapter padded to ``max_rank``, checked against the pool's layout."""
  if node.n_in != pool_like.n_in or node.n_batch != pool_like.n_batch:
    raise ValueError(f"{path}: adapter {who!r} has LoRA with n_in={node.n_in}, "
                     f"{node.n_batch} layer axes; the pool n_in={pool_like.n_in}, "
                     f"{pool_like.n_batch} layer axes")
  r = node.rank
  if r > max_rank:
    raise ValueError(f"{path}: adapter {who!r} has rank {r}, above the pool's maximum rank "
                     f"{max_rank}; build the pool with a larger max_rank=")
  nb = node.n_batch
  pad_a = [(0, 0)] * (node.a.ndim - 1) + [(0, max_rank - r)]
  pad_b = [(0, 0)] * nb + [(0, max_rank - r)] + [(0, 0)] * (node.b.ndim - nb - 1)
  return np.pad(np.asarray(node.a), pad_a), np.pad(np.asarray(node.b), pad_b), r


def _stack_slots(per_slot, nb: int):
  """``[S]`` arrays of ``[*batch, ...]`` -> ``[*batch, S, ...]``."""
  return jnp.asarray(np.stack(per_slot, axis=nb))


def _names_leaf(names, lead):
  enc = _encode_names(names)
  return np.broadcast_to(enc, (*lead, *enc.shape))


def stack(adapters: Mapping[str, Any], base=None, *, slots: Optional[int] = None,
          max_rank: Optional[int] = None, dtype=None):
  """One tree holding every adapter of ``adapters`` on their shared base, one slot each.

  Args:
    adapters: ``{name: tuned tree}``: trees of one base model with LoRA/QLoRA
      (:class:`~peftjax.lora.LoraWeight`) or IA3 (:class:`~peftjax.ia3.IA3Weight`) nodes. Slots
      ``1..len(adapters)`` get them in this order; slot 0 is "no adapter". Adapters may target
      different kernels (a kernel an adapter does not target is a zero update in its slot) and
      have different ranks and scales (``rank_pattern``/``alpha_pattern`` included).
    base: the base parameter tree (plain arrays, or quantized kernels for QLoRA); default the
      first adapter's tree with its nodes replaced by their base kernels. Every adapter's base
      kernels must have the same types, shapes and dtypes (values are not compared).
    slots: number of slots including slot 0 (default ``len(adapters) + 1``); spare slots start
      empty, for :func:`load` to fill without changing shapes.
    max_rank: the padded rank of every LoRA pool (default the largest rank among the adapters).
    dtype: dtype of the stacked adapter arrays (default: the adapters' common dtype).

  Returns:
    The base tree with each adapted kernel a :class:`LoraPool` or :class:`IA3Pool` (not routed:
    call :func:`route` before running the model).

  Raises:
    ValueError: no adapters, a bad or duplicate name, too few slots, a rank above ``max_rank``,
      adapters whose base kernels differ, one kernel adapted by LoRA in one adapter and IA3 in
      another, or IA3 on different sides.
    TypeError: a tree with nodes that cannot be pooled (soft prompts, bottleneck adapters, ...).
  """
  if not isinstance(adapters, Mapping) or not adapters:
    raise ValueError(f"stack needs a non-empty {{name: tuned tree}} mapping, got {adapters!r}")
  names = [_check_name(n) for n in adapters]
  n_slots = len(names) + 1 if slots is None else slots
  if isinstance(n_slots, bool) or not isinstance(n_slots, (int, np.integer)) or \
      n_slots < len(names) + 1:
    raise ValueError(f"slots={slots!r} cannot hold slot 0 and {len(names)} adapters: need "
                     f"slots >= {len(names) + 1}")
  n_slots = int(n_slots)
  found = {n: _adapter_nodes(n, t) for n, t in adapters.items()}
  first = next(iter(adapters.values()))
  base_tree = _base_tree(first) if base is None else _unwrap(base)
  for n, t in adapters.items():
    _check_base_tree(n, t, base_tree)
  base_leaves = dict(targeting.leaves_with_paths(base_tree))
  paths = sorted({p for nodes in found.values() for p in nodes})
  ranks_all = [x.rank for nodes in found.values() for x in nodes.values()
               if isinstance(x, LoraWeight)]
  if max_rank is None:
    max_rank = max(ranks_all, default=1)
  elif isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
    raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")
  slot_name_list = [None, *names] + [None] * (n_slots - 1 - len(names))
  new = {}
  for path in paths:
    w = base_leaves[path]   # (every adapter's base matches base_tree: checked above)
    here = {n: found[n][path] for n in names if path in found[n]}
    kinds = {type(x) for x in here.values()}
    if len(kinds) > 1:
      raise ValueError(f"{path}: adapted by LoRA in some adapters and IA3 in others "
                       f"({ {n: type(x).__name__ for n, x in here.items()} }); pool them apart")
    ref = next(iter(here.values()))
    lead = _layer_shape(ref)
    if isinstance(ref, LoraWeight):
      adt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(
          *[x.a.dtype for x in here.values()])
      zero_a = np.zeros((*ref.a.shape[:-1], max_rank), adt)
      zero_b = np.zeros((*lead, max_rank, *ref.b.shape[ref.n_batch + 1:]), adt)
      a_s, b_s, sc, rk = [zero_a], [zero_b], [0.0], [0]
      for n in slot_name_list[1:]:
        if n is None or n not in here:
          a_s.append(zero_a), b_s.append(zero_b), sc.append(0.0), rk.append(0)
          continue
        a, b, r = _lora_slot(path, here[n], ref, max_rank, n)
        a_s.append(a.astype(adt)), b_s.append(b.astype(adt))
        sc.append(float(here[n].scale)), rk.append(r)
      nb = ref.n_batch
      new[path] = LoraPool(
          w=w, a=_stack_slots(a_s, nb), b=_stack_slots(b_s, nb),
          scales=jnp.asarray(np.broadcast_to(np.asarray(sc, np.float32), (*lead, n_slots))),
          ranks=jnp.asarray(np.broadcast_to(np.asarray(rk, np.int32), (*lead, n_slots))),
          names=jnp.asarray(_names_leaf(slot_name_list, lead)), n_in=ref.n_in)
    else:
      sides = {(x.side, x.n_axes, x.n_batch) for x in here.values()}
      if len(sides) > 1:
        raise ValueError(f"{path}: the adapters' IA3 vectors scale different sides "
                         f"({ {n: x.side for n, x in here.items()} }); pool them apart")
      vdt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(
          *[x.vector.dtype for x in here.values()])
      ones = np.ones(ref.vector.shape, vdt)
      v_s = [ones] + [np.asarray(here[n].vector).astype(vdt) if n in here else ones
                      for n in slot_name_list[1:]]
      rk = [0] + [int(n in here) for n in slot_name_list[1:]]
      new[path] = IA3Pool(
          w=w, vector=_stack_slots(v_s, ref.n_batch),
          ranks=jnp.asarray(np.broadcast_to(np.asarray(rk, np.int32), (*lead, n_slots))),
          names=jnp.asarray(_names_leaf(slot_name_list, lead)), side=ref.side,
          n_axes=ref.n_axes)
  return targeting.map_selected(lambda p, _: new[p], base_tree, set(new))


# ------------------------------------------------------------------------------------------------
# routing
# ------------------------------------------------------------------------------------------------

def route(pool, ids):
  """``pool`` with every row of the next batch routed to a slot.

  Args:
    pool: a tree from :func:`stack`.
    ids: one slot per batch row: an int array ``[rows]`` (traced values are fine, e.g. inside
      ``jit``), or a sequence of slot numbers and adapter names (``None`` or 0: no adapter).

  Returns:
    ``pool`` with every pool node's ``ids`` set (broadcast over its layer axes). The ids are
    data, not static: routing the next batch differently does not recompile.

  Raises:
    ValueError: an unknown adapter name, a slot outside ``[0, slots)`` (concrete ids), ids that
      are not one-dimensional.
  """
  found = _pools(pool)
  n_slots = found[0][1].n_slots
  if isinstance(ids, (list, tuple)):
    conv = []
    for i in ids:
      if i is None:
        conv.append(0)
      elif isinstance(i, str):
        conv.append(_slot_of(pool, i))
      else:
        conv.append(i)
    ids = np.asarray(conv)
  if not isinstance(ids, jax.core.Tracer):
    arr = np.asarray(ids)
    if not np.issubdtype(arr.dtype, np.integer):
      raise ValueError(f"ids must be integer slots, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= n_slots):
      raise ValueError(f"ids must be slots in [0, {n_slots}), got {arr.tolist()}")
  traced = isinstance(ids, jax.core.Tracer)
  ids = ids.astype(jnp.int32) if traced else np.asarray(ids, np.int32)
  if ids.ndim != 1:
    raise ValueError(f"ids must be one slot per batch row ([rows]), got shape {list(ids.shape)}")

  def visit(x):
    if not _is_pool(x):
      return x
    shape = (*_layer_shape(x), ids.shape[0])
    return x.replace(ids=jnp.broadcast_to(ids, shape) if traced else
                     jnp.asarray(np.broadcast_to(ids, shape)))
  return jax.tree_util.tree_map(visit, pool, is_leaf=is_node)


def per_adapter_mean(per_row_loss, ids):
  """The training loss that gives every adapter of a pool the gradient it gets alone.

  ``sum over the adapters in the batch of (mean of per_row_loss over that adapter's rows)``: with
  it, a step on the pool with a batch mixing adapters equals one step of each adapter on its own
  rows with a mean loss. (A plain mean over the batch would scale adapter ``k``'s gradient by
  ``n_k / rows``.)

  Args:
    per_row_loss: ``[rows]`` losses (e.g. each row's mean token loss).
    ids: int ``[rows]``: the rows' slots (as given to :func:`route`).

  >>> import jax.numpy as jnp
  >>> float(per_adapter_mean(jnp.array([1.0, 3.0, 10.0]), jnp.array([1, 1, 2])))
  12.0
  """
  ids = jnp.asarray(ids)
  same = (ids[:, None] == ids[None, :]).astype(per_row_loss.dtype)
  return jnp.sum(per_row_loss / jnp.sum(same, axis=1))


# ------------------------------------------------------------------------------------------------
# one adapter out, one adapter in
# ------------------------------------------------------------------------------------------------

def _first(x):
  return np.asarray(x).reshape(-1, x.shape[-1])[0]


def unstack(pool, name: str):
  """The tree of the adapter called ``name``: the base with its own LoRA/IA3 nodes, unpadded.

  ``unstack(stack({"x": t, ...}), "x")`` has ``t``'s nodes, arrays and scales (dropout and the
  ``matmul`` choice are not kept in a pool: they come back as the defaults).

  Raises:
    ValueError: ``name`` is not in the pool.

  >>> import jax.numpy as jnp, peftjax
  >>> t = peftjax.lora.apply({"mlp": {"up": {"kernel": jnp.ones((4, 3))}}}, rank=1)
  >>> pool = stack({"one": t}, max_rank=4)
  >>> unstack(pool, "one")["mlp"]["up"]["kernel"].a.shape     # the padding dropped
  (4, 1)
  """
  k = _slot_of(pool, name)

  def visit(x):
    if not _is_pool(x):
      return x
    nb = x.n_batch
    take = lambda arr: np.asarray(arr)[(slice(None),) * nb + (k,)]
    r = int(_first(x.ranks)[k])
    if r == 0:
      return x.w
    if isinstance(x, LoraPool):
      a = jnp.asarray(take(x.a)[..., :r])
      b = jnp.asarray(take(x.b)[(slice(None),) * nb + (slice(0, r),)])
      return LoraWeight(w=x.w, a=a, b=b, scale=float(_first(x.scales)[k]), n_in=x.n_in)
    return IA3Weight(w=x.w, vector=jnp.asarray(take(x.vector)), side=x.side, n_axes=x.n_axes)
  return jax.tree_util.tree_map(visit, pool, is_leaf=is_node)


def _read_adapter(pool, adapter):
  """A tuned tree from a tree, an HF PEFT directory or a peftjax adapter checkpoint."""
  if not isinstance(adapter, (str, os.PathLike)):
    return adapter
  path = Path(adapter)
  from peftjax.io.hf_peft import ADAPTER_CONFIG, load_hf_peft
  base = base_params(pool)
  if (path / ADAPTER_CONFIG).is_file():
    return load_hf_peft(path, base)
  if not path.is_dir():
    raise ValueError(f"{path}: no such adapter directory (an HF PEFT adapter with "
                     f"{ADAPTER_CONFIG}, or a peftjax adapter checkpoint)")
  from peftjax.io.checkpoint import restore_adapter
  return restore_adapter(path, base)


def saved_layout(adapter) -> Optional[bool]:
  """The layers' layout an adapter directory was saved on: True for stacked layers (a
  ``scan_layers`` model, as `peftjax train` trains language models), False per layer, None for
  an HF PEFT directory (it loads onto either) or an adapter without layer leaves."""
  from peftjax.io.hf_peft import ADAPTER_CONFIG
  path = Path(adapter)
  if (path / ADAPTER_CONFIG).is_file():
    return None
  from peftjax.io.checkpoint import stacked_layers
  return stacked_layers(path)


def _set_slot(pool, k: int, name: Optional[str], nodes: dict):
  """``pool`` with slot ``k`` holding ``nodes`` (``{path: LoraWeight | IA3Weight}``) named
  ``name`` (None: an empty slot)."""
  pools = dict(_pools(pool))
  for p, x in nodes.items():
    if p not in pools:
      raise ValueError(f"{p}: the adapter targets a kernel the pool does not have (the pool's "
                       f"kernels: {sorted(pools)[:8]}{' ...' if len(pools) > 8 else ''}); pools "
                       f"have fixed targets: stack the adapters together instead")
    want = LoraWeight if isinstance(pools[p], LoraPool) else IA3Weight
    if not isinstance(x, want):
      raise ValueError(f"{p}: the adapter has {type(x).__name__}, the pool a "
                       f"{type(pools[p]).__name__}")
  # check everything before changing anything
  for p, x in nodes.items():
    pl = pools[p]
    if isinstance(pl, LoraPool):
      _lora_slot(p, x, pl, pl.max_rank, name)
    elif (x.side, x.n_axes, x.n_batch) != (pl.side, pl.n_axes, pl.n_batch):
      raise ValueError(f"{p}: the adapter's IA3 scales side {x.side!r}, the pool's {pl.side!r}")
  names = list(slot_names(pool))
  names[k] = name

  def visit(path, x):
    if not _is_pool(x):
      return x
    p = targeting.path_str(path)
    nb, lead = x.n_batch, _layer_shape(x)
    # New values go in through host arrays, so every leaf keeps the pool's placement (committed
    # or not, its sharding): a jitted function sees the same input types and does not recompile.
    put = lambda arr, v: arr.at[(slice(None),) * nb + (k,)].set(np.asarray(v, arr.dtype))
    node = nodes.get(p)
    enc = x.names.at[...].set(np.asarray(_names_leaf(names, lead)))
    if isinstance(x, LoraPool):
      if node is None:
        a = put(x.a, np.zeros(x.a.shape[:nb] + x.a.shape[nb + 1:]))
        b = put(x.b, np.zeros(x.b.shape[:nb] + x.b.shape[nb + 1:]))
        scale, r = 0.0, 0
      else:
        pa, pb, r = _lora_slot(p, node, x, x.max_rank, name)
        a, b, scale = put(x.a, pa), put(x.b, pb), float(node.scale)
      return x.replace(a=a, b=b, scales=put(x.scales, np.full(lead, scale)),
                       ranks=put(x.ranks, np.full(lead, r)), names=enc)
    v = node.vector if node is not None else np.ones(x.vector.shape[:nb] +
                                                     x.vector.shape[nb + 1:])
    return x.replace(vector=put(x.vector, v), names=enc,
                     ranks=put(x.ranks, np.full(lead, int(node is not None))))
  return jax.tree_util.tree_map_with_path(visit, pool, is_leaf=is_node)


def load(pool, slot_or_name, adapter, *, name: Optional[str] = None):
  """``pool`` with an adapter loaded into one slot (hot-swap): shapes and static fields stay the
  same, so a jitted function called with the result does not recompile.

  Args:
    pool: a tree from :func:`stack` (routed or not; the routing is kept).
    slot_or_name: an adapter name (its slot is replaced, or a new name takes the first empty
      slot) or a slot number ``1..slots-1``.
    adapter: a tuned tree of the pool's base model, a Hugging Face PEFT adapter directory
      (``adapter_config.json``, read with :func:`peftjax.io.hf_peft.load_hf_peft`) or a peftjax
      adapter checkpoint directory (:func:`peftjax.io.checkpoint.save_adapter`).
    name: the slot's name when ``slot_or_name`` is a number (default: the slot's present name,
      else ``"slot<k>"``).

  Raises:
    ValueError: the pool is full, slot 0 or a slot out of range, a rank above the pool's maximum,
      a target the pool does not have, a different base kernel or node type, a bad name.
    TypeError: an adapter with nodes that cannot be pooled.

  >>> import jax, jax.numpy as jnp, peftjax
  >>> base = {"mlp": {"up": {"kernel": jnp.ones((4, 3))}}}
  >>> pool = stack({"one": peftjax.lora.apply(base, rank=2)}, slots=3)
  >>> pool = load(pool, "two", peftjax.lora.apply(base, rank=2, key=jax.random.key(1)))
  >>> slot_names(pool), slot_names(remove(pool, "one"))
  ((None, 'one', 'two'), (None, None, 'two'))
  """
  names = list(slot_names(pool))
  n_slots = len(names)
  if isinstance(slot_or_name, str):
    if name is not None and name != slot_or_name:
      raise ValueError(f"name={name!r} is only for a slot given by number; the adapter is "
                       f"called {slot_or_name!r}")
    name = _check_name(slot_or_name)
    if name in names:
      k = names.index(name)
    else:
      free = [i for i in range(1, n_slots) if names[i] is None]
      if not free:
        raise ValueError(f"the pool is full ({n_slots - 1} adapter slots: {names[1:]}); remove "
                         f"one first, or stack with a larger slots=")
      k = free[0]
  elif isinstance(slot_or_name, (int, np.integer)) and not isinstance(slot_or_name, bool):
    k = int(slot_or_name)
    if not 1 <= k < n_slots:
      raise ValueError(f"slot {k} is not an adapter slot: use 1..{n_slots - 1} (slot 0 is "
                       f"\"no adapter\")")
    name = _check_name(name if name is not None else names[k] or f"slot{k}")
    if name in names and names.index(name) != k:
      raise ValueError(f"adapter name {name!r} is already used by slot {names.index(name)}")
  else:
    raise TypeError(f"slot_or_name must be an adapter name or a slot number, got "
                    f"{slot_or_name!r}")
  tree = _read_adapter(pool, adapter)
  nodes = _adapter_nodes(name, tree)
  # targets outside the pool first (the clearer message), then the rest of the base
  pools = {p for p, _ in _pools(pool)}
  if set(nodes) <= pools:
    _check_base_tree(name, tree, base_params(pool))
  return _set_slot(pool, k, name, nodes)


def remove(pool, name: str):
  """``pool`` with the adapter called ``name`` removed (its slot emptied: zeros, scale 0); rows
  still routed to that slot get the base model.

  Raises:
    ValueError: ``name`` is not in the pool.
  """
  return _set_slot(pool, _slot_of(pool, name), None, {})
