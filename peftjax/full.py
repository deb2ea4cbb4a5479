"""Full fine-tuning as a method: every floating leaf trains (the baseline PEFT is measured against).

>>> import jax.numpy as jnp, peftjax
>>> tree = peftjax.full.apply({"d": {"kernel": jnp.ones((4, 4)), "step": jnp.zeros((), jnp.int32)}})
>>> peftjax.summary(tree).trainable
16
"""

from __future__ import annotations

import jax.numpy as jnp

from peftjax import partial as _partial
from peftjax._src import method as method_lib
from peftjax._src import targeting

__all__ = ["apply", "METHOD"]


def _is_float(path: str, leaf) -> bool:
  return targeting.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating)


def apply(params):
  """Marks every floating array leaf of ``params`` trainable (integer leaves stay frozen).

  Raises:
    ValueError: ``params`` has no floating leaf.
  """
  return _partial.apply(params, targets=_is_float)


METHOD = method_lib.Method(
    name="full", apply=apply, description="full fine-tuning (every floating leaf trains)",
    learning_rate=5e-5)
