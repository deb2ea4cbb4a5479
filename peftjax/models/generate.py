"""Jitted KV-cache generation for :class:`peftjax.models.LlamaForCausalLM`.

One compiled program per (model, shapes, sampling settings): the prompt is run once (prefill) into a
cache of ``prompt_len + max_new_tokens`` slots, then a ``lax.while_loop`` feeds one token per step
until every row has produced a stop token or ``max_new_tokens`` tokens. Prompts of different lengths
are batched with padding (left padding is usual; any padding works because positions come from the
mask and the first token is sampled at each row's last real token).

Parameters may contain peftjax nodes (LoRA, QLoRA, adapters): they are detected and the model is
run through :func:`peftjax.lift`, or pass your own ``apply_fn``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from peftjax._src.additive import check_positive_int
from peftjax._src.lift import lifted_apply
from peftjax._src.nodes import is_node
from peftjax.models.llama import KVCache, LlamaForCausalLM, init_cache

Array = jax.Array

__all__ = ["generate", "GenerateOutput", "sample_logits", "init_slots", "prefill_slot", "decode_step",
           "prompt_buckets", "prompt_logprobs", "TokenLogprobs", "TOP_LOGPROBS"]


class GenerateOutput(NamedTuple):
  """Result of :func:`generate`.

  Attributes:
    tokens: int32 ``[batch, max_new_tokens]``: generated tokens; after a row's stop token (which is
      included) the row holds ``pad_token_id``.
    lengths: int32 ``[batch]``: number of generated tokens per row, stop token included.
  """
  tokens: Array
  lengths: Array


def sample_logits(logits: Array, key: Optional[Array], temperature: float | Array = 0.0,
                  top_p: float | Array = 1.0, top_k: int = 0) -> Array:
  """Next tokens ``[batch]`` from ``logits [batch, vocab]``.

  ``temperature == 0`` (a Python number) is greedy (argmax). Otherwise sample from
  ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens (if
  ``top_k > 0``; static) and to the smallest set whose probability reaches ``top_p`` (nucleus; the
  most likely token is always kept). ``temperature`` and ``top_p`` may be traced values, so changing
  them does not recompile.
  """
  if isinstance(temperature, (int, float)) and temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  neg = jnp.finfo(jnp.float32).min
  if top_k and top_k < logits.shape[-1]:
    kth = lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if not (isinstance(top_p, (int, float)) and top_p >= 1.0):
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
    drop_sorted = (before >= top_p) & (top_p < 1.0)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        drop_sorted)
    logits = jnp.where(drop, neg, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("apply_fn", "config", "max_new_tokens", "greedy",
                                             "nucleus", "top_k", "stop_tokens", "pad_token_id",
                                             "cache_dtype"))
def _generate(params, input_ids, inputs_embeds, attention_mask, key, prefix, temperature, top_p,
              *,
              apply_fn, config, max_new_tokens, greedy, nucleus, top_k, stop_tokens,
              pad_token_id, cache_dtype):
  b, t0 = attention_mask.shape
  total = t0 + max_new_tokens
  cache = init_cache(config, b, total, cache_dtype)
  mask = jnp.concatenate([attention_mask.astype(jnp.int32),
                          jnp.ones((b, max_new_tokens), jnp.int32)], axis=1)
  last = jnp.maximum(t0 - 1 - jnp.argmax(attention_mask[:, ::-1], axis=1), 0)
  kw = {} if prefix is None else {"prefix": prefix}
  first = {"input_ids": input_ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
  logits, cache = apply_fn({"params": params}, **first, attention_mask=mask, cache=cache,
                           logits_index=last, **kw)
  stops = jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)

  def pick(logits, i):
    if greedy:
      return sample_logits(logits[:, -1], None, 0.0)
    return sample_logits(logits[:, -1], jax.random.fold_in(key, i), temperature,
                         top_p if nucleus else 1.0, top_k)

  tok = pick(logits, 0)
  out = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(tok)
  done = jnp.isin(tok, stops)
  lengths = jnp.ones((b,), jnp.int32)

  def cond(state):
    i, _, _, _, done, _ = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, tok, cache, out, done, lengths = state
    logits, cache = apply_fn({"params": params}, tok[:, None], attention_mask=mask, cache=cache,
                             **kw)
    new = pick(logits, i)
    new = jnp.where(done, pad_token_id, new)
    out = out.at[:, i].set(new)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(new, stops)
    return i + 1, new, cache, out, done, lengths

  state = (jnp.asarray(1, jnp.int32), tok, cache, out, done, lengths)
  _, _, _, out, _, lengths = lax.while_loop(cond, body, state)
  return GenerateOutput(out, lengths)


def generate(model: LlamaForCausalLM, params: Any, input_ids: Optional[Array] = None,
             attention_mask: Optional[Array] = None, *, inputs_embeds: Optional[Array] = None,
             max_new_tokens: int = 32,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             stop_tokens: Optional[Sequence[int]] = None, pad_token_id: Optional[int] = None,
             key: Optional[Array] = None, prefix: Optional[Array] = None,
             apply_fn: Optional[Callable] = None, cache_dtype: Any = None) -> GenerateOutput:
  """Generates up to ``max_new_tokens`` tokens per prompt with a KV cache (jitted).

  Args:
    model: the decoder.
    params: its parameters (the inner tree, without ``{"params": ...}``); may hold peftjax nodes.
    input_ids: int ``[batch, prompt_len]``, padded (left padding recommended).
    attention_mask: ``[batch, prompt_len]``, 1 real / 0 padding (default all ones).
    inputs_embeds: ``[batch, prompt_len, hidden]``: the prompt as embeddings instead of
      ``input_ids`` (give exactly one of them); e.g. a soft prompt before the tokens' embeddings.
    max_new_tokens: tokens to generate per row.
    temperature: 0 for greedy decoding, else sampling temperature (``key`` required).
    top_p: nucleus sampling mass (1.0 = off).
    top_k: keep only the ``top_k`` most likely tokens (0 = off).
    stop_tokens: token ids ending a row (default: the config's ``eos_token_id``); ``()`` for none.
    pad_token_id: fills rows after their stop token (default: config's pad, else 0).
    key: PRNG key for sampling.
    prefix: per-layer prefix keys/values, as for the model.
    apply_fn: what to call instead of ``model.apply`` (e.g. ``peftjax.lift(model.apply)``);
      default ``model.apply``, or ``peftjax.lift(model.apply)`` if ``params`` holds nodes.
    cache_dtype: dtype of the KV cache (default: the model's compute dtype).

  Returns:
    :class:`GenerateOutput` ``(tokens [batch, max_new_tokens], lengths [batch])``.

  Example:
    >>> out = generate(model, params, ids, mask, max_new_tokens=20)       # doctest: +SKIP
    >>> tokenizer.batch_decode(out.tokens, skip_special_tokens=True)      # doctest: +SKIP
  """
  if not isinstance(model, LlamaForCausalLM):
    raise TypeError(f"generation needs a peftjax.models.LlamaForCausalLM, got "
                    f"{type(model).__name__}")
  max_new_tokens = check_positive_int(max_new_tokens, "max_new_tokens")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  if temperature > 0 and key is None:
    raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=jax.random.key(...)")
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("give exactly one of input_ids and inputs_embeds")
  if input_ids is not None:
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, prompt_len], got shape {input_ids.shape}")
    shape = input_ids.shape
  else:
    inputs_embeds = jnp.asarray(inputs_embeds)
    if inputs_embeds.ndim != 3:
      raise ValueError(f"inputs_embeds must be [batch, prompt_len, hidden], got shape "
                       f"{inputs_embeds.shape}")
    shape = inputs_embeds.shape[:2]
  if attention_mask is None:
    attention_mask = jnp.ones(shape, jnp.int32)
  attention_mask = jnp.asarray(attention_mask, jnp.int32)
  if attention_mask.shape != tuple(shape):
    raise ValueError(f"attention_mask shape {attention_mask.shape} != the prompt's "
                     f"{tuple(shape)}")
  cfg = model.config
  if stop_tokens is None:
    stop_tokens = cfg.stop_token_ids
  stop_tokens = tuple(int(s) for s in stop_tokens)
  if pad_token_id is None:
    pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  if apply_fn is None:
    apply_fn = model.apply
    if any(is_node(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_node)):
      apply_fn = lifted_apply(model)
  greedy = temperature == 0
  return _generate(params, input_ids, inputs_embeds, attention_mask, None if greedy else key,
                   prefix,
                   jnp.float32(temperature), jnp.float32(top_p), apply_fn=apply_fn, config=cfg,
                   max_new_tokens=int(max_new_tokens), greedy=greedy, nucleus=top_p < 1.0,
                   top_k=int(top_k), stop_tokens=stop_tokens, pad_token_id=int(pad_token_id),
                   cache_dtype=jnp.dtype(cache_dtype or model.dtype))


# ------------------------------------------------------------------------------------------------
# slots: continuous batching (one row per request, each at its own length, with its own adapter)
# ------------------------------------------------------------------------------------------------

def init_slots(model: LlamaForCausalLM, slots: int, max_len: int, cache_dtype: Any = None):
  """An empty KV cache of ``slots`` rows of ``max_len`` tokens, one index per row, for
  :func:`prefill_slot` and :func:`decode_step`.

  >>> import jax, jax.numpy as jnp
  >>> from peftjax.models import LlamaConfig, LlamaForCausalLM
  >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
  ...                                      num_layers=1, num_heads=2, num_kv_heads=1))
  >>> params = model.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32))["params"]
  >>> cache = init_slots(model, slots=2, max_len=24)
  >>> t0, cache = prefill_slot(model, params, cache, 0, [5, 6, 7])     # row 0: 3 tokens
  >>> t1, cache = prefill_slot(model, params, cache, 1, [9])           # row 1: 1 token
  >>> toks, cache = decode_step(model, params, cache, jnp.stack([t0, t1]), jnp.zeros(2),
  ...                           jnp.ones(2, bool))
  >>> cache.index.tolist()                                             # each row's length
  [4, 2]
  """
  slots = check_positive_int(slots, "slots")
  max_len = check_positive_int(max_len, "max_len")
  return init_cache(model.config, slots, max_len, jnp.dtype(cache_dtype or model.dtype),
                    per_row=True)


def prompt_buckets(max_len: int, smallest: int = 16) -> tuple[int, ...]:
  """The padded prompt lengths :func:`prefill_slot` compiles for: powers of two from
  ``smallest`` below ``max_len``, and ``max_len`` (so ``log2(max_len / smallest) + 1`` programs
  at most).

  >>> prompt_buckets(100)
  (16, 32, 64, 100)
  """
  out, b = [], smallest
  while b < max_len:
    out.append(b)
    b *= 2
  return (*out, max_len)


def _has_pool(params) -> bool:
  from peftjax import multi
  return any(multi._is_pool(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_node))


def _routed(params, ids):
  from peftjax import multi
  return multi.route(params, ids) if _has_pool(params) else params


def _sample_rows(logits, keys, temperature, top_p):
  """One token per row: greedy where ``temperature[row] == 0``, else sampled with the row's own
  key (``keys [rows]``) and nucleus ``top_p[row]``.

  Only the work some row needs runs (``lax.cond``): an all-greedy batch is one argmax, and the
  nucleus sort runs only when a sampled row has ``top_p < 1``. (Sampling a ``[32, 8192]`` batch
  with the nucleus costs ~58 ms on one CPU core, the argmax ~1 ms: most of a greedy decode step
  at the multi-adapter benchmark's shape before this.) The result is the same either way."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  hot = temperature > 0
  temp = jnp.where(hot, temperature, 1.0)

  def sampled(nucleus: bool):
    one = lambda l, k, t, p: sample_logits(l[None], k, t, p if nucleus else 1.0)[0]
    return lambda: jnp.where(hot, jax.vmap(one)(logits, keys, temp, top_p), greedy)

  sample = lambda: lax.cond(jnp.any(hot & (top_p < 1.0)), sampled(True), sampled(False))
  return lax.cond(jnp.any(hot), sample, lambda: greedy)


#: How many alternatives :func:`decode_step`/:func:`prefill_slot` report per token with
#: ``logprobs=`` (OpenAI's most, ``top_logprobs <= 20``).
TOP_LOGPROBS = 20


class TokenLogprobs(NamedTuple):
  """Log-probabilities of the chosen tokens under the model (``log_softmax`` of its logits,
  before temperature or nucleus: what OpenAI's and vLLM's ``logprobs`` report), per row.

  Attributes:
    logprob: float32 ``[rows]``: the chosen token's.
    top_ids: int32 ``[rows, k]``: the ``k = min(TOP_LOGPROBS, vocab)`` likeliest tokens, likeliest
      first.
    top_logprobs: float32 ``[rows, k]``: theirs.
  """
  logprob: Array
  top_ids: Array
  top_logprobs: Array


def _logprobs(logits, tok, want) -> TokenLogprobs:
  """:class:`TokenLogprobs` of ``tok`` under ``logits [rows, V]``; zeros (and no work, a
  ``lax.cond``) unless some row ``want``s them."""
  rows, vocab = logits.shape
  k = min(TOP_LOGPROBS, vocab)

  def compute():
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top_lp, top_id = lax.top_k(lp, k)
    return TokenLogprobs(jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0],
                         top_id.astype(jnp.int32), top_lp)

  def none():
    return TokenLogprobs(jnp.zeros((rows,), jnp.float32), jnp.zeros((rows, k), jnp.int32),
                         jnp.zeros((rows, k), jnp.float32))
  return lax.cond(jnp.any(want), compute, none)


