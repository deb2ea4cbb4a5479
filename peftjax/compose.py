"""Several PEFT methods on one tree: ``peftjax.compose(params, spec)``.

Methods compose because each rewrites *leaves* into nodes and everything else (``lift``,
``trainable_mask``, ``optimizer``, ``summary``, ``merge``) reads the nodes. Chaining ``apply``
calls on disjoint targets works as is::

    tuned = peftjax.lora.apply(params, rank=8, targets=["query", "value"])
    tuned = peftjax.bitfit.apply(tuned)
    tuned = peftjax.partial.apply(tuned, targets=["classifier"])

:func:`compose` does the same from one declarative spec, checks that no two methods rewrite the
same leaf, and accepts a JSON-round-trippable config (:func:`to_config`)::

    spec = [("lora", {"rank": 8, "targets": ["query", "value"]}),
            ("bitfit", {}),
            ("partial", {"targets": ["classifier"]})]
    tuned = peftjax.compose(params, spec)
    config = peftjax.compose_config(spec)   # = peftjax.compose.to_config (module function)
    tuned = peftjax.compose(params, json.loads(json.dumps(config)))

Rules for one leaf touched by two methods:

* a method may wrap a node that is a *wrappable* base (a quantized kernel under LoRA: QLoRA);
* ``Trainable``/``SliceTrainable`` marks combine by union (BitFit then "top layer fully" trains
  the union of both);
* anything else is a conflict with no defined order: a ``ValueError`` naming the leaf and both
  methods.

Methods that add model inputs (``prompt``, ``prefix``: a :class:`peftjax.Tuned` with a slot)
may appear anywhere; their slots are gathered and the result is ``Tuned(tree, prompt=..., ...)``.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from peftjax._src import method as method_lib
from peftjax._src import targeting
from peftjax._src.nodes import is_node, materialize
from peftjax._src.selective import SliceTrainable, Trainable, describe_leaf
from peftjax._src.tuned import Tuned

__all__ = ["compose", "to_config", "CONFIG_VERSION"]

CONFIG_VERSION = 1

def _resolve_method(method) -> tuple[str, Callable]:
  if callable(method) and not isinstance(method, str):
    return getattr(method, "__qualname__", repr(method)), method
  if not isinstance(method, (str, method_lib.Method)):
    raise TypeError(f"a method is a name such as 'lora', a peftjax Method or a callable "
                    f"apply(params, **kwargs); got {method!r}")
  m = method_lib.get(method)
  return m.name, m.apply


def _steps(spec) -> list[tuple[Any, dict]]:
  """Normalizes a spec to ``[(method, kwargs), ...]``."""
  if isinstance(spec, Mapping):
    if "methods" not in spec:
      raise ValueError(f"a config dict needs a 'methods' list; got keys {sorted(spec)}")
    version = spec.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
      raise ValueError(f"config version {version!r} is not supported (this is version "
                       f"{CONFIG_VERSION})")
    extra = set(spec) - {"methods", "version"}
    if extra:
      raise ValueError(f"unknown config keys {sorted(extra)}; a config has 'version' and "
                       f"'methods'")
    spec = spec["methods"]
  if isinstance(spec, (str, bytes)) or not isinstance(spec, Sequence):
    raise TypeError(f"spec must be a list of (method, kwargs) pairs or a config dict "
                    f"{{'methods': [...]}}; got {type(spec).__name__}")
  if not spec:
    raise ValueError("spec lists no method")
  out = []
  for i, item in enumerate(spec):
    if isinstance(item, Mapping):
      if "method" not in item:
        raise ValueError(f"spec item {i} ({item!r}) has no 'method' key")
      kw = {k: v for k, v in item.items() if k != "method"}
      out.append((item["method"], kw))
    elif isinstance(item, str) or callable(item):
      out.append((item, {}))
    elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], Mapping):
      out.append((item[0], dict(item[1])))
    else:
      raise TypeError(f"spec item {i} must be a method name, a (method, kwargs) pair or a dict "
                      f"with a 'method' key; got {item!r}")
  return out


def to_config(spec) -> dict:
  """A JSON-serializable config ``{"version": 1, "methods": [{"method": ..., **kwargs}]}``.

  ``compose(params, json.loads(json.dumps(to_config(spec))))`` equals ``compose(params, spec)``.
  PRNG keys must be given as int seeds (``key=0``), dtypes as strings (``dtype="bfloat16"``).

  Raises:
    TypeError: a method that is not a name, or a keyword value that JSON cannot hold (named).

  >>> from peftjax.compose import to_config
  >>> to_config([("lora", {"rank": 4, "targets": ["query"]}), "bitfit"])
  {'version': 1, 'methods': [{'method': 'lora', 'rank': 4, 'targets': ['query']}, {'method': 'bitfit'}]}
  """
  methods = []
  for method, kw in _steps(spec):
    if not isinstance(method, str):
      raise TypeError(f"to_config: method {method!r} is not a name; only named methods "
                      f"({', '.join(method_lib.names())}) can be written to a config")
    item = {"method": _resolve_method(method)[0]}
    for k, v in kw.items():
      v = list(v) if isinstance(v, tuple) else v
      try:
        ok = json.loads(json.dumps(v)) == v
      except (TypeError, ValueError):
        ok = False
      if not ok:
        hint = (" (give PRNG keys as an int seed, dtypes as strings)"
                if k in ("key", "dtype") or hasattr(v, "dtype") else "")
        raise TypeError(f"to_config: {method}.{k}={v!r} cannot be stored in JSON{hint}")
      item[k] = v
    methods.append(item)
  return {"version": CONFIG_VERSION, "methods": methods}


def _prepare_kwargs(kw: dict) -> dict:
  kw = dict(kw)
  key = kw.get("key")
  if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
    kw["key"] = jax.random.key(int(key))
  return kw


def _union(old, new):
  """Combined node for two marks on one leaf, or None if they do not combine."""
  if not isinstance(old, (Trainable, SliceTrainable)):
    return None
  if isinstance(new, Trainable):
    return old if isinstance(old, Trainable) else new
  if isinstance(new, SliceTrainable):
    if isinstance(old, Trainable):
      return old
    if old.n_lead == new.n_lead:
      idx = tuple(sorted(set(old.index) | set(new.index)))
      full = new.frozen  # the materialized old node: old's slices hold old's values
      rows = full.reshape(-1, *full.shape[old.n_lead:])[np.asarray(idx)]
      return SliceTrainable(frozen=old.frozen, value=rows, index=idx, n_lead=old.n_lead)
  return None


def compose(params, spec):
  """Applies several PEFT methods to one parameter tree.

  Args:
    params: any parameter pytree.
    spec: a list whose items are ``(method, kwargs)`` pairs, method names, or dicts
      ``{"method": name, **kwargs}``; or a config dict ``{"version": 1, "methods": [...]}`` as
      made by :func:`to_config` (an int ``key`` becomes ``jax.random.key(key)``). A method is a
      registered name (``peftjax.methods.names()``: ``"lora"``, ``"bitfit"``, ``"partial"``,
      ``"diff_pruning"``, ``"adapters"``, ``"ia3"``, ``"qlora"``, ``"prompt"``, ``"prefix"``,
      ...), a :class:`peftjax.Method`, or a callable ``apply(params, **kwargs)``. Methods run in
      order.

  Returns:
    The rewritten tree (a :class:`peftjax.Tuned` with the slots if a method such as ``prompt``
    adds model inputs). Its trainable count is the sum of the methods' counts (minus overlaps of combined
    ``Trainable``/``SliceTrainable`` marks).

  Raises:
    ValueError: an unknown method, an empty spec, two methods on one leaf with no defined order
      (naming the leaf and both methods), or a method that changes the tree's structure.
    TypeError: a malformed spec.
    Errors of the methods themselves (bad kwargs) propagate unchanged.

  >>> import jax, jax.numpy as jnp, peftjax
  >>> from peftjax.compose import compose
  >>> params = {"attn": {"query": {"kernel": jnp.zeros((8, 8)), "bias": jnp.zeros(8)}},
  ...           "classifier": {"kernel": jnp.zeros((8, 2)), "bias": jnp.zeros(2)}}
  >>> tuned = compose(params, [("lora", {"rank": 2, "targets": ["query"]}),
  ...                          ("bitfit", {}), ("partial", {"targets": ["classifier"]})])
  >>> [type(x).__name__ for x in jax.tree.leaves(tuned, is_leaf=peftjax.is_node)]  # bias, kernel
  ['Trainable', 'LoraWeight', 'Trainable', 'Trainable']
  >>> peftjax.summary(tuned).trainable        # 2*(8+8) + 8 + (16 + 2)
  58
  """
  steps = _steps(spec)
  owner: dict[str, str] = {}     # path -> name of the method that rewrote it
  extras: dict[str, Any] = {}
  cur = params
  for method, kw in steps:
    name, fn = _resolve_method(method)
    pairs = dict(targeting.leaves_with_paths(cur))
    hidden = {p: x for p, x in pairs.items() if is_node(x) and not type(x).wrappable}
    view = targeting.map_selected(lambda p, x: materialize(x), cur, set(hidden))
    view_pairs = dict(targeting.leaves_with_paths(view))
    out = fn(view, **_prepare_kwargs(kw))
    if isinstance(out, Tuned) and out.params is view:
      for slot, value in out.slots().items():
        if slot in extras:
          raise ValueError(f"compose: {name} and {extras[slot][0]} both add a '{slot}' to the "
                           f"tree; use one of them")
        extras[slot] = (name, value)
      out = out.params
    out_pairs = dict(targeting.leaves_with_paths(out))
    if set(out_pairs) != set(view_pairs):
      added = sorted(set(out_pairs) - set(view_pairs))[:3]
      gone = sorted(set(view_pairs) - set(out_pairs))[:3]
      raise ValueError(f"compose: {name} changed the tree's structure (new paths {added}, "
                       f"removed {gone}); compose supports methods that rewrite leaves in place "
                       f"or wrap the tree as {{'params': tree, ...}}")
    restore = {}
    for p, new in out_pairs.items():
      if new is view_pairs[p]:
        if p in hidden:
          restore[p] = hidden[p]
        continue
      if p in hidden:
        merged = _union(hidden[p], new)
        if merged is None:
          before = owner.get(p, "a method applied before compose")
          raise ValueError(
              f"compose: {p} is rewritten by both {before} ({describe_leaf(hidden[p])}) and "
              f"{name} ({describe_leaf(new)}); two methods on one leaf have no defined order. "
              f"Give them disjoint targets")
        restore[p] = merged
      owner[p] = name if p not in owner else f"{owner[p]}+{name}"
    cur = targeting.map_selected(lambda p, x: restore[p], out, set(restore)) if restore else out
  if extras:
    return Tuned(cur, **{slot: v for slot, (_, v) in extras.items()})
  return cur
