"""Adapter checkpoints with orbax: the trainable leaves of a tuned tree and a JSON manifest.

:func:`save_adapter` / :func:`restore_adapter` hold only the adapter: the trainable leaves of a
tuned tree (``peftjax.split(tree)[0]``: LoRA's ``a`` and ``b``, ...), the frozen data that belongs
to an adapter rather than to the base (a node's frozen fields other than its ``base_field`` and
its ``rng_field``, e.g. a sparse delta's indices) and a JSON manifest: the methods and their
configs (node ``type_id`` and static fields, per node), the peftjax version and a fingerprint of
the base model's shapes and dtypes. What a node field is comes from the node class's role
declarations (:mod:`peftjax._src.nodes`), never from its name or shape. Restoring takes either
the base parameters (nodes are rebuilt around the base weights from the manifest; a soft prompt
or prefix is rebuilt into a :class:`peftjax.Tuned` slot) or a tuned template (needed when a
node's frozen part is not the base weight itself, e.g. QLoRA's quantized base); restoring onto
another base model is refused with a message naming the differing parameters.

Training state (optimizer state, step, PRNG key, data position, keep-N, asynchronous saves) is
:class:`peftjax.train.checkpoint.TrainCheckpointer`, which stores its adapter in this format;
``peftjax.io.checkpoint.TrainCheckpointer`` is the same class.

Layout: ``<dir>/adapter`` (orbax arrays: OCDBT/Zarr through TensorStore) and
``<dir>/manifest/metadata`` (JSON). Manifests of format 2 name node types by ``type_id``; format
1 (peftjax 0.1) named them ``module.qualname``, which still reads. Nothing here reads pickle, and
a node type named in a manifest is only looked up among the registered peftjax node classes
(:func:`peftjax._src.nodes.node_type`): nothing is imported by a name from a manifest. Names
(``name=``) are single path components checked by :func:`peftjax.io.hf_peft.safe_name`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from peftjax._src import nodes as nodes_lib
from peftjax._src import targeting
from peftjax._src.nodes import is_node
from peftjax._src.partition import combine, split
from peftjax._src.tuned import SLOTS, as_tuned
from peftjax.io.hf_peft import safe_join

__all__ = ["FORMAT", "FORMAT_VERSION", "CorruptCheckpoint", "adapter_manifest",
           "base_fingerprint", "save_adapter", "restore_adapter", "read_manifest",
           "stacked_layers", "TrainCheckpointer"]

FORMAT = "peftjax-adapter"
#: Written by this peftjax: node types by ``type_id``.
FORMAT_VERSION = 2
#: Read by this peftjax (1: peftjax 0.1, node types by ``module.qualname``).
READ_VERSIONS = (1, 2)


def __getattr__(name):
  # The training checkpointer lives beside the trainer (peftjax.train.checkpoint), which imports
  # this module: a lazy alias avoids the import cycle and keeps old imports working.
  if name == "TrainCheckpointer":
    from peftjax.train import checkpoint as _train_ckpt
    return _train_ckpt.TrainCheckpointer
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class CorruptCheckpoint(ValueError):
  """A checkpoint's files do not read completely (truncated, corrupt); the message names the
  directory. A ``ValueError``, as the other checkpoint errors."""


def _short(e: BaseException, limit: int = 240) -> str:
  """An exception's message on one line, without TensorStore's spec dump, at most ``limit``."""
  text = " ".join(str(e).split())
  text = text.split(" [tensorstore_spec", 1)[0]
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _quiet_closed_loop_noise():
  """After a failed TensorStore read, reads still in flight complete on orbax's closed event loop
  and report ``RuntimeError: Event loop is closed`` through ``sys.unraisablehook``, one
  traceback each; drop exactly those (everything else still reaches the previous hook)."""
  import sys
  previous = sys.unraisablehook
  if getattr(previous, "_peftjax_quiet", False):
    return

  def hook(u):
    if u.exc_type is RuntimeError and "Event loop is closed" in str(u.exc_value):
      return
    previous(u)
  hook._peftjax_quiet = True
  sys.unraisablehook = hook


def _read_checked(directory, what: str, read):
  """``read()``, its failure to read stored files (TensorStore's ``ValueError``, an ``OSError``,
  undecodable JSON) as :class:`CorruptCheckpoint` naming ``directory`` and ``what``."""
  try:
    return read()
  except CorruptCheckpoint:
    raise
  except (ValueError, OSError) as e:
    _quiet_closed_loop_noise()
    raise CorruptCheckpoint(f"{directory}: the {what} does not read completely (truncated or "
                            f"corrupt files?): {_short(e)}") from e


def _version() -> str:
  import peftjax
  return getattr(peftjax, "__version__", "unknown")


def _desc(x) -> str:
  return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def _norm(path: str) -> str:
  """Paths are stored without a leading ``params/``: ``p``, ``{"params": p}`` and
  ``Tuned(p, ...)`` (whose parameter leaves render as ``params/...``) are the same."""
  return path[len("params/"):] if path.startswith("params/") else path


def _node_class(name, where: str):
  """The registered node class a manifest names (a ``type_id``, or a format-1 ``module.qualname``).

  Only the registry of peftjax node classes is consulted; nothing is imported by ``name``.
  """
  if not isinstance(name, str):
    raise ValueError(f"{where}: the manifest names node type {name!r}, which is not a name")
  try:
    return nodes_lib.node_type(name)
  except ValueError:
    raise ValueError(f"{where}: the manifest names node type {name!r}, which is not a "
                     f"registered peftjax node type in this peftjax ({_version()}); nothing "
                     f"named in a manifest is imported") from None


def _maybe_node_class(name):
  """The node class ``name`` resolves to, or None (an array description, None, unknown)."""
  try:
    return nodes_lib.node_type(name) if isinstance(name, str) else None
  except ValueError:
    return None


def _jsonable(v):
  if isinstance(v, (bool, int, float, str)) or v is None:
    return v
  if isinstance(v, (tuple, list)):
    return [_jsonable(x) for x in v]
  if isinstance(v, np.generic):
    return v.item()
  return repr(v)


def _from_json(v, default):
  """Manifest value -> field value (lists back to tuples where the field holds tuples)."""
  if isinstance(v, list) and (isinstance(default, tuple) or default is None):
    return tuple(_from_json(x, None) for x in v)
  return v


def _static(node) -> dict:
  return {f.name: getattr(node, f.name) for f in dataclasses.fields(node)
          if f.metadata.get("static", False)}


def _base_field(cls) -> Optional[str]:
  """The field holding the node's frozen base weight (its declared ``base_field`` when that field
  is not trained), or None."""
  f = cls.base_field
  return None if f is None or f in cls.trainable_fields else f


def _extra_fields(cls) -> list[str]:
  """Frozen fields that belong to the adapter (saved with it): not trained, not the base weight,
  not per-step key data -- e.g. ``SparseDelta.indices``."""
  return [f for f in cls.data_fields() if f not in cls.trainable_fields
          and f != cls.base_field and f != cls.rng_field]


def base_fingerprint(tree, *, exclude=()) -> dict:
  """A fingerprint of the base model's shapes and dtypes under ``tree`` (tuned or not).

  A node with a frozen base weight counts as the array it stands for (``LoraWeight`` -> its
  ``w``'s shape and dtype). Nodes without one (``Trainable``, soft prompts) are left out, as are
  the paths in ``exclude``; a leading ``params/`` is dropped from every path.

  Returns:
    ``{"sha256": hex digest, "leaves": {path: "float32[64, 64]", ...}}``.

  >>> import jax.numpy as jnp, peftjax
  >>> base = {"d": {"kernel": jnp.ones((4, 4))}}
  >>> fp = base_fingerprint(base)
  >>> fp["leaves"]
  {'d/kernel': 'float32[4, 4]'}
  >>> fp == base_fingerprint({"params": peftjax.lora.apply(base, rank=2)})
  True
  """
  exclude = set(exclude)
  leaves = {}
  for raw, leaf in targeting.leaves_with_paths(tree):
    path = _norm(raw)
    if path in exclude:
      continue
    if is_node(leaf):
      if leaf.base is not None:
        leaves[path] = _desc(leaf)
    elif targeting.is_array(leaf) and not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaves[path] = _desc(leaf)
  digest = hashlib.sha256("\n".join(f"{p}={d}" for p, d in sorted(leaves.items())).encode())
  return {"sha256": digest.hexdigest(), "leaves": leaves}


def _extra_mask(tree):
  """True at the leaves of every node's adapter-owned frozen fields (see :func:`_extra_fields`)."""
  def node_mask(n):
    extra = set(_extra_fields(type(n)))
    return n.replace(**{f: jax.tree_util.tree_map(lambda _, e=(f in extra): e, getattr(n, f))
                        for f in type(n).data_fields()})
  return jax.tree_util.tree_map(
      lambda x: node_mask(x) if is_node(x) else jax.tree_util.tree_map(lambda _: False, x),
      tree, is_leaf=is_node)


def _parts(tree) -> tuple[list, list]:
  """``(trainable, frozen adapter data)``: lists of ``(normalized path, leaf)``."""
  out = []
  for part in (split(tree)[0], split(tree, _extra_mask(tree))[0]):
    flat, _ = jax.tree_util.tree_flatten_with_path(part)
    out.append([(_norm(targeting.path_str(p)), x) for p, x in flat])
  return out[0], out[1]


def _specs(pairs) -> list:
  return [{"path": p, "shape": list(x.shape), "dtype": jnp.dtype(x.dtype).name} for p, x in pairs]


def adapter_manifest(tuned) -> dict:
  """The manifest stored beside an adapter: methods, configs, version, base fingerprint, leaves.

  Returns:
    A JSON-serializable dict: ``format``, ``format_version`` (2), ``peftjax_version``, ``methods``
    (per node ``type_id``: count, trainable parameters, distinct static configs), ``nodes`` (per
    node: path, ``type`` (its ``type_id``), static fields, base field and its description (an
    array's dtype and shape, or a nested node's ``type_id``), whether it can be rebuilt around
    the base weight alone), ``leaves`` (trainable leaves in checkpoint order: path, shape,
    dtype), ``frozen_leaves`` (frozen adapter data, e.g. sparse indices) and ``base``
    (:func:`base_fingerprint`). Paths have no leading ``params/``.

  >>> import jax.numpy as jnp, peftjax
  >>> m = adapter_manifest(peftjax.lora.apply({"d": {"kernel": jnp.ones((8, 8))}}, rank=2))
  >>> m["methods"]["lora"]["trainable_params"], [l["path"] for l in m["leaves"]]
  (32, ['d/kernel/a', 'd/kernel/b'])
  >>> m["nodes"][0]["type"], m["nodes"][0]["base_field"], m["nodes"][0]["base"]
  ('lora', 'w', 'float32[8, 8]')
  """
  nodes, methods = [], {}
  for raw, leaf in targeting.leaves_with_paths(tuned):
    if not is_node(leaf):
      continue
    path, cls = _norm(raw), type(leaf)
    static = {k: _jsonable(v) for k, v in _static(leaf).items()}
    base = leaf.base
    simple = all(targeting.is_array(getattr(leaf, f)) or getattr(leaf, f) is None
                 for f in cls.trainable_fields + tuple(_extra_fields(cls)))
    static_ok = all(_from_json(json.loads(json.dumps(static[k])), v) == v
                    for k, v in _static(leaf).items())
    trainable, _ = _parts(leaf)
    nodes.append({"path": path, "type": cls.type_id, "static": static,
                  "base_field": _base_field(cls),
                  "base": (_desc(base) if targeting.is_array(base) else
                           type(base).type_id if is_node(base) else None),
                  "shape": _desc(leaf),
                  "rebuildable": (base is None or targeting.is_array(base)) and simple
                  and static_ok})
    entry = methods.setdefault(cls.type_id, {"count": 0, "trainable_params": 0, "configs": []})
    entry["count"] += 1
    entry["trainable_params"] += sum(int(np.prod(x.shape)) for _, x in trainable)
    if static not in entry["configs"]:
      entry["configs"].append(static)
  trainable, extra = _parts(tuned)
  return {"format": FORMAT, "format_version": FORMAT_VERSION, "peftjax_version": _version(),
          "methods": methods, "nodes": nodes, "leaves": _specs(trainable),
          "frozen_leaves": _specs(extra), "base": base_fingerprint(tuned)}


# ------------------------------------------------------------------------------------------------
# matching a manifest to a target tree
# ------------------------------------------------------------------------------------------------

def _baseless(manifest: dict) -> set:
  return {n["path"] for n in manifest["nodes"] if n["base_field"] is None}


def _check_base(manifest: dict, target, where: str):
  want = manifest["base"]
  have = base_fingerprint(target, exclude=_baseless(manifest))
  if want["sha256"] == have["sha256"]:
    return
  a, b = want["leaves"], have["leaves"]
  diffs = [f"{p}: checkpoint {a[p]}, model {b[p]}" for p in sorted(set(a) & set(b)) if a[p] != b[p]]
  only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
  lines = diffs[:5]
  if only_a:
    lines.append(f"only in the checkpoint's base: {only_a[:5]}" +
                 (" ..." if len(only_a) > 5 else ""))
  if only_b:
    lines.append(f"only in this model: {only_b[:5]}" + (" ..." if len(only_b) > 5 else ""))
  raise ValueError(f"{where}: this adapter was saved for a different base model (base fingerprint "
                   f"{want['sha256'][:12]}, this model {have['sha256'][:12]}); refusing to restore "
                   f"onto it. " + "; ".join(lines))


def _base_name(desc) -> str:
  """A manifest's base description for messages: an array description, or a node class name."""
  cls = _maybe_node_class(desc)
  return cls.__name__ if cls is not None else str(desc)


def _leaf_name(leaf) -> str:
  return type(leaf).__name__ if is_node(leaf) else _desc(leaf)


def _rebuild(cls, n: dict, leaf, specs: dict, where: str):
  """A ``cls`` node at ``n["path"]`` from the manifest, around the base ``leaf`` (or None)."""
  p = n["path"]
  if not n["rebuildable"]:
    raise ValueError(f"{where}: {p}: this {cls.__name__} cannot be rebuilt from the base alone "
                     f"(its frozen part is {_base_name(n['base'])}); pass the tuned tree as the "
                     f"target (e.g. from the same peftjax method's apply(base, ...))")
  bf = _base_field(cls)
  if bf != n["base_field"]:
    raise ValueError(f"{where}: {p}: the checkpoint's {cls.__name__} keeps its base weight in "
                     f"{n['base_field']!r}, this peftjax's in {bf!r}; pass the tuned tree as the "
                     f"target")
  if leaf is not None:
    if bf is not None:
      base_cls = _maybe_node_class(n["base"])
      ok = (type(leaf) is base_cls if is_node(leaf) else
            base_cls is None and targeting.is_array(leaf) and _desc(leaf) == n["base"])
      expected = n["base"]
    else:
      ok = targeting.is_array(leaf) and _desc(leaf) == n["shape"]
      expected = n["shape"]
    if not ok:
      raise ValueError(f"{where}: {p}: the checkpoint's base is {_base_name(expected)}, the "
                       f"target has {_leaf_name(leaf)}")
  fields = {f: None for f in cls.data_fields()}
  if bf is not None:
    fields[bf] = leaf
  for f in cls.data_fields():
    # (path_str drops a trailing "value" component, the Flax NNX rule: Trainable.value is at p)
    spec = specs.get(f"{p}/{f}") or (specs.get(p) if f == "value" else None)
    if spec is not None:
      fields[f] = jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.dtype(spec["dtype"]))
  defaults = {f.name: f.default for f in dataclasses.fields(cls)}
  static = {k: _from_json(v, defaults.get(k)) for k, v in n["static"].items()}
  try:
    return cls(**fields, **static)
  except TypeError as e:
    raise ValueError(f"{where}: {p}: cannot rebuild {cls.__name__} from the manifest "
                     f"({e})") from None