@functools.partial(jax.jit, static_argnames=("apply_fn",), donate_argnames=("cache",))
def _prefill_slot(params, cache, slot, tokens, length, adapter, temperature, top_p, key, want, *,
                  apply_fn):
  b = tokens.shape[1]
  shape = (cache.k.shape[0], 1, cache.k.shape[2], b, cache.k.shape[4])  # one row, b positions
  small = KVCache(jnp.zeros(shape, cache.k.dtype), jnp.zeros(shape, cache.v.dtype),
                  jnp.zeros((), jnp.int32))
  routed = _routed(params, adapter[None])
  logits, small = apply_fn({"params": routed}, tokens, cache=small,
                           logits_index=(length - 1)[None])
  at = (0, slot, 0, 0, 0)
  cache = KVCache(lax.dynamic_update_slice(cache.k, small.k, at),
                  lax.dynamic_update_slice(cache.v, small.v, at), cache.index.at[slot].set(length))
  tok = _sample_rows(logits[:, -1], key[None], temperature[None], top_p[None])
  lps = _logprobs(logits[:, -1], tok, want[None])
  return tok[0], jax.tree.map(lambda x: x[0], lps), cache


@functools.partial(jax.jit, static_argnames=("apply_fn",), donate_argnames=("cache",))
def _decode_step(params, cache, tokens, adapters, active, temperature, top_p, key, want, *,
                 apply_fn):
  routed = _routed(params, adapters)
  logits, new = apply_fn({"params": routed}, tokens[:, None], cache=cache)
  new = new._replace(index=jnp.where(active, new.index, cache.index))
  tok = _sample_rows(logits[:, -1], key, temperature, top_p)
  return tok, _logprobs(logits[:, -1], tok, want & active), new


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _prompt_logprobs(params, tokens, adapter, *, apply_fn):
  routed = _routed(params, adapter[None])
  logits = apply_fn({"params": routed}, tokens)                       # [1, b, V]
  return _logprobs(logits[0, :-1], tokens[0, 1:], jnp.bool_(True))


