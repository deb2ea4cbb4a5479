"""Writing Hugging Face PEFT adapters: :func:`save_hf_peft`.

The method of a tree follows from its nodes' declarations: the ``hf_peft_type`` of every node
type in it (``LoraWeight`` and ``DoraWeight`` -> ``LORA``, ``IA3Weight`` -> ``IA3``,
``VeraWeight`` -> ``VERA``, ``LohaWeight`` -> ``LOHA``, ``LokrWeight`` -> ``LOKR``, ``OftWeight``
-> ``OFT``, ``SoftPrompt`` -> ``PROMPT_TUNING``, ``Prefix`` -> ``PREFIX_TUNING``); one adapter
directory holds one method. The variants' tensors and configs come from their node types
(:func:`variant_type`). A
node type with a ``finalized()`` method is a training-time reparameterization (``PrefixMLP``,
``PromptEncoder``) that :func:`peftjax.finalize` replaces first; a trainable node type whose
``hf_peft_type`` is None (adapters, DiffPruning, ...) has no HF PEFT format.

The directory is written file by file to temporaries and renamed, so a failed save leaves no
half-written adapter; ``peft.PeftModel.from_pretrained`` loads it.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

from peftjax._src import targeting
from peftjax._src.nodes import is_node, materialize, node_types
from peftjax._src.tuned import Tuned, as_tuned
from peftjax.io.hf_peft.names import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FAMILIES, KEY_PREFIX,
                                      PROMPT_KEY_PREFIX, PROMPT_LEARNING, SUPPORTED_METHODS,
                                      _is_feedforward, _matches, _num_layers, _sites,
                                      detect_family, hf_module_name, safe_join)
from peftjax.io.safetensors import write_safetensors

__all__ = ["save_hf_peft"]

#: The Tuned slot that holds each model-input method's node.
_SLOT = {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix"}


def _atomic_write(directory: Path, files: Sequence[tuple[str, Any]]):
  """Writes ``(name, writer)`` pairs: each to a temporary file in ``directory``, then renamed."""
  directory.mkdir(parents=True, exist_ok=True)
  tmp = []
  try:
    for name, write in files:
      fd, t = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
      os.close(fd)
      tmp.append((t, directory / name))
      write(Path(t))
    for t, final in tmp:
      os.replace(t, final)
  finally:
    for t, _ in tmp:
      if os.path.exists(t):
        os.unlink(t)


def _num(x: float):
  x = float(x)
  return int(x) if x.is_integer() else x


def _target_modules(chosen: set, all_modules: Iterable[str]):
  """The shortest ``target_modules`` that selects exactly ``chosen`` among ``all_modules``."""
  all_modules = list(all_modules)
  names = sorted({m.rsplit(".", 1)[-1] for m in chosen})
  if {m for m in all_modules if _matches(names, m)} == chosen:
    return names
  return "(" + "|".join(re.escape(m) for m in sorted(chosen)) + ")"


def _patterns(special: dict, values: dict) -> dict:
  """``rank_pattern``/``alpha_pattern``: one key per module name (``"down_proj"``) when every
  adapted module of that name has the same value, else one key per full module name."""
  out = {}
  by_leaf = collections.defaultdict(set)
  for m, v in values.items():
    by_leaf[m.rsplit(".", 1)[-1]].add(v)
  for m, v in sorted(special.items()):
    leaf = m.rsplit(".", 1)[-1]
    if len(by_leaf[leaf]) == 1:
      out[leaf] = v
    else:
      out[m] = v
  return out


def _nodes(tuned: Tuned):
  """``(where, slot, node)`` for every node of ``tuned``: ``where`` is the path inside ``params``
  (``slot`` None) or the slot's name, ``"prompt"``/``"prefix"``."""
  for p, leaf in targeting.leaves_with_paths(tuned.params):
    if is_node(leaf):
      yield p or "the root", None, leaf
  for slot, value in tuned.slots().items():
    for p, leaf in targeting.leaves_with_paths(value):
      if is_node(leaf):
        yield f"{slot}/{p}" if p else slot, slot, leaf


