"""Llama-family causal language model (Llama 2/3, Mistral, Qwen2, SmolLM2) in Flax linen.

Why linen: a linen module is a description, and its parameters are a plain nested dict of arrays
(``{"embed_tokens": {"embedding": ...}, "layers_0": {"self_attn": {"q_proj": {"kernel": ...}}}}``).
Every peftjax method is a transform over exactly such a pytree -- it replaces a ``kernel`` leaf with
a LoRA/QLoRA/adapter node -- and ``peftjax.lift(model.apply)`` then runs the unchanged model on the
rewritten tree. NNX keeps parameters inside mutable objects, so a rewritten tree would have to be
pushed back into the object graph (``nnx.split``/``nnx.merge``) at every call; linen needs nothing.

Parameter layout (``scan_layers=False``; with ``scan_layers=True`` the ``layers_i`` subtrees are one
``layers`` subtree whose leaves carry a leading ``[num_layers]`` axis)::

  embed_tokens/embedding                     [vocab, hidden]
  layers_i/input_layernorm/scale             [hidden]
  layers_i/self_attn/{q,k,v}_proj/kernel     [hidden, heads*head_dim] / [hidden, kv_heads*head_dim]
  layers_i/self_attn/{q,k,v}_proj/bias       (Qwen2, or attention_bias)
  layers_i/self_attn/o_proj/kernel           [heads*head_dim, hidden]
  layers_i/post_attention_layernorm/scale    [hidden]
  layers_i/mlp/{gate,up}_proj/kernel         [hidden, intermediate]
  layers_i/mlp/down_proj/kernel              [intermediate, hidden]
  norm/scale                                 [hidden]
  lm_head/kernel                             [hidden, vocab] (absent when embeddings are tied)

Hooks for additive PEFT methods: ``inputs_embeds`` replaces token ids (soft prompts), and ``prefix``
([layers, 2, batch, n_prefix, kv_heads, head_dim]) prepends per-layer keys/values (prefix tuning).
Prefix positions are visible to every query, padding never is, and the RoPE positions of the real
tokens are not shifted by the prefix (Hugging Face PEFT shifts them; the prefix keys are used as
given, without rotation).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax import lax

from peftjax import losses
from peftjax.models import common
from peftjax.models.common import RMSNorm, constrain

Array = jax.Array
Dtype = Any

__all__ = ["LlamaConfig", "LlamaForCausalLM", "KVCache", "init_cache", "SUPPORTED_MODEL_TYPES"]

#: ``model_type`` values (Hugging Face ``config.json``) this module implements.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM"}


def _freeze(d: Optional[dict]) -> Optional[tuple]:
  if not d:
    return None
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture of a Llama-family decoder (hashable; usable as a static jit argument).

  ``rope_scaling`` is stored as a sorted tuple of ``(key, value)`` pairs; read it with
  :attr:`rope_scaling_dict`.
  """
  vocab_size: int = 32000
  hidden_size: int = 4096
  intermediate_size: int = 11008
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: Optional[int] = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Optional[tuple] = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: Optional[int] = None
  hidden_act: str = "silu"
  initializer_range: float = 0.02
  model_type: str = "llama"
  bos_token_id: Optional[int] = None
  eos_token_id: Any = None  # int or tuple of ints
  pad_token_id: Optional[int] = None

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported model_type {self.model_type!r} for LlamaConfig; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                       f"({self.num_kv_heads})")
    if self.head_dim is None:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                         f"{self.num_heads}; set head_dim")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.hidden_act not in common.ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: "
                       f"{sorted(common.ACTIVATIONS)}")
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    common.rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling_dict)  # validates

  @property
  def rope_scaling_dict(self) -> Optional[dict]:
    return None if self.rope_scaling is None else dict(self.rope_scaling)

  @property
  def stop_token_ids(self) -> tuple[int, ...]:
    """``eos_token_id`` as a tuple (empty if unknown)."""
    e = self.eos_token_id
    return () if e is None else (tuple(e) if isinstance(e, (tuple, list)) else (int(e),))

  # -- Hugging Face conversion ---------------------------------------------------------------------
  @classmethod
  def from_hf(cls, hf) -> "LlamaConfig":
    """From a ``transformers`` config object (4.x or 5.x field names) or its dict."""
    get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, dict) else \
        (lambda k, d=None: getattr(hf, k, d))
    model_type = get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported model_type {model_type!r} for the Llama family; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    rope = dict(get("rope_parameters") or {})
    theta = rope.pop("rope_theta", None) or get("rope_theta", None) or 10000.0
    scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
    if scaling is None and get("rope_scaling"):
      scaling = dict(get("rope_scaling"))
    if scaling is not None:
      scaling = dict(scaling)
      scaling["rope_type"] = scaling.pop("rope_type", None) or scaling.pop("type", "default")
      scaling.pop("rope_theta", None)
      if scaling["rope_type"] == "default":
        scaling = None
    if model_type == "qwen2":
      qkv_bias, o_bias, mlp_bias = True, False, False
      window = get("sliding_window") if get("use_sliding_window", False) else None
      if window is not None and get("max_window_layers", 0) < get("num_hidden_layers"):
        raise ValueError("Qwen2 with use_sliding_window on a subset of layers is not supported")
    else:
      qkv_bias = o_bias = bool(get("attention_bias", False))
      mlp_bias = bool(get("mlp_bias", False))
      window = get("sliding_window") if model_type == "mistral" else None
    heads = get("num_attention_heads")
    return cls(
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
        intermediate_size=get("intermediate_size"), num_layers=get("num_hidden_layers"),
        num_heads=heads, num_kv_heads=get("num_key_value_heads") or heads,
        head_dim=get("head_dim") or None, rms_norm_eps=get("rms_norm_eps", 1e-6),
        rope_theta=float(theta), rope_scaling=_freeze(scaling),
        max_position_embeddings=get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
        o_bias=o_bias, mlp_bias=mlp_bias, sliding_window=window,
        hidden_act=get("hidden_act", "silu"), initializer_range=get("initializer_range", 0.02),
        model_type=model_type, bos_token_id=get("bos_token_id"),
        eos_token_id=get("eos_token_id"), pad_token_id=get("pad_token_id"))

  def to_hf_dict(self) -> dict:
    """``config.json`` contents that ``transformers.AutoConfig`` reads back to this config."""
    d = dict(model_type=self.model_type, architectures=[_ARCHITECTURES[self.model_type]],
             vocab_size=self.vocab_size, hidden_size=self.hidden_size,
             intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
             num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
             head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
             max_position_embeddings=self.max_position_embeddings,
             tie_word_embeddings=self.tie_word_embeddings, hidden_act=self.hidden_act,
             initializer_range=self.initializer_range, bos_token_id=self.bos_token_id,
             eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
             else self.eos_token_id, pad_token_id=self.pad_token_id)
    rope = {"rope_type": "default", "rope_theta": self.rope_theta}
    if self.rope_scaling is not None:
      sc = self.rope_scaling_dict
      if sc["rope_type"] == "freq_factors":
        raise ValueError("rope scaling from a GGUF rope_freqs tensor has no Hugging Face config "
                         "equivalent; cannot save this model as an HF directory")
      rope = dict(sc, rope_theta=self.rope_theta)
      d["rope_scaling"] = {k: v for k, v in sc.items()}
    d["rope_parameters"] = rope
    d["rope_theta"] = self.rope_theta
    if self.model_type == "qwen2":
      d.update(use_sliding_window=False, sliding_window=None)
    elif self.model_type == "mistral":
      d["sliding_window"] = self.sliding_window
    else:
      d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
    return d