def prompt_logprobs(model: LlamaForCausalLM, params: Any, prompt: Sequence[int], *,
                    adapter: int = 0, buckets: Optional[Sequence[int]] = None,
                    apply_fn: Optional[Callable] = None) -> TokenLogprobs:
  """The :class:`TokenLogprobs` of every prompt token after the first, each under the model
  given the tokens before it (one forward over the prompt, no cache): what OpenAI's completions
  with ``echo`` and ``logprobs`` report for the prompt, and what log-likelihood evaluations use.

  Args:
    model, params, adapter, apply_fn: as for :func:`prefill_slot`.
    prompt: token ids, at least 2.
    buckets: padded lengths (default :func:`prompt_buckets` of ``len(prompt)`` rounded up), so
      one program serves every prompt length of a bucket.

  Returns:
    :class:`TokenLogprobs` with ``len(prompt) - 1`` rows (row ``i``: token ``i + 1``).
  """
  n = len(prompt)
  if n < 2:
    raise ValueError(f"prompt_logprobs needs at least 2 tokens, got {n}")
  buckets = sorted(prompt_buckets(max(2 * n, 16)) if buckets is None else buckets)
  b = next((x for x in buckets if n <= x), None)
  if b is None:
    raise ValueError(f"no prompt bucket holds {n} tokens: {buckets}")
  pad = model.config.pad_token_id or 0
  tokens = jnp.asarray([list(prompt) + [pad] * (b - n)], jnp.int32)
  lps = _prompt_logprobs(params, tokens, jnp.int32(adapter),
                         apply_fn=_apply_fn(model, params, apply_fn))
  return jax.tree.map(lambda x: x[:n - 1], lps)