def _method_of(tuned: Tuned) -> tuple[str, str, Optional[str]]:
  """``(peft_type, where, slot)``: the one HF method whose nodes ``tuned`` holds, by the node
  types' own ``hf_peft_type`` declarations, and where its first node is (see :func:`_nodes`)."""
  kinds = {}
  for where, slot, leaf in _nodes(tuned):
    cls = type(leaf)
    if hasattr(cls, "finalized"):
      raise ValueError(f"{where} is a {cls.__name__} (node type {cls.type_id!r}), a training-time "
                       "reparameterization; call peftjax.finalize(tree) first, which replaces it "
                       "by the plain node it produces")
    if cls.hf_peft_type is None:
      if any(jax.tree_util.tree_leaves(leaf.trainable_mask())):
        raise ValueError(f"{where} is a {cls.__name__} (node type {cls.type_id!r}), which has no "
                         f"Hugging Face PEFT format (node types with one: {_formats()})")
      continue  # frozen (a quantized base, ...): not part of the adapter
    kinds.setdefault(cls.hf_peft_type, (where, slot))
  if not kinds:
    raise ValueError(f"the tree has no node to save: none of {_formats()}")
  if len(kinds) > 1:
    where = ", ".join(f"{k} at {w}" for k, (w, _) in kinds.items())
    raise ValueError(f"the tree mixes methods ({where}); an HF PEFT adapter holds one: save each "
                     "separately")
  method, (where, slot) = next(iter(kinds.items()))
  return method, where, slot


def _formats() -> str:
  """``"LoraWeight (LORA), IA3Weight (IA3), ..."``: the node types that declare an HF format."""
  order = {m: i for i, m in enumerate(SUPPORTED_METHODS)}
  types = sorted((c for c in node_types().values() if c.hf_peft_type),
                 key=lambda c: (order.get(c.hf_peft_type, len(order)), c.__name__))
  return ", ".join(f"{c.__name__} ({c.hf_peft_type})" for c in types)