class KVCache(NamedTuple):
  """Key/value cache for incremental decoding.

  Attributes:
    k: ``[layers, batch, kv_heads, max_len, head_dim]`` (heads before positions: the layout the
      attention's dots read without a transpose).
    v: ``[layers, batch, kv_heads, max_len, head_dim]``.
    index: int32 scalar, the number of filled slots (the next token is written at ``index``);
      or int32 ``[batch]``, one per row (:func:`init_cache` with ``per_row=True``): every row
      writes at its own index and its queries sit at their own positions, as continuous
      batching needs (rows at different lengths decoded in one step).
  """
  k: Array
  v: Array
  index: Array


def init_cache(config: LlamaConfig, batch: int, max_len: int,
               dtype: Dtype = jnp.float32, *, per_row: bool = False) -> KVCache:
  """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_len`` tokens.

  ``per_row``: one index per row (``int32 [batch]``) instead of one for the whole batch.
  """
  shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
  index = jnp.zeros((batch,) if per_row else (), jnp.int32)
  return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), index)


def _write(buf: Array, new: Array, layer, index: Array) -> Array:
  """The cache ``buf [layers, batch, kv_heads, len, head_dim]`` with layer ``layer``'s new
  entries ``new [batch, t, kv_heads, head_dim]`` written from ``index`` (a scalar: the same
  offset for every row; ``[batch]``: each row's own), clamped as ``lax.dynamic_update_slice``
  clamps: ``0 <= start <= len - t``.

  One update in place: a donated cache is neither copied nor re-stacked, whatever its size. (The
  layer writes, then reads its slice; read-then-write would make XLA copy the whole buffer.)"""
  new = new.astype(buf.dtype)
  if index.ndim == 0:
    return lax.dynamic_update_slice(buf, jnp.swapaxes(new, 1, 2)[None], (layer, 0, 0, index, 0))
  t = new.shape[1]
  start = jnp.clip(index, 0, buf.shape[3] - t)
  rows = jnp.arange(buf.shape[1])[:, None]
  # (layer, row, :, position): the indexed axes go first, so the update is laid out as ``new``.
  return buf.at[layer, rows, :, start[:, None] + jnp.arange(t)[None, :]].set(
      new, indices_are_sorted=True, unique_indices=True)


