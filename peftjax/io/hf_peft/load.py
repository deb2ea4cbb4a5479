"""Reading Hugging Face PEFT adapters: :func:`read_hf_peft` (raw) and :func:`load_hf_peft` (a tree).

:func:`read_hf_peft` returns the config and tensors of any adapter as stored
(:class:`HfPeftAdapter`); :func:`load_hf_peft` puts a LoRA, IA3, prompt- or prefix-tuning adapter
onto a peftjax parameter tree; :func:`prompt_tuning_from_hf` and :func:`prefix_tuning_from_hf`
give the arrays of the last two.

Config. ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern`` (matched as HF PEFT does:
``re.match(rf"(.*\\.)?({key})$", module)``), ``use_rslora``, ``lora_dropout``, ``target_modules``
(list, regex or ``"all-linear"``), ``exclude_modules``, ``layers_to_transform``/``layers_pattern``,
``feedforward_modules`` (IA3), ``use_dora`` (``DoraWeight`` nodes, with the
``lora_magnitude_vector`` tensors) and ``modules_to_save`` (loaded as plain, frozen weights) are
honoured; the LoRA-family variants VeRA, LoHa, LoKr and OFT load through their node types'
``from_hf_peft`` (see :mod:`peftjax._src.variants`); features that change the forward pass and
that peftjax cannot express (LoRA biases, ``bias != "none"``, ...) are a ``ValueError``; config
fields this module does not know are kept in :attr:`HfPeftAdapter.config` (listed in
``unknown``) and warned about, never fatal.
Shapes are strict, and every missing, extra or misshapen tensor is a ``ValueError`` naming the key.

Safety: only JSON and safetensors are read (never pickle: a directory holding only
``adapter_model.bin`` is refused).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from peftjax._src import targeting
from peftjax._src.nodes import is_node
from peftjax._src.tuned import Tuned, as_tuned
from peftjax.io.hf_peft.names import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FAMILIES, KEY_PREFIX,
                                      PROMPT_KEY_PREFIX,
                                      SUPPORTED_METHODS, _hf_params, _is_feedforward,
                                      _num_layers, _pattern_key, _Site, _sites, _targeted,
                                      _under_modules_to_save, detect_family, safe_join)
from peftjax.io.safetensors import SafetensorsFile
from peftjax.lora import LoraWeight

__all__ = ["HfPeftAdapter", "read_hf_peft", "load_hf_peft", "prompt_tuning_from_hf",
           "prefix_tuning_from_hf"]

_PICKLE_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth",
                   "adapter_model.ckpt", "pytorch_model.bin")


# Config fields HF PEFT writes (0.13 .. 0.21) for the methods read here. Anything else is unknown:
# kept and warned about.
_COMMON_FIELDS = {"peft_type", "task_type", "peft_version", "auto_mapping",
                  "base_model_name_or_path", "revision", "inference_mode", "modules_to_save"}
_LORA_FIELDS = _COMMON_FIELDS | {
    "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "rank_pattern",
    "alpha_pattern", "use_rslora", "fan_in_fan_out", "bias", "init_lora_weights",
    "layers_to_transform", "layers_pattern", "layer_replication", "loftq_config", "megatron_config",
    "megatron_core", "use_dora", "lora_bias", "eva_config", "corda_config", "use_qalora",
    "qalora_group_size", "trainable_token_indices", "target_parameters", "alora_invocation_tokens",
    "arrow_config", "ensure_weight_tying", "kasa_config", "lora_ga_config", "monteclora_config",
    "use_bdlora", "velora_config", "runtime_config"}
_IA3_FIELDS = _COMMON_FIELDS | {"target_modules", "feedforward_modules", "exclude_modules",
                                "fan_in_fan_out", "init_ia3_weights"}
_PROMPT_FIELDS = _COMMON_FIELDS | {
    "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads",
    "num_layers", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
    "tokenizer_kwargs", "encoder_hidden_size", "prefix_projection", "init_weights"}
_KNOWN_FIELDS = {"LORA": _LORA_FIELDS, "IA3": _IA3_FIELDS, "PROMPT_TUNING": _PROMPT_FIELDS,
                 "PREFIX_TUNING": _PROMPT_FIELDS}

def _variant_fields(peft_type: str):
  """The config fields a LoRA-family variant's node type declares (``hf_peft_fields``)."""
  from peftjax._src.nodes import node_types
  for cls in node_types().values():
    if cls.hf_peft_type == peft_type and hasattr(cls, "hf_peft_fields"):
      return _COMMON_FIELDS | set(cls.hf_peft_fields)
  return None


# LoRA config fields that change the forward pass in ways a LoraWeight cannot express:
# field -> predicate "value is unsupported".
_UNSUPPORTED_LORA = {
    "lora_bias": bool, "use_qalora": bool, "use_bdlora": bool,
    "bias": lambda v: v not in (None, "none"),
    "layer_replication": lambda v: v is not None,
    "target_parameters": lambda v: bool(v),
    "trainable_token_indices": lambda v: v is not None,
    "alora_invocation_tokens": lambda v: v is not None,
    "arrow_config": lambda v: v is not None,
    "kasa_config": lambda v: v is not None,
    "monteclora_config": lambda v: v is not None,
    "velora_config": lambda v: v is not None,
}