def _apply_fn(model, params, apply_fn):
  if apply_fn is not None:
    return apply_fn
  if any(is_node(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_node)):
    return lifted_apply(model)
  return model.apply


def prefill_slot(model: LlamaForCausalLM, params: Any, cache: KVCache, slot: int,
                 prompt: Sequence[int], *, adapter: int = 0, temperature: float = 0.0,
                 top_p: float = 1.0, key: Optional[Array] = None,
                 buckets: Optional[Sequence[int]] = None,
                 apply_fn: Optional[Callable] = None, logprobs: Optional[bool] = None):
  """Runs one prompt into row ``slot`` of a slot cache (:func:`init_slots`) and samples its first
  token; the other rows are untouched.

  The prompt is padded on the right to the smallest of ``buckets`` (default
  :func:`prompt_buckets`) that holds it, so one program serves every prompt length of a bucket;
  the padding's keys sit after the prompt, where the causal mask hides them, and the next
  :func:`decode_step` overwrites them. Row ``slot``'s index becomes ``len(prompt)``.

  Args:
    model: the decoder.
    params: its parameters; with adapter pools (:func:`peftjax.multi.stack`) the row runs with
      pool slot ``adapter`` (0: the base).
    cache: the slot cache (consumed: its buffers are donated; use the returned one).
    slot: the cache row.
    prompt: token ids, ``1 <= len(prompt) < max_len``.
    adapter: the pool slot of this request.
    temperature, top_p: sampling of the first token (0: greedy); traced, no recompile.
    key: PRNG key (needed when ``temperature > 0``).
    buckets: the padded prompt lengths.
    apply_fn: as for :func:`generate`.
    logprobs: None, or whether to compute the token's :class:`TokenLogprobs` (data: either value
      runs the same compiled program).

  Returns:
    ``(first token (int32 scalar), cache)``; with ``logprobs`` given, ``(token, cache,
    TokenLogprobs)`` (one row's: scalar ``logprob``, ``[k]`` alternatives; zeros if False).
  """
  n_slots, max_len = cache.k.shape[1], cache.k.shape[3]
  if cache.index.shape != (n_slots,):
    raise ValueError(f"prefill_slot needs a cache with one index per row (init_slots), got an "
                     f"index of shape {tuple(cache.index.shape)}")
  if not 0 <= slot < n_slots:
    raise ValueError(f"slot must be in [0, {n_slots}), got {slot}")
  n = len(prompt)
  if not 1 <= n < max_len:
    raise ValueError(f"a prompt needs 1 to {max_len - 1} tokens (the cache holds {max_len}), "
                     f"got {n}")
  buckets = sorted(prompt_buckets(max_len) if buckets is None else buckets)
  b = next((x for x in buckets if n <= x <= max_len), None)
  if b is None:
    raise ValueError(f"no prompt bucket holds {n} tokens within max_len {max_len}: {buckets}")
  if temperature > 0 and key is None:
    raise ValueError("sampling (temperature > 0) needs a PRNG key: pass key=jax.random.key(...)")
  pad = model.config.pad_token_id or 0
  tokens = jnp.asarray([list(prompt) + [pad] * (b - n)], jnp.int32)
  tok, lps, cache = _prefill_slot(
      params, cache, jnp.int32(slot), tokens, jnp.int32(n), jnp.int32(adapter),
      jnp.float32(temperature), jnp.float32(top_p), jax.random.key(0) if key is None else key,
      jnp.bool_(bool(logprobs)), apply_fn=_apply_fn(model, params, apply_fn))
  return (tok, cache) if logprobs is None else (tok, cache, lps)