def _dense(features, use_bias, cfg, dtype, param_dtype, name):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.initializers.normal(cfg.initializer_range), name=name)


class LMHead(nn.Module):
  """The output projection ``lm_head/kernel [hidden, vocab]`` (no bias), as ``nn.Dense`` computes it.

  ``head(x)`` gives float32 logits; ``head(x, labels, weights)`` the summed token cross-entropy by
  :func:`peftjax.losses.fused_cross_entropy`, without forming the logits.
  """
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, labels=None, weights=None):
    cfg = self.config
    kernel = self.param("kernel", nn.initializers.normal(cfg.initializer_range),
                        (x.shape[-1], cfg.vocab_size), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    if labels is not None:
      return losses.fused_cross_entropy(x, kernel, labels, weights=weights)
    out = lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return out.astype(jnp.float32)


class LlamaAttention(nn.Module):
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin, mask, cache, cache_index, prefix_kv):
    cfg = self.config
    b, t, _ = x.shape
    hd, h, kvh = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    q = _dense(h * hd, cfg.qkv_bias, cfg, self.dtype, self.param_dtype, "q_proj")(x)
    k = _dense(kvh * hd, cfg.qkv_bias, cfg, self.dtype, self.param_dtype, "k_proj")(x)
    v = _dense(kvh * hd, cfg.qkv_bias, cfg, self.dtype, self.param_dtype, "v_proj")(x)
    q = common.apply_rope(q.reshape(b, t, h, hd), cos, sin)
    k = common.apply_rope(k.reshape(b, t, kvh, hd), cos, sin)
    v = v.reshape(b, t, kvh, hd)
    if cache is not None:  # (k [layers, ...], v, this layer): write this layer's keys, read them
      ck, cv, layer = cache
      ck, cv = _write(ck, k, layer, cache_index), _write(cv, v, layer, cache_index)
      k, v = ck[layer].astype(self.dtype), cv[layer].astype(self.dtype)  # [b, kvh, len, hd]
      cache = (ck, cv, layer + 1)
    major = cache is not None
    if prefix_kv is not None:
      pk, pv = (x.astype(self.dtype) for x in prefix_kv)
      if major:
        pk, pv = jnp.swapaxes(pk, 1, 2), jnp.swapaxes(pv, 1, 2)
      k = jnp.concatenate([pk, k], axis=2 if major else 1)
      v = jnp.concatenate([pv, v], axis=2 if major else 1)
    out = common.attention(q, k, v, mask, heads_major=major)
    out = _dense(cfg.hidden_size, cfg.o_bias, cfg, self.dtype, self.param_dtype, "o_proj")(out)
    return out, cache


