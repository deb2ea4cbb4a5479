"""peftjax.losses: the fused LM head + cross-entropy against the plain log-softmax loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax
from peftjax.losses import IGNORE_INDEX, cross_entropy, default_chunk_size, fused_cross_entropy
from peftjax.models import LlamaConfig, LlamaForCausalLM


def _case(dtype, transpose, vocab=40, d=16, lead=(3, 7)):
  k = jax.random.split(jax.random.key(0), 4)
  h = jax.random.normal(k[0], lead + (d,)).astype(dtype)
  w = (0.5 * jax.random.normal(k[1], (vocab, d) if transpose else (d, vocab))).astype(dtype)
  y = jax.random.randint(k[2], lead, 0, vocab).at[0, 3].set(IGNORE_INDEX).at[2, 0].set(-1)
  wt = jax.random.uniform(k[3], lead)
  return h, w, y, wt


def _reference(h, w, y, wt, transpose):
  logits = jnp.einsum("...d,vd->...v" if transpose else "...d,dv->...v", h, w,
                      preferred_element_type=jnp.float32)
  return (wt * cross_entropy(logits, y)).sum()


def _numpy_nll(logits, y):
  logits = np.asarray(logits, np.float64)
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  picked = np.take_along_axis(logits, np.maximum(y, 0)[..., None], -1)[..., 0]
  return np.where(y >= 0, lse - picked, 0.0)


def test_cross_entropy_matches_numpy():
  logits = jax.random.normal(jax.random.key(3), (4, 5, 11)) * 3
  y = jnp.array([[0, 1, 2, 3, 10]] * 4).at[1, 2].set(IGNORE_INDEX)
  np.testing.assert_allclose(cross_entropy(logits, y), _numpy_nll(logits, np.asarray(y)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_fused_equals_plain_values_and_gradients(dtype, transpose, chunk):
  h, w, y, wt = _case(dtype, transpose)
  fused = lambda h, w: fused_cross_entropy(h, w, y, transpose=transpose, chunk_size=chunk,
                                           weights=wt)
  ref = lambda h, w: _reference(h, w, y, wt, transpose)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  rv, (rh, rw) = jax.value_and_grad(ref, (0, 1))(h, w)
  eager = chunk == 4   # jit and eager once; the other chunk sizes jitted only
  for f in (fused, jax.jit(fused)) if eager else (jax.jit(fused),):
    v = f(h, w)
    assert v.dtype == jnp.float32
    np.testing.assert_allclose(v, rv, rtol=tol)
  grads = jax.grad(fused, (0, 1))
  for g in (grads, jax.jit(grads)) if eager else (jax.jit(grads),):
    gh, gw = g(h, w)
    assert gh.dtype == dtype and gw.dtype == dtype
    np.testing.assert_allclose(np.float32(gh), np.float32(rh), rtol=tol, atol=tol)
    np.testing.assert_allclose(np.float32(gw), np.float32(rw), rtol=tol, atol=5 * tol)


def test_fused_skips_the_kernel_gradient_when_the_kernel_is_frozen():
  h, w, y, _ = _case(jnp.float32, False)
  f = lambda h, w: fused_cross_entropy(h, w, y, chunk_size=4)
  # logits and d hidden only; the weight gradient's matmul appears when w is differentiated
  assert str(jax.make_jaxpr(jax.grad(f))(h, w)).count("dot_general") == 2
  assert str(jax.make_jaxpr(jax.grad(f, (0, 1)))(h, w)).count("dot_general") == 3


def test_fused_holds_one_chunk_of_logits():
  n, d, v = 512, 32, 32768
  h, w, y = jnp.ones((n, d)), jnp.ones((d, v)), jnp.zeros((n,), jnp.int32)

  def temp(loss):
    return jax.jit(jax.grad(loss)).lower(h).compile().memory_analysis().temp_size_in_bytes

  logits_bytes = n * v * 4
  plain = temp(lambda h: cross_entropy(h @ w, y).sum())
  fused = temp(lambda h: fused_cross_entropy(h, w, y, chunk_size=32))
  assert plain >= logits_bytes
  assert fused < logits_bytes / 3, (fused, logits_bytes)


def test_lora_on_the_head_under_lift_equals_the_merged_kernel():
  h, w, y, wt = _case(jnp.float32, False)
  tuned = peftjax.lora.apply({"head": {"kernel": w}}, rank=2, targets=["head"])
  tuned = jax.tree.map(lambda x: x + 0.1 if x.ndim == 2 and x.shape[0] == 2 else x, tuned)
  trainable, frozen = peftjax.split(tuned)
  lifted = peftjax.lift(lambda p, h: fused_cross_entropy(h, p["head"]["kernel"], y, weights=wt,
                                                         chunk_size=5))

  def via_lift(t):
    return lifted(peftjax.combine(t, frozen), h)

  def via_merge(t):
    return _reference(h, peftjax.merge(peftjax.combine(t, frozen))["head"]["kernel"], y, wt, False)

  np.testing.assert_allclose(via_lift(trainable), via_merge(trainable), rtol=1e-5)
  ga, gb = jax.grad(via_lift)(trainable), jax.grad(via_merge)(trainable)
  for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_default_chunk_size():
  assert default_chunk_size(8192) == 256
  assert default_chunk_size(49152) == 42
  assert default_chunk_size(10**9) == 16


@pytest.mark.parametrize("bad, match", [
    (dict(labels=jnp.zeros((3, 6), jnp.int32)), r"labels shape \(3, 6\) != hidden's leading shape"),
    (dict(labels=jnp.zeros((3, 7))), "labels must be integers"),
    (dict(kernel=jnp.zeros((15, 40))), r"kernel \(15, 40\) does not fit hidden size 16"),
    (dict(chunk_size=0), "chunk_size must be a positive int, got 0"),
    (dict(weights=jnp.ones((7, 3))), r"weights shape \(7, 3\) != the tokens' shape \(3, 7\)"),
])
def test_bad_input_is_named(bad, match):
  h, w, y, _ = _case(jnp.float32, False)
  args = dict(hidden=h, kernel=w, labels=y) | {k: v for k, v in bad.items()
                                               if k in ("labels", "kernel")}
  kw = {k: v for k, v in bad.items() if k in ("chunk_size", "weights")}
  with pytest.raises((ValueError, TypeError), match=match):
    fused_cross_entropy(**args, **kw)


@pytest.mark.parametrize("tied", [False, True])
def test_llama_labels_equal_the_logits_loss(tied):
  cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                    num_heads=2, num_kv_heads=1, tie_word_embeddings=tied)
  model = LlamaForCausalLM(cfg)
  ids = jax.random.randint(jax.random.key(1), (2, 9), 0, 64)
  params = model.init(jax.random.key(0), ids)["params"]
  assert ("lm_head" in params) != tied
  tuned = peftjax.lora.apply(params, rank=2)
  tuned = jax.tree.map(lambda x: x, tuned)
  trainable, frozen = peftjax.split(tuned)
  fwd = peftjax.forward(model)
  labels = ids[:, 1:].at[0, 2].set(IGNORE_INDEX)

  def plain(t):
    logits = fwd(peftjax.combine(t, frozen), ids[:, :-1])
    return cross_entropy(logits, labels).sum()

  def fused(t):
    return fwd(peftjax.combine(t, frozen), ids[:, :-1], labels=labels)

  np.testing.assert_allclose(jax.jit(fused)(trainable), jax.jit(plain)(trainable), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(jax.jit(jax.grad(fused))(trainable)),
                  jax.tree.leaves(jax.jit(jax.grad(plain))(trainable))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_llama_labels_with_a_soft_prompt_skip_the_virtual_tokens():
  cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=1)
  model = LlamaForCausalLM(cfg)
  ids = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)
  params = model.init(jax.random.key(0), ids)["params"]
  tuned = peftjax.prompt.apply(params, 3)
  fwd = peftjax.forward(model)
  labels = ids[:, 1:]
  plain = jax.jit(lambda t: cross_entropy(fwd(t, ids[:, :-1]), labels).sum())(tuned)
  weights = jnp.full(labels.shape, 0.5)
  fused = jax.jit(lambda t: fwd(t, ids[:, :-1], labels=labels, loss_weights=weights))(tuned)
  np.testing.assert_allclose(fused, 0.5 * plain, rtol=1e-5)