def _template(manifest: dict, target, where: str):
  """``target`` with every manifest node in place (kept, or rebuilt around the base leaf).

  A node the manifest has at a :class:`peftjax.Tuned` slot (``prompt``, ``prefix``) that the
  target lacks is rebuilt into that slot (the result is then a ``Tuned``).
  """
  flat = {_norm(p): leaf for p, leaf in targeting.leaves_with_paths(target)}
  by_path = {n["path"]: n for n in manifest["nodes"]}
  classes = {p: _node_class(n["type"], where) for p, n in by_path.items()}
  specs = {l["path"]: l for l in manifest["leaves"] + manifest["frozen_leaves"]}
  for p, leaf in flat.items():
    if is_node(leaf) and p not in by_path and _parts(leaf)[0]:
      raise ValueError(f"{where}: the target has a {type(leaf).__name__} at {p}, which the "
                       "checkpoint does not have")
  new, slots = {}, {}
  for p, n in by_path.items():
    cls = classes[p]
    if p not in flat:
      if p in SLOTS and getattr(as_tuned(target), p) is None:
        slots[p] = _rebuild(cls, n, None, specs, where)
        continue
      raise ValueError(f"{where}: the checkpoint has a {cls.__name__} at {p}, which the target "
                       "lacks; pass the tuned tree as the target (e.g. from the same peftjax "
                       "method's apply(base, ...))")
    leaf = flat[p]
    if is_node(leaf) and type(leaf) is cls:
      # Fields the checkpoint lacks (added to the node type since) keep the target's value, and
      # so do execution fields (how the node computes, not what).
      static = {k: _jsonable(v) for k, v in _static(leaf).items()
                if k in n["static"] and k not in cls.execution_fields}
      want = {k: v for k, v in n["static"].items() if k not in cls.execution_fields}
      if static != want:
        raise ValueError(f"{where}: {p}: the target's {cls.__name__} config {static} "
                         f"differs from the checkpoint's {want}")
      continue
    if is_node(leaf) and type(leaf) is not _maybe_node_class(n["base"]):
      raise ValueError(f"{where}: {p} is a {type(leaf).__name__} in the target, "
                       f"{cls.__name__} in the checkpoint")
    new[p] = _rebuild(cls, n, leaf, specs, where)
  raw = {p for p, _ in targeting.leaves_with_paths(target) if _norm(p) in new}
  out = targeting.map_selected(lambda p, _: new[_norm(p)], target, raw)
  return as_tuned(out).replace(**slots) if slots else out