def save_hf_peft(tuned, path: str | os.PathLike, *, family: Optional[str] = None,
                 hf_prefix: Optional[str] = None, adapter_name: Optional[str] = None,
                 task_type: Optional[str] = "auto", base_model_name_or_path: Optional[str] = None,
                 rslora: bool = False, dtype=None, extra_config: Optional[dict] = None,
                 modules_to_save: Any = "auto") -> Path:
  """Writes the adapter of ``tuned`` as a Hugging Face PEFT adapter directory.

  The method follows from the nodes' ``hf_peft_type`` declarations:
  :class:`~peftjax.lora.LoraWeight` -> ``LORA``, :class:`~peftjax.ia3.IA3Weight` -> ``IA3``, a
  ``SoftPrompt`` as the tree's ``prompt`` -> ``PROMPT_TUNING``, a ``Prefix`` as its ``prefix`` ->
  ``PREFIX_TUNING`` (finalize P-tuning and prefix-MLP trees first). For LoRA the most
  common rank and alpha become ``r``/``lora_alpha`` and the others go into
  ``rank_pattern``/``alpha_pattern`` (keyed by module name, or full module name where layers
  differ); ``target_modules`` is the list of module names when that selects exactly the adapted
  modules, else a regex.

  Args:
    tuned: the tuned tree, in any shape :func:`peftjax.as_tuned` accepts: a
      :class:`peftjax.Tuned` (as ``peftjax.prompt/prefix.apply`` return), ``params``,
      ``{"params": params}`` or peftjax 0.1's ``{"params": ..., "prompt" | "prefix": ...}``;
      per-layer or layer-stacked.
    path: output directory (created); files are written to temporaries and renamed.
    family, hf_prefix: name mapping (see :func:`hf_module_name`); default from the tree
      (BERT: ``"bert."`` when the tree has a ``classifier``, else ``""``).
    adapter_name: write to ``path/adapter_name`` (checked with :func:`safe_name`).
    task_type: HF ``task_type``; ``"auto"``: ``"CAUSAL_LM"`` for Llama, ``"SEQ_CLS"`` for a
      tree with a ``classifier``, else None.
    base_model_name_or_path: recorded in the config.
    rslora: LoRA: record ``use_rslora`` (alpha is then ``scale * sqrt(r)``); either way HF PEFT
      recomputes exactly each node's ``scale``.
    dtype: dtype of the saved tensors (default: the adapters').
    extra_config: more config fields (e.g. :attr:`HfPeftAdapter.config` fields to carry over);
      the computed ones win.
    modules_to_save: top-level modules of the tree (``"classifier"``, ``"pooler"``) written
      whole, as plain weights, as HF PEFT's ``modules_to_save`` (a trained head). ``"auto"``:
      the ``classifier`` for ``SEQ_CLS`` (HF PEFT's wrapper for that task always restores it),
      else none.

  Returns:
    The adapter directory.

  Raises:
    ValueError: no adapter nodes, several methods in one tree, a trainable node type without an
      HF format (named), an unfinalized training-time reparameterization (``PrefixMLP``,
      ``PromptEncoder``), a prompt or prefix the method cannot hold or that is not in its slot,
      LoRA/IA3 on a leaf that maps to no HF module, a bad adapter name, LoRA and DoRA nodes in one
      tree (one ``use_dora`` per adapter), VeRA nodes that do not share one projection or rank,
      OFT nodes with different block sizes.

  Example (files, so not run here)::

    save_hf_peft(tuned, "out/")     # then in PyTorch:
    # peft.PeftModel.from_pretrained(transformers_model, "out/")
  """
  directory = safe_join(path, adapter_name)
  tuned = as_tuned(tuned)
  method, where, found_in = _method_of(tuned)
  slot = _SLOT.get(method)
  for other in tuned.slots():
    if other != slot:
      raise ValueError(f"the tree has a {other} (Tuned.{other}), which a {method} adapter cannot "
                       f"hold; save tree.replace({other}=None) to write the {method} adapter "
                       "alone")
  if slot is not None and (found_in != slot or where != slot):
    raise ValueError(f"{where}: a {method} node is saved from the tree's {slot} itself "
                     f"(peftjax.Tuned(params, {slot}=node), as peftjax.{slot}.apply returns)")
  inner = tuned.params
  family = family or detect_family(inner)
  if family not in FAMILIES:
    raise ValueError(f"unknown model family {family!r}; use one of {FAMILIES}")
  if hf_prefix is None:
    hf_prefix = ("bert." if isinstance(inner, Mapping) and "classifier" in inner else "") \
        if family == "bert" else ""
  if task_type == "auto":
    # HF PEFT picks the model wrapper by task_type; a prompt on a classifier needs SEQ_CLS's
    # (the generic wrapper handles prompts differently and gives other logits).
    classifier = isinstance(inner, Mapping) and "classifier" in inner
    task_type = "CAUSAL_LM" if family == "llama" else "SEQ_CLS" if classifier else None
  if isinstance(modules_to_save, str) and modules_to_save == "auto":
    modules_to_save = ("classifier",) if task_type == "SEQ_CLS" else ()
  modules_to_save = sorted(set(modules_to_save or ()))
  common = {"task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
            "revision": None, "inference_mode": True, "modules_to_save": modules_to_save or None}
  cast = (lambda x: np.asarray(x).astype(dtype)) if dtype is not None else np.asarray
  if method == "PROMPT_TUNING":
    config, tensors = _prompt_config(cast(jax.device_get(tuned.prompt.materialize())),
                                     _num_layers(inner), None)
  elif method == "PREFIX_TUNING":
    config, tensors = _prefix_config(cast(jax.device_get(tuned.prefix.materialize())))
  else:
    sites = _sites(inner, family, hf_prefix)
    ours = lambda leaf: is_node(leaf) and type(leaf).hf_peft_type == method
    adapted = [s for s in sites if ours(s.leaf)]
    stray = [(p, leaf) for p, leaf in targeting.leaves_with_paths(inner)
             if ours(leaf) and p not in {s.path for s in adapted}]
    if stray:
      raise ValueError(f"{type(stray[0][1]).__name__} on {stray[0][0]} cannot be written in "
                       "Hugging Face PEFT format (only 'kernel'/'embedding' leaves with at most "
                       "one leading layer axis map to HF modules)")
    all_modules = {m for s in sites if not s.embedding for m in s.modules}
    if method == "LORA":
      config, tensors = _lora_config(adapted, all_modules, rslora, cast)
    elif method == "IA3":
      config, tensors = _ia3_config(adapted, all_modules, cast)
    else:
      config, tensors = _variant_config(variant_type(method), adapted, all_modules, cast)
  tensors = list(tensors) + _saved_modules(inner, modules_to_save, family, hf_prefix,
                                           PROMPT_KEY_PREFIX if method in PROMPT_LEARNING
                                           else KEY_PREFIX, cast)
  config.update(common)
  for k, v in (extra_config or {}).items():  # computed fields always win
    if k not in config or (config[k] is None and k in ("base_model_name_or_path", "revision")):
      config[k] = v
  _write_adapter(directory, config, tensors)
  return directory


