"""Nodes: the pytree types that stand in for a parameter leaf.

A *node* replaces one array leaf of a parameter tree (usually a kernel) with a small structure that
computes the same array in a cheaper or trainable way: ``LoraWeight(w, a, b)`` is ``w + s*a@b``,
``QuantizedWeight(packed, scales, ...)`` is a dequantized 4-bit matrix, and so on. Every node

* is a dataclass registered as a JAX pytree with :func:`node_dataclass` (array fields are children,
  fields declared with ``static_field()`` are static metadata);
* names its trainable fields in ``trainable_fields`` (everything else is frozen);
* knows the array it stands for: ``shape``, ``dtype`` and :meth:`Node.materialize`;
* may implement a fast rule for ``dot_general`` with the node as the right-hand operand
  (:meth:`Node.dot_general`); :func:`dot_general` below normalizes the left-hand case onto it;
* may implement :meth:`Node.astype` so a dtype cast keeps the node factored.

This module is the one place where node types plug into :func:`peftjax.lift`: the interpreter
calls :func:`dot_general`, :func:`materialize` and :meth:`Node.astype` and nothing else.
Nodes nest: a field may hold another node (``LoraWeight(w=QuantizedWeight(...))``); rules
compute on nested nodes through :func:`dot_general` and :func:`materialize` again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "Node",
    "node_dataclass",
    "static_field",
    "is_node",
    "materialize",
    "dot_general",
    "shape_dtype",
]


def static_field(**kwargs):
  """A dataclass field that is static pytree metadata (not a leaf): ints, floats, strings."""
  return dataclasses.field(metadata={"static": True}, **kwargs)


class Node:
  """Base class of every node. Subclasses are created with :func:`node_dataclass`."""

  #: Names of the fields whose leaves are trained. All other array fields are frozen.
  trainable_fields: ClassVar[tuple[str, ...]] = ()
  #: Whether a reparameterization (LoRA) may wrap this node as its frozen base.
  wrappable: ClassVar[bool] = False
  #: Whether every array leaf carries the node's leading axis, so that slicing all leaves on axis
  #: 0 (what ``lax.scan`` does to ``xs``) yields the node of one slice. Nodes whose leaves do not
  #: (e.g. an MLP that *produces* a stacked array) set this False; ``lift`` then materializes
  #: them before a scan slices them.
  scan_slices_leaves: ClassVar[bool] = True

  # -- the array this node stands for ---------------------------------------------------------
  @property
  def shape(self) -> tuple[int, ...]:
    raise NotImplementedError

  @property
  def dtype(self) -> jnp.dtype:
    raise NotImplementedError

  @property
  def ndim(self) -> int:
    return len(self.shape)

  def materialize(self) -> jax.Array:
    """The plain array this node stands for (differentiable in every field)."""
    raise NotImplementedError

  # -- rules ----------------------------------------------------------------------------------
  def dot_general(self, x, dimension_numbers, *, precision=None, preferred_element_type=None):
    """``lax.dot_general(x, self.materialize(), dimension_numbers, ...)``, computed faster.

    The node is always the right-hand operand here; :func:`dot_general` handles the other case.
    The default materializes. Subclasses override it with their factored rule and may fall back
    to ``super().dot_general(...)`` for dimension numbers they do not handle.
    """
    return lax.dot_general(x, self.materialize(), dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)

  def astype(self, dtype) -> "Node | jax.Array":
    """The node cast to ``dtype`` (what ``convert_element_type`` on the kernel does).

    The default casts every floating field; nodes whose storage must not be cast (packed integer
    codes) override it.
    """
    dtype = jnp.dtype(dtype)

    def cast(x):
      if is_node(x):
        return x.astype(dtype)
      if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(dtype)
      return x

    return self.replace(**{f: jax.tree_util.tree_map(cast, getattr(self, f), is_leaf=is_node)
                           for f in self.data_fields()})

  def param_count(self) -> int:
    """Parameters this node holds, for :func:`peftjax.summary`: by default every stored element
    of its array fields (nested nodes count their own way). Quantized storage overrides it with
    the number of values it stands for."""
    total = 0
    for name in self.data_fields():
      for leaf in jax.tree_util.tree_leaves(getattr(self, name), is_leaf=is_node):
        if is_node(leaf):
          total += leaf.param_count()
        elif hasattr(leaf, "shape") and not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) \
            and jnp.issubdtype(leaf.dtype, jnp.inexact):
          total += math.prod(leaf.shape)
    return total

  # -- helpers ---------------------------------------------------------------------------------
  @classmethod
  def data_fields(cls) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("static", False))

  def replace(self, **changes):
    return dataclasses.replace(self, **changes)

  def trainable_mask(self):
    """The same node with a bool in place of every leaf: True where the leaf is trained."""
    out = {}
    for name in self.data_fields():
      value = getattr(self, name)
      train = name in self.trainable_fields
      out[name] = jax.tree_util.tree_map(
          lambda v, train=train: v.trainable_mask() if (is_node(v) and not train) else
          jax.tree_util.tree_map(lambda _: train, v),
          value, is_leaf=is_node)
    return self.replace(**out)

  def __repr__(self):
    fields = []
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if hasattr(v, "shape") and hasattr(v, "dtype") and not is_node(v):
        v = f"{jnp.dtype(v.dtype).name}{list(v.shape)}"
      fields.append(f"{f.name}={v}")
    return f"{type(self).__name__}({', '.join(fields)})"


def node_dataclass(cls):
  """Makes ``cls`` a frozen dataclass registered as a pytree node.

  Fields made with :func:`static_field` become static metadata; all others are children.
  """
  cls = dataclasses.dataclass(frozen=True, repr=False, eq=False)(cls)
  data, meta = [], []
  for f in dataclasses.fields(cls):
    (meta if f.metadata.get("static", False) else data).append(f.name)
  jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
  return cls


def is_node(x: Any) -> bool:
  return isinstance(x, Node)


def materialize(x):
  """The plain array for a node; arrays pass through."""
  return x.materialize() if is_node(x) else x


def shape_dtype(x) -> jax.ShapeDtypeStruct:
  """The abstract value a node (or array) stands for."""
  if is_node(x):
    return jax.ShapeDtypeStruct(tuple(x.shape), jnp.dtype(x.dtype))
  aval = jax.typeof(x)
  return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))


def _free_dims(ndim: int, contract: Sequence[int], batch: Sequence[int]) -> list[int]:
  used = set(contract) | set(batch)
  return [d for d in range(ndim) if d not in used]


def dot_general(lhs, rhs, dimension_numbers, *, precision=None, preferred_element_type=None,
                **unused_params):
  """``lax.dot_general`` where either operand may be a node.

  A node on the right runs its rule. A node on the left is moved to the right by swapping the
  operands and transposing the result, so node rules handle one case only. Both operands nodes:
  the left one is materialized.
  """
  del unused_params  # e.g. out_sharding: the rules produce default-sharded results
  if is_node(lhs) and is_node(rhs):
    lhs = lhs.materialize()
  if is_node(rhs):
    return rhs.dot_general(lhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  if not is_node(lhs):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
  # node @ x  ==  transpose(x @ node)
  (lc, rc), (lb, rb) = dimension_numbers
  out = lhs.dot_general(rhs, ((rc, lc), (rb, lb)), precision=precision,
                        preferred_element_type=preferred_element_type)
  nb = len(lb)
  n_node_free = len(_free_dims(lhs.ndim, lc, lb))
  n_x_free = len(_free_dims(jnp.ndim(rhs), rc, rb))
  # swapped result: (batch, x_free, node_free) -> wanted: (batch, node_free, x_free)
  perm = (list(range(nb)) + list(range(nb + n_x_free, nb + n_x_free + n_node_free)) +
          list(range(nb, nb + n_x_free)))
  return jnp.transpose(out, perm)
