"""Names: adapter names on disk, peftjax module paths <-> HF module names, and HF's matching rules.

HF keys are ``base_model.model.<module>.lora_A.weight`` (``[r, in]``) and
``...lora_B.weight`` (``[out, r]``), transposed relative to peftjax's ``a [*in, r]`` and
``b [r, *out]``; embeddings use ``lora_embedding_A [r, vocab]`` / ``lora_embedding_B [dim, r]``;
IA3 vectors are ``<module>.ia3_l`` (``[out, 1]``, or ``[1, in]`` for ``feedforward_modules``).
``<module>`` comes from the peftjax module path by an explicit table per model family
(:func:`hf_module_name`):

* ``"llama"``: ``layers_3/self_attn/q_proj`` -> ``model.layers.3.self_attn.q_proj``,
  ``lm_head`` -> ``lm_head``, anything else ``x/y`` -> ``model.x.y``;
* ``"bert"``: ``layers_3/attention/self/query`` -> ``{p}encoder.layer.3.attention.self.query``,
  ``classifier/...`` -> ``classifier...``, anything else ``x/y`` -> ``{p}x.y`` where ``{p}`` is the
  base prefix (``""`` for ``BertModel``, ``bert.``/``roberta.`` under a task head);
* ``"generic"``: ``/`` -> ``.`` and Flax's ``name_3`` -> ``name.3``.

Layer-stacked trees (``nn.scan``: one ``layers`` subtree whose leaves have a leading layer axis)
map ``layers.N`` to slice ``N``.

Config fields that select modules (``target_modules``, ``exclude_modules``,
``layers_to_transform``/``layers_pattern``, ``rank_pattern``/``alpha_pattern`` keys,
``feedforward_modules``, ``modules_to_save``) are matched against these names as HF PEFT does
(the ``_matches`` family of helpers below), both when loading and when choosing what to write.

Adapter names are single path components checked by :func:`safe_name`, so no name can read or
write outside the given directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax

from peftjax._src import targeting
from peftjax._src.nodes import is_node
from peftjax._src.tuned import as_tuned
from peftjax.lora import STACKED_PATH, default_layout

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "KEY_PREFIX", "PROMPT_KEY_PREFIX", "PROMPT_LEARNING",
           "FAMILIES", "SUPPORTED_METHODS",
           "safe_name", "safe_join", "detect_family", "hf_module_name"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Every key of a saved HF PEFT LoRA/IA3 adapter starts with this.
KEY_PREFIX = "base_model.model."
#: A prompt-learning adapter (prompt, prefix, P-tuning) wraps the model itself, not a tuner: its
#: ``modules_to_save`` tensors (e.g. a classification head) are keyed under this.
PROMPT_KEY_PREFIX = "base_model."
#: ``peft_type`` values of prompt-learning adapters.
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")
FAMILIES = ("llama", "bert", "generic")
#: ``peft_type`` values :func:`load_hf_peft` and :func:`save_hf_peft` handle.
SUPPORTED_METHODS = ("LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING", "VERA", "LOHA", "LOKR",
                     "OFT")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_LAYER_COMP = re.compile(r"layers_(\d+)")
_INDEXED = re.compile(r"(.+)_(\d+)")


# ================================================================================================
# names and paths
# ================================================================================================

def safe_name(name: str, what: str = "adapter name") -> str:
  """Checks that ``name`` is one harmless path component (letters, digits, ``_ . -``).

  Args:
    name: an adapter name (becomes a subdirectory).
    what: how to call it in the error.

  Returns:
    ``name``.

  Raises:
    ValueError: for separators, ``..``, a leading dot or dash, an empty or over-long name.

  >>> safe_name("my_adapter-v2")
  'my_adapter-v2'
  >>> safe_name("../evil")
  Traceback (most recent call last):
  ...
  ValueError: adapter name '../evil' is not allowed: ...
  """
  if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
    raise ValueError(f"{what} {name!r} is not allowed: use 1-128 letters, digits, '_', '.' or "
                     "'-', starting with a letter or digit (no path separators, no '..')")
  return name


def safe_join(directory: str | os.PathLike, name: Optional[str],
              what: str = "adapter name") -> Path:
  """``directory / name`` after :func:`safe_name`, checked to stay inside ``directory``.

  ``name=None`` returns ``directory`` itself.

  >>> str(safe_join("/tmp/out", "lora1"))
  '/tmp/out/lora1'
  """
  directory = Path(directory)
  if name is None:
    return directory
  out = directory / safe_name(name, what)
  base = directory.resolve()
  if not out.resolve().is_relative_to(base):  # e.g. a symlink planted inside the directory
    raise ValueError(f"{what} {name!r} resolves to {out.resolve()}, outside {base}")
  return out


def detect_family(params) -> str:
  """``"llama"``, ``"bert"`` or ``"generic"`` from the top-level names of a parameter tree.

  >>> detect_family({"embed_tokens": {}, "layers_0": {"self_attn": {}}})
  'llama'
  >>> detect_family({"params": {"embeddings": {"word_embeddings": {}}}})
  'bert'
  >>> detect_family({"dense": {}})
  'generic'
  """
  params = as_tuned(params).params
  if not isinstance(params, Mapping):
    return "generic"
  for k, v in params.items():
    if (k == "layers" or _LAYER_COMP.fullmatch(str(k))) and isinstance(v, Mapping):
      if "self_attn" in v:
        return "llama"
      if "attention" in v:
        return "bert"
  if "embed_tokens" in params:
    return "llama"
  if isinstance(params.get("embeddings"), Mapping) and "word_embeddings" in params["embeddings"]:
    return "bert"
  return "generic"


def hf_module_name(path: str | Sequence[str], family: str = "generic", layer: Optional[int] = None,
                   hf_prefix: str = "") -> str:
  """The Hugging Face module name of a peftjax module path (without ``base_model.model.``).

  Args:
    path: module path relative to the parameter root, ``"layers_0/self_attn/q_proj"`` (a trailing
      ``kernel``/``embedding``/... leaf name is not part of it).
    family: ``"llama"``, ``"bert"`` or ``"generic"`` (see the module docstring).
    layer: for a layer-stacked path (``layers/...``), the layer index ``N`` (slice ``N``).
    hf_prefix: BERT base prefix (``""``, ``"bert."``, ``"roberta."``).

  Returns:
    e.g. ``"model.layers.0.self_attn.q_proj"``.

  Raises:
    ValueError: for an unknown family, or a stacked path without ``layer``.

  >>> hf_module_name("layers_2/mlp/down_proj", "llama")
  'model.layers.2.mlp.down_proj'
  >>> hf_module_name("layers/self_attn/q_proj", "llama", layer=5)
  'model.layers.5.self_attn.q_proj'
  >>> hf_module_name("layers_1/attention/self/query", "bert", hf_prefix="bert.")
  'bert.encoder.layer.1.attention.self.query'
  >>> hf_module_name("blocks_0/attn/q", "generic")
  'blocks.0.attn.q'
  """
  comps = tuple(path.split("/")) if isinstance(path, str) else tuple(path)
  if family not in FAMILIES:
    raise ValueError(f"unknown model family {family!r}; use one of {FAMILIES}")
  if not comps:
    raise ValueError("empty module path")

  def stacked_error():
    return ValueError(f"{'/'.join(comps)} is layer-stacked; pass layer=N for slice N")

  if family in ("llama", "bert"):
    first, rest = comps[0], list(comps[1:])
    layers = "model.layers" if family == "llama" else f"{hf_prefix}encoder.layer"
    m = _LAYER_COMP.fullmatch(first)
    if m:
      return ".".join([layers, m.group(1)] + rest)
    if first == "layers":
      if layer is None:
        raise stacked_error()
      return ".".join([layers, str(layer)] + rest)
    if family == "llama":
      return ".".join(comps) if first == "lm_head" else "model." + ".".join(comps)
    return ".".join(comps) if first == "classifier" else hf_prefix + ".".join(comps)
  # generic
  out, stacked_done = [], False
  for c in comps:
    m = _INDEXED.fullmatch(c)
    if m:
      out += [m.group(1), m.group(2)]
    elif not stacked_done and STACKED_PATH.fullmatch(c):
      if layer is None:
        raise stacked_error()
      out += [c, str(layer)]
      stacked_done = True
    else:
      out.append(c)
  return ".".join(out)


def _is_stacked(family: str, comps: Sequence[str]) -> bool:
  if family in ("llama", "bert"):
    return bool(comps) and comps[0] == "layers"
  return any(STACKED_PATH.fullmatch(c) and not _INDEXED.fullmatch(c) for c in comps)


class _Site(NamedTuple):
  """A kernel or embedding of the tree that LoRA may sit on."""
  path: str            # leaf path relative to the root, ".../kernel"
  leaf: Any            # array (or node)
  n_batch: int
  n_in: int
  modules: tuple       # HF module name per layer (one entry if not stacked)
  embedding: bool


def _leaf_kind(name: str) -> Optional[str]:
  return {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}.get(name)


def _sites(params, family: str, hf_prefix: str) -> list[_Site]:
  sites = []
  for path, leaf in targeting.leaves_with_paths(params):
    comps = path.split("/")
    if comps[-1] not in ("kernel", "embedding"):
      continue
    if is_node(leaf) and hasattr(leaf, "n_batch") and hasattr(leaf, "n_in"):  # LoRA, IA3
      n_batch, n_in = leaf.n_batch, leaf.n_in
    elif targeting.is_kernel_like(leaf):
      if comps[-1] == "embedding":
        n_batch, n_in = 0, 1
      elif _is_stacked(family, comps[:-1]):
        n_batch, n_in = default_layout(path, tuple(leaf.shape))
      else:
        n_batch, n_in = default_layout(comps[-1], tuple(leaf.shape))
    else:
      continue
    if n_batch > 1:
      continue
    if n_batch:
      mods = tuple(hf_module_name(comps[:-1], family, i, hf_prefix) for i in range(leaf.shape[0]))
    else:
      mods = (hf_module_name(comps[:-1], family, None, hf_prefix),)
    sites.append(_Site(path, leaf, n_batch, n_in, mods, comps[-1] == "embedding"))
  return sites


def _hf_params(params, family: str, hf_prefix: str) -> dict:
  """Every array leaf's HF parameter name -> (leaf path, layer or None, leaf name)."""
  out = {}
  for path, leaf in targeting.leaves_with_paths(params):
    comps = path.split("/")
    kind = _leaf_kind(comps[-1])
    if kind is None or not targeting.is_array(leaf) or len(comps) < 2:
      continue
    stacked = _is_stacked(family, comps[:-1])
    layers = range(leaf.shape[0]) if stacked and leaf.ndim >= 1 else [None]
    for i in layers:
      name = hf_module_name(comps[:-1], family, i, hf_prefix) + "." + kind
      out[name] = (path, i, comps[-1])
  return out