def _abstract(want_specs: list, pairs: list, what: str, where: str, sharding=None):
  have = [(p, list(x.shape), jnp.dtype(x.dtype).name) for p, x in pairs]
  want = [(s["path"], list(s["shape"]), s["dtype"]) for s in want_specs]
  if have != want:
    hp, wp = {h[0]: h for h in have}, {w[0]: w for w in want}
    for w in want:
      if w[0] not in hp:
        raise ValueError(f"{where}: missing {what} leaf {w[0]} in the target")
      if hp[w[0]] != w:
        raise ValueError(f"{where}: {what} leaf {w[0]}: checkpoint {w[2]}{w[1]}, target "
                         f"{hp[w[0]][2]}{hp[w[0]][1]}")
    extra = [h[0] for h in have if h[0] not in wp]
    raise ValueError(f"{where}: the target has {what} leaves the checkpoint lacks: {extra[:5]}"
                     if extra else f"{where}: {what} leaves are in a different order")
  default = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return [jax.ShapeDtypeStruct(tuple(x.shape), jnp.dtype(x.dtype),
                               sharding=x.sharding if isinstance(x, jax.Array) else default)
          for _, x in pairs]


def _abstract_adapter(manifest: dict, template, where: str, sharding=None) -> dict:
  trainable, extra = _parts(template)
  return {"trainable": _abstract(manifest["leaves"], trainable, "trainable", where, sharding),
          "frozen": _abstract(manifest["frozen_leaves"], extra, "frozen adapter", where,
                              sharding)}


