"""Partial fine-tuning: train chosen leaves, or whole layers (e.g. the top ``k``), fully.

``apply`` wraps the chosen leaves in :class:`~peftjax._src.selective.Trainable` nodes. In a
layer-stacked model (Flax ``nn.scan``: one ``layers`` subtree whose leaves are ``[L, ...]``) the
choice is per layer *slice*: a leaf becomes ``SliceTrainable(frozen, value=leaf[idx], index=idx)``
and only those slices train; the others stay bit-identical through any number of optimizer steps.

Layers are found by path (see :func:`layer_groups`):

* unrolled: ``layers_0``, ``layers_1``, ... (any component ``<name>_<i>`` whose name ends in
  ``layer(s)``/``block(s)``/``stage(s)``, or is ``h``), or a list ``layers/0``, ``layers/1``, ...;
* stacked: a component matching ``layers``/``blocks``/``stack(ed)``/``*scan*`` (as in
  :data:`peftjax.lora.STACKED_PATH`) whose leaves share a leading layer axis.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence, Union

import numpy as np

from peftjax._src import targeting
from peftjax._src.nodes import is_node
from peftjax._src.selective import SliceTrainable, Trainable, check_plain_float, leaf_predicate
from peftjax.lora import STACKED_PATH
from peftjax._src import method as method_lib

__all__ = ["apply", "layer_groups", "LayerGroup", "Trainable", "SliceTrainable"]

_LAYER_NAME = r"(?:.*(?:layers?|blocks?|stages?)|h)"
_UNROLLED = re.compile(rf"(?i)(?P<name>{_LAYER_NAME})_(?P<idx>\d+)")
_LIST_PARENT = re.compile(rf"(?i){_LAYER_NAME}")

Layers = Union[None, int, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class LayerGroup:
  """One stack of layers in a parameter tree.

  Attributes:
    prefix: the path up to the layer component: ``"params/layers"`` (stacked),
      ``"params/layers_"`` (unrolled ``layers_<i>``) or ``"params/layers/"`` (a list).
    stacked: True for a layer-stacked subtree (``[L, ...]`` leaves).
    n_layers: number of layers ``L``.
  """
  prefix: str
  stacked: bool
  n_layers: int


def _layer_of(path: str):
  """``(prefix, stacked, index or None)`` of the first layer component of ``path``, or None."""
  parts = path.split("/")
  for i, c in enumerate(parts[:-1]):
    m = _UNROLLED.fullmatch(c)
    if m:
      return "/".join(parts[:i] + [m.group("name") + "_"]), False, int(m.group("idx"))
    if c.isdigit() and i > 0 and _LIST_PARENT.fullmatch(parts[i - 1]):
      return "/".join(parts[:i]) + "/", False, int(c)
    if STACKED_PATH.fullmatch(c) and not parts[i + 1].isdigit():
      return "/".join(parts[:i + 1]), True, None
  return None


def _groups(pairs) -> dict[str, tuple[LayerGroup, list]]:
  found: dict[str, list] = {}
  for p, leaf in pairs:
    hit = _layer_of(p)
    if hit is not None:
      found.setdefault((hit[0], hit[1]), []).append((p, leaf, hit[2]))
  out = {}
  for (prefix, stacked), members in found.items():
    if stacked:
      lead = {tuple(getattr(l, "shape", ()))[:1] for _, l, _ in members}
      if len(lead) != 1 or lead == {()}:
        detail = "\n".join(f"  {p}: {list(getattr(l, 'shape', ()))}" for p, l, _ in members[:6])
        raise ValueError(f"{prefix} looks layer-stacked, but its leaves do not share a leading "
                         f"layer axis:\n{detail}\nSelect leaves with `targets` instead of "
                         f"`layers`")
      n = lead.pop()[0]
    else:
      n = len({i for _, _, i in members})
    out[prefix] = (LayerGroup(prefix, stacked, n), members)
  return out


def layer_groups(params) -> list[LayerGroup]:
  """The layer stacks of ``params`` (unrolled or layer-stacked), in flatten order.

  >>> import jax.numpy as jnp
  >>> p = {"layers_0": {"w": jnp.ones(2)}, "layers_1": {"w": jnp.ones(2)},
  ...      "dec": {"layers": {"w": jnp.ones((3, 2))}}}
  >>> [(g.prefix, g.stacked, g.n_layers) for g in layer_groups(p)]
  [('dec/layers', True, 3), ('layers_', False, 2)]
  """
  return [g for g, _ in _groups(targeting.leaves_with_paths(params)).values()]


def _resolve(layers: Layers, group: LayerGroup, order: list[int]) -> list[int]:
  """Positions (into ``order``, the group's sorted layer ids) chosen by ``layers``."""
  n = len(order)
  if isinstance(layers, (bool, np.bool_)):
    raise TypeError(f"layers must be an int or a list of ints, got {layers!r}")
  if isinstance(layers, (int, np.integer)):
    if not -n <= int(layers) < n:
      raise ValueError(f"layers={layers} is out of range for {group.prefix} with {n} layers: "
                       f"use -k for the top k layers (-{n} <= layers < {n})")
    return list(range(n))[int(layers):]
  if isinstance(layers, (list, tuple)):
    if not layers:
      raise ValueError("layers=[] selects nothing; give layer indices, or -k for the top k")
    out = []
    for i in layers:
      if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
        raise TypeError(f"layers must contain ints, got {i!r} in {layers!r}")
      if not -n <= int(i) < n:
        raise ValueError(f"layer index {i} is out of range for {group.prefix} with {n} layers "
                         f"(valid: {-n}..{n - 1})")
      out.append(int(i) % n)
    return sorted(set(out))
  raise TypeError(f"layers must be an int (-k: the top k layers; i: layers i..L-1) or a list of "
                  f"layer indices, got {type(layers).__name__}: {layers!r}")


def apply(params, layers: Layers = None, *, targets=None):
  """Makes whole layers and/or chosen leaves fully trainable.

  Args:
    params: any parameter pytree.
    layers: which layers of every layer stack: ``-k`` = the top ``k`` layers, an int ``i >= 0``
      = layers ``i..L-1`` (``layers[i:]``), or a list of layer indices (negative counts from the
      top). ``None``: no layer restriction (then ``targets`` is required).
    targets: which leaves: ``None`` = every floating leaf (of the chosen layers), a regex over
      paths such as ``"params/classifier/.*"``, a list of module names (a leaf under one of them,
      e.g. ``["classifier"]``, or named so, e.g. ``["bias"]``), or a callable
      ``(path, leaf) -> bool``.

  Returns:
    ``params`` with each chosen leaf replaced by ``Trainable(leaf)``; in layer-stacked subtrees
    by ``SliceTrainable(frozen=leaf, value=leaf[idx], index=idx)`` with ``value``
    ``[len(idx), ...]`` (``Trainable`` if every layer is chosen).

  Raises:
    ValueError: neither ``layers`` nor ``targets``; ``layers`` on a tree without layers, or out
      of range (naming the stack and its size); nothing selected; a chosen leaf that already
      belongs to another method.
    TypeError: bad ``layers``/``targets`` types, or a chosen leaf that is not a floating array.

  >>> import jax.numpy as jnp, peftjax
  >>> params = {"layers": {"mlp": {"kernel": jnp.zeros((4, 8, 8))}}, "head": {"kernel": jnp.zeros((8, 2))}}
  >>> tuned = peftjax.partial.apply(params, layers=-1)           # the top layer of a scanned model
  >>> node = tuned["layers"]["mlp"]["kernel"]
  >>> type(node).__name__, node.index, node.value.shape
  ('SliceTrainable', (3,), (1, 8, 8))
  >>> tuned = peftjax.partial.apply(params, targets=["head"])
  >>> peftjax.summary(tuned).trainable
  16
  """
  if layers is None and targets is None:
    raise ValueError("partial.apply needs `layers` (e.g. layers=-2 for the top two layers) "
                     "and/or `targets` (which leaves to train fully)")
  pred = leaf_predicate(targets)
  pairs = targeting.leaves_with_paths(params)
  floating = lambda x: (is_node(x) or (targeting.is_array(x) and
                                        np.issubdtype(np.dtype(x.dtype), np.floating)))
  # Every chosen leaf is checked; untargeted non-floating leaves in a chosen layer are skipped.
  keep = (lambda p, x: pred(p, x)) if targets is not None else (lambda p, x: floating(x))
  rewrite: dict[str, Callable] = {}

  if layers is None:
    for p, x in pairs:
      if pred(p, x):
        rewrite[p] = Trainable
  else:
    groups = _groups(pairs)
    if not groups:
      raise ValueError(f"layers={layers!r}: found no layers in this tree (no layers_<i>, "
                       f"layers/<i> or layer-stacked `layers` subtree). Select leaves with "
                       f"`targets` instead. Some of its paths:\n{targeting.describe_paths(pairs)}")
    for group, members in groups.values():
      order = sorted({i for _, _, i in members}) if not group.stacked else list(range(group.n_layers))
      chosen = [order[j] for j in _resolve(layers, group, order)]
      for p, x, i in members:
        if not keep(p, x):
          continue
        if not group.stacked:
          if i in chosen:
            rewrite[p] = Trainable
        elif len(chosen) == group.n_layers:
          rewrite[p] = Trainable
        else:
          idx = tuple(chosen)
          rewrite[p] = (lambda leaf, idx=idx: SliceTrainable(
              frozen=leaf, value=leaf[np.asarray(idx)], index=idx, n_lead=1))
  if not rewrite:
    raise ValueError(f"layers={layers!r}, targets={targets!r} selected no leaf. Some of the "
                     f"tree's paths:\n{targeting.describe_paths(pairs)}")
  for p, x in pairs:
    if p in rewrite:
      check_plain_float(p, x, "partial")
  return targeting.map_selected(lambda p, x: rewrite[p](x), params, set(rewrite))


METHOD = method_lib.Method(
    name="partial", apply=apply, description="train the top --top-layers layers fully",
    options=(method_lib.Option("top_layers", 2, "how many top layers train", kwarg="layers",
                               type=method_lib.positive_int, convert=lambda v: -v),
             method_lib.TARGETS),
    learning_rate=5e-5)