class LlamaMLP(nn.Module):
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    act = common.ACTIVATIONS[cfg.hidden_act]

    def dense(n, name):
      return _dense(n, cfg.mlp_bias, cfg, self.dtype, self.param_dtype, name)

    h = act(dense(cfg.intermediate_size, "gate_proj")(x)) * dense(cfg.intermediate_size,
                                                                  "up_proj")(x)
    h = constrain(h, ("batch", "length", "mlp"))
    return dense(cfg.hidden_size, "down_proj")(h)


class LlamaBlock(nn.Module):
  """One decoder layer: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

  Called as ``block((x, cache), prefix_kv, ctx) -> ((x, cache), None)`` so it can be scanned:
  ``cache`` is None or ``(k, v, layer)``, the whole KV cache (:class:`KVCache`'s arrays) and
  this block's layer in it, carried from layer to layer so that each writes its slice in place;
  ``prefix_kv`` is this layer's prefix (or None); ``ctx = (cos, sin, mask, cache_index)`` is shared
  by all layers.
  """
  config: LlamaConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, carry, prefix_kv, ctx):
    cfg = self.config
    x, cache = carry
    cos, sin, mask, cache_index = ctx
    h = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="input_layernorm")(x)
    h, cache = LlamaAttention(cfg, self.dtype, self.param_dtype, name="self_attn")(
        h, cos, sin, mask, cache, cache_index, prefix_kv)
    x = constrain(x + h, ("batch", "length", "embed"))
    h = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="post_attention_layernorm")(x)
    x = constrain(x + LlamaMLP(cfg, self.dtype, self.param_dtype, name="mlp")(h),
                  ("batch", "length", "embed"))
    return (x, cache), None