def _lora_config(adapted, all_modules: set, rslora: bool, cast) -> tuple[dict, list]:
  """LoRA and its variants saved as LoRA (DoRA): a node type may declare ``hf_peft_flags``
  (config fields its adapter sets, ``{"use_dora": True}``) and ``hf_peft_tensors()`` (per layer,
  the tensors it adds to ``lora_A``/``lora_B``)."""
  tensors, ranks, alphas, dropouts = [], {}, {}, collections.Counter()
  flags = {}
  for s in adapted:
    flags.setdefault(tuple(sorted(getattr(type(s.leaf), "hf_peft_flags", {}).items())),
                     (s.path, type(s.leaf).__name__))
  if len(flags) > 1:
    (_, (p1, c1)), (_, (p2, c2)) = list(flags.items())[:2]
    raise ValueError(f"the tree mixes {c1} ({p1}) and {c2} ({p2}); one HF PEFT LoRA adapter has "
                     "one config (e.g. use_dora for all modules): save each separately")
  for s in adapted:
    node = s.leaf  # a LoraWeight (or a variant saved as LoRA)
    extra = node.hf_peft_tensors() if hasattr(node, "hf_peft_tensors") else None
    r = node.rank
    alpha = node.scale * (math.sqrt(r) if rslora else r)
    a, b = np.asarray(jax.device_get(node.a)), np.asarray(jax.device_get(node.b))
    nb = node.n_batch
    fan_in = math.prod(a.shape[nb:nb + node.n_in])
    for i, m in enumerate(s.modules):
      A = cast((a[i] if nb else a).reshape(fan_in, r).T)
      B = cast((b[i] if nb else b).reshape(r, -1).T)
      names = ("lora_embedding_A", "lora_embedding_B") if s.embedding else ("lora_A.weight",
                                                                             "lora_B.weight")
      tensors += [(f"{KEY_PREFIX}{m}.{names[0]}", A), (f"{KEY_PREFIX}{m}.{names[1]}", B)]
      for suffix, arr in (extra[i] if extra else {}).items():
        tensors.append((f"{KEY_PREFIX}{m}.{suffix}", cast(arr)))
      ranks[m], alphas[m] = r, alpha
      dropouts[node.dropout] += 1
  r0 = collections.Counter(ranks.values()).most_common(1)[0][0]
  alpha0 = collections.Counter(round(v, 9) for v in alphas.values()).most_common(1)[0][0]
  rank_pattern = _patterns({m: r for m, r in ranks.items() if r != r0}, ranks)
  alpha_pattern = _patterns({m: _num(a) for m, a in alphas.items()
                             if not math.isclose(a, alpha0, rel_tol=1e-12)},
                            {m: _num(a) for m, a in alphas.items()})
  if len(dropouts) > 1:
    warnings.warn(f"LoRA nodes have different dropout rates {sorted(dropouts)}; HF PEFT has one "
                  f"lora_dropout: writing the most common", stacklevel=3)
  config = {
      "peft_type": "LORA", "r": r0, "lora_alpha": _num(alpha0),
      "target_modules": _target_modules(set(ranks), all_modules | set(ranks)),
      "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "use_rslora": bool(rslora),
      "lora_dropout": float(dropouts.most_common(1)[0][0]), "bias": "none",
      "fan_in_fan_out": False, "init_lora_weights": True, "layers_to_transform": None,
      "layers_pattern": None, "use_dora": False}
  config.update(dict(next(iter(flags))))
  return config, tensors


def variant_type(peft_type: str) -> type:
  """The node type that declares ``hf_peft_type == peft_type`` and the variant protocol
  (``hf_peft_tensors``/``hf_peft_config``/``from_hf_peft``, see :mod:`peftjax._src.variants`)."""
  for cls in node_types().values():
    if cls.hf_peft_type == peft_type and hasattr(cls, "from_hf_peft"):
      return cls
  raise ValueError(f"peftjax cannot read or write {peft_type} adapters")


def _variant_config(cls, adapted, all_modules: set, cast) -> tuple[dict, list]:
  """Config and tensors of a LoRA-family variant, from its node type's declarations: per layer,
  ``node.hf_peft_tensors()`` gives ``{suffix: array}`` (keys ``<module>.<suffix>``) and
  ``node.hf_peft_settings()`` the per-module values (rank, alpha, ...) that
  ``cls.hf_peft_config(nodes, settings)`` turns into the config and any shared tensors."""
  tensors, settings = [], {}
  for s in adapted:
    per_layer = s.leaf.hf_peft_tensors()
    for m, parts in zip(s.modules, per_layer):
      for suffix, arr in parts.items():
        tensors.append((f"{KEY_PREFIX}{m}.{suffix}", cast(arr)))
      settings[m] = s.leaf.hf_peft_settings()
  config, shared = cls.hf_peft_config([s.leaf for s in adapted], settings)
  tensors += [(k, cast(v)) for k, v in shared]
  config["target_modules"] = _target_modules(set(settings), all_modules | set(settings))
  return config, tensors