def _fill(template, restored: dict):
  out = template
  for key, mask in (("trainable", None), ("frozen", _extra_mask(template))):
    part, rest = split(out, mask)
    treedef = jax.tree_util.tree_structure(part)
    out = combine(jax.tree_util.tree_unflatten(treedef, list(restored[key])), rest)
  return out


def _adapter_arrays(tuned) -> dict:
  trainable, extra = _parts(tuned)
  return {"trainable": [x for _, x in trainable], "frozen": [x for _, x in extra]}


def _global_adapter(tuned, manifest: dict, where: str) -> dict:
  """The adapter's arrays to write, checked whole: no leaf may be empty where the tree has
  data (a partitioned parameter saved as a ``[0]`` shard is a known failure elsewhere), and in a
  multi-process run every process must hold the same adapter layout (checked across processes)
  and arrays not already global are replicated over all devices, so that orbax writes one
  complete copy from the processes together."""
  arrays = _adapter_arrays(tuned)
  for spec, x in zip(manifest["leaves"] + manifest["frozen_leaves"],
                     arrays["trainable"] + arrays["frozen"]):
    if 0 in tuple(x.shape):
      raise ValueError(f"{where}: adapter leaf {spec['path']} has shape {list(x.shape)}: nothing "
                       f"to save (an empty shard?)")
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    from peftjax.train import distributed as dist
    layout = hashlib.sha256(json.dumps([manifest["leaves"], manifest["frozen_leaves"]],
                                       sort_keys=True).encode()).digest()
    multihost_utils.assert_equal(np.frombuffer(layout, np.uint8),
                                 f"{where}: the processes hold different adapters")
    arrays = dist.replicate(arrays)
  return arrays


