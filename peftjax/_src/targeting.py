"""Choosing leaves of a parameter tree by key path.

Paths are rendered once per leaf as ``"params/layers_0/attn/q_proj/kernel"`` (dict keys, attribute
names and sequence indices joined by ``/``; the ``value`` attribute of Flax NNX variables is
dropped, so NNX state paths read like linen ones). A *target spec* is one of

* ``None``: the default, every dense kernel of attention and MLP blocks (HF PEFT's "all-linear"):
  a floating leaf named ``kernel`` (or a node there) with ``ndim >= 2``, excluding
  embeddings, norms and output heads (see :data:`DEFAULT_EXCLUDE`, and a top-level module named
  as an output, :data:`DEFAULT_EXCLUDE_TOP`: ``out/kernel``, but not ``attn/out/kernel``);
* a ``str``: a regular expression that must match the whole path (``re.fullmatch``);
* a list/tuple of names: kernels whose path contains one of the names as a module
  (``["q_proj", "v_proj"]`` -> ``.../q_proj/kernel``), and kernel-like leaves that are
  themselves named so (``["w1"]`` -> ``w1`` of ``{"w1": ..., "w2": ...}``);
* a callable ``(path: str, leaf) -> bool``.

A spec that selects nothing is an error naming the spec and showing a few real paths.
"""

from __future__ import annotations

import re
import zlib
from typing import Any, Callable, Iterable, Sequence, Union

import jax
import jax.numpy as jnp

from peftjax._src.nodes import is_node

Targets = Union[None, str, Sequence[str], Callable[[str, Any], bool]]

#: A path component matching this marks an embedding, a norm or an output head: never a default
#: target. (``MultiHeadDotProductAttention_0`` is not a head; ``lm_head`` and ``head`` are.)
DEFAULT_EXCLUDE = re.compile(
    r"(?i).*(embed|norm|pooler|classifier|lm_head).*|wte|wpe|ln_.*|score|head|.*_head|head_.*")


#: A top-level module (the first path component, after a ``params`` wrapper) so named is a
#: model's output layer, not a projection inside a block: never a default target.
DEFAULT_EXCLUDE_TOP = re.compile(r"(?i)out|output|logits|readout")


def _key_name(k) -> str | None:
  if isinstance(k, jax.tree_util.DictKey):
    return str(k.key)
  if isinstance(k, jax.tree_util.GetAttrKey):
    return k.name
  if isinstance(k, jax.tree_util.SequenceKey):
    return str(k.idx)
  if isinstance(k, jax.tree_util.FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(path: tuple) -> str:
  """``(DictKey('params'), DictKey('q'), DictKey('kernel'))`` -> ``"params/q/kernel"``."""
  names = [_key_name(k) for k in path]
  if names and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
    names = names[:-1]  # flax.nnx Variable wrapper
  return "/".join(names)


def path_key(key, path: str):
  """``fold_in(key, crc32(path))``: a per-path key that does not depend on traversal order."""
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def describe_leaf(leaf) -> str:
  """``"LoraWeight[64, 64]"``, ``"float32[64]"`` or ``"float 0.5"``: a leaf in one short phrase."""
  if is_node(leaf):
    return f"{type(leaf).__name__}{list(leaf.shape)}"
  if is_array(leaf):
    return f"{jnp.dtype(leaf.dtype).name}{list(leaf.shape)}"
  text = repr(leaf)
  return f"{type(leaf).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def leaves_with_paths(tree) -> list[tuple[str, Any]]:
  """Every leaf (nodes count as leaves) with its rendered path, in flatten order."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)
  return [(path_str(p), leaf) for p, leaf in flat]


def is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and not is_node(x)


def is_kernel_like(leaf) -> bool:
  """A floating array with ndim >= 2, or a node that a reparameterization may wrap."""
  if is_node(leaf):
    return type(leaf).wrappable and leaf.ndim >= 2
  return is_array(leaf) and leaf.ndim >= 2 and jnp.issubdtype(leaf.dtype, jnp.floating)


def default_target(path: str, leaf) -> bool:
  parts = path.split("/")
  modules = parts[:-1]
  top = modules[1:2] if modules[:1] == ["params"] else modules[:1]
  return (parts[-1] == "kernel" and (is_kernel_like(leaf) or is_node(leaf)) and
          not any(DEFAULT_EXCLUDE.fullmatch(c) for c in modules) and
          not (len(modules) == 1 + (modules[:1] == ["params"]) and
               any(DEFAULT_EXCLUDE_TOP.fullmatch(c) for c in top)))


def compile_targets(targets: Targets) -> Callable[[str, Any], bool]:
  """Turns a target spec into one predicate ``(path, leaf) -> bool`` (regexes compiled once)."""
  if targets is None:
    return default_target
  if isinstance(targets, str):
    try:
      rx = re.compile(targets)
    except re.error as e:
      raise ValueError(f"targets={targets!r} is not a valid regular expression: {e}") from None
    return lambda path, leaf: rx.fullmatch(path) is not None
  if callable(targets):
    return targets
  if isinstance(targets, Iterable):
    names = list(targets)
    if not names or not all(isinstance(n, str) for n in names):
      raise TypeError(f"targets must be a regex, a non-empty list of module names or a callable "
                      f"(path, leaf) -> bool; got {targets!r}")
    wanted = set(names)

    def by_name(path, leaf):
      parts = path.split("/")
      return ((is_kernel_like(leaf) or is_node(leaf)) and
              (parts[-1] in wanted or
               parts[-1] == "kernel" and bool(wanted.intersection(parts[:-1]))))
    return by_name
  raise TypeError(f"targets must be None, a regex string, a list of module names or a callable; "
                  f"got {type(targets).__name__}: {targets!r}")


def describe_paths(pairs: list[tuple[str, Any]], n: int = 8) -> str:
  shown = [f"  {p}: {describe_leaf(l)}" for p, l in pairs[:n]]
  more = f"\n  ... ({len(pairs) - n} more)" if len(pairs) > n else ""
  return "\n".join(shown) + more


def select(tree, targets: Targets, *, what: str = "targets") -> list[tuple[str, Any]]:
  """The ``(path, leaf)`` pairs of ``tree`` chosen by ``targets``; an error if there are none."""
  pred = compile_targets(targets)
  pairs = leaves_with_paths(tree)
  chosen = [(p, l) for p, l in pairs if pred(p, l)]
  if not chosen:
    hint = ""
    if targets is None:
      ex = [p.rsplit("/", 1)[-1] for p, l in pairs if is_kernel_like(l)][:2] or ["w1"]
      hint = (f" The default picks the kernels named `kernel` inside attention/MLP blocks; for "
              f"other trees pass {what}=: a regex over these paths (e.g. {what}=r\".*{ex[0]}\"), "
              f"a list of names (matched against each path's components: a module whose "
              f"`kernel` to take, or the leaf's own name, e.g. {what}={ex!r}) or a callable "
              f"(path, leaf) -> bool.")
    raise ValueError(f"{what}={targets!r} matched no leaf of the parameter tree.{hint} Some of "
                     f"its paths:\n{describe_paths(pairs)}")
  return chosen


def map_selected(fn: Callable[[str, Any], Any], tree, paths: set[str]):
  """Replaces the leaves at ``paths`` (nodes count as leaves) by ``fn(path, leaf)``."""
  def visit(p, leaf):
    s = path_str(p)
    return fn(s, leaf) if s in paths else leaf
  return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_node)
