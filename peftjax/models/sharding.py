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

__all__ = ["DEFAULT_RULES", "NODE_RULES", "axis_rules", "logical_axes", "spec_for",
           "param_specs", "param_shardings", "shard_params", "put_global", "make_mesh",
           "mesh_shape", "batch_sharding"]

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


def _same_shape_names(node, f, shp, base_names):
  """The generic rule: a dimension of field ``f`` that has the size of the node's dimension at the
  same position keeps that dimension's logical name (LoRA's ``a [in, r]`` keeps ``in``, its ``b``
  ``[r, out]`` keeps ``out``); a field of another rank is replicated."""
  full = tuple(node.shape)
  if len(shp) != len(full):
    return (None,) * len(shp)
  names = []
  for d, (s, fs) in enumerate(zip(shp, full)):
    keep = s == fs and not (f == "a" and d == len(full) - 1) and \
        not (f == "b" and d == len(full) - 2)
    names.append(base_names[d] if keep else None)
  return tuple(names)


def _kernel_parts(node, base_names):
  """``(layers, in, out)`` logical names of a kernel node ``[*layers, *in, *out]``."""
  s = int(getattr(node, "n_batch", 0))
  n_in = int(getattr(node, "n_in", 1))
  names = tuple(base_names)
  return names[:s], names[s:s + n_in], names[s + n_in:]


def _kernel_rule(layout: dict):
  """A node rule from ``{field: template}``; a template is a tuple of ``"S"`` (the layer axes),
  ``"I"`` / ``"O"`` (the kernel's input / output axes) and ``None`` (one replicated axis)."""
  def rule(node, f, shp, base_names):
    if f not in layout:
      return None
    lead, ins, outs = _kernel_parts(node, base_names)
    parts = {"S": lead, "I": ins, "O": outs}
    names = tuple(n for t in layout[f] for n in (parts[t] if t in parts else (t,)))
    return names if len(names) == len(shp) else (None,) * len(shp)
  return rule


def _ia3_rule(node, f, shp, base_names):
  if f != "vector":
    return None
  lead, ins, outs = _kernel_parts(node, base_names)
  along = ins if node.side == "in" else outs
  slot = (None,) if node.type_id == "ia3_pool" else ()
  names = lead + slot + along
  return names if len(names) == len(shp) else (None,) * len(shp)


def _quantized_layout(node, base_names):
  """Logical names of ``QuantizedWeight``'s storage: ``codes``/``scales``/``zeros``/``mins``
  ``[*S, N, ...]`` are stored transposed, so their row axis is the kernel's output axis and their
  last axis its (blocked) input axis; the double-quantized scales are flat per layer, ``[*S, P]``
  in row-major ``[N, nb]`` order, so they follow the output axis."""
  s = len(node.stack_shape)
  lead = tuple(base_names[:s])
  k = base_names[s] if len(node.in_shape) == 1 else None
  n = base_names[s + len(node.in_shape)] if len(node.out_shape) == 1 else None
  return lead, k, n