# ------------------------------------------------------------------------------------------------
# adapter checkpoints
# ------------------------------------------------------------------------------------------------

def _checkpointer():
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save_adapter(path: str | os.PathLike, tuned, *, name: Optional[str] = None,
                 force: bool = False) -> Path:
  """Saves the adapter of ``tuned`` (trainable leaves, frozen adapter data, manifest) with orbax.

  Frozen adapter data are a node's frozen fields other than the base weight and per-step keys
  (e.g. the indices of a sparse delta); LoRA has none. Orbax writes to a temporary directory and
  renames it when complete.

  Args:
    path: checkpoint directory (must not exist unless ``force``).
    tuned: the tuned tree (``params``, ``{"params": params}``, a :class:`peftjax.Tuned`).
    name: save into ``path/name`` (a single safe path component; ``"../x"`` is refused).
    force: overwrite an existing checkpoint.

  Returns:
    The checkpoint directory.

  Raises:
    ValueError: no trainable leaves, a bad name, an existing directory without ``force``.

  Example (files, in a temporary directory)::

    >>> import tempfile, jax.numpy as jnp, peftjax
    >>> tuned = peftjax.lora.apply({"d": {"kernel": jnp.ones((8, 8))}}, rank=2)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...   d = save_adapter(tmp + "/ckpt", tuned)
    ...   back = restore_adapter(d, {"d": {"kernel": jnp.ones((8, 8))}})
    >>> back["d"]["kernel"].a.shape
    (8, 2)
  """
  directory = safe_join(path, name, "checkpoint name")
  manifest = adapter_manifest(tuned)
  if not manifest["leaves"]:
    raise ValueError("the tree has no trainable leaves (apply a PEFT method first)")
  if directory.exists() and not force:
    raise ValueError(f"{directory} exists; pass force=True to overwrite it")
  arrays = _global_adapter(tuned, manifest, str(directory))
  with _checkpointer() as ckptr:
    ckptr.save(directory.absolute(), args=ocp.args.Composite(
        adapter=ocp.args.StandardSave(arrays),
        manifest=ocp.args.JsonSave(manifest)), force=force)
  return directory


