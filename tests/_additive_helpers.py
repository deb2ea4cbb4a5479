"""Helpers shared by the additive-method tests (adapters, IA3, prompt, prefix)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


def random_params(model, seed, ids):
  """Random parameters without compiling ``model.init``: shapes from ``eval_shape``, values from
  NumPy (norm scales near 1, everything else N(0, 0.08^2))."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]
  r = np.random.RandomState(seed)

  def fill(path, s):
    near_one = jax.tree_util.keystr(path).endswith("['scale']")
    return jnp.asarray((1.0 if near_one else 0.0) + 0.08 * r.randn(*s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def jitted_update(tx):
  """One jitted optimizer step ``(grads, state, trainable) -> (trainable, state)``."""
  @jax.jit
  def update(g, state, t):
    u, state = tx.update(g, state, t)
    return optax.apply_updates(t, u), state
  return update


_JITTED = {}


def jitted(fn, *key):
  """``jax.jit(fn)`` made once per key (so tests share compiled programs)."""
  if key not in _JITTED:
    _JITTED[key] = jax.jit(fn)
  return _JITTED[key]
