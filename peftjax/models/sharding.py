"""Logical axis names for the reference models' parameters, and rules mapping them onto a mesh.

Every parameter gets a tuple of *logical* axis names from its path (``q_proj/kernel`` is
``("embed", "heads")``, a scanned one gets a leading ``"layers"``); *rules* map logical names to the
axes of a ``jax.sharding.Mesh`` with axes ``data``, ``fsdp`` and ``tensor``. The default rules give
FSDP on the hidden (``embed``) axis and Megatron-style tensor parallelism on heads / MLP / vocab.
A mesh axis that does not divide a dimension is dropped for that dimension (the array is then
replicated along it), so the same rules work for any model and mesh, one device included.

Nodes (LoRA, quantized weights) shard consistently with the array they stand for: a field with the
node's shape gets the base spec; for other fields each dimension that matches the base keeps the
base's mesh axes, the rest are replicated -- so LoRA ``a [in, r]`` follows the kernel's input axis
and ``b [r, out]`` its output axis.

Example:
  >>> mesh = make_mesh(fsdp=-1)                                     # doctest: +SKIP
  >>> params = shard_params(params, mesh)                           # doctest: +SKIP
  >>> logits = jax.jit(model.apply)({"params": params}, ids)        # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["DEFAULT_RULES", "axis_rules", "logical_axes", "spec_for", "param_specs",
           "param_shardings", "shard_params", "make_mesh", "batch_sharding"]

#: Logical axis name -> mesh axis (or tuple of mesh axes, or None).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)

_RULES: contextvars.ContextVar = contextvars.ContextVar("peftjax_axis_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def axis_rules(rules: Iterable[tuple[str, Any]]):
  """Context manager setting the rules the models' activation constraints use."""
  token = _RULES.set(tuple(rules))
  try:
    yield
  finally:
    _RULES.reset(token)


def _is_node(x) -> bool:
  try:
    from peftjax._src.nodes import is_node
  except ImportError:  # pragma: no cover
    return False
  return is_node(x)