def read_manifest(path: str | os.PathLike, *, name: Optional[str] = None) -> dict:
  """The JSON manifest of an adapter checkpoint (see :func:`adapter_manifest`).

  Raises:
    ValueError: not a peftjax adapter checkpoint, or an unknown format version.
  """
  directory = safe_join(path, name, "checkpoint name")
  f = directory / "manifest" / "metadata"
  if not f.is_file():
    raise ValueError(f"{directory}: not a peftjax adapter checkpoint (no manifest)")
  try:
    manifest = json.loads(f.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CorruptCheckpoint(f"{f}: corrupt manifest ({e})") from None
  _check_manifest(manifest, str(directory))
  return manifest


def stacked_layers(path: str | os.PathLike) -> Optional[bool]:
  """Whether the adapter checkpoint at ``path`` was saved on a model with stacked layers
  (``layers/...`` leaves: ``scan_layers=True``, as `peftjax train` trains language models), per
  layer (``layers_0/...``), or neither (None: no layer leaves).

  Raises:
    ValueError: not a peftjax adapter checkpoint.
  """
  leaves = (read_manifest(path).get("base") or {}).get("leaves") or {}
  if any(p.startswith("layers/") for p in leaves):
    return True
  if any(re.match(r"layers_\d+/", p) for p in leaves):
    return False
  return None


def _check_manifest(manifest, where: str):
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ValueError(f"{where}: not a peftjax adapter manifest")
  version = manifest.get("format_version")
  if isinstance(version, bool) or version not in READ_VERSIONS:
    raise ValueError(f"{where}: manifest format_version {version!r}; this peftjax ({_version()}) "
                     f"reads versions {', '.join(map(str, READ_VERSIONS))}")
  for k in ("nodes", "leaves", "frozen_leaves", "base"):
    if k not in manifest:
      raise ValueError(f"{where}: manifest lacks {k!r}")


def restore_adapter(path: str | os.PathLike, target, *, name: Optional[str] = None,
                    sharding=None):
  """Restores an adapter checkpoint onto ``target``.

  Args:
    path: checkpoint directory written by :func:`save_adapter`.
    target: the base parameters (the model the adapter was trained on; nodes are rebuilt around
      its weights from the manifest, and a soft prompt or prefix into a :class:`peftjax.Tuned`
      slot), or a tuned template with the same nodes (needed when a node's frozen part is not
      the base weight, e.g. QLoRA's quantized base, or the manifest says a node is not
      ``rebuildable``). A leading ``{"params": ...}`` wrapper may differ from the saved tree's.
      Manifests of format 1 (peftjax 0.1) and 2 are read.
    name: read ``path/name`` (a single safe path component).
    sharding: sharding of restored leaves that have no template array (default: the first
      device); leaves of a template keep its shardings.

  Returns:
    The tuned tree, with the checkpoint's adapter leaves (bit-identical) and the target's base.

  Raises:
    ValueError: a different base model (naming the differing parameters), node types or configs
      that differ from the target's, not a checkpoint.
    CorruptCheckpoint: files that do not read completely (truncated, corrupt), naming the
      directory (a ``ValueError``).
  """
  directory = safe_join(path, name, "checkpoint name")
  manifest = read_manifest(directory)
  where = str(directory)
  _check_base(manifest, target, where)
  template = _template(manifest, target, where)
  abstract = _abstract_adapter(manifest, template, where, sharding)
  with _checkpointer() as ckptr:
    out = _read_checked(directory, "adapter data", lambda: ckptr.restore(
        directory.absolute(), args=ocp.args.Composite(adapter=ocp.args.StandardRestore(abstract))))
  return _fill(template, out["adapter"])
