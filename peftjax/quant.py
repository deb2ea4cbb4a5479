"""Quantized frozen kernels: NF4 / FP4 / int4 / int8, packed two 4-bit codes per byte.

``quantize(params)`` rewrites the target kernels of a parameter tree into
:class:`QuantizedWeight` nodes (blockwise absmax scales, optionally double-quantized to 8 bits as
in QLoRA: about 4.127 bits per parameter for NF4 with blocks of 64). Under :func:`peftjax.lift`
a quantized kernel's matmuls run a dequantizing matmul (the Pallas kernel on GPU, XLA elsewhere)
whose backward pass gives ``dx`` only and dequantizes again rather than storing a float copy of the
weight. ``dequantize`` (or ``peftjax.merge``) gives plain arrays back. QLoRA is
:func:`peftjax.qlora.apply`. See ``docs/quant.md`` for the layout and measured figures.

>>> import jax, jax.numpy as jnp, peftjax
>>> params = {"mlp": {"up": {"kernel": jax.random.normal(jax.random.key(0), (256, 128))}}}
>>> q = peftjax.quant.quantize(params)
>>> node = q["mlp"]["up"]["kernel"]
>>> node.format, node.shape, node.codes.dtype.name, round(peftjax.quant.bits_per_param(q), 2)
('nf4', (256, 128), 'uint8', 4.13)
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from peftjax._src import targeting
from peftjax._src.nodes import is_node
from peftjax._src.quant import formats as _formats
from peftjax._src.quant.core import KERNELS, QuantizedWeight, quantize_array, quantize_layers
from peftjax._src.quant.formats import FORMATS, FP4, NF4
from peftjax._src.quant.matmul import qmatmul

__all__ = ["quantize", "dequantize", "QuantizedWeight", "bits_per_param", "quantize_array",
           "quantize_layers", "quantize_options", "qmatmul", "FORMATS", "NF4", "FP4", "KERNELS"]


def _is_q(x) -> bool:
  return isinstance(x, QuantizedWeight)


_describe = targeting.describe_leaf


def quantize(params, *, format: str = "nf4", block_size: int | None = 64,
             double_quant: bool = True, targets=None, compute_dtype=None, symmetric: bool = True,
             layout: Callable[[str, tuple], tuple[int, int]] | None = None,
             kernel: str = "auto"):
  """Rewrites the target kernels of ``params`` into :class:`QuantizedWeight` nodes.

  Args:
    params: any parameter pytree (Flax linen/NNX, dicts).
    format: ``"nf4"`` (QLoRA's NormalFloat, bitsandbytes' table), ``"fp4"`` (bitsandbytes'),
      ``"int4"`` (group-wise; ``symmetric=False`` adds a zero point per block) or ``"int8"``.
    block_size: values per scale along the kernel's input axes (even for 4-bit formats);
      ``None`` = one scale per output channel.
    double_quant: quantize the scales to 8 bits in blocks of 256 after subtracting their mean.
    targets: which kernels, as for :func:`peftjax.lora.apply` (default: every dense kernel of
      attention and MLP blocks; a regex over ``"a/b/kernel"`` paths; module names; a callable).
    compute_dtype: the dtype kernels dequantize to (their ``dtype`` under ``lift``); default each
      kernel's own dtype.
    symmetric: ``int4`` only.
    layout: ``(path, shape) -> (n_batch, n_in)`` (layer axes, input axes); default
      :func:`peftjax.lora.default_layout`. Layer-stacked kernels are quantized per layer.
    kernel: matmul implementation: ``"auto"`` (XLA: the Pallas kernel measured slower on an
      H200), ``"xla"``,
      ``"pallas"`` or ``"interpret"``.

  Returns:
    The same tree with target kernels replaced by :class:`QuantizedWeight` nodes.

  Raises:
    ValueError: unknown format, bad block size or layout, targets that match nothing, a 1-D
      target, NaN/Inf in a target.
    TypeError: a non-floating target, a target that is already a node (quantized twice), bad
      option types.

  >>> import jax.numpy as jnp, peftjax
  >>> p = {"q_proj": {"kernel": jnp.ones((64, 32))}, "norm": {"scale": jnp.ones(64)}}
  >>> q = peftjax.quant.quantize(p, format="int4", double_quant=False)
  >>> type(q["q_proj"]["kernel"]).__name__, q["norm"]["scale"].shape
  ('QuantizedWeight', (64,))
  """
  _formats.check_format(format, block_size, symmetric)
  if not isinstance(double_quant, bool):
    raise TypeError(f"quantize: double_quant must be a bool; got {double_quant!r}")
  if compute_dtype is not None and not jnp.issubdtype(jnp.dtype(compute_dtype), jnp.floating):
    raise TypeError(f"quantize: compute_dtype={compute_dtype!r} is not a floating dtype")
  if kernel not in KERNELS:
    raise ValueError(f"quantize: kernel={kernel!r} is not one of {KERNELS}")
  chosen = targeting.select(params, targets)
  for path, leaf in chosen:  # every target is checked before any work is done
    if is_node(leaf):
      raise TypeError(f"quantize: target {path} is already a {type(leaf).__name__} node "
                      f"({_describe(leaf)}); quantize the original kernel once, or narrow targets")
    if not targeting.is_array(leaf):
      raise TypeError(f"quantize: target {path} is not an array: {_describe(leaf)}")
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(f"quantize: target {path} has dtype {jnp.dtype(leaf.dtype).name}; only "
                      f"floating kernels can be quantized; narrow targets")
    if leaf.ndim < 2:
      raise ValueError(f"quantize: target {path} has shape {list(leaf.shape)}; only kernels "
                       f"(ndim >= 2) can be quantized; narrow targets")

  def rewrite(path, w):
    lay = layout(path, tuple(w.shape)) if layout is not None else None
    return quantize_array(w, format=format, block_size=block_size, double_quant=double_quant,
                          symmetric=symmetric, layout=lay, compute_dtype=compute_dtype,
                          kernel=kernel, path=path)

  return targeting.map_selected(rewrite, params, {p for p, _ in chosen})


def quantize_options(spec: Any) -> dict | None:
  """The keyword arguments of :func:`quantize` that a ``quantize=`` argument stands for.

  Loaders (:func:`peftjax.io.from_pretrained`, :func:`peftjax.io.from_gguf`) take ``quantize=``
  in any of these forms and quantize the target kernels as they read them:

  * ``None`` or ``False``: no quantization (returns ``None``);
  * ``True``: QLoRA's defaults (NF4, blocks of 64, double quantization, the default targets);
  * a format name, ``"nf4"``, ``"fp4"``, ``"int4"`` or ``"int8"``;
  * a dict of :func:`quantize` keywords (``format``, ``block_size``, ``double_quant``,
    ``targets``, ``compute_dtype``, ``symmetric``, ``layout``, ``kernel``): the same names as
    :func:`peftjax.qlora.apply`'s.

  Returns:
    A dict with every keyword of :func:`quantize` (defaults filled in), or ``None``.

  Raises:
    ValueError: an unknown format or keyword, a bad block size (the value named).
    TypeError: a value of another type.

  >>> quantize_options("int4")["format"], quantize_options(None)
  ('int4', None)
  """
  if spec is None or spec is False:
    return None
  defaults = {k: p.default for k, p in inspect.signature(quantize).parameters.items()
              if p.kind is inspect.Parameter.KEYWORD_ONLY}
  if spec is True:
    given = {}
  elif isinstance(spec, str):
    given = {"format": spec}
  elif isinstance(spec, dict):
    given = dict(spec)
    unknown = sorted(set(given) - set(defaults))
    if unknown:
      raise ValueError(f"quantize={spec!r}: unknown option {unknown[0]!r}; the options are "
                       f"{', '.join(defaults)} (as for peftjax.quant.quantize)")
  else:
    raise TypeError(f"quantize= must be None, True, a format name ({', '.join(FORMATS)}) or a "
                    f"dict of peftjax.quant.quantize options; got {type(spec).__name__}: {spec!r}")
  out = {**defaults, **given}
  _formats.check_format(out["format"], out["block_size"], out["symmetric"])
  if not isinstance(out["double_quant"], bool):
    raise TypeError(f"quantize: double_quant must be a bool; got {out['double_quant']!r}")
  if out["kernel"] not in KERNELS:
    raise ValueError(f"quantize: kernel={out['kernel']!r} is not one of {KERNELS}")
  if out["compute_dtype"] is not None and not jnp.issubdtype(jnp.dtype(out["compute_dtype"]),
                                                            jnp.floating):
    raise TypeError(f"quantize: compute_dtype={out['compute_dtype']!r} is not a floating dtype")
  return out


def dequantize(tree):
  """Replaces every :class:`QuantizedWeight` (also inside other nodes) by its dequantized array.

  Args:
    tree: a node or any pytree. ``LoraWeight(w=QuantizedWeight)`` becomes ``LoraWeight(w=array)``.

  Returns:
    The same structure with plain arrays ``[*S, *I, *O]`` in each node's compute dtype.

  >>> import jax, peftjax
  >>> w = jax.random.normal(jax.random.key(0), (64, 8))
  >>> back = peftjax.quant.dequantize(peftjax.quant.quantize({"kernel": w}, targets="kernel"))
  >>> back["kernel"].shape, bool(abs(back["kernel"] - w).max() < 0.5)
  ((64, 8), True)
  """
  return jax.tree_util.tree_map(lambda x: x.materialize() if _is_q(x) else x, tree, is_leaf=_is_q)


def bits_per_param(tree) -> float:
  """Stored bits per represented parameter over all :class:`QuantizedWeight` nodes in ``tree``.

  Counts the bytes of every array the nodes hold (packed codes, scales or 8-bit scales with their
  absmax and offset, zero points), padding included, over the number of kernel values.

  Raises:
    ValueError: ``tree`` holds no :class:`QuantizedWeight`.
  """
  qs = [x for x in jax.tree_util.tree_leaves(tree, is_leaf=_is_q) if _is_q(x)]
  if not qs:
    raise ValueError("bits_per_param: the tree holds no QuantizedWeight")
  return 8.0 * sum(q.nbytes for q in qs) / sum(q.size for q in qs)