def _keyname(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


_QKV = {"q_proj", "k_proj", "v_proj", "query", "key", "value"}


def _axes_for_path(names: Sequence[str], ndim: int) -> tuple:
  """Logical axes of one parameter from its path (module names ... leaf name)."""
  leaf = names[-1] if names else ""
  parent = names[-2] if len(names) >= 2 else ""
  grand = names[-3] if len(names) >= 3 else ""
  great = names[-4] if len(names) >= 4 else ""
  base: tuple
  if leaf == "embedding":
    # Tables are gathered by token id: sharding the vocab axis forces XLA to replicate the
    # gathered rows, so only the hidden axis is sharded (FSDP).
    base = (None, "embed")
  elif leaf in ("kernel", "bias"):
    if parent in _QKV:
      base = ("embed", "heads")
    elif parent == "o_proj" or (parent == "dense" and grand == "output" and great == "attention"):
      base = ("heads", "embed")
    elif parent in ("gate_proj", "up_proj") or (parent == "dense" and grand == "intermediate"):
      base = ("embed", "mlp")
    elif parent == "down_proj" or (parent == "dense" and grand == "output"):
      base = ("mlp", "embed")
    elif parent == "lm_head":
      base = ("embed", "vocab")
    elif "LayerNorm" in parent or "norm" in parent.lower():
      base = ("norm",)
    else:  # pooler, classifier heads, unknown dense layers: FSDP on the input axis only
      base = ("embed", None)
    if leaf == "bias" and len(base) == 2:
      base = (base[1],)
  else:  # norm scales, anything else
    base = (None,) * ndim
  if len(base) == ndim - 1:
    base = ("layers",) + base
  if len(base) != ndim:
    base = (None,) * ndim
  return base


def logical_axes(params: Any) -> Any:
  """A tree like ``params`` with a tuple of logical axis names for each array (and each node).

  Example:
    >>> import jax.numpy as jnp
    >>> logical_axes({"layers": {"mlp": {"down_proj": {"kernel": jnp.zeros((2, 8, 4))}}}})
    {'layers': {'mlp': {'down_proj': {'kernel': ('layers', 'mlp', 'embed')}}}}
  """
  def one(path, x):
    names = [_keyname(k) for k in path]
    return _axes_for_path(names, len(x.shape))

  return jax.tree_util.tree_map_with_path(one, params, is_leaf=_is_node)


def _rules_dict(rules) -> dict:
  return dict(rules if rules is not None else _RULES.get())


def spec_for(names: Sequence[Optional[str]], shape: Sequence[int], mesh_shape: dict,
             rules: Optional[Iterable] = None) -> P:
  """The ``PartitionSpec`` for logical ``names`` of an array of ``shape`` on a mesh.

  Mesh axes missing from the mesh, already used by an earlier dimension, or not dividing the
  dimension are dropped.
  """
  rd = _rules_dict(rules)
  used: set = set()
  out = []
  for name, dim in zip(names, shape):
    target = rd.get(name) if name is not None else None
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    chosen = []
    size = 1
    for a in axes:
      if a not in mesh_shape or a in used:
        continue
      if dim % (size * mesh_shape[a]):
        continue
      chosen.append(a)
      size *= mesh_shape[a]
    used.update(chosen)
    out.append(None if not chosen else (chosen[0] if len(chosen) == 1 else tuple(chosen)))
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def _node_specs(node, base_names, mesh_shape, rules):
  """The node with a PartitionSpec in place of each array field (recursing into nested nodes)."""
  full = tuple(node.shape)
  changes = {}
  for f in node.data_fields():
    value = getattr(node, f)

    def child(x, f=f):
      if _is_node(x):
        return _node_specs(x, base_names, mesh_shape, rules)
      shp = tuple(np.shape(x))
      if shp == full:
        return spec_for(base_names, shp, mesh_shape, rules)
      if len(shp) != len(full):
        return P()
      names = []
      for d, (s, fs) in enumerate(zip(shp, full)):
        keep = s == fs and not (f == "a" and d == len(full) - 1) and \
            not (f == "b" and d == len(full) - 2)
        names.append(base_names[d] if keep else None)
      return spec_for(names, shp, mesh_shape, rules)

    changes[f] = jax.tree_util.tree_map(child, value, is_leaf=_is_node)
  return node.replace(**changes)


def param_specs(params: Any, mesh: Mesh, rules: Optional[Iterable] = None) -> Any:
  """``PartitionSpec`` for every array of ``params`` (nodes keep their structure)."""
  mesh_shape = dict(mesh.shape)
  axes = logical_axes(params)

  def one(x, names):
    if _is_node(x):
      return _node_specs(x, names, mesh_shape, rules)
    return spec_for(names, np.shape(x), mesh_shape, rules)

  return jax.tree_util.tree_map(one, params, axes, is_leaf=_is_node)


def param_shardings(params: Any, mesh: Mesh, rules: Optional[Iterable] = None) -> Any:
  """``NamedSharding`` for every array of ``params``: use as ``jit`` in/out shardings."""
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules),
                                is_leaf=lambda s: isinstance(s, P))


def shard_params(params: Any, mesh: Mesh, rules: Optional[Iterable] = None) -> Any:
  """``params`` placed on ``mesh`` by the rules (FSDP on ``embed``, tensor-parallel heads/MLP).

  Args:
    params: a parameter tree of a reference model (arrays and peftjax nodes).
    mesh: a mesh with any subset of the axes ``data``, ``fsdp``, ``tensor``.
    rules: ``(logical name, mesh axes)`` pairs; default :data:`DEFAULT_RULES`.

  Returns:
    The same tree with every array a sharded ``jax.Array``.
  """
  return jax.device_put(params, param_shardings(params, mesh, rules))


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh with ``Auto`` axes; one size may be -1 (the rest).

  Example:
    >>> make_mesh(fsdp=-1).axis_names
    ('data', 'fsdp', 'tensor')
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError("at most one of data, fsdp, tensor may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not split into data*fsdp*tensor = {sizes}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(('data', 'fsdp', 'tensor'), sizes))} needs "
                     f"{math.prod(sizes)} devices, have {len(devices)}")
  arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, ("data", "fsdp", "tensor"),
              axis_types=(jax.sharding.AxisType.Auto,) * 3)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Optional[Iterable] = None,
                   shape: Optional[Sequence[int]] = None) -> NamedSharding:
  """Sharding for a batch-major input (``[batch, seq, ...]``): batch over ``data`` and ``fsdp``."""
  names = ("batch",) + (None,) * (ndim - 1)
  shape = shape or (math.prod(mesh.shape.values()),) + (1,) * (ndim - 1)
  return NamedSharding(mesh, spec_for(names, shape, dict(mesh.shape), rules))