def _ia3_config(adapted, all_modules: set, cast) -> tuple[dict, list]:
  tensors, chosen, ff = [], set(), set()
  for s in adapted:
    node = s.leaf
    vec = np.asarray(jax.device_get(node.vector))
    nb = node.n_batch
    for i, m in enumerate(s.modules):
      v = (vec[i] if nb else vec).reshape(-1)
      tensors.append((f"{KEY_PREFIX}{m}.ia3_l", cast(v[None, :] if node.side == "in"
                                                     else v[:, None])))
      chosen.add(m)
      if node.side == "in":
        ff.add(m)
  target = _target_modules(chosen, all_modules)
  ff_names = sorted({m.rsplit(".", 1)[-1] for m in ff})
  if {m for m in chosen if _is_feedforward({"feedforward_modules": ff_names}, m)} != ff:
    ff_names = sorted(ff)
  config = {"peft_type": "IA3", "target_modules": target, "feedforward_modules": ff_names,
            "fan_in_fan_out": False, "init_ia3_weights": True}
  return config, tensors


def _prompt_config(prompt: np.ndarray, num_layers, num_heads) -> tuple[dict, list]:
  if prompt.ndim != 2:
    raise ValueError(f"prompt must be [num_virtual_tokens, hidden], got shape {list(prompt.shape)}")
  nvt, dim = prompt.shape
  config = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": nvt, "token_dim": dim,
            "num_transformer_submodules": 1, "num_attention_heads": num_heads,
            "num_layers": num_layers, "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None}
  return config, [("prompt_embeddings", prompt)]


def _prefix_config(prefix: np.ndarray) -> tuple[dict, list]:
  if prefix.ndim != 5 or prefix.shape[1] != 2:
    raise ValueError(f"prefix must be [layers, 2, n_virtual, kv_heads, head_dim], got shape "
                     f"{list(prefix.shape)}")
  L, _, nvt, heads, hd = prefix.shape
  emb = prefix.transpose(2, 0, 1, 3, 4).reshape(nvt, L * 2 * heads * hd)
  config = {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": nvt, "token_dim": heads * hd,
            "num_transformer_submodules": 1, "num_attention_heads": heads, "num_layers": L,
            "encoder_hidden_size": heads * hd, "prefix_projection": False}
  return config, [("prompt_embeddings", emb)]


def _saved_modules(inner, modules: Sequence[str], family: str, hf_prefix: str, key_prefix: str,
                   cast) -> list[tuple[str, np.ndarray]]:
  """The tensors of whole top-level ``modules`` under their HF names (nodes materialized)."""
  out = []
  for module in modules:
    if not isinstance(inner, Mapping) or module not in inner:
      have = sorted(inner) if isinstance(inner, Mapping) else []
      raise ValueError(f"modules_to_save: the tree has no top-level module {module!r} (it has "
                       f"{have})")
    for p, leaf in targeting.leaves_with_paths(inner[module]):
      comps = [module] + p.split("/")
      name = hf_module_name(comps[:-1], family, hf_prefix=hf_prefix) if len(comps) > 1 else ""
      x = cast(jax.device_get(materialize(leaf)))
      kernel = comps[-1] == "kernel"
      key = f"{key_prefix}{name}.{'weight' if kernel else comps[-1]}"
      out.append((key, np.ascontiguousarray(x.T if kernel else x)))
  return out


def _write_adapter(directory: Path, config: dict, tensors: Sequence[tuple[str, np.ndarray]]):
  import peftjax
  meta = {"format": "pt", "peftjax_version": getattr(peftjax, "__version__", "unknown")}
  entries = [(k, np.asarray(v).dtype, tuple(np.shape(v)), (lambda v=v: v)) for k, v in tensors]
  config = dict(sorted(config.items()))
  _atomic_write(directory, [
      (ADAPTER_WEIGHTS, lambda p: write_safetensors(p, entries, meta)),
      (ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n")),
  ])
