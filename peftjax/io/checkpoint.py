"""Checkpoints with orbax: small adapter checkpoints, and training state for exact resumption.

**Adapter checkpoints** (:func:`save_adapter` / :func:`restore_adapter`) hold only the adapter:
the trainable leaves of a tuned tree (``peftjax.split(tree)[0]``: LoRA's ``a`` and ``b``, ...), the
frozen data that belongs to an adapter rather than to the base (a node's frozen fields other than
the base weight, e.g. a sparse delta's indices; per-step keys are not saved), and a JSON manifest:
the methods and their configs (node types and static fields, per node), the peftjax version and a
fingerprint of the base model's shapes and dtypes. Restoring takes either the base parameters
(nodes are rebuilt around the base weights from the manifest) or a tuned template (needed when a
node's frozen part is not the base weight itself, e.g. QLoRA's quantized base, or for parameters
the base lacks, e.g. a soft prompt); restoring onto another base model is refused with a message
naming the differing parameters.

**Training state** (:class:`TrainCheckpointer`, over ``orbax.checkpoint.CheckpointManager``):
the adapter as above, optimizer state, step, PRNG key and a JSON data position, with keep-N and
asynchronous saving. Restored arrays are bit-identical, so a resumed run continues exactly as an
uninterrupted one would (given the same base weights and the same data order from the restored
position). Orbax writes each checkpoint into a temporary directory and renames it only when it is
complete, so a process killed mid-save leaves the previous checkpoint intact; leftovers are
removed when the next :class:`TrainCheckpointer` opens the directory.

Layout: ``<dir>/adapter`` (orbax arrays: OCDBT/Zarr through TensorStore) and
``<dir>/manifest/metadata`` (JSON). Nothing here reads pickle, and node types named in a manifest
are only looked up among peftjax's own ``Node`` classes. Names (``name=``) are single path
components checked by :func:`peftjax.io.hf_peft.safe_name`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from peftjax._src import targeting
from peftjax._src.nodes import Node, is_node
from peftjax._src.partition import combine, split
from peftjax.io.hf_peft import safe_join

__all__ = ["FORMAT", "adapter_manifest", "base_fingerprint", "save_adapter", "restore_adapter",
           "read_manifest", "TrainState", "TrainCheckpointer"]

FORMAT = "peftjax-adapter"
FORMAT_VERSION = 1
#: Frozen node fields that are per-step randomness, not adapter data: not saved, None on restore.
_TRANSIENT_FIELDS = ("dropout_key", "key")
#: Static node fields that choose how a node is computed, not what it computes: a template's
#: value is kept on restore (e.g. ``LoraWeight.matmul``).
_EXECUTION_FIELDS = ("matmul",)


def _version() -> str:
  import peftjax
  return getattr(peftjax, "__version__", "unknown")


def _desc(x) -> str:
  return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def _norm(path: str) -> str:
  """Paths are stored without a leading ``params/``: ``{"params": p}`` and ``p`` are the same."""
  return path[len("params/"):] if path.startswith("params/") else path


def _type_name(cls) -> str:
  return f"{cls.__module__}.{cls.__qualname__}"


def _resolve_type(name: str):
  """A node class from its manifest name: only ``peftjax.*`` modules, only Node subclasses."""
  mod, _, qual = name.rpartition(".")
  if not mod.startswith("peftjax.") and mod != "peftjax":
    raise ValueError(f"manifest names node type {name!r} outside peftjax; refusing to import it")
  try:
    cls = getattr(importlib.import_module(mod), qual)
  except (ImportError, AttributeError):
    raise ValueError(f"manifest names node type {name!r}, which this peftjax "
                     f"({_version()}) does not have") from None
  if not (isinstance(cls, type) and issubclass(cls, Node)):
    raise ValueError(f"manifest names {name!r}, which is not a peftjax node type")
  return cls


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


def _base_field(node) -> Optional[str]:
  """The frozen field holding the weight the node stands for (LoRA's ``w``), if any.

  The first frozen, non-transient field whose value has the node's shape (``w`` preferred).
  """
  cls = type(node)
  frozen = [f for f in cls.data_fields()
            if f not in cls.trainable_fields and f not in _TRANSIENT_FIELDS]
  for f in sorted(frozen, key=lambda f: f != "w"):
    v = getattr(node, f)
    if v is not None and hasattr(v, "shape") and tuple(v.shape) == tuple(node.shape):
      return f
  return None


def _extra_fields(node) -> list[str]:
  """Frozen fields that belong to the adapter (saved with it): not trained, not base, not
  transient -- e.g. ``SparseDelta.indices``."""
  cls, bf = type(node), _base_field(node)
  return [f for f in cls.data_fields() if f not in cls.trainable_fields and f != bf
          and f not in _TRANSIENT_FIELDS]


def base_fingerprint(tree, *, exclude=()) -> dict:
  """A fingerprint of the base model's shapes and dtypes under ``tree`` (tuned or not).

  A node counts as the array it stands for (``LoraWeight`` -> its ``w``'s shape and dtype). Nodes
  without a frozen base weight (``Trainable``, soft prompts) are left out, as are the paths in
  ``exclude``; a leading ``params/`` is dropped from every path.

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
      if _base_field(leaf) is not None:
        leaves[path] = _desc(leaf)
    elif targeting.is_array(leaf) and not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaves[path] = _desc(leaf)
  digest = hashlib.sha256("\n".join(f"{p}={d}" for p, d in sorted(leaves.items())).encode())
  return {"sha256": digest.hexdigest(), "leaves": leaves}


def _extra_mask(tree):
  """True at the leaves of every node's adapter-owned frozen fields (see :func:`_extra_fields`)."""
  def node_mask(n):
    extra = set(_extra_fields(n))
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
    A JSON-serializable dict: ``format``, ``format_version``, ``peftjax_version``, ``methods``
    (per node type: count, trainable parameters, distinct static configs), ``nodes`` (per node:
    path, type, static fields, base field and its description, whether it can be rebuilt around
    the base weight alone), ``leaves`` (trainable leaves in checkpoint order: path, shape, dtype),
    ``frozen_leaves`` (frozen adapter data, e.g. sparse indices) and ``base``
    (:func:`base_fingerprint`). Paths have no leading ``params/``.

  >>> import jax.numpy as jnp, peftjax
  >>> m = adapter_manifest(peftjax.lora.apply({"d": {"kernel": jnp.ones((8, 8))}}, rank=2))
  >>> m["methods"]["peftjax.lora.LoraWeight"]["trainable_params"], [l["path"] for l in m["leaves"]]
  (32, ['d/kernel/a', 'd/kernel/b'])
  """
  nodes, methods = [], {}
  for raw, leaf in targeting.leaves_with_paths(tuned):
    if not is_node(leaf):
      continue
    path, cls = _norm(raw), type(leaf)
    static = {k: _jsonable(v) for k, v in _static(leaf).items()}
    bf = _base_field(leaf)
    base = getattr(leaf, bf) if bf else None
    simple = all(targeting.is_array(getattr(leaf, f)) or getattr(leaf, f) is None
                 for f in cls.trainable_fields + tuple(_extra_fields(leaf)))
    static_ok = all(_from_json(json.loads(json.dumps(static[k])), v) == v
                    for k, v in _static(leaf).items())
    trainable, extra = _parts(leaf)
    nodes.append({"path": path, "type": _type_name(cls), "static": static, "base_field": bf,
                  "base": (_desc(base) if targeting.is_array(base) else
                           _type_name(type(base)) if is_node(base) else None),
                  "shape": _desc(leaf),
                  "rebuildable": (bf is None or targeting.is_array(base)) and simple and static_ok})
    entry = methods.setdefault(_type_name(cls), {"count": 0, "trainable_params": 0, "configs": []})
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


def _template(manifest: dict, target, where: str):
  """``target`` with every manifest node in place (kept, or rebuilt around the base leaf)."""
  flat = {_norm(p): leaf for p, leaf in targeting.leaves_with_paths(target)}
  by_path = {n["path"]: n for n in manifest["nodes"]}
  specs = {l["path"]: l for l in manifest["leaves"] + manifest["frozen_leaves"]}
  for p, leaf in flat.items():
    if is_node(leaf) and p not in by_path and _parts(leaf)[0]:
      raise ValueError(f"{where}: the target has a {type(leaf).__name__} at {p}, which the "
                       "checkpoint does not have")
  new = {}
  for p, n in by_path.items():
    if p not in flat:
      raise ValueError(f"{where}: the checkpoint has a {n['type'].rsplit('.', 1)[-1]} at {p}, "
                       "which the target lacks; pass the tuned tree as the target (e.g. from the "
                       "same peftjax method's apply(base, ...))")
    leaf = flat[p]
    if is_node(leaf) and _type_name(type(leaf)) == n["type"]:
      # Fields the checkpoint lacks (added to the node type since) keep the target's value.
      static = {k: _jsonable(v) for k, v in _static(leaf).items()
                if k in n["static"] and k not in _EXECUTION_FIELDS}
      want = {k: v for k, v in n["static"].items() if k not in _EXECUTION_FIELDS}
      if static != want:
        raise ValueError(f"{where}: {p}: the target's {type(leaf).__name__} config {static} "
                         f"differs from the checkpoint's {want}")
      continue
    if is_node(leaf) and n["base"] != _type_name(type(leaf)):
      raise ValueError(f"{where}: {p} is a {type(leaf).__name__} in the target, "
                       f"{n['type'].rsplit('.', 1)[-1]} in the checkpoint")
    # rebuild the node around the base leaf
    cls = _resolve_type(n["type"])
    if not n["rebuildable"]:
      raise ValueError(f"{where}: {p}: this {cls.__name__} cannot be rebuilt from the base alone "
                       f"(its frozen part is {n['base']}); pass the tuned tree as the target "
                       f"(e.g. from the same peftjax method's apply(base, ...))")
    have = _desc(leaf) if targeting.is_array(leaf) else _type_name(type(leaf))
    expected = n["base"] if n["base_field"] is not None else n["shape"]
    if have != expected:
      raise ValueError(f"{where}: {p}: the checkpoint's base is {expected}, the target has {have}")
    fields = {f: None for f in cls.data_fields()}
    if n["base_field"] is not None:
      fields[n["base_field"]] = leaf
    for f in cls.data_fields():
      # (path_str drops a trailing "value" component, the Flax NNX rule: Trainable.value is at p)
      spec = specs.get(f"{p}/{f}") or (specs.get(p) if f == "value" else None)
      if spec is not None:
        fields[f] = jax.ShapeDtypeStruct(tuple(spec["shape"]), jnp.dtype(spec["dtype"]))
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    static = {k: _from_json(v, defaults.get(k)) for k, v in n["static"].items()}
    try:
      new[p] = cls(**fields, **static)
    except TypeError as e:
      raise ValueError(f"{where}: {p}: cannot rebuild {cls.__name__} from the manifest "
                       f"({e})") from None
  raw = {p for p, _ in targeting.leaves_with_paths(target) if _norm(p) in new}
  return targeting.map_selected(lambda p, _: new[_norm(p)], target, raw)


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
  default = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
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
    tuned: the tuned tree (``params``, ``{"params": params}``, ``{"params": ..., "prompt": ...}``).
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
  with _checkpointer() as ckptr:
    ckptr.save(directory.absolute(), args=ocp.args.Composite(
        adapter=ocp.args.StandardSave(_adapter_arrays(tuned)),
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
    raise ValueError(f"{f}: corrupt manifest ({e})") from None
  _check_manifest(manifest, str(directory))
  return manifest


def _check_manifest(manifest, where: str):
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ValueError(f"{where}: not a peftjax adapter manifest")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise ValueError(f"{where}: manifest format_version {manifest.get('format_version')!r}; this "
                     f"peftjax ({_version()}) reads version {FORMAT_VERSION}")
  for k in ("nodes", "leaves", "frozen_leaves", "base"):
    if k not in manifest:
      raise ValueError(f"{where}: manifest lacks {k!r}")


def restore_adapter(path: str | os.PathLike, target, *, name: Optional[str] = None,
                    sharding=None):
  """Restores an adapter checkpoint onto ``target``.

  Args:
    path: checkpoint directory written by :func:`save_adapter`.
    target: the base parameters (the model the adapter was trained on; nodes are rebuilt around
      its weights from the manifest), or a tuned template with the same nodes (needed when a
      node's frozen part is not the base weight, e.g. QLoRA's quantized base, or when the adapter
      adds parameters the base lacks, e.g. a soft prompt). A leading ``{"params": ...}`` wrapper
      may differ from the saved tree's.
    name: read ``path/name`` (a single safe path component).
    sharding: sharding of restored leaves that have no template array (default: the first
      device); leaves of a template keep its shardings.

  Returns:
    The tuned tree, with the checkpoint's adapter leaves (bit-identical) and the target's base.

  Raises:
    ValueError: a different base model (naming the differing parameters), node types or configs
      that differ from the target's, not a checkpoint.
  """
  directory = safe_join(path, name, "checkpoint name")
  manifest = read_manifest(directory)
  where = str(directory)
  _check_base(manifest, target, where)
  template = _template(manifest, target, where)
  abstract = _abstract_adapter(manifest, template, where, sharding)
  with _checkpointer() as ckptr:
    out = ckptr.restore(directory.absolute(), args=ocp.args.Composite(
        adapter=ocp.args.StandardRestore(abstract)))
  return _fill(template, out["adapter"])


# ------------------------------------------------------------------------------------------------
# training state
# ------------------------------------------------------------------------------------------------

class TrainState(NamedTuple):
  """What :meth:`TrainCheckpointer.restore` returns.

  Attributes:
    params: the tuned tree (restored adapter leaves, base from the target).
    opt_state: the optimizer state (structure of the template given to ``restore``), or None.
    step: the restored step.
    rng: the PRNG key (typed if it was saved typed), or None.
    data_position: the JSON value saved as the data position (an int, a dict, ...), or None.
  """
  params: Any
  opt_state: Any
  step: int
  rng: Any
  data_position: Any


def _leaf_specs(tree) -> list:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [{"path": jax.tree_util.keystr(p), "shape": list(np.shape(x)),
           "dtype": jnp.dtype(getattr(x, "dtype", np.asarray(x).dtype)).name} for p, x in flat]


class TrainCheckpointer:
  """Training-state checkpoints in one directory (``orbax.checkpoint.CheckpointManager``).

  Each step directory holds the adapter (as :func:`save_adapter`), the optimizer state's leaves,
  the PRNG key's data (orbax arrays) and a JSON record: step, data position, key kind, the
  adapter manifest and the optimizer state's leaf specs (checked on restore).

  Args:
    directory: where the step directories live (created).
    max_to_keep: keep the newest N checkpoints (None: all).
    save_interval_steps: :meth:`save` skips steps that are not multiples (unless ``force``).
    async_save: write in a background thread; :meth:`save` returns once the arrays are copied.
    keep_period: also keep every checkpoint whose step is a multiple of this.

  Use it as a context manager, or call :meth:`close` (which waits for pending saves).

  Example (files, in a temporary directory)::

    >>> import tempfile, jax, jax.numpy as jnp, optax, peftjax
    >>> tuned = peftjax.lora.apply({"d": {"kernel": jnp.ones((8, 8))}}, rank=2)
    >>> tx = peftjax.optimizer(optax.adam(1e-3), tuned)
    >>> with tempfile.TemporaryDirectory() as tmp, TrainCheckpointer(tmp) as ckpt:
    ...   _ = ckpt.save(10, tuned, tx.init(tuned), rng=jax.random.key(1), data_position=640)
    ...   ckpt.wait_until_finished()
    ...   state = ckpt.restore(tuned, tx.init(tuned))
    >>> state.step, state.data_position
    (10, 640)
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: Optional[int] = 3,
               save_interval_steps: int = 1, async_save: bool = True,
               keep_period: Optional[int] = None):
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or max_to_keep < 1):
      raise ValueError(f"max_to_keep must be a positive integer or None, got {max_to_keep!r}")
    if isinstance(save_interval_steps, bool) or save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be a positive integer, got "
                       f"{save_interval_steps!r}")
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        keep_period=keep_period, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  # -- context manager ---------------------------------------------------------------------------
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    """Waits for pending saves and releases the manager."""
    self._manager.close()

  def wait_until_finished(self):
    """Blocks until every asynchronous save has been committed."""
    self._manager.wait_until_finished()

  def latest_step(self) -> Optional[int]:
    """The newest committed step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every committed step, ascending."""
    return sorted(self._manager.all_steps())

  # -- save / restore ----------------------------------------------------------------------------
  def save(self, step: int, params, opt_state=None, *, rng=None, data_position: Any = None,
           force: bool = False) -> bool:
    """Saves the training state at ``step`` (asynchronously if so configured).

    Args:
      step: the number of completed optimizer steps (a non-negative int).
      params: the tuned tree; only its adapter (trainable leaves, frozen adapter data) is
        written.
      opt_state: the optimizer state (any pytree of arrays), or None.
      rng: the PRNG key to continue with (typed or raw uint32), or None.
      data_position: where the data pipeline is (any JSON value: a sample index, a dict of
        shard offsets, ...), or None.
      force: save even if ``step`` is not a multiple of ``save_interval_steps``.

    Returns:
      Whether a checkpoint was started.

    Raises:
      ValueError: a negative or non-int step, a data position that is not JSON, a step that
        already exists.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"step must be a non-negative integer, got {step!r}")
    step = int(step)
    try:
      json.dumps(data_position)
    except (TypeError, ValueError) as e:
      raise ValueError(f"data_position must be JSON-serializable (int, str, list, dict); got "
                       f"{type(data_position).__name__}: {e}") from None
    if step in self._manager.all_steps():
      raise ValueError(f"{self.directory}: step {step} is already saved")
    manifest = adapter_manifest(params)
    state = {"adapter": _adapter_arrays(params)}
    rng_meta = None
    if rng is not None:
      if jnp.issubdtype(getattr(rng, "dtype", np.float32), jax.dtypes.prng_key):
        rng_meta = {"typed": True, "impl": str(jax.random.key_impl(rng))}
        state["rng"] = jax.random.key_data(rng)
      else:
        rng_meta = {"typed": False}
        state["rng"] = jnp.asarray(rng)
      rng_meta.update(shape=list(state["rng"].shape), dtype=jnp.dtype(state["rng"].dtype).name)
    opt_specs = None
    if opt_state is not None:
      state["opt_state"] = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(opt_state)]
      opt_specs = _leaf_specs(opt_state)
    meta = {"step": step, "data_position": data_position, "rng": rng_meta,
            "opt_state": opt_specs, "manifest": manifest, "peftjax_version": _version()}
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, params, opt_state=None, *, step: Optional[int] = None,
              sharding=None) -> TrainState:
    """Restores the state saved at ``step`` (default: the latest).

    Args:
      params: the base parameters or a tuned template (as for :func:`restore_adapter`): its
        frozen leaves are used as they are, so pass the same base weights to continue exactly.
      opt_state: a template with the optimizer state's structure (e.g. ``tx.init(params)``), or
        None to skip it.
      step: which step; default :meth:`latest_step`.
      sharding: for leaves without a template array (default: the first device).

    Returns:
      :class:`TrainState`.

    Raises:
      ValueError: no checkpoint, an unknown step, a different base model, an optimizer state
        template whose leaves differ from the saved ones (naming the leaf).
    """
    self._manager.wait_until_finished()
    steps = self._manager.all_steps()
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise ValueError(f"{self.directory}: no checkpoint to restore")
    elif step not in steps:
      raise ValueError(f"{self.directory}: no checkpoint for step {step}; have {sorted(steps)}")
    where = f"{self.directory} step {step}"
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manifest = meta["manifest"]
    _check_manifest(manifest, where)
    _check_base(manifest, params, where)
    template = _template(manifest, params, where)
    default = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"adapter": _abstract_adapter(manifest, template, where, sharding)}
    treedef = None
    if opt_state is not None:
      if meta["opt_state"] is None:
        raise ValueError(f"{where}: no optimizer state was saved; pass opt_state=None")
      saved = meta["opt_state"]
      leaves, treedef = jax.tree_util.tree_flatten(opt_state)
      have = _leaf_specs(opt_state)
      if len(have) != len(saved):
        raise ValueError(f"{where}: the optimizer state template has {len(have)} leaves, the "
                         f"checkpoint {len(saved)} (another optimizer or adapter set?)")
      for h, s in zip(have, saved):
        if (h["shape"], h["dtype"]) != (s["shape"], s["dtype"]):
          raise ValueError(f"{where}: optimizer state leaf {s['path']}: checkpoint "
                           f"{s['dtype']}{s['shape']}, template {h['dtype']}{h['shape']} "
                           f"(at {h['path']})")
      abstract["opt_state"] = [
          jax.ShapeDtypeStruct(tuple(s["shape"]), jnp.dtype(s["dtype"]),
                               sharding=x.sharding if isinstance(x, jax.Array) else default)
          for x, s in zip(leaves, saved)]
    if meta["rng"] is not None:
      r = meta["rng"]
      abstract["rng"] = jax.ShapeDtypeStruct(tuple(r["shape"]), jnp.dtype(r["dtype"]),
                                             sharding=default)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    params_out = _fill(template, out["adapter"])
    opt_out = (jax.tree_util.tree_unflatten(treedef, out["opt_state"])
               if opt_state is not None else None)
    rng = None
    if meta["rng"] is not None:
      rng = out["rng"]
      if meta["rng"]["typed"]:
        rng = jax.random.wrap_key_data(rng, impl=meta["rng"]["impl"])
    return TrainState(params_out, opt_out, int(meta["step"]), rng, meta["data_position"])