def _quantized_specs(node, base_names, mesh_shape, rules):
  """``QuantizedWeight``: the packed codes and their scales sharded along the same mesh axes as
  the kernel they stand for. The input (packed) axis is sharded only in whole quantization
  blocks: its mesh axes are the ones that divide the number of blocks ``nb``, so every shard of
  ``codes`` holds the blocks whose scales sit in the same shard of ``scales``."""
  lead, k, n = _quantized_layout(node, base_names)
  stack = tuple(node.stack_shape)
  rows = math.prod(node.out_shape)
  n_blocks = -(-math.prod(node.in_shape) // node.block_size)
  block_spec = spec_for(lead + (n, k), stack + (rows, n_blocks), mesh_shape, rules)
  block_spec = list(tuple(block_spec) + (None,) * (len(stack) + 2 - len(block_spec)))
  # A mesh axis that shards the kernel but cannot shard its own axis here (too few blocks on
  # the input axis: FSDP on the hidden axis of a kernel with K / block_size < devices) shards
  # the other storage axis instead, so the packed codes are split as finely as the kernel.
  as_tuple = lambda e: () if e is None else (e,) if isinstance(e, str) else tuple(e)
  kernel_axes = [a for e in spec_for(base_names, node.shape, mesh_shape, rules)
                 for a in as_tuple(e)]
  placed = {a for e in block_spec for a in as_tuple(e)}
  for a in kernel_axes:
    if a in placed:
      continue
    for d, size in ((len(stack), rows), (len(stack) + 1, n_blocks)):
      have = as_tuple(block_spec[d])
      if size % (math.prod(mesh_shape[b] for b in have) * mesh_shape[a]) == 0:
        new_axes = have + (a,)
        block_spec[d] = new_axes[0] if len(new_axes) == 1 else new_axes
        placed.add(a)
        break
  changes = {}
  for f in ("codes", "scales", "zeros", "mins"):
    x = getattr(node, f)
    if x is not None:
      changes[f] = P(*block_spec) if np.ndim(x) == len(block_spec) else P()
  for f, names in (("qscales", lead + (n,)), ("qscales_absmax", lead + (n,)),
                   ("qscales_offset", lead)):
    x = getattr(node, f)
    if x is not None:
      changes[f] = spec_for(names, np.shape(x), mesh_shape, rules) \
          if np.ndim(x) == len(names) else P()
  return node.replace(**changes)


_LORA = _kernel_rule({"a": ("S", "I", None), "b": ("S", None, "O")})

#: type_id -> rule ``(node, field, field shape, base logical names) -> logical names or None``
#: (None: the generic same-shape rule), for every peftjax node type; a field not named by a
#: rule gets the generic rule (the base weight, same-shape deltas). ``"quantized"`` has its
#: own spec function (:func:`_quantized_specs`). Node types of other packages use the generic
#: rule. ``tests/test_distributed.py`` checks that every registered peftjax type is listed.
NODE_RULES: dict = {
    "lora": _LORA,
    "dora": _kernel_rule({"a": ("S", "I", None), "b": ("S", None, "O"), "magnitude": ("S", "O")}),
    "vera": _kernel_rule({"a": ("S", "I", None), "b": ("S", None, "O"),
                          "lambda_d": ("S", None), "lambda_b": ("S", "O")}),
    "loha": _kernel_rule({"a1": ("S", "I", None), "b1": ("S", None, "O"),
                          "a2": ("S", "I", None), "b2": ("S", None, "O")}),
    "lokr": _kernel_rule({"w1": ("S", None, None), "w2": ("S", None, None),
                          "a2": ("S", None, None), "b2": ("S", None, None)}),
    "oft": _kernel_rule({"q": ("S", None, None)}),
    "bottleneck_adapter": lambda node, f, shp, names: _kernel_rule({
        "down": ("S", "I" if node.parallel else "O", None), "down_bias": ("S", None),
        "up": ("S", None, "O"), "up_bias": ("S", "O")})(node, f, shp, names),
    "ia3": _ia3_rule,
    "ia3_pool": _ia3_rule,
    "lora_pool": _kernel_rule({"a": ("S", None, "I", None), "b": ("S", None, None, "O")}),
    "quantized": None,          # _quantized_specs
    "trainable": None,          # value: the kernel's own spec
    "diff_pruning": None,       # delta, log_alpha: the kernel's shape and spec
    "slice_trainable": None,    # value [rows, *rest]: the rest keeps the kernel's names
    "sparse_delta": None,       # indices, values: 1-D, replicated
    "soft_prompt": None,        # [n_virtual, hidden]: small, replicated (no logical names)
    "prefix": None,
    "prefix_mlp": None,
    "prompt_encoder": None,
}


def _node_specs(node, base_names, mesh_shape, rules):
  """The node with a PartitionSpec in place of each array field (recursing into nested nodes)."""
  if node.type_id == "quantized" and type(node).__module__.startswith("peftjax."):
    return _quantized_specs(node, base_names, mesh_shape, rules)
  rule = NODE_RULES.get(node.type_id) if type(node).__module__.startswith("peftjax.") else None
  changes = {}
  for f in node.data_fields():
    value = getattr(node, f)

    def child(x, f=f):
      if _is_node(x):
        return _node_specs(x, base_names, mesh_shape, rules)
      shp = tuple(np.shape(x))
      names = rule(node, f, shp, base_names) if rule is not None else None
      if names is None:
        if shp == tuple(node.shape):
          names = tuple(base_names)
        else:
          names = _same_shape_names(node, f, shp, base_names)
      return spec_for(names, shp, mesh_shape, rules)

    changes[f] = jax.tree_util.tree_map(child, value, is_leaf=_is_node)
  return node.replace(**changes)


def param_specs(params: Any, mesh, rules: Optional[Iterable] = None) -> Any:
  """``PartitionSpec`` for every array of ``params`` (nodes keep their structure).

  ``mesh`` is a ``Mesh`` or just its axis sizes (``{"fsdp": 8}``): the specs depend on nothing
  else.
  """
  mesh_shape = dict(mesh.shape if hasattr(mesh, "shape") else mesh)
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
    The same tree with every array a sharded ``jax.Array``. In a multi-process run (``mesh``
    spanning several processes) every process passes the same values (e.g. the same checkpoint
    or seed) and keeps only its own shards (:func:`put_global`).
  """
  return put_global(params, param_shardings(params, mesh, rules))


def put_global(tree: Any, shardings: Any) -> Any:
  """``jax.device_put(tree, shardings)`` that also works when the shardings span devices of
  other processes (multi-process runs): each process builds its own shards from its copy of
  the value (``jax.make_array_from_callback``), so all processes must hold the same values.
  Typed PRNG keys are placed through their key data.

  ``shardings`` is one sharding or a tree of them matching ``tree`` (as for ``device_put``).
  """
  from jax.sharding import Sharding
  if isinstance(shardings, Sharding):
    shardings = jax.tree_util.tree_map(lambda _: shardings, tree)
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  specs = treedef.flatten_up_to(shardings)
  if all(s.is_fully_addressable for s in specs):
    return jax.device_put(tree, treedef.unflatten(specs))
  return treedef.unflatten([_put_one(x, s) for x, s in zip(leaves, specs)])


def _put_one(x, sharding):
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    impl = jax.random.key_impl(x)
    data = _put_one(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=impl)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    # already global (another layout): reshard with a jitted identity
    return jax.jit(lambda v: v, out_shardings=sharding)(x)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


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


def mesh_shape(spec: str) -> dict:
  """``"data=2,fsdp=-1,tensor=2"`` as ``{"data": 2, "fsdp": -1, "tensor": 2}`` (axes not named
  are 1; one may be -1: the rest of the devices), for :func:`make_mesh`.

  Raises:
    ValueError: an unknown axis, an axis named twice, a size that is not a positive integer or
      -1, or more than one -1; the message quotes ``spec``.

  Example:
    >>> mesh_shape("fsdp=-1,tensor=2")
    {'data': 1, 'fsdp': -1, 'tensor': 2}
  """
  sizes = {"data": 1, "fsdp": 1, "tensor": 1}
  seen = set()
  for part in str(spec).split(","):
    name, eq, value = part.strip().partition("=")
    name = name.strip()
    if not eq or name not in sizes:
      raise ValueError(f"mesh {spec!r}: expected axis=size pairs separated by commas, the axes "
                       f"data, fsdp, tensor (e.g. 'data=2,fsdp=-1,tensor=2'); got {part!r}")
    if name in seen:
      raise ValueError(f"mesh {spec!r}: axis {name!r} is named twice")
    seen.add(name)
    try:
      size = int(value)
    except ValueError:
      size = 0
    if size < 1 and size != -1:
      raise ValueError(f"mesh {spec!r}: {name} must be a positive integer or -1 (the rest of "
                       f"the devices), got {value.strip()!r}")
    sizes[name] = size
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"mesh {spec!r}: at most one axis may be -1")
  return sizes


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: Optional[Iterable] = None,
                   shape: Optional[Sequence[int]] = None) -> NamedSharding:
  """Sharding for a batch-major input (``[batch, seq, ...]``): batch over ``data`` and ``fsdp``."""
  names = ("batch",) + (None,) * (ndim - 1)
  shape = shape or (math.prod(mesh.shape.values()),) + (1,) * (ndim - 1)
  return NamedSharding(mesh, spec_for(names, shape, dict(mesh.shape), rules))