class LlamaForCausalLM(nn.Module):
  """Llama-family decoder with a causal-LM head.

  Attributes:
    config: the architecture.
    scan_layers: run the layers with ``nn.scan`` (parameters under ``layers``, stacked on axis 0:
      faster compiles and the layout layer-stacked adapters expect) instead of a Python loop
      (``layers_0`` ...). Both load the same checkpoints.
    remat: rematerialize each layer in the backward pass: False, True (save nothing) or a
      ``jax.checkpoint_policies`` name such as ``"dots_with_no_batch_dims_saveable"``.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); norms, softmax and logits stay float32.
    param_dtype: dtype of freshly initialized parameters (loaders choose their own).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    ...                   num_heads=4, num_kv_heads=2)
    >>> model = LlamaForCausalLM(cfg)
    >>> ids = jnp.ones((1, 5), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> model.apply({"params": params}, ids).shape
    (1, 5, 64)
  """
  config: LlamaConfig
  scan_layers: bool = False
  remat: Any = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Optional[Array] = None, *, attention_mask: Optional[Array] = None,
               position_ids: Optional[Array] = None, inputs_embeds: Optional[Array] = None,
               prefix: Optional[Array] = None, cache: Optional[KVCache] = None,
               logits_index: Optional[Array] = None, return_hidden: bool = False,
               labels: Optional[Array] = None, loss_weights: Optional[Array] = None):
    """Logits for every position (or hidden states, or the summed token loss).

    Args:
      input_ids: int ``[batch, seq]``; or give ``inputs_embeds`` ``[batch, seq, hidden]`` instead.
      attention_mask: ``[batch, seq]`` (1 = real token, 0 = padding); with ``cache`` it must cover
        the whole cache, ``[batch, max_len]``. Default: all ones.
      position_ids: int ``[batch, seq]``. Default: ``cumsum(attention_mask) - 1`` over the sequence
        (over the cache with ``cache``), so padding never shifts the real tokens' positions.
      inputs_embeds: ``[batch, seq, hidden]`` used instead of the token embedding.
      prefix: per-layer prefix keys/values ``[layers, 2, batch (or 1), n_prefix, kv_heads,
        head_dim]`` (``[:, 0]`` keys, ``[:, 1]`` values, used as given: no RoPE is applied to them);
        visible to every query.
      cache: a :class:`KVCache`; the new keys/values are written at ``cache.index`` (per row if it
        is ``[batch]``) and the updated cache is returned.
      logits_index: int ``[batch]``: compute logits only at this position of each row
        (``[batch, 1, vocab]``), e.g. the last real token of a padded prompt.
      return_hidden: return the final normed hidden states ``[batch, seq, hidden]`` instead of
        logits.
      labels: int ``[batch, seq]``: return the summed cross-entropy of these targets (negative
        labels are ignored) instead of logits, computed by
        :func:`peftjax.losses.fused_cross_entropy` in chunks of tokens, so the
        ``[batch, seq, vocab]`` float32 logits (and their gradient) are never held.
      loss_weights: float ``[batch, seq]`` per-token weights of that sum (e.g. ``1 / n`` for the
        mean); default 1.

    Returns:
      ``logits`` float32 ``[batch, seq, vocab]`` (or hidden states, or with ``labels`` a float32
      scalar); ``(logits, cache)`` if a cache was given.
    """
    cfg = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    embed = common.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype,
                     param_dtype=self.param_dtype,
                     embedding_init=nn.initializers.normal(cfg.initializer_range),
                     name="embed_tokens")
    if inputs_embeds is None:
      x = embed(input_ids)
    else:
      if self.is_initializing():
        embed(jnp.zeros((1, 1), jnp.int32))  # create the table even when it is bypassed
      x = inputs_embeds.astype(self.dtype)
    b, t = x.shape[:2]
    x = constrain(x, ("batch", "length", "embed"))

    if cache is not None:
      s = cache.k.shape[3]
      if cache.k.shape[1] != b:
        raise ValueError(f"cache batch {cache.k.shape[1]} != input batch {b}")
      full_mask = (jnp.ones((b, s), jnp.int32) if attention_mask is None else attention_mask)
      if full_mask.shape != (b, s):
        raise ValueError(f"with a cache, attention_mask must cover the cache: expected shape "
                         f"{(b, s)}, got {tuple(full_mask.shape)}")
      index = cache.index
      if index.ndim not in (0, 1) or (index.ndim == 1 and index.shape[0] != b):
        raise ValueError(f"cache.index must be a scalar or one index per row ([{b}]), got shape "
                         f"{tuple(index.shape)}")
      q_slot = index[..., None] + jnp.arange(t)  # [t], or [b, t] with an index per row
    else:
      s = t
      full_mask = (jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask)
      if full_mask.shape != (b, t):
        raise ValueError(f"attention_mask must have shape {(b, t)}, got {tuple(full_mask.shape)}")
      index = jnp.zeros((), jnp.int32)
      q_slot = jnp.arange(t)
    all_pos = common.positions_from_mask(full_mask)  # [b, s]
    if position_ids is None:
      if cache is None:
        position_ids = all_pos
      elif index.ndim == 0:
        position_ids = lax.dynamic_slice_in_dim(all_pos, index, t, axis=1)
      else:
        position_ids = jnp.take_along_axis(all_pos, jnp.minimum(q_slot, s - 1), axis=1)
    k_slot = jnp.arange(s)
    valid = full_mask.astype(bool)
    q_slot = jnp.broadcast_to(q_slot, (b, t))
    mask = (k_slot[None, None, :] <= q_slot[:, :, None]) & valid[:, None, :]  # [b, t, s]
    if cfg.sliding_window is not None:
      mask &= (position_ids[:, :, None] - all_pos[:, None, :]) < cfg.sliding_window

    prefix = common.expand_prefix(prefix, cfg.num_layers, b, cfg.num_kv_heads, cfg.head_dim)
    if prefix is not None:
      mask = jnp.concatenate([jnp.ones((b, t, prefix.shape[3]), bool), mask], axis=-1)

    inv_freq = common.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict)
    cos, sin = common.rope_cos_sin(position_ids, inv_freq)

    # The whole cache is carried through the layers (each writes its own slice in place);
    # the layer index is static without scan (a plain slice), a counter with it.
    state = None if cache is None else (cache.k, cache.v,
                                        jnp.zeros((), jnp.int32) if self.scan_layers else 0)
    (x, state), _ = common.layer_stack(
        LlamaBlock, num_layers=cfg.num_layers, scan=self.scan_layers, remat=self.remat,
        block_kwargs=dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype),
        x=(x, state), xs=prefix, ctx=(cos, sin, mask, index))
    x = RMSNorm(cfg.rms_norm_eps, self.dtype, self.param_dtype, name="norm")(x)
    if logits_index is not None:
      x = jnp.take_along_axis(x, logits_index.astype(jnp.int32)[:, None, None], axis=1)

    if labels is not None:
      if return_hidden or cache is not None or logits_index is not None:
        raise ValueError("labels= (the fused loss) does not combine with return_hidden, cache or "
                         "logits_index")
      if cfg.tie_word_embeddings:
        table = jnp.asarray(embed.embedding, self.dtype)
        return losses.fused_cross_entropy(x, table, labels, transpose=True, weights=loss_weights)
      return LMHead(cfg, self.dtype, self.param_dtype, name="lm_head")(x, labels, loss_weights)
    if return_hidden:
      out = x
    elif cfg.tie_word_embeddings:
      out = embed.attend(x).astype(jnp.float32)
    else:
      out = LMHead(cfg, self.dtype, self.param_dtype, name="lm_head")(x)
    if cache is None:
      return out
    return out, KVCache(state[0], state[1], index + t)