def decode_step(model: LlamaForCausalLM, params: Any, cache: KVCache, tokens: Array,
                adapters: Array, active: Array, *, temperature: Any = 0.0, top_p: Any = 1.0,
                key: Optional[Array] = None, apply_fn: Optional[Callable] = None,
                logprobs: Any = None):
  """One decoding step for every row of a slot cache: each row feeds its last token at its own
  position (its cache index) through its own adapter, and gets its next token.

  Shapes are fixed by the cache (``slots`` rows), so every step of a server runs one compiled
  program whatever requests come and go; adapters, tokens, sampling settings and the pool's
  contents are data.

  Args:
    model: the decoder.
    params: parameters, with adapter pools or without.
    cache: the slot cache (consumed; use the returned one).
    tokens: int32 ``[slots]``: each row's last token (written at its index).
    adapters: int32 ``[slots]``: each row's pool slot (ignored without pools).
    active: bool ``[slots]``: rows whose index advances (free rows compute, but stay put).
    temperature, top_p: scalars or ``[slots]``; a row with temperature 0 is greedy.
    key: PRNG key for the sampled rows, or one per row (a ``[slots]`` key array: a request's own
      seed, folded with its token count, samples the same wherever and with whatever it is
      batched).
    apply_fn: as for :func:`generate`.
    logprobs: None, or a bool (or bool ``[slots]``): the rows whose :class:`TokenLogprobs` to
      compute (data: every value runs the same compiled program; none: no work).

  Returns:
    ``(next tokens int32 [slots], cache)``; with ``logprobs`` given, ``(tokens, cache,
    TokenLogprobs)`` (zeros in the rows not asked for and the inactive ones).
  """
  s = cache.k.shape[1]
  if cache.index.shape != (s,):
    raise ValueError(f"decode_step needs a cache with one index per row (init_slots), got an "
                     f"index of shape {tuple(cache.index.shape)}")
  row = lambda x, dt: jnp.broadcast_to(jnp.asarray(x, dt), (s,))
  if key is None:
    key = jax.random.key(0)
  if key.shape == ():
    key = jax.random.split(key, s)
  elif key.shape != (s,):
    raise ValueError(f"key must be one PRNG key or one per row ([{s}]), got shape {key.shape}")
  tok, lps, cache = _decode_step(
      params, cache, row(tokens, jnp.int32), row(adapters, jnp.int32), row(active, bool),
      row(temperature, jnp.float32), row(top_p, jnp.float32), key,
      row(False if logprobs is None else logprobs, bool),
      apply_fn=_apply_fn(model, params, apply_fn))
  return (tok, cache) if logprobs is None else (tok, cache, lps)