def _num_layers(inner) -> Optional[int]:
  """The number of layers of a parameter tree (``layers_N`` subtrees or a stacked ``layers``)."""
  if not isinstance(inner, Mapping):
    return None
  n = sum(1 for k in inner if _LAYER_COMP.fullmatch(str(k)))
  if n:
    return n
  if isinstance(inner.get("layers"), Mapping):
    leaves = jax.tree_util.tree_leaves(inner["layers"], is_leaf=is_node)
    return int(leaves[0].shape[0]) if leaves else None
  return None


# ================================================================================================
# matching module names as HF PEFT does
# ================================================================================================

def _pattern_key(pattern_keys: Iterable[str], module: str) -> Optional[str]:
  for key in pattern_keys:
    if re.match(rf"(.*\.)?({key})$", module):
      return key
  return None


def _matches(spec, module: str) -> bool:
  if spec is None:
    return False
  if isinstance(spec, str):
    return re.fullmatch(spec, module) is not None
  return module in spec or any(module.endswith("." + t) for t in spec)


def _layer_index(module: str, layers_pattern) -> Optional[int]:
  if layers_pattern is None:
    m = re.match(r".*\.[^.]*\.(\d+)\.", module)
    return int(m.group(1)) if m else None
  pats = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern)
  for p in pats:
    m = re.match(rf".*\.{p}\.(\d+)\.", module)
    if m:
      return int(m.group(1))
  return None