def hf_tensor_map(config: LlamaConfig) -> list[common.TensorSpec]:
  """Where each parameter lives in an HF ``*ForCausalLM`` checkpoint (``{p}`` is ``model.``)."""
  T = common.TensorSpec
  specs = [T(("embed_tokens", "embedding"), "{p}embed_tokens.weight"),
           T(("norm", "scale"), "{p}norm.weight")]
  if not config.tie_word_embeddings:
    specs.append(T(("lm_head", "kernel"), "lm_head.weight", "linear"))
  lp = "{p}layers.{i}."
  for n, bias in (("q_proj", config.qkv_bias), ("k_proj", config.qkv_bias),
                  ("v_proj", config.qkv_bias), ("o_proj", config.o_bias)):
    specs.append(T(("self_attn", n, "kernel"), f"{lp}self_attn.{n}.weight", "linear", True))
    if bias:
      specs.append(T(("self_attn", n, "bias"), f"{lp}self_attn.{n}.bias", "copy", True))
  for n in ("gate_proj", "up_proj", "down_proj"):
    specs.append(T(("mlp", n, "kernel"), f"{lp}mlp.{n}.weight", "linear", True))
    if config.mlp_bias:
      specs.append(T(("mlp", n, "bias"), f"{lp}mlp.{n}.bias", "copy", True))
  specs.append(T(("input_layernorm", "scale"), f"{lp}input_layernorm.weight", "copy", True))
  specs.append(T(("post_attention_layernorm", "scale"), f"{lp}post_attention_layernorm.weight",
                 "copy", True))
  return specs
