"""peftjax/_src/jax_compat.py: each JAX difference read from what it is given, on this JAX."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from peftjax._src import jax_compat


def _scan_eqn():
  def f(a, b, c, d, xs):
    body = lambda carry, x: ((carry[0] + x.sum() * a, carry[1] * b), carry[0])
    return lax.scan(body, (c, d), xs)
  jaxpr = jax.make_jaxpr(f)(1.0, 2.0, 1.0, 1.0, jnp.ones((3, 2)))
  return next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan")


def test_scan_counts_of_this_jax():
  eqn = _scan_eqn()
  assert jax_compat.scan_counts(eqn.params) == (2, 2)
  assert len(eqn.invars) == 5


def test_scan_counts_of_the_older_form_and_an_unknown_one():
  assert jax_compat.scan_counts({"num_consts": 3, "num_carry": 1, "jaxpr": None}) == (3, 1)
  with pytest.raises(NotImplementedError, match=r"does not know this JAX's scan parameters "
                                                r"\(\['jaxpr', 'length'\]\)"):
    jax_compat.scan_counts({"jaxpr": None, "length": 3})
