"""Target selection by key path."""

import jax.numpy as jnp
import pytest
from flax import nnx

from peftjax._src import targeting
from peftjax.testing import TinyNNX

TREE = {
    "params": {
        "embed_tokens": {"embedding": jnp.zeros((10, 4))},
        "MultiHeadDotProductAttention_0": {"query": {"kernel": jnp.zeros((4, 2, 2))}},
        "mlp": {"fc": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}},
        "input_layernorm": {"scale": jnp.ones(4)},
        "norm": {"kernel": jnp.zeros((4, 4))},
        "lm_head": {"kernel": jnp.zeros((4, 10))},
        "classifier": {"kernel": jnp.zeros((4, 2))},
        "int_table": {"kernel": jnp.zeros((4, 4), jnp.int32)},
    }
}


def paths(targets):
  return sorted(p for p, _ in targeting.select(TREE, targets))


def test_default_is_all_linear():
  assert paths(None) == ["params/MultiHeadDotProductAttention_0/query/kernel",
                         "params/mlp/fc/kernel"]


def test_regex_names_and_callable():
  assert paths(r".*/fc/(kernel|bias)") == ["params/mlp/fc/bias", "params/mlp/fc/kernel"]
  assert paths(["query"]) == ["params/MultiHeadDotProductAttention_0/query/kernel"]
  assert paths(lambda p, x: x.ndim == 1) == ["params/input_layernorm/scale", "params/mlp/fc/bias"]


def test_nnx_state_paths_drop_value():
  _, state = nnx.split(TinyNNX(rngs=nnx.Rngs(0)))
  assert paths_of(state) == ["fc1/kernel", "fc2/kernel"]


def paths_of(tree):
  return sorted(p for p, _ in targeting.select(tree, None))


def test_nothing_matched_lists_paths():
  with pytest.raises(ValueError, match=r"(?s)targets='nope' matched no leaf.*params/mlp/fc/kernel"):
    targeting.select(TREE, "nope")


def test_bad_specs():
  with pytest.raises(ValueError, match="not a valid regular expression"):
    targeting.select(TREE, "(")
  with pytest.raises(TypeError, match="targets must be"):
    targeting.select(TREE, 3)
  with pytest.raises(TypeError, match="targets must be"):
    targeting.select(TREE, [1, 2])