# ================================================================================================
# reading
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class HfPeftAdapter:
  """A Hugging Face PEFT adapter as stored: config and tensors (NumPy, HF layout and names).

  Attributes:
    directory: where it was read from.
    peft_type: ``"LORA"``, ``"IA3"``, ``"PROMPT_TUNING"``, ``"PREFIX_TUNING"``, ...
    config: the whole ``adapter_config.json`` (unknown fields included).
    tensors: key -> array.
    unknown: config fields this module does not know (kept in ``config``, ignored).
  """
  directory: Path
  peft_type: str
  config: dict
  tensors: dict
  unknown: tuple = ()

  @property
  def config_path(self) -> Path:
    return self.directory / ADAPTER_CONFIG

  @property
  def weights_path(self) -> Path:
    return self.directory / ADAPTER_WEIGHTS


def _read_json(path: Path) -> dict:
  try:
    raw = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise ValueError(f"{path}: missing (not a Hugging Face PEFT adapter directory)") from None
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text ({e})") from None
  try:
    cfg = json.loads(raw)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON ({e})") from None
  if not isinstance(cfg, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
  return cfg


def read_hf_peft(path: str | os.PathLike, *, adapter_name: Optional[str] = None,
                 warn_unknown: bool = True) -> HfPeftAdapter:
  """Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (nothing else, never pickle).

  Args:
    path: the adapter directory.
    adapter_name: read ``path/adapter_name`` instead (HF PEFT's layout for extra adapters);
      checked with :func:`safe_name`.
    warn_unknown: warn about config fields this module does not know.

  Returns:
    :class:`HfPeftAdapter`.

  Raises:
    ValueError: missing or invalid config (not JSON, no ``peft_type``), only pickle weights
      present, a truncated or corrupt safetensors file (naming the file and tensor).

  Example (files, so not run here)::

    adapter = read_hf_peft("my_adapter/")
    adapter.peft_type, sorted(adapter.tensors)[:2]
  """
  directory = safe_join(path, adapter_name)
  if not directory.is_dir():
    raise ValueError(f"{directory}: not a directory (expected a Hugging Face PEFT adapter)")
  cfg_path = directory / ADAPTER_CONFIG
  cfg = _read_json(cfg_path)
  peft_type = cfg.get("peft_type")
  if not isinstance(peft_type, str):
    raise ValueError(f"{cfg_path}: 'peft_type' is missing or not a string ({peft_type!r})")
  peft_type = peft_type.upper()
  known = _KNOWN_FIELDS.get(peft_type)
  if known is None:
    known = _variant_fields(peft_type)
  unknown = tuple(sorted(set(cfg) - known)) if known is not None else ()
  if unknown and warn_unknown:
    warnings.warn(f"{cfg_path}: unknown adapter_config fields {list(unknown)} are kept "
                  f"(HfPeftAdapter.config) but ignored", stacklevel=2)
  weights = directory / ADAPTER_WEIGHTS
  if not weights.exists():
    pickles = [n for n in _PICKLE_WEIGHTS if (directory / n).exists()]
    if pickles:
      raise ValueError(f"{directory}: found {pickles} but no {ADAPTER_WEIGHTS}; peftjax never "
                       "loads pickle files (they can run code). Convert them to safetensors with "
                       "peft in a trusted environment (PeftModel.save_pretrained(..., "
                       "safe_serialization=True))")
    raise ValueError(f"{weights}: missing")
  sf = SafetensorsFile(weights)
  tensors = {name: np.array(sf.get(name)) for name in sorted(sf.keys())}
  return HfPeftAdapter(directory, peft_type, cfg, tensors, unknown)


# ================================================================================================
# loading onto a parameter tree
# ================================================================================================

def _check_lora_config(cfg: dict, cfg_path: Path):
  for field, bad in _UNSUPPORTED_LORA.items():
    if field in cfg and bad(cfg[field]):
      raise ValueError(f"{cfg_path}: {field}={cfg[field]!r} is not supported by peftjax LoRA "
                       f"(it changes the forward pass beyond W + s*A@B)")
  r = cfg.get("r")
  if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
    raise ValueError(f"{cfg_path}: 'r' must be a positive integer, got {r!r}")
  alpha = cfg.get("lora_alpha", 8)
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
    raise ValueError(f"{cfg_path}: 'lora_alpha' must be a number, got {alpha!r}")
  for field, typ in (("rank_pattern", int), ("alpha_pattern", (int, float))):
    pat = cfg.get(field) or {}
    if not isinstance(pat, dict) or not all(
        isinstance(k, str) and isinstance(v, typ) and not isinstance(v, bool)
        for k, v in pat.items()):
      raise ValueError(f"{cfg_path}: {field!r} must map module patterns to numbers, got {pat!r}")
  for field in ("target_modules", "exclude_modules"):
    tm = cfg.get(field)
    if tm is not None and not isinstance(tm, str) and not (
        isinstance(tm, list) and all(isinstance(t, str) for t in tm)):
      raise ValueError(f"{cfg_path}: {field!r} must be a list of names or a regex, got {tm!r}")
  dropout = cfg.get("lora_dropout") or 0.0
  if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
    raise ValueError(f"{cfg_path}: 'lora_dropout' must be a number in [0, 1), got {dropout!r}")
  lp = cfg.get("layers_pattern")
  regexes = [(f, cfg[f]) for f in ("target_modules", "exclude_modules")
             if isinstance(cfg.get(f), str) and cfg[f].lower() != "all-linear"]
  regexes += [(f"rank_pattern key {k!r}", k) for k in cfg.get("rank_pattern") or {}]
  regexes += [(f"alpha_pattern key {k!r}", k) for k in cfg.get("alpha_pattern") or {}]
  regexes += [("layers_pattern", p) for p in ([lp] if isinstance(lp, str) else lp or [])]
  for what, rx in regexes:
    try:
      re.compile(rx)
    except (re.error, TypeError) as e:
      raise ValueError(f"{cfg_path}: {what} is not a valid regular expression: {e}") from None
  init = cfg.get("init_lora_weights", True)
  if isinstance(init, str) and init.lower().split("_")[0] in ("pissa", "olora", "corda", "loftq",
                                                              "lora-ga", "lora_ga"):
    warnings.warn(f"{cfg_path}: init_lora_weights={init!r} modifies the base weights at init; "
                  "the adapter is only exact on the base it was converted against", stacklevel=3)


def _rank_alpha(cfg: dict, module: str) -> tuple[int, float]:
  rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
  kr, ka = _pattern_key(rp, module), _pattern_key(ap, module)
  r = rp[kr] if kr is not None else cfg["r"]
  alpha = ap[ka] if ka is not None else cfg.get("lora_alpha", 8)
  return int(r), float(alpha)


def _detect_bert_prefix(keys: Iterable[str]) -> str:
  for k in keys:
    m = re.match(re.escape(KEY_PREFIX) + r"(?:(\w+)\.)?(?:encoder|embeddings)\.", k)
    if m:
      return (m.group(1) + ".") if m.group(1) else ""
  return "bert."


_LORA_KEY = re.compile(r"(.+)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_\-]+)?\.weight|"
                       r"(.+)\.(lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
                       r"(?:\.[A-Za-z0-9_\-]+)?")
_IA3_KEY = re.compile(r"(.+)\.(ia3_l)(?:\.[A-Za-z0-9_\-]+)?")


def load_hf_peft(path: str | os.PathLike, params, *, method: Optional[str] = None,
                 family: Optional[str] = None, hf_prefix: Optional[str] = None,
                 adapter_name: Optional[str] = None, dtype=None):
  """Puts a Hugging Face PEFT adapter (LoRA, IA3, prompt or prefix tuning) onto a parameter tree.

  Args:
    path: adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).
    params: the base parameter tree, in any shape :func:`peftjax.as_tuned` accepts (``params``,
      ``{"params": params}``, a :class:`peftjax.Tuned`), e.g. from
      :func:`peftjax.io.from_pretrained` of the model the adapter was trained on; per-layer
      (``layers_N``) or layer-stacked (``layers`` with a leading ``[L]`` axis).
    method: the ``peft_type`` expected (``"LORA"``, ...); default: any of
      :data:`SUPPORTED_METHODS`.
    family: ``"llama"``, ``"bert"`` or ``"generic"``; default :func:`detect_family`.
    hf_prefix: BERT base prefix; default from the adapter's keys.
    adapter_name: read ``path/adapter_name`` (checked with :func:`safe_name`).
    dtype: dtype of the adapter's arrays; default the kernel's (float32 for non-float bases) or,
      for prompts, the stored one.

  Returns:
    * LoRA: ``params`` with every adapted kernel a :class:`~peftjax.lora.LoraWeight` (``a [*in,
      r]`` = ``lora_A.T``, ``b [r, *out]`` = ``lora_B.T``, ``scale`` = ``alpha/r``, or
      ``alpha/sqrt(r)`` with rsLoRA, ``dropout`` = ``lora_dropout``), in the shape given (a plain
      tree, ``{"params": ...}`` or a :class:`~peftjax.Tuned`);
    * IA3: the same with :class:`~peftjax.ia3.IA3Weight` nodes (``side="in"`` for
      ``feedforward_modules``, else ``"out"``);
    * prompt tuning: ``Tuned(params, prompt=SoftPrompt)`` (as ``peftjax.prompt.apply``);
    * prefix tuning: ``Tuned(params, prefix=Prefix)`` (as ``peftjax.prefix.apply``; HF shifts
      the real tokens' positions by the number of virtual tokens: pass
      ``position_ids = arange(T) + n_virtual`` to reproduce its outputs).

    ``modules_to_save`` tensors replace their base weights (as plain, frozen arrays).

  Raises:
    ValueError: another or an unsupported method, unsupported LoRA features, missing keys (a
      module the config targets without tensors), extra keys, mismatched shapes, a stacked kernel
      whose layers have different ranks or scales, a kernel that already has an adapter (a tree
      that already has the prompt or prefix); each names the key.

  Example (files, so not run here)::

    model, params, _ = peftjax.io.from_pretrained("base/")
    tuned = load_hf_peft("adapter/", params)
    logits = peftjax.lift(model.apply)({"params": tuned}, ids)
  """
  adapter = read_hf_peft(path, adapter_name=adapter_name)
  pt, cfg_path = adapter.peft_type, adapter.config_path
  if method is not None and pt != str(method).upper():
    raise ValueError(f"{cfg_path}: this is a {pt} adapter, not {str(method).upper()}")
  if pt not in SUPPORTED_METHODS:
    raise ValueError(f"{cfg_path}: peft_type {pt!r} is not supported; supported: "
                     f"{', '.join(SUPPORTED_METHODS)}")
  tuned = as_tuned(params)
  inner = tuned.params
  family = family or detect_family(inner)
  if family not in FAMILIES:
    raise ValueError(f"unknown model family {family!r}; use one of {FAMILIES}")
  if hf_prefix is None:
    hf_prefix = _detect_bert_prefix(adapter.tensors) if family == "bert" else ""
  if pt in ("PROMPT_TUNING", "PREFIX_TUNING"):
    # the model's own tensors (modules_to_save, e.g. a classification head) beside the prompt
    saved = [k for k in adapter.tensors if k.startswith(PROMPT_KEY_PREFIX)]
    prompt_only = dataclasses.replace(adapter, tensors={
        k: v for k, v in adapter.tensors.items() if k not in saved})
    slot, node = _load_prompt(prompt_only, inner, dtype)
    if getattr(tuned, slot) is not None:
      raise ValueError(f"{cfg_path}: the tree already has a {slot}; load the {pt} adapter onto "
                       "the base parameters")
    tuned = tuned.replace(**{slot: node})
    if saved:
      new = _modules_to_save(adapter, inner, family, hf_prefix, saved, set(),
                             key_prefix=PROMPT_KEY_PREFIX)
      tuned = tuned.replace(params=targeting.map_selected(lambda p, leaf: new[p], inner, set(new)))
    return tuned
  sites = _sites(inner, family, hf_prefix)
  if pt == "LORA":
    _check_lora_config(adapter.config, cfg_path)
    found, rest = _classify(adapter, _LORA_KEY)
    new = _modules_to_save(adapter, inner, family, hf_prefix, rest, set(found))
    new.update(_lora_nodes(adapter, sites, found, new, family, dtype))
  elif pt == "IA3":
    _check_ia3_config(adapter.config, cfg_path)
    found, rest = _classify(adapter, _IA3_KEY)
    new = _modules_to_save(adapter, inner, family, hf_prefix, rest, set(found))
    new.update(_ia3_nodes(adapter, inner, sites, found, new, family, dtype))
  else:
    from peftjax.io.hf_peft.save import variant_type
    cls = variant_type(pt)
    _check_variant_config(adapter.config, cfg_path)
    cls.check_hf_peft_config(adapter.config, cfg_path)
    parts = re.compile(r"(.+)\.(" + "|".join(re.escape(p) for p in cls.hf_peft_parts) + ")")
    found, rest = _classify(adapter, parts, skip=set(getattr(cls, "hf_peft_shared", ())))
    new = _modules_to_save(adapter, inner, family, hf_prefix, rest, set(found))
    new.update(_variant_nodes(cls, adapter, sites, found, new, family, dtype))
  return _with_params(params, tuned, targeting.map_selected(lambda p, leaf: new[p], inner,
                                                             set(new)))


def _with_params(given, tuned: Tuned, params):
  """``given`` (a plain tree, a ``{"params": ...}`` dict or a Tuned) with ``params`` inside."""
  if isinstance(given, Tuned):
    return tuned.replace(params=params)
  if tuned.params is given:
    return params
  return type(given)({**given, "params": params}) if isinstance(given, dict) else \
      {**given, "params": params}


def _classify(adapter: HfPeftAdapter, pattern, skip=frozenset()) -> tuple[dict, list]:
  """``({module: {part: key}}, other keys)`` for a LoRA/IA3/variant file (``skip``: shared keys
  outside any module, e.g. VeRA's projections, read by the node type itself)."""
  found: dict[str, dict[str, str]] = collections.defaultdict(dict)
  rest = []
  for k in sorted(adapter.tensors):
    if k in skip:
      continue
    if not k.startswith(KEY_PREFIX):
      raise ValueError(f"{adapter.weights_path}: unexpected key {k!r}: Hugging Face PEFT keys "
                       f"start with {KEY_PREFIX!r}")
    m = pattern.fullmatch(k[len(KEY_PREFIX):])
    if m:
      groups = [g for g in m.groups() if g is not None]
      found[groups[0]][groups[1]] = k
    else:
      rest.append(k)
  return dict(found), rest


def _check_modules(adapter: HfPeftAdapter, sites, found: dict, family: str, want_parts, key_of):
  """Every tensor belongs to a targeted module of the model; every targeted module has them."""
  cfg, where = adapter.config, adapter.weights_path
  by_module = {m: s for s in sites for m in s.modules}
  for module, parts in found.items():
    first = next(iter(parts.values()))
    if module not in by_module:
      near = [m for m in by_module if m.rsplit(".", 1)[-1] == module.rsplit(".", 1)[-1]][:3]
      raise ValueError(f"{where}: extra key {first!r}: module {module!r} is not a kernel of this "
                       f"{family} model" + (f" (similar modules: {near})" if near else
                                            f" (its modules look like {list(by_module)[:3]})"))
    site = by_module[module]
    for part, k in parts.items():
      if part not in want_parts(site):
        raise ValueError(f"{where}: extra key {k!r}: {site.path} is "
                         f"{'an embedding' if site.embedding else 'a linear kernel'}; expected "
                         f"{' and '.join(want_parts(site))} tensors")
    if not _targeted(cfg, site, module):
      raise ValueError(f"{where}: extra key {first!r}: module {module!r} is not selected by "
                       f"target_modules={cfg.get('target_modules')!r} (exclude_modules="
                       f"{cfg.get('exclude_modules')!r}, layers_to_transform="
                       f"{cfg.get('layers_to_transform')!r})")
  for module, site in by_module.items():
    if _targeted(cfg, site, module):
      for part in want_parts(site):
        if part not in found.get(module, {}):
          raise ValueError(f"{where}: missing key {key_of(module, part, site)!r} (module "
                           f"{module!r} is selected by target_modules="
                           f"{cfg.get('target_modules')!r})")


def _modules_to_save(adapter: HfPeftAdapter, inner, family: str, hf_prefix: str, rest_keys,
                     adapted: set, key_prefix: str = KEY_PREFIX) -> dict:
  """Leaves replaced by ``modules_to_save`` tensors (and embeddings' saved ``base_layer``)."""
  where, mts = adapter.weights_path, adapter.config.get("modules_to_save")
  full = _hf_params(inner, family, hf_prefix)
  replacements: dict[str, dict] = collections.defaultdict(dict)  # leaf path -> {layer: ...}
  saved_modules = set()
  for k in rest_keys:
    name = k[len(key_prefix):]
    base_layer = re.fullmatch(r"(.+)\.base_layer\.(weight|bias)", name)
    if base_layer and base_layer.group(1) in adapted:
      name = base_layer.group(1) + "." + base_layer.group(2)
    else:
      name = re.sub(r"\.modules_to_save\.[A-Za-z0-9_\-]+\.", ".", name)
      module = name.rsplit(".", 1)[0]
      if not _under_modules_to_save(mts, module):
        raise ValueError(f"{where}: extra key {k!r}: not an adapter tensor of a targeted module "
                         f"and not under modules_to_save={mts!r}")
      saved_modules.add(module)
    if name not in full:
      raise ValueError(f"{where}: extra key {k!r}: {name!r} is not a parameter of this "
                       f"{family} model")
    leaf_path, layer, leaf_name = full[name]
    replacements[leaf_path][layer] = (k, adapter.tensors[k], leaf_name)

  flat = dict(targeting.leaves_with_paths(inner))
  new: dict[str, Any] = {}
  for leaf_path, per_layer in replacements.items():
    out = np.array(jax.device_get(flat[leaf_path]))
    for layer, (k, arr, leaf_name) in per_layer.items():
      target_shape = out.shape[1:] if layer is not None else out.shape
      val = arr.T if leaf_name == "kernel" else arr
      if tuple(val.shape) != tuple(target_shape):
        want = target_shape[::-1] if leaf_name == "kernel" else target_shape
        raise ValueError(f"{where}: key {k!r} has shape {list(arr.shape)}; parameter {leaf_path}"
                         f"{f' (layer {layer})' if layer is not None else ''} needs {list(want)}")
      if layer is None:
        out = val.astype(out.dtype)
      else:
        out[layer] = val.astype(out.dtype)
    new[leaf_path] = jnp.asarray(out)
  if saved_modules:
    warnings.warn(f"{adapter.config_path}: modules_to_save {sorted(saved_modules)[:6]} loaded "
                  "as plain (frozen) weights", stacklevel=3)
  return new


def _adapter_dtype(w, dtype):
  if dtype is not None:
    return jnp.dtype(dtype)
  if jnp.issubdtype(w.dtype, jnp.floating) and not is_node(w):
    return jnp.dtype(w.dtype)
  return jnp.dtype(jnp.float32)


def _site_axes(site: _Site, w):
  shape = tuple(w.shape)
  return shape[site.n_batch:site.n_batch + site.n_in], shape[site.n_batch + site.n_in:]


def _adapted_sites(sites, found: dict, where: Path, what: str):
  """``(site, modules)`` for every site with tensors; a stacked site needs all its layers."""
  out = []
  for site in sites:
    mods = [m for m in site.modules if m in found]
    if not mods:
      continue
    if is_node(site.leaf) and not type(site.leaf).wrappable:
      raise ValueError(f"{site.path} already has an adapter ({type(site.leaf).__name__}); load "
                       f"the {what} adapter onto the base parameters")
    if site.n_batch and len(mods) != len(site.modules):
      missing = [m for m in site.modules if m not in found]
      raise ValueError(f"{where}: the adapter covers only some layers of the layer-stacked "
                       f"{site.path} (no tensors for {missing[:3]}); load it with "
                       "scan_layers=False")
    out.append((site, mods))
  return out


def _lora_nodes(adapter, sites, found, replaced, family, dtype) -> dict:
  cfg, where = adapter.config, adapter.weights_path
  dora = bool(cfg.get("use_dora", False))
  if dora:
    emb = [s.path for s in sites if s.embedding and any(_targeted(cfg, s, m) for m in s.modules)]
    if emb:
      raise ValueError(f"{adapter.config_path}: use_dora on the embedding {emb[0]} is not "
                       "supported by peftjax DoRA (linear kernels only)")
  want = lambda s: ("lora_embedding_A", "lora_embedding_B") if s.embedding else (
      ("lora_A", "lora_B", "lora_magnitude_vector") if dora else ("lora_A", "lora_B"))
  key_of = lambda m, part, s: KEY_PREFIX + m + "." + part + (
      "" if s.embedding or part == "lora_magnitude_vector" else ".weight")
  _check_modules(adapter, sites, found, family, want, key_of)
  rslora = bool(cfg.get("use_rslora", False))
  dropout = float(cfg.get("lora_dropout") or 0.0)
  new = {}
  for site, mods in _adapted_sites(sites, found, where, "LoRA"):
    w = replaced.get(site.path, site.leaf)
    in_shape, out_shape = _site_axes(site, w)
    fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
    a_list, b_list, m_list, scales, ranks = [], [], [], set(), set()
    for m in mods:
      r, alpha = _rank_alpha(cfg, m)
      ranks.add(r)
      scales.add(alpha / math.sqrt(r) if rslora else alpha / r)
      ka, kb = (found[m][p] for p in want(site)[:2])
      A, B = adapter.tensors[ka], adapter.tensors[kb]
      if A.shape != (r, fan_in):
        raise ValueError(f"{where}: key {ka!r} has shape {list(A.shape)}, expected {[r, fan_in]} "
                         f"(rank {r} from the config; {site.path} has {fan_in} inputs)")
      if B.shape != (fan_out, r):
        raise ValueError(f"{where}: key {kb!r} has shape {list(B.shape)}, expected {[fan_out, r]} "
                         f"({site.path} has {fan_out} outputs; rank {r} from the config)")
      a_list.append(A.T.reshape(*in_shape, r))
      b_list.append(B.T.reshape(r, *out_shape))
      if dora:
        km = found[m]["lora_magnitude_vector"]
        M = adapter.tensors[km]
        if M.shape != (fan_out,):
          raise ValueError(f"{where}: key {km!r} has shape {list(M.shape)}, expected "
                           f"{[fan_out]} ({site.path} has {fan_out} outputs)")
        m_list.append(M.reshape(out_shape))
    if len(ranks) > 1 or len(scales) > 1:
      raise ValueError(f"{where}: the layers of the layer-stacked {site.path} have different "
                       f"ranks {sorted(ranks)} or scales {sorted(scales)} (rank_pattern/"
                       "alpha_pattern per layer); load the adapter with scan_layers=False")
    adt = _adapter_dtype(w, dtype)
    a = np.stack(a_list) if site.n_batch else a_list[0]
    b = np.stack(b_list) if site.n_batch else b_list[0]
    if dora:
      from peftjax.dora import DoraWeight
      mag = np.stack(m_list) if site.n_batch else m_list[0]
      new[site.path] = DoraWeight(w=w, a=jnp.asarray(a, adt), b=jnp.asarray(b, adt),
                                  magnitude=jnp.asarray(mag, adt), scale=scales.pop(),
                                  n_in=site.n_in, dropout=dropout)
      continue
    new[site.path] = LoraWeight(w=w, a=jnp.asarray(a, adt), b=jnp.asarray(b, adt),
                                scale=scales.pop(), n_in=site.n_in, dropout=dropout)
  return new


def _check_variant_config(cfg: dict, cfg_path: Path):
  """The module-selecting fields every LoRA-family variant shares, and ``bias``."""
  _check_module_fields(cfg, cfg_path, ("target_modules", "exclude_modules"))
  if cfg.get("bias") not in (None, "none"):
    raise ValueError(f"{cfg_path}: bias={cfg['bias']!r} is not supported (trained biases are not "
                     "part of peftjax's variant nodes)")
  if cfg.get("fan_in_fan_out"):
    raise ValueError(f"{cfg_path}: fan_in_fan_out=True (GPT-2 Conv1D weights) is not supported")


def _variant_nodes(cls, adapter, sites, found, replaced, family, dtype) -> dict:
  """Nodes of a LoRA-family variant: per site, the per-layer ``{part: tensor}`` dicts go to
  ``cls.from_hf_peft``, which checks their shapes and builds the node."""
  cfg, where = adapter.config, adapter.weights_path
  sites = [s for s in sites if not s.embedding]

  def want(site):
    w = replaced.get(site.path, site.leaf)
    in_shape, out_shape = _site_axes(site, w)
    return cls.hf_peft_parts_for(cfg, site.modules[0], math.prod(in_shape), math.prod(out_shape))

  _check_modules(adapter, sites, found, family, want,
                 lambda m, part, s: KEY_PREFIX + m + "." + part)
  new = {}
  for site, mods in _adapted_sites(sites, found, where, adapter.peft_type):
    w = replaced.get(site.path, site.leaf)
    layers = [{p: adapter.tensors[k] for p, k in found[m].items()} for m in mods]
    keys = [dict(found[m]) for m in mods]
    new[site.path] = cls.from_hf_peft(w, site.n_batch, site.n_in, layers, keys, mods, adapter,
                                      _adapter_dtype(w, dtype))
  return new


def _check_module_fields(cfg: dict, cfg_path: Path, fields):
  """Each of ``fields`` is absent, a list of module names or a regex that compiles."""
  for field in fields:
    v = cfg.get(field)
    if v is not None and not isinstance(v, str) and not (
        isinstance(v, list) and all(isinstance(t, str) for t in v)):
      raise ValueError(f"{cfg_path}: {field!r} must be a list of names or a regex, got {v!r}")
    if isinstance(v, str) and v.lower() != "all-linear":
      try:
        re.compile(v)
      except re.error as e:
        raise ValueError(f"{cfg_path}: {field} is not a valid regular expression: {e}") from None


def _check_ia3_config(cfg: dict, cfg_path: Path):
  _check_module_fields(cfg, cfg_path, ("target_modules", "feedforward_modules", "exclude_modules"))


def _ia3_nodes(adapter, inner, sites, found, replaced, family, dtype) -> dict:
  from peftjax.ia3 import IA3Weight
  cfg, where = adapter.config, adapter.weights_path
  sites = [s for s in sites if not s.embedding]
  _check_modules(adapter, sites, found, family, lambda s: ("ia3_l",),
                 lambda m, part, s: KEY_PREFIX + m + ".ia3_l")
  flat = dict(targeting.leaves_with_paths(inner))
  new, biased = {}, []
  for site, mods in _adapted_sites(sites, found, where, "IA3"):
    w = replaced.get(site.path, site.leaf)
    in_shape, out_shape = _site_axes(site, w)
    sides = {_is_feedforward(cfg, m) for m in mods}
    if len(sides) > 1:
      raise ValueError(f"{where}: feedforward_modules selects only some layers of the "
                       f"layer-stacked {site.path}; load it with scan_layers=False")
    ff = sides.pop()
    axes = in_shape if ff else out_shape
    want = (1, math.prod(in_shape)) if ff else (math.prod(out_shape), 1)
    vecs = []
    for m in mods:
      k = found[m]["ia3_l"]
      v = adapter.tensors[k]
      if v.shape != want:
        raise ValueError(f"{where}: key {k!r} has shape {list(v.shape)}, expected {list(want)} "
                         f"({'feedforward: input' if ff else 'output'} features of {site.path})")
      vecs.append(v.reshape(axes))
    vec = np.stack(vecs) if site.n_batch else vecs[0]
    new[site.path] = IA3Weight(w=w, vector=jnp.asarray(vec, _adapter_dtype(w, dtype)),
                               side="in" if ff else "out", n_axes=len(axes))
    bias = site.path.rsplit("/", 1)[0] + "/bias"
    if not ff and bias in flat:
      biased.append(bias)
  if biased:
    warnings.warn(f"{adapter.config_path}: HF PEFT's IA3 scales the output including the bias "
                  f"((x@W + b) * l); peftjax's IA3Weight scales x@W only, so outputs differ by "
                  f"(l - 1) * b at {biased[:3]}" + (" ..." if len(biased) > 3 else ""),
                  stacklevel=3)
  return new


def _find_leaf(inner, suffixes: Sequence[str]):
  for p, leaf in targeting.leaves_with_paths(inner):
    if any(p == s or p.endswith("/" + s) for s in suffixes):
      return p, leaf
  return None, None


def _load_prompt(adapter: HfPeftAdapter, inner, dtype) -> tuple[str, Any]:
  """``("prompt", SoftPrompt)`` or ``("prefix", Prefix)``: the slot and node of the adapter."""
  from peftjax._src.additive import Prefix, SoftPrompt, find_embedding
  where = adapter.config_path
  if adapter.peft_type == "PROMPT_TUNING":
    tokens = prompt_tuning_from_hf(adapter)
    try:
      p, table = find_embedding(inner)
    except ValueError:  # no table where prompt tuning looks: nothing to check against
      p, table = None, None
    if table is not None and tuple(table.shape[-1:]) != (tokens.shape[1],):
      raise ValueError(f"{where}: token_dim {tokens.shape[1]} does not match the model's "
                       f"embedding width {table.shape[-1]} ({p})")
    dt = jnp.dtype(dtype) if dtype is not None else tokens.dtype
    return "prompt", SoftPrompt(tokens=jnp.asarray(tokens, dt))
  kv = prefix_tuning_from_hf(adapter)
  n = _num_layers(inner)
  if n is not None and n != kv.shape[0]:
    raise ValueError(f"{where}: num_layers {kv.shape[0]} does not match the model's {n} layers")
  _, k_proj = _find_leaf(inner, ("self_attn/k_proj/kernel", "attention/self/key/kernel"))
  if k_proj is not None and k_proj.shape[-1] != kv.shape[3] * kv.shape[4]:
    raise ValueError(f"{where}: token_dim {kv.shape[3] * kv.shape[4]} does not match the model's "
                     f"key width {k_proj.shape[-1]}")
  dt = jnp.dtype(dtype) if dtype is not None else kv.dtype
  return "prefix", Prefix(kv=jnp.asarray(kv, dt))


# ================================================================================================
# prompt and prefix tuning as arrays
# ================================================================================================

def _need(adapter: HfPeftAdapter, peft_type: str):
  if adapter.peft_type != peft_type:
    raise ValueError(f"{adapter.config_path}: this is a {adapter.peft_type} adapter, not "
                     f"{peft_type}")


def _int_field(adapter: HfPeftAdapter, name: str) -> int:
  v = adapter.config.get(name)
  if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
    raise ValueError(f"{adapter.config_path}: {name!r} must be a positive integer, got {v!r}")
  return v


def _prompt_tensor(adapter: HfPeftAdapter, width: int) -> np.ndarray:
  key = "prompt_embeddings"
  extra = sorted(set(adapter.tensors) - {key})
  if extra:
    raise ValueError(f"{adapter.weights_path}: extra key {extra[0]!r} (expected only {key!r})")
  if key not in adapter.tensors:
    raise ValueError(f"{adapter.weights_path}: missing key {key!r}")
  emb = adapter.tensors[key]
  nvt = _int_field(adapter, "num_virtual_tokens")
  nts = adapter.config.get("num_transformer_submodules") or 1
  if emb.shape != (nvt * nts, width):
    raise ValueError(f"{adapter.weights_path}: key {key!r} has shape {list(emb.shape)}, expected "
                     f"{[nvt * nts, width]} from the config")
  return emb


def prompt_tuning_from_hf(adapter: HfPeftAdapter) -> np.ndarray:
  """The soft prompt ``[num_virtual_tokens, hidden]`` of an HF ``PROMPT_TUNING`` adapter.

  Raises:
    ValueError: another method, ``num_transformer_submodules != 1`` (encoder-decoder), missing,
      extra or misshapen ``prompt_embeddings``.
  """
  _need(adapter, "PROMPT_TUNING")
  if (adapter.config.get("num_transformer_submodules") or 1) != 1:
    raise ValueError(f"{adapter.config_path}: num_transformer_submodules="
                     f"{adapter.config['num_transformer_submodules']} (encoder-decoder) is not "
                     "supported")
  return _prompt_tensor(adapter, _int_field(adapter, "token_dim"))


def prefix_tuning_from_hf(adapter: HfPeftAdapter) -> np.ndarray:
  """Per-layer prefix keys/values ``[layers, 2, n_virtual, kv_heads, head_dim]`` (HF PREFIX_TUNING).

  HF stores ``prompt_embeddings [n_virtual, layers * 2 * token_dim]`` (``token_dim = kv_heads *
  head_dim``; its ``num_attention_heads`` is the number of key/value heads), read as
  ``[n_virtual, layers, 2, kv_heads, head_dim]``: the layout of ``peftjax``'s ``Prefix`` node.

  Raises:
    ValueError: another method, ``prefix_projection=True`` (the projection MLP is not mapped),
      missing, extra or misshapen tensors.
  """
  _need(adapter, "PREFIX_TUNING")
  if adapter.config.get("prefix_projection"):
    raise ValueError(f"{adapter.config_path}: prefix_projection=True is not supported")
  L = _int_field(adapter, "num_layers")
  td = _int_field(adapter, "token_dim")
  heads = _int_field(adapter, "num_attention_heads")
  if td % heads:
    raise ValueError(f"{adapter.config_path}: token_dim {td} is not divisible by "
                     f"num_attention_heads {heads}")
  emb = _prompt_tensor(adapter, L * 2 * td)
  nvt = emb.shape[0]
  return emb.reshape(nvt, L, 2, heads, td // heads).transpose(1, 2, 0, 3, 4)
