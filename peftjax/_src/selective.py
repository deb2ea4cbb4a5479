"""Node types of the selective methods: what trains is marked by wrapping the leaf in a node.

* :class:`Trainable` ``(value)``: the whole leaf trains (BitFit biases, partial tuning of whole
  leaves, automatic selection of leaves).
* :class:`SliceTrainable` ``(frozen, value, index)``: some slices of a leaf train (one layer of a
  layer-stacked ``[L, ...]`` array, some rows of a kernel); the rest stay bit-identical.
* :class:`SparseDelta` ``(w, indices, values)``: ``w`` plus a sparse difference with exactly
  ``k`` stored entries (the projected DiffPruning delta, a Fisher-selected sparse mask).
* :class:`DiffPruningWeight` ``(w, delta, log_alpha)``: ``w + z * delta`` with hard-concrete gates
  ``z`` (Louizos et al., 2018) while DiffPruning trains (Guo et al., 2021).

Because trainability is carried by the nodes, :func:`peftjax.trainable_mask`, ``split``,
``optimizer``, ``summary`` and ``merge`` need no special case for any of them.

Nodes whose leaves do not all carry a layer axis (``SliceTrainable``, ``SparseDelta``) set
``scan_slices_leaves = False``: sliced by ``lax.scan`` on axis 0 they would not be the node of
one layer, so :func:`peftjax.lift` materializes them before a scan (cheap: one scatter).
``DiffPruningWeight`` keeps one gate key per layer, so it is scanned like LoRA.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from peftjax._src import nodes as nodes_lib
from peftjax._src import targeting
from peftjax._src.nodes import Node, is_node, node_dataclass, static_field

__all__ = ["Trainable", "SliceTrainable", "SparseDelta", "DiffPruningWeight", "describe_leaf",
           "check_plain_float", "leaf_predicate"]


@node_dataclass
class Trainable(Node):
  """A leaf that trains as a whole: stands for ``value`` itself.

  Attributes:
    value: the trained array, any shape.

  >>> import jax.numpy as jnp
  >>> t = Trainable(jnp.ones(3))
  >>> t.shape, t.trainable_mask().value
  ((3,), True)
  """

  value: jax.Array

  type_id = "trainable"
  base_field = "value"
  trainable_fields = ("value",)


  def materialize(self):
    return self.value


@node_dataclass
class SliceTrainable(Node):
  """A leaf of which only some slices train.

  The leaf is viewed as ``[R, *tail]`` by flattening its first ``n_lead`` axes
  (``R = prod(shape[:n_lead])``); the slices ``index`` of that view are ``value`` (trained), the
  others come from ``frozen``. ``n_lead=1`` on a layer-stacked ``[L, ...]`` array trains whole
  layers; ``n_lead=1`` on a ``[in, out]`` kernel trains rows; ``n_lead=ndim-1`` trains vectors
  along the last axis.

  Attributes:
    frozen: the full array ``[*lead, *tail]``; its entries at ``index`` are not used.
    value: ``[k, *tail]``, the trained slices.
    index: ``k`` sorted, distinct ints in ``[0, R)`` (static).
    n_lead: number of leading axes flattened into the slice index (static).

  >>> import jax.numpy as jnp
  >>> n = SliceTrainable(jnp.zeros((3, 2)), jnp.ones((1, 2)), index=(1,))
  >>> n.materialize().tolist()
  [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
  """

  frozen: jax.Array
  value: jax.Array
  index: tuple = static_field(default=())
  n_lead: int = static_field(default=1)

  type_id = "slice_trainable"
  base_field = "frozen"
  trainable_fields = ("value",)
  scan_slices_leaves = False  # ``value`` has k, not L, rows: materialized before a scan


  def materialize(self):
    shape = self.shape
    rows = math.prod(shape[:self.n_lead])
    flat = self.frozen.reshape(rows, *shape[self.n_lead:])
    flat = flat.at[np.asarray(self.index, np.int32)].set(
        self.value.astype(flat.dtype), indices_are_sorted=True, unique_indices=True)
    return flat.reshape(shape)

  def astype(self, dtype):
    return self.replace(frozen=self.frozen.astype(dtype))


#: The sparse ``dot_general`` rule is used while ``x``'s free size times ``k`` is at most this
#: many times the kernel's size (else the node materializes: one scatter, one dense matmul).
SPARSE_DOT_MAX_RATIO = 1.0


@node_dataclass
class SparseDelta(Node):
  """``w`` plus a sparse difference: ``w.ravel().at[indices].add(values)``.

  ``dot_general`` with this node computes ``x @ w`` plus the sparse product (a gather of ``x``
  and a scatter-add into the output, ``O(tokens * k)``), so neither the dense difference nor its
  dense gradient ``x^T g`` is formed, while that is cheaper than one more kernel-sized array
  (see :data:`SPARSE_DOT_MAX_RATIO`).

  Attributes:
    w: frozen base array (any shape).
    indices: int32 ``[k]``, sorted distinct flat indices into ``w`` (frozen; differentiate the
      trainable part from ``peftjax.split``, since ``jax.grad`` rejects integer leaves).
    values: ``[k]`` trained differences.

  >>> import jax.numpy as jnp
  >>> n = SparseDelta(jnp.zeros((2, 2)), jnp.array([1, 2], jnp.int32), jnp.array([5.0, 7.0]))
  >>> n.materialize().tolist()
  [[0.0, 5.0], [7.0, 0.0]]
  """

  w: Any
  indices: jax.Array
  values: jax.Array

  type_id = "sparse_delta"
  base_field = "w"
  trainable_fields = ("values",)
  scan_slices_leaves = False  # flat indices into the whole stacked array: materialized first


  @property
  def k(self) -> int:
    return int(self.indices.shape[0])

  def dense_delta(self):
    """The difference as a dense array with the shape of ``w`` (in ``values``' dtype)."""
    return jnp.zeros(math.prod(self.shape), self.values.dtype).at[self.indices].add(
        self.values, indices_are_sorted=True, unique_indices=True).reshape(self.shape)

  def materialize(self):
    w = nodes_lib.materialize(self.w)
    flat = w.reshape(-1).at[self.indices].add(
        self.values.astype(w.dtype), indices_are_sorted=True, unique_indices=True)
    return flat.reshape(w.shape)

  def astype(self, dtype):
    return self.replace(w=self.w.astype(dtype))

  def dot_general(self, x, dimension_numbers, *, precision=None, preferred_element_type=None):
    (lc, rc), (lb, rb) = dimension_numbers
    shape = self.shape
    x_free = [d for d in range(x.ndim) if d not in set(lc) | set(lb)]
    x_free_size = math.prod(x.shape[d] for d in x_free)
    if rb or x_free_size * self.k > SPARSE_DOT_MAX_RATIO * math.prod(shape):
      return super().dot_general(x, dimension_numbers, precision=precision,
                                 preferred_element_type=preferred_element_type)
    base = nodes_lib.dot_general(x, self.w, dimension_numbers, precision=precision,
                                 preferred_element_type=preferred_element_type)
    free = [d for d in range(len(shape)) if d not in set(rc)]
    # Multi-index of each stored entry, then its flat index over the contracted and free axes.
    strides = np.cumprod((1,) + shape[::-1])[:-1][::-1]
    idx = self.indices
    coords = [lax.rem(lax.div(idx, jnp.asarray(int(s), idx.dtype)), jnp.asarray(n, idx.dtype))
              for s, n in zip(strides, shape)]

    def ravel(axes):
      out = None
      for d in axes:
        out = coords[d] if out is None else out * shape[d] + coords[d]
      return jnp.zeros_like(idx) if out is None else out

    c_idx, f_idx = ravel(rc), ravel(free)
    xt = jnp.transpose(x, x_free + list(lc))
    xt = xt.reshape(*xt.shape[:len(x_free)], math.prod(shape[d] for d in rc))
    contrib = xt.at[..., c_idx].get(mode="promise_in_bounds")              # [*x_free, k]
    contrib = contrib * self.values.astype(x.dtype).reshape((1,) * (contrib.ndim - 1) + (-1,))
    out = jnp.zeros((*xt.shape[:-1], math.prod(shape[d] for d in free)), contrib.dtype)
    out = out.at[..., f_idx].add(contrib, mode="promise_in_bounds")
    out = out.reshape(*xt.shape[:-1], *(shape[d] for d in free))
    return base + out.astype(base.dtype)


@node_dataclass
class DiffPruningWeight(Node):
  """``w + z * delta`` with a hard-concrete gate ``z`` per entry (DiffPruning while training).

  ``z = clip(sigmoid((log u - log(1-u) + log_alpha) / beta) * (zeta - gamma) + gamma, 0, 1)`` with
  ``u ~ U(0, 1)`` drawn from ``key`` (training); without a key the gate is deterministic,
  ``clip(sigmoid(log_alpha) * (zeta - gamma) + gamma, 0, 1)`` (evaluation). The probability that a
  gate is nonzero, ``sigmoid(log_alpha - beta * log(-gamma / zeta))``, is the differentiable
  expected L0 norm that :func:`peftjax.diff_pruning.penalty` drives to the target density.

  Attributes:
    w: frozen base array.
    delta: trained difference, shape of ``w``.
    log_alpha: trained gate logits, shape of ``w``.
    key: ``None`` or raw uint32 key data ``[*w.shape[:n_batch], 2]`` (one key per layer of a
      layer-stacked array, so ``lax.scan`` slices it like the other leaves); frozen.
    n_batch: number of leading layer axes of ``w`` (used when setting ``key``).
    beta, gamma, zeta: hard-concrete temperature and stretch interval.
  """

  w: jax.Array
  delta: jax.Array
  log_alpha: jax.Array
  key: Any = None
  n_batch: int = static_field(default=0)
  beta: float = static_field(default=2.0 / 3.0)
  gamma: float = static_field(default=-0.1)
  zeta: float = static_field(default=1.1)

  type_id = "diff_pruning"
  base_field = "w"
  rng_field = "key"
  trainable_fields = ("delta", "log_alpha")


  def gate(self) -> jax.Array:
    """The gate ``z`` in ``[0, 1]``, shape of ``w`` (float32; stochastic when ``key`` is set)."""
    la = self.log_alpha.astype(jnp.float32)
    if self.key is None:
      s = jax.nn.sigmoid(la)
    else:
      nb = self.key.ndim - 1
      keys = self.key.reshape(-1, 2)
      per = la.shape[nb:]
      u = jax.vmap(lambda k: jax.random.uniform(jax.random.wrap_key_data(k), per, jnp.float32,
                                                1e-6, 1.0 - 1e-6))(keys).reshape(la.shape)
      s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + la) / self.beta)
    return jnp.clip(s * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

  @property
  def open_logit(self) -> float:
    """The deterministic gate is nonzero exactly where ``log_alpha > open_logit``."""
    p = -self.gamma / (self.zeta - self.gamma)
    return math.log(p / (1.0 - p))

  def prob_nonzero(self) -> jax.Array:
    """``P(z != 0)`` per entry (float32, shape of ``w``): the expected L0 norm's terms."""
    shift = self.beta * math.log(-self.gamma / self.zeta)
    return jax.nn.sigmoid(self.log_alpha.astype(jnp.float32) - shift)

  def effective_delta(self) -> jax.Array:
    return self.gate() * self.delta.astype(jnp.float32)

  def materialize(self):
    return (self.w + self.effective_delta().astype(self.w.dtype)).astype(self.w.dtype)

  def astype(self, dtype):
    return self.replace(w=self.w.astype(dtype))


# -- helpers shared by the method modules --------------------------------------------------------

describe_leaf = targeting.describe_leaf


def top_k(mags: np.ndarray, k: int) -> np.ndarray:
  """Sorted flat positions of the ``k`` largest values (ties: lower position first).

  >>> top_k(np.array([0.5, 2.0, 0.5, 1.0]), 3).tolist()
  [0, 1, 3]
  """
  if k == mags.size:
    return np.arange(mags.size)
  kth = np.partition(mags, mags.size - k)[mags.size - k]
  above = np.flatnonzero(mags > kth)
  at = np.flatnonzero(mags == kth)[:k - above.size]
  return np.sort(np.concatenate([above, at]))


def check_plain_float(path: str, leaf, method: str) -> None:
  """Raises unless ``leaf`` is a plain floating array (not a node, not an int array)."""
  if is_node(leaf):
    raise ValueError(
        f"{method}: {path} is already rewritten by another method ({describe_leaf(leaf)}); "
        f"two methods on one leaf have no defined order. Narrow `targets`, or fold the other "
        f"method in first with peftjax.merge")
  if not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
    raise TypeError(f"{method}: {path} is not an array: {describe_leaf(leaf)}")
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    raise TypeError(f"{method}: {path} is not a floating array ({describe_leaf(leaf)}); only "
                    f"floating parameters can be trained")


def leaf_predicate(targets):
  """A predicate ``(path, leaf) -> bool`` over *any* leaf (not only kernels).

  ``None``: every leaf; a regex (full match); a list of names (a path component equal to one of
  them: a module such as ``"classifier"`` or a leaf name such as ``"bias"``); a callable.
  """
  if targets is None:
    return lambda p, x: True
  if isinstance(targets, (list, tuple)):
    if not targets or not all(isinstance(n, str) for n in targets):
      raise TypeError(f"targets must be a regex, a non-empty list of module names or a callable "
                      f"(path, leaf) -> bool; got {targets!r}")
    names = set(targets)
    return lambda p, x: bool(names.intersection(p.split("/")))
  return targeting.compile_targets(targets)
