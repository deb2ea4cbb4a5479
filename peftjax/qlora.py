"""QLoRA (Dettmers et al., 2023): LoRA adapters trained on top of a frozen 4-bit base.

``apply`` = :func:`peftjax.quant.quantize` then :func:`peftjax.lora.apply` on the same kernels, so
each target becomes ``LoraWeight(w=QuantizedWeight(...), a, b)``. Under :func:`peftjax.lift` the
base runs the dequantizing matmul and the adapter its factored product; only ``a`` and ``b`` are
trainable (``peftjax.optimizer`` / ``peftjax.split``). ``peftjax.merge`` dequantizes and folds the
adapter in (full precision); :func:`merge_requantized` folds it in and quantizes again, and says how
much error that adds.

>>> import jax, peftjax
>>> params = {"attn": {"q_proj": {"kernel": jax.random.normal(jax.random.key(0), (128, 64))}}}
>>> tuned = peftjax.qlora.apply(params, rank=4)
>>> node = tuned["attn"]["q_proj"]["kernel"]
>>> type(node).__name__, type(node.w).__name__, node.a.shape, node.b.shape
('LoraWeight', 'QuantizedWeight', (128, 4), (4, 64))
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from peftjax import lora as _lora
from peftjax import lora_init
from peftjax import quant as _quant
from peftjax._src import targeting
from peftjax._src.nodes import is_node
from peftjax._src.quant.core import QuantizedWeight, quantize_array
from peftjax._src import method as method_lib
from peftjax._src import nodes as nodes_lib

__all__ = ["apply", "merge_requantized"]


def apply(params, rank: int = 8, *, format: str = "nf4", block_size: int | None = 64,
          double_quant: bool = True, targets=None, alpha: float | None = None, key=None,
          compute_dtype=None, symmetric: bool = True,
          layout: Callable[[str, tuple], tuple[int, int]] | None = None, kernel: str = "auto",
          **lora_kwargs):
  """Quantizes the target kernels, then puts LoRA adapters on exactly those kernels.

  ``params`` may already hold :class:`~peftjax.quant.QuantizedWeight` leaves (a model loaded with
  ``peftjax.io.from_pretrained(..., quantize=...)``): those are kept as they are (their format
  wins over ``format``/``block_size``/...). With ``targets=None`` the adapters then go on exactly
  the quantized leaves and nothing else is quantized; with ``targets`` given, the targets get
  adapters, targeted plain kernels are quantized first, and quantized leaves that are not
  targeted stay frozen in 4 bits.

  Args:
    params: any parameter pytree, plain or already quantized.
    rank: LoRA rank.
    format, block_size, double_quant, compute_dtype, symmetric, kernel: as for
      :func:`peftjax.quant.quantize` (default NF4, blocks of 64, double quantization).
    targets: which kernels (default: every dense kernel of attention and MLP blocks, or the
      quantized leaves of an already quantized tree).
    alpha: LoRA scale numerator (default ``rank``).
    key: PRNG key of the adapters (per-path keys, so ``A`` equals plain LoRA's on the same tree).
    layout: ``(path, shape) -> (n_batch, n_in)``, used by both steps.
    **lora_kwargs: the rest of :func:`peftjax.lora.apply` (``dropout``, ``init``, ``rslora``,
      ``dtype`` of the adapters: default float32, ``loftq_iter``). ``init="loftq"`` quantizes
      each target with the settings above inside LoftQ's loop; ``"pissa"``/``"olora"`` run on
      the full-precision kernels and quantize the residual bases (QPiSSA). Both need plain
      (unquantized) targets.

  Returns:
    The tree with each target replaced by ``LoraWeight(w=QuantizedWeight(...))``.

  Raises:
    ValueError, TypeError: as :func:`peftjax.quant.quantize` and :func:`peftjax.lora.apply`.

  >>> import jax, peftjax
  >>> p = {"mlp": {"up": {"kernel": jax.random.normal(jax.random.key(0), (128, 64))}}}
  >>> q = peftjax.quant.quantize(p)              # e.g. what from_pretrained(quantize="nf4") gives
  >>> node = apply(q, rank=4)["mlp"]["up"]["kernel"]
  >>> type(node).__name__, node.w is q["mlp"]["up"]["kernel"]
  ('LoraWeight', True)
  """
  bare = {p for p, l in targeting.leaves_with_paths(params) if isinstance(l, QuantizedWeight)}
  if lora_init.modifies_base(lora_kwargs.get("init")):
    quant = dict(format=format, block_size=block_size, double_quant=double_quant,
                 compute_dtype=compute_dtype, symmetric=symmetric, kernel=kernel)
    return _base_init(params, rank, bare, quant, targets=targets, alpha=alpha, key=key,
                      layout=layout, **lora_kwargs)
  if bare and targets is None:
    return _lora.apply(params, rank, alpha=alpha, targets=lambda path, leaf: path in bare,
                       key=key, layout=layout, **lora_kwargs)
  if bare:
    chosen = {p for p, _ in targeting.select(params, targets)}
    plain = chosen - bare
    quantized = params
    if plain:
      quantized = _quant.quantize(params, format=format, block_size=block_size,
                                  double_quant=double_quant,
                                  targets=lambda path, leaf: path in plain,
                                  compute_dtype=compute_dtype, symmetric=symmetric,
                                  layout=layout, kernel=kernel)
    return _lora.apply(quantized, rank, alpha=alpha, targets=lambda path, leaf: path in chosen,
                       key=key, layout=layout, **lora_kwargs)
  quantized = _quant.quantize(params, format=format, block_size=block_size,
                              double_quant=double_quant, targets=targets,
                              compute_dtype=compute_dtype, symmetric=symmetric, layout=layout,
                              kernel=kernel)
  new = {p for p, l in targeting.leaves_with_paths(quantized) if isinstance(l, QuantizedWeight)}
  return _lora.apply(quantized, rank, alpha=alpha, targets=lambda path, leaf: path in new,
                     key=key, layout=layout, **lora_kwargs)


def _base_init(params, rank, bare, quant, *, targets, **lora_kwargs):
  """QLoRA with a base-changing init (:func:`peftjax.lora_init.modifies_base`) on plain targets:
  LoftQ quantizes inside its loop; PiSSA/OLoRA quantize the residual base after the init."""
  if targets is None and bare:
    targets = lambda path, leaf: path in bare  # lora_init names the quantized kernel in its error
  if lora_kwargs["init"] == "loftq":
    return _lora.apply(params, rank, targets=targets, loftq_quant=quant, **lora_kwargs)
  before = {p for p, l in targeting.leaves_with_paths(params) if isinstance(l, _lora.LoraWeight)}
  tuned = _lora.apply(params, rank, targets=targets, **lora_kwargs)

  def requantize(path, node):
    if (not isinstance(node, _lora.LoraWeight) or is_node(node.w)
        or targeting.path_str(path) in before):
      return node
    return node.replace(w=quantize_array(node.w, layout=(node.n_batch, node.n_in),
                                         path=targeting.path_str(path), **quant))
  return jax.tree_util.tree_map_with_path(requantize, tuned, is_leaf=is_node)


def _quantized_base(node) -> QuantizedWeight | None:
  """The single QuantizedWeight nested in ``node`` (None if none; error if several)."""
  found = [x for x in jax.tree_util.tree_leaves(node, is_leaf=lambda x: isinstance(
      x, QuantizedWeight)) if isinstance(x, QuantizedWeight)]
  if len(found) > 1:
    raise ValueError(f"merge_requantized: a {type(node).__name__} holds {len(found)} quantized "
                     f"kernels; it can fold only one")
  return found[0] if found else None


def requantize_like(q: QuantizedWeight, w) -> QuantizedWeight:
  """Quantizes ``w`` (the shape of ``q``) with ``q``'s format, block size, scales and layout."""
  return quantize_array(
      w, format=q.format, block_size=q.block_size, double_quant=q.double_quant,
      symmetric=q.symmetric, layout=(len(q.stack_shape), len(q.in_shape)),
      compute_dtype=q.dtype, kernel=q.kernel)


def merge_requantized(tree):
  """Folds each adapter into its quantized base and quantizes the sum again.

  For every node that wraps a :class:`QuantizedWeight` (``LoraWeight(w=QuantizedWeight)``),
  ``exact = merge(node) = deq(base) + delta`` is quantized with the base's settings. The error
  this adds is measured against ``exact``.

  Args:
    tree: a QLoRA tree (from :func:`apply`, trained or not).

  Returns:
    ``(new_tree, report)``: ``new_tree`` has a plain :class:`QuantizedWeight` where each wrapper
    was; ``report`` is a dict::

      {"paths": {path: {"rel_error": |deq(new) - exact| / |exact|,
                        "max_abs_error": max |deq(new) - exact|,
                        "delta_norm_rel": |delta| / |exact|,
                        "delta_rel_error": |(deq(new) - deq(base)) - delta| / |delta|}},
       "rel_error": ..., "max_abs_error": ..., "delta_rel_error": ...}   # over all paths

    Norms are Frobenius. ``delta_rel_error`` is the share of the adapter's update that the
    re-quantized weight fails to carry: near 0 the update survives, near 1 (or above) it is lost
    in quantization noise (``nan`` when the update is zero).

  Raises:
    ValueError: the tree holds no adapter over a quantized base.
  """
  sums = {"err2": 0.0, "exact2": 0.0, "derr2": 0.0, "delta2": 0.0, "max": 0.0}
  paths: dict[str, dict[str, float]] = {}

  def visit(path, node):
    if not is_node(node) or isinstance(node, QuantizedWeight):
      return node
    base = _quantized_base(node)
    if base is None:
      return node
    p = targeting.path_str(path)
    exact = jnp.asarray(node.materialize(), jnp.float32)
    old = jnp.asarray(base.materialize(), jnp.float32)
    new = requantize_like(base, exact.astype(base.dtype))
    got = jnp.asarray(new.materialize(), jnp.float32)
    delta = exact - old
    err2 = float(jnp.sum((got - exact) ** 2))
    exact2 = float(jnp.sum(exact ** 2))
    derr2 = float(jnp.sum(((got - old) - delta) ** 2))
    delta2 = float(jnp.sum(delta ** 2))
    mx = float(jnp.max(jnp.abs(got - exact)))
    paths[p] = {
        "rel_error": math.sqrt(err2 / exact2) if exact2 else 0.0,
        "max_abs_error": mx,
        "delta_norm_rel": math.sqrt(delta2 / exact2) if exact2 else 0.0,
        "delta_rel_error": math.sqrt(derr2 / delta2) if delta2 else float("nan"),
    }
    for k, v in (("err2", err2), ("exact2", exact2), ("derr2", derr2), ("delta2", delta2)):
      sums[k] += v
    sums["max"] = max(sums["max"], mx)
    return new

  new_tree = jax.tree_util.tree_map_with_path(visit, tree, is_leaf=is_node)
  if not paths:
    raise ValueError("merge_requantized: the tree holds no adapter over a quantized kernel "
                     "(expected LoraWeight(w=QuantizedWeight) nodes, e.g. from peftjax.qlora.apply)")
  report = {
      "paths": paths,
      "rel_error": math.sqrt(sums["err2"] / sums["exact2"]) if sums["exact2"] else 0.0,
      "max_abs_error": sums["max"],
      "delta_rel_error": (math.sqrt(sums["derr2"] / sums["delta2"]) if sums["delta2"]
                          else float("nan")),
  }
  return new_tree, report


#: How a model is loaded for QLoRA: attention and MLP kernels quantized to NF4 (blocks of 64,
#: double quantization: :func:`apply`'s defaults) as they are read (a GGUF file's own 4-bit
#: blocks are kept instead: :func:`peftjax.io.from_gguf`'s ``gguf_blocks``), embeddings, norms
#: and the head in bfloat16 as in the paper; the float32 model is never built.
LOAD = {"quantize": {"format": "nf4", "block_size": 64, "double_quant": True},
        "dtype": "bfloat16"}



def _load(options: dict) -> dict:
  """:data:`LOAD`, except for an init that computes the base from the full-precision kernel
  (PiSSA/OLoRA quantize the residual, LoftQ quantizes in its loop): then the model loads in
  float32 and :func:`apply` quantizes."""
  if lora_init.modifies_base(options.get("init")):
    return {"dtype": "float32"}
  return LOAD


METHOD = method_lib.Method(
    name="qlora", apply=apply, description="4-bit base + LoRA on top (NF4 with double quantization; a GGUF "
                                  "model keeps its own Q4_0/Q4_1/Q8_0 blocks)",
    options=_lora.OPTIONS, step_hook=nodes_lib.set_rng, hf_peft_type="LORA", load=_load)
