"""split/combine, trainable_mask, optimizer and summary."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
from peftjax.testing import TinyTransformer


@pytest.fixture(scope="module")
def tuned():
  v = TinyTransformer().init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  return peftjax.lora.apply(v, rank=4)


def test_split_combine_exact_inverse(tuned):
  t, f = peftjax.split(tuned)
  back = peftjax.combine(t, f)
  assert jax.tree.structure(back) == jax.tree.structure(tuned)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tuned)):
    assert a is b
  n_train = sum(x.size for x in jax.tree.leaves(t))
  assert n_train == peftjax.summary(tuned).trainable
  assert all(x is None or True for x in jax.tree.leaves(t, is_leaf=lambda x: x is None))


def test_trainable_mask_only_adapters(tuned):
  mask = peftjax.trainable_mask(tuned)
  node = mask["params"]["layers_0"]["attn"]["q_proj"]["kernel"]
  assert (node.w, node.a, node.b) == (False, True, True)
  assert mask["params"]["embed"]["embedding"] is False


def test_combine_mismatched_trees(tuned):
  t, f = peftjax.split(tuned)
  del f["params"]["lm_head"]
  with pytest.raises(ValueError, match=r"(?s)not have the same tree structure.*params/lm_head/kernel"):
    peftjax.combine(t, f)
  with pytest.raises(TypeError):
    peftjax.combine()


def test_combine_node_type_mismatch(tuned):
  t, _ = peftjax.split(tuned)
  with pytest.raises(ValueError, match="node types or metadata differ"):
    peftjax.combine(t, peftjax.lora.apply(peftjax.merge(tuned), rank=2, alpha=3))


@pytest.mark.standard_promotion  # steps an optax optimizer (Adam: float ** int32 count)
def test_optimizer_state_only_for_trainable(tuned):
  tx = peftjax.optimizer(optax.adam(1e-3), tuned)
  state = tx.init(tuned)
  n_state = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
  assert n_state == 2 * peftjax.summary(tuned).trainable  # mu and nu, nothing for frozen leaves
  grads = jax.tree.map(jnp.ones_like, tuned)
  updates, state = tx.update(grads, state, tuned)
  mask = peftjax.trainable_mask(tuned)
  for m, u in zip(jax.tree.leaves(mask), jax.tree.leaves(updates)):
    assert bool(jnp.all(u != 0)) if m else bool(jnp.all(u == 0))
  # state initialized from the trainable half works the same
  t, _ = peftjax.split(tuned)
  state2 = tx.init(t)
  g_t, _ = peftjax.split(grads)
  u2, _ = tx.update(g_t, state2, t)
  for a, b in zip(jax.tree.leaves(peftjax.split(updates)[0]), jax.tree.leaves(u2)):
    np.testing.assert_array_equal(a, b)


def test_optimizer_rejects_other_tree(tuned):
  tx = peftjax.optimizer(optax.sgd(1e-3), tuned)
  with pytest.raises(ValueError, match="same tree structure"):
    tx.init(peftjax.merge(tuned))


def test_optax_masked_alone_does_not_freeze(tuned):
  """The reason peftjax.optimizer exists: optax.masked passes raw gradients through."""
  tx = optax.masked(optax.sgd(1.0), peftjax.trainable_mask(tuned))
  grads = jax.tree.map(jnp.ones_like, tuned)
  u, _ = tx.update(grads, tx.init(tuned), tuned)
  assert bool(jnp.all(u["params"]["embed"]["embedding"] == 1))


def test_summary_table(tuned):
  s = peftjax.summary(tuned)
  text = str(s)
  assert "params/layers_0/attn/q_proj/kernel" in text and "LoraWeight" in text
  assert f"trainable params: {s.trainable:,}" in text
  assert 0 < s.fraction < 0.5
  assert s.trainable_bytes == 4 * s.trainable
