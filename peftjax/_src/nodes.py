"""Nodes: the pytree types that stand in for a parameter leaf.

A *node* replaces one array leaf of a parameter tree (usually a kernel) with a small structure that
computes the same array in a cheaper or trainable way: ``LoraWeight(w, a, b)`` is ``w + s*a@b``,
``QuantizedWeight(packed, scales, ...)`` is a dequantized 4-bit matrix, and so on. Every node

* is a dataclass registered as a JAX pytree with :func:`node_dataclass` (array fields are children,
  fields declared with ``static_field()`` are static metadata);
* declares its roles as class attributes, checked by :func:`node_dataclass` when the class is
  created (a wrong declaration fails at import, not in a user's run):

  - ``type_id``: a stable name for checkpoint manifests (``"lora"``), unique among node types;
  - ``trainable_fields``: the fields whose leaves train (everything else is frozen);
  - ``base_field``: the field holding the array the node stands for (LoRA's ``w``); ``shape``
    and ``dtype`` derive from it. When that field is frozen it is the *base weight*, which
    adapter checkpoints take from the base model instead of saving. ``None``: the node computes
    its own ``shape``/``dtype`` (and must define them);
  - ``rng_field``: a frozen field holding per-step randomness (raw ``uint32[*layers, 2]`` key
    data) that :func:`set_rng` fills and checkpoints never save; ``None`` if the node has none;
  - ``execution_fields``: static fields that choose *how* the node is computed, not *what*
    (LoRA's ``matmul``): a restored checkpoint keeps the template's value;
  - ``mergeable``: whether :func:`peftjax.merge` can fold it into a plain array;
  - ``hf_peft_type``: the Hugging Face PEFT ``peft_type`` its adapter is saved as, or ``None``;

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
from typing import Any, ClassVar, Optional, Sequence

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
    "set_rng",
    "node_types",
    "node_type",
]

#: type_id -> node class, filled by :func:`node_dataclass`.
_NODE_TYPES: dict[str, type] = {}
#: other names a node class was stored under (``"peftjax.lora.LoraWeight"``, the module path
#: that format-1 manifests recorded) -> type_id.
_ALIASES: dict[str, str] = {}


def static_field(**kwargs):
  """A dataclass field that is static pytree metadata (not a leaf): ints, floats, strings."""
  return dataclasses.field(metadata={"static": True}, **kwargs)


class Node:
  """Base class of every node. Subclasses are created with :func:`node_dataclass`."""

  #: Stable name of the node type in checkpoint manifests (required, unique).
  type_id: ClassVar[str] = ""
  #: Names of the fields whose leaves are trained. All other array fields are frozen.
  trainable_fields: ClassVar[tuple[str, ...]] = ()
  #: The field holding the array the node stands for (``shape``/``dtype`` derive from it); when
  #: it is frozen, it is the base weight. None: the node defines ``shape`` and ``dtype`` itself.
  base_field: ClassVar[Optional[str]] = None
  #: Frozen field of per-step PRNG key data, filled by :func:`set_rng`; never checkpointed.
  rng_field: ClassVar[Optional[str]] = None
  #: Static fields that choose how the node is computed (kept from the template on restore).
  execution_fields: ClassVar[tuple[str, ...]] = ()
  #: Whether :func:`peftjax.merge` folds the node into a plain array.
  mergeable: ClassVar[bool] = True
  #: Hugging Face PEFT ``peft_type`` this node's adapter is written as, or None.
  hf_peft_type: ClassVar[Optional[str]] = None
  #: Earlier names of the type in manifests (the class's ``module.qualname`` is added).
  aliases: ClassVar[tuple[str, ...]] = ()
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
    return tuple(getattr(self, self.base_field).shape)

  @property
  def dtype(self) -> jnp.dtype:
    return getattr(self, self.base_field).dtype

  @property
  def base(self):
    """The frozen base weight (the ``base_field``'s value when that field is frozen), or None."""
    f = self.base_field
    return None if f is None or f in self.trainable_fields else getattr(self, f)

  # -- per-step randomness ---------------------------------------------------------------------
  def wants_rng(self) -> bool:
    """Whether :func:`set_rng` should give this node key data (default: it has an rng field)."""
    return self.rng_field is not None

  def rng_shape(self) -> tuple[int, ...]:
    """Leading (layer) axes of the key data: one key per layer of a layer-stacked node."""
    return tuple(self.shape[:getattr(self, "n_batch", 0)])

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
  """Makes ``cls`` a frozen dataclass registered as a pytree node, after checking its roles.

  Fields made with :func:`static_field` become static metadata; all others are children. The
  class's role declarations (see the module docstring) must be consistent, else ``TypeError``
  here, at class creation: ``type_id`` set and unique; ``trainable_fields``, ``base_field`` and
  ``rng_field`` naming data fields (the rng field frozen, defaulting to None);
  ``execution_fields`` naming static fields; ``shape``/``dtype`` defined when there is no
  ``base_field``.

  >>> import jax.numpy as jnp
  >>> @node_dataclass
  ... class Scaled(Node):
  ...   type_id = "doc_scaled"
  ...   w: jax.Array
  ...   s: jax.Array
  ...   base_field, trainable_fields = "w", ("s",)
  ...   def materialize(self):
  ...     return self.w * self.s
  >>> Scaled(jnp.ones((2, 3)), jnp.full((3,), 2.0)).shape
  (2, 3)
  >>> @node_dataclass
  ... class Broken(Node):
  ...   type_id = "doc_broken"
  ...   w: jax.Array
  ...   trainable_fields = ("v",)
  Traceback (most recent call last):
  TypeError: Broken.trainable_fields names 'v', which is not a data field (data fields: ['w'])
  """
  cls = dataclasses.dataclass(frozen=True, repr=False, eq=False)(cls)
  data, meta = [], []
  for f in dataclasses.fields(cls):
    (meta if f.metadata.get("static", False) else data).append(f.name)
  _check_roles(cls, data, meta)
  jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
  _NODE_TYPES[cls.type_id] = cls
  for name in (f"{cls.__module__}.{cls.__qualname__}", *cls.aliases):
    _ALIASES[name] = cls.type_id
  return cls


def _check_roles(cls, data: list, meta: list):
  name = cls.__name__

  def fail(msg):
    raise TypeError(f"{name}.{msg}")

  tid = cls.__dict__.get("type_id")
  if not isinstance(tid, str) or not tid:
    fail("type_id must be declared (a stable, unique string for checkpoint manifests)")
  if tid in _NODE_TYPES and _NODE_TYPES[tid].__qualname__ != cls.__qualname__:
    fail(f"type_id {tid!r} is already used by {_NODE_TYPES[tid].__module__}."
         f"{_NODE_TYPES[tid].__qualname__}")
  for f in cls.trainable_fields:
    if f not in data:
      fail(f"trainable_fields names {f!r}, which is not a data field (data fields: {data})")
  for role in ("base_field", "rng_field"):
    f = getattr(cls, role)
    if f is not None and f not in data:
      fail(f"{role} names {f!r}, which is not a data field (data fields: {data})")
  if cls.rng_field is not None:
    if cls.rng_field in cls.trainable_fields:
      fail(f"rng_field {cls.rng_field!r} is also trainable; key data must be frozen")
    default = {f.name: f.default for f in dataclasses.fields(cls)}[cls.rng_field]
    if default is not None:
      fail(f"rng_field {cls.rng_field!r} must default to None (no randomness until set_rng)")
  for f in cls.execution_fields:
    if f not in meta:
      fail(f"execution_fields names {f!r}, which is not a static field (static fields: {meta})")
  if cls.base_field is None:
    for prop in ("shape", "dtype"):
      if getattr(cls, prop) is getattr(Node, prop):
        fail(f"{prop} must be defined: the node declares no base_field to derive it from")
  if not isinstance(cls.mergeable, bool):
    fail(f"mergeable must be a bool, got {cls.mergeable!r}")


def node_types() -> dict[str, type]:
  """Every registered node type: ``{type_id: class}`` (importing peftjax's method modules)."""
  import importlib

  from peftjax._src.method import METHOD_MODULES
  # quant: quantized bases outside any method; multi: adapter pools of the methods' nodes
  for mod in (*METHOD_MODULES, "quant", "multi"):
    importlib.import_module(f"peftjax.{mod}")
  return dict(_NODE_TYPES)


def node_type(name: str) -> type:
  """The node class of a manifest name: a ``type_id`` or an earlier name (``module.qualname``).

  Raises:
    ValueError: no node type has that name.
  """
  types = node_types()
  tid = name if name in types else _ALIASES.get(name)
  if tid is None:
    raise ValueError(f"no peftjax node type is called {name!r} (known: {sorted(types)})")
  return types[tid]


def set_rng(tree, key):
  """Gives every node that wants per-step randomness fresh key data from ``key``.

  Each node's key is ``fold_in(key, crc32(path))`` (independent of traversal order), split per
  layer for layer-stacked nodes, stored as raw ``uint32[*layers, 2]`` in its ``rng_field``
  (LoRA dropout, DiffPruning gate noise). Call once per training step; ``key=None`` clears
  the keys (evaluation: deterministic). Works under ``jit``.

  Raises:
    TypeError: ``key`` is neither a PRNG key (typed or raw ``uint32[2]``) nor None.

  >>> import jax, jax.numpy as jnp, peftjax
  >>> t = peftjax.lora.apply({"d": {"kernel": jnp.ones((4, 4))}}, rank=2, dropout=0.1)
  >>> set_rng(t, jax.random.key(0))["d"]["kernel"].dropout_key.shape
  (2,)
  >>> set_rng(t, None)["d"]["kernel"].dropout_key is None
  True
  """
  if key is not None and not (isinstance(key, jax.Array) and
                              (jnp.issubdtype(key.dtype, jax.dtypes.prng_key) or
                               key.shape[-1:] == (2,))):
    raise TypeError(f"key must be a PRNG key (jax.random.key) or None, got {key!r}")
  if key is not None and not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)

  def visit(path, x):
    if not is_node(x) or not x.wants_rng():
      return x
    if key is None:
      return x.replace(**{x.rng_field: None})
    from peftjax._src.targeting import path_key, path_str
    k = path_key(key, path_str(path))
    lead = x.rng_shape()
    ks = jax.random.split(k, math.prod(lead)) if lead else k
    return x.replace(**{x.rng_field: jax.random.key_data(ks).reshape(*lead, 2)})

  return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_node)


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