_NOT_ALL_LINEAR = re.compile(r"(^|\.)(lm_head|classifier|score|qa_outputs|pooler|cls)(\.|$)")


def _targeted(cfg: dict, site: _Site, module: str) -> bool:
  target = cfg.get("target_modules")
  if isinstance(target, str) and target.lower() == "all-linear":
    hit = not site.embedding and not _NOT_ALL_LINEAR.search(module)
  else:
    hit = _matches(target, module)
  if not hit or _matches(cfg.get("exclude_modules"), module):
    return False
  ltt = cfg.get("layers_to_transform")
  if ltt is not None:
    idx = _layer_index(module, cfg.get("layers_pattern"))
    wanted = {ltt} if isinstance(ltt, int) else set(ltt)
    return idx is not None and idx in wanted
  return True


def _is_feedforward(cfg: dict, module: str) -> bool:
  ff = cfg.get("feedforward_modules")
  if ff is None:
    return False
  if isinstance(ff, str):
    return re.fullmatch(ff, module) is not None
  return any(module.endswith(t) for t in ff)  # HF PEFT's own test


def _under_modules_to_save(mts, module: str) -> bool:
  """Whether ``module`` or one of its parents is selected by ``modules_to_save``."""
  if not mts:
    return False
  mts = [mts] if isinstance(mts, str) else list(mts)
  parts = module.split(".")
  return any(_matches(mts, ".".join(parts[:i])) for i in range(1, len(parts) + 1))
