"""QLoRA: quantize + LoRA, lift == merge, training with frozen packed weights, merge_requantized."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
from peftjax import qlora, quant
from peftjax.lora import LoraWeight
from peftjax.quant import QuantizedWeight
from peftjax.testing import TinyTransformer, next_token_loss

TOK = jax.random.randint(jax.random.key(1), (4, 16), 0, 64)


@functools.lru_cache(maxsize=None)
def model_case(**kw):
  model = TinyTransformer(**kw)
  return model, jax.jit(model.init)(jax.random.key(0), TOK)


def randomize_b(tree, scale=0.1):
  def f(path, x):
    if isinstance(x, LoraWeight):
      k = jax.random.fold_in(jax.random.key(7), len(jax.tree_util.keystr(path)))
      return x.replace(b=(jax.random.normal(k, x.b.shape) * scale).astype(x.b.dtype))
    return x
  return jax.tree_util.tree_map_with_path(f, tree, is_leaf=peftjax.is_node)


def qnodes(tree):
  return [x for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(
      x, QuantizedWeight)) if isinstance(x, QuantizedWeight)]


def assert_trees_close(a, b, tol=1e-5):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def test_apply_structure_matches_lora():
  model, params = model_case()
  tuned = qlora.apply(params, rank=4, block_size=32, key=jax.random.key(5))
  plain = peftjax.lora.apply(params, rank=4, key=jax.random.key(5))
  flat_q = dict(peftjax._src.targeting.leaves_with_paths(tuned))
  flat_l = dict(peftjax._src.targeting.leaves_with_paths(plain))
  assert flat_q.keys() == flat_l.keys()
  n_lora = 0
  for path, node in flat_q.items():
    if isinstance(flat_l[path], LoraWeight):
      n_lora += 1
      assert isinstance(node, LoraWeight) and isinstance(node.w, QuantizedWeight)
      assert node.w.shape == flat_l[path].w.shape and node.w.block_size == 32
      np.testing.assert_array_equal(np.asarray(node.a), np.asarray(flat_l[path].a))
      assert node.a.dtype == jnp.float32
    else:
      assert not peftjax.is_node(node)   # embeddings, norms, lm_head untouched
  assert n_lora == 2 * 7
  mask = peftjax.trainable_mask(tuned)
  assert sum(jax.tree_util.tree_leaves(mask)) == 2 * n_lora   # a and b only


@pytest.mark.parametrize("kw,kernel", [
    (dict(), "interpret"),
    (dict(scan=True, dense_general=True, remat=True), "xla"),
])
def test_lift_equals_merge_forward_and_grads(kw, kernel):
  model, params = model_case(**kw)
  tuned = randomize_b(qlora.apply(params, rank=4, block_size=32, kernel=kernel))
  for n in qnodes(tuned):
    assert n.kernel == kernel
  fwd = peftjax.lift(model.apply)
  merged_apply = jax.jit(lambda t: model.apply(peftjax.merge(t), TOK))
  np.testing.assert_allclose(jax.jit(fwd)(tuned, TOK), merged_apply(tuned), rtol=1e-5, atol=1e-5)
  trainable, frozen = peftjax.split(tuned)
  loss = lambda t: next_token_loss(fwd(peftjax.combine(t, frozen), TOK), TOK)
  ref = lambda t: next_token_loss(model.apply(peftjax.merge(peftjax.combine(t, frozen)), TOK), TOK)
  g_ref = jax.jit(jax.grad(ref))(trainable)
  assert_trees_close(jax.jit(jax.grad(loss))(trainable), g_ref)
  if not kw:  # without jit too (op by op; gradients without jit: test_quant's matmul tests)
    np.testing.assert_allclose(fwd(tuned, TOK), merged_apply(tuned), rtol=1e-5, atol=1e-5)


def test_no_float_copy_of_frozen_weights_in_residuals():
  from jax._src.ad_checkpoint import saved_residuals
  model, params = model_case()
  tuned = randomize_b(qlora.apply(params, rank=4, block_size=32))
  trainable, frozen = peftjax.split(tuned)
  fwd = peftjax.lift(model.apply)
  # 3 x 7 tokens: no activation, flattened to [tokens, features] for the low-rank product, has
  # a kernel's shape (with TOK's 64 tokens, x [64, 32] would look like a [64, 32] kernel).
  tok = TOK[:3, :7]
  res = saved_residuals(lambda t: next_token_loss(fwd(peftjax.combine(t, frozen), tok), tok),
                        trainable)
  kernel_shapes = {tuple(n.shape) for n in qnodes(tuned)}
  assert not any(21 in s for s in kernel_shapes)
  # ("from a constant" residuals are existing arrays, e.g. the unquantized lm_head; a dequantized
  # weight kept for the backward pass would be the output of some operation.)
  bad = [(a, why) for a, why in res
         if jnp.issubdtype(a.dtype, jnp.floating) and tuple(a.shape) in kernel_shapes
         and why != "from a constant"]
  assert bad == []
  assert any(a.dtype == jnp.uint8 for a, _ in res)   # the packed codes are what is kept


def _train(tree, fwd, steps=25, lr=3e-2):
  tx = peftjax.optimizer(optax.adam(lr), tree)
  trainable, frozen = peftjax.split(tree)
  opt_state = tx.init(trainable)

  @jax.jit
  def step(trainable, opt_state):
    l, g = jax.value_and_grad(
        lambda t: next_token_loss(fwd(peftjax.combine(t, frozen), TOK), TOK))(trainable)
    updates, opt_state = tx.update(g, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, l

  losses = []
  for _ in range(steps):
    trainable, opt_state, l = step(trainable, opt_state)
    losses.append(float(l))
  return peftjax.combine(trainable, frozen), losses


@pytest.mark.standard_promotion  # steps an optax optimizer (Adam: float ** int32 count)
def test_qlora_training_reduces_loss_like_lora_and_keeps_codes():
  model, params = model_case(scan=True)
  fwd = peftjax.lift(model.apply)
  q_tree = qlora.apply(params, rank=4, block_size=32)
  before = [tuple(np.asarray(l).copy() for l in jax.tree_util.tree_leaves(n)) for n in qnodes(q_tree)]
  q_out, q_losses = _train(q_tree, fwd)
  l_out, l_losses = _train(peftjax.lora.apply(params, rank=4), fwd)
  q_drop, l_drop = q_losses[0] - q_losses[-1], l_losses[0] - l_losses[-1]
  assert q_drop > 0.5 and l_drop > 0.5
  assert abs(q_drop - l_drop) <= 0.1 * l_drop, (q_losses, l_losses)
  after = [tuple(np.asarray(l) for l in jax.tree_util.tree_leaves(n)) for n in qnodes(q_out)]
  assert len(after) == len(before) == 7
  for b, a in zip(before, after):
    for x, y in zip(b, a):
      assert x.dtype == y.dtype
      np.testing.assert_array_equal(x, y)   # packed codes and scales bit-identical
  # and the trained adapters are what merge() folds in
  np.testing.assert_allclose(fwd(q_out, TOK), model.apply(peftjax.merge(q_out), TOK),
                             rtol=1e-5, atol=1e-5)


def test_merge_requantized():
  model, params = model_case()
  tuned = qlora.apply(params, rank=4, block_size=32)
  # zero adapters: re-quantizing the dequantized base gives the same codes back
  same, rep0 = qlora.merge_requantized(tuned)
  for n_old, n_new in zip(qnodes(tuned), qnodes(same)):
    np.testing.assert_array_equal(np.asarray(n_old.codes), np.asarray(n_new.codes))
  assert rep0["rel_error"] < 1e-2 and np.isnan(rep0["delta_rel_error"])
  # a real update
  trained = randomize_b(tuned, scale=0.2)
  new, rep = qlora.merge_requantized(trained)
  assert set(rep) == {"paths", "rel_error", "max_abs_error", "delta_rel_error"}
  assert len(rep["paths"]) == 14
  assert not any(isinstance(x, LoraWeight) for x in jax.tree_util.tree_leaves(
      new, is_leaf=peftjax.is_node))
  assert len(qnodes(new)) == 14
  exact = peftjax.merge(trained)
  for path, r in rep["paths"].items():
    assert set(r) == {"rel_error", "max_abs_error", "delta_norm_rel", "delta_rel_error"}
    assert 0 < r["rel_error"] < 0.15 and r["delta_norm_rel"] > 0
  # the report's overall figure is the measured one
  flat_new = dict(peftjax._src.targeting.leaves_with_paths(new))
  flat_exact = dict(peftjax._src.targeting.leaves_with_paths(exact))
  num = sum(float(jnp.sum((flat_new[p].materialize() - flat_exact[p]) ** 2)) for p in rep["paths"])
  den = sum(float(jnp.sum(flat_exact[p] ** 2)) for p in rep["paths"])
  assert rep["rel_error"] == pytest.approx(np.sqrt(num / den), rel=1e-4)
  # the re-quantized model is as far from the exact merge as the NF4 base was from the f32 base
  f = jax.jit(peftjax.lift(model.apply))
  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  assert rel(f(new, TOK), f(exact, TOK)) < 1.5 * rel(f(tuned, TOK), f(params, TOK))


def test_errors():
  _, params = model_case()
  with pytest.raises(ValueError, match="format='q4' is not one of"):
    qlora.apply(params, format="q4")
  with pytest.raises(ValueError, match="block_size must be positive"):
    qlora.apply(params, block_size=-2)
  with pytest.raises(ValueError, match="rank"):
    qlora.apply(params, rank=0)
  with pytest.raises(ValueError, match="matched no leaf"):
    qlora.apply(params, targets="nope")
  with pytest.raises(ValueError, match="no adapter over a quantized kernel"):
    qlora.merge_requantized(peftjax.lora.apply(params, rank=2))
  with pytest.raises(ValueError, match="no adapter over a quantized kernel"):
    qlora.merge_requantized(quant.quantize(params))
  tuned = qlora.apply(params, rank=2)
  with pytest.raises(TypeError, match="already a LoraWeight"):
    quant.quantize(tuned, targets=".*q_proj/kernel")
