"""Checks shared by the method tests."""

import jax
import jax.numpy as jnp
import numpy as np

import peftjax


def check_lift_vs_merge(fn, tuned, args, loss, use_jit):
  """lift(fn)(tuned) == fn(merge(tuned)): outputs and gradients of the trainable part."""
  tr, fr = peftjax.split(tuned)

  def value_and_grad(apply):
    f = lambda t: (lambda y: (loss(y), y))(apply(peftjax.combine(t, fr), *args))
    vg = jax.value_and_grad(f, has_aux=True)
    return jax.jit(vg) if use_jit else vg
  (_, y1), g1 = value_and_grad(peftjax.lift(fn))(tr)
  (_, y2), g2 = value_and_grad(lambda p, *a: fn(peftjax.merge(p), *a))(tr)
  np.testing.assert_allclose(y1, y2, atol=1e-5, rtol=1e-5)
  leaves = jax.tree.leaves(g2)
  assert leaves and all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
  for a, b in zip(jax.tree.leaves(g1), leaves):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  return g1
