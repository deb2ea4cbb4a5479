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


def test_default_leaves_out_a_top_level_output_layer_but_not_attention_out():
  import peftjax
  params = {"params": {"blk": {"attn": {"out": {"kernel": jnp.ones((16, 16))}},
                               "mlp": {"kernel": jnp.ones((16, 16))}},
                       "out": {"kernel": jnp.ones((16, 2))}}}
  tuned = peftjax.lora.apply(params, rank=8)  # rank 8 > out/kernel's 2 outputs: not a target
  p = tuned["params"]
  assert not peftjax.is_node(p["out"]["kernel"])
  assert peftjax.is_node(p["blk"]["attn"]["out"]["kernel"])
  assert peftjax.is_node(p["blk"]["mlp"]["kernel"])


def test_plain_dict_default_error_teaches_targets_and_names_match_leaves():
  import peftjax
  params = {"w1": jnp.ones((4, 4)), "w2": jnp.ones((4, 4)), "b": jnp.ones(4)}
  with pytest.raises(ValueError, match=r"(?s)targets=None matched no leaf.*pass targets=: a regex"
                                       r".*a list of names.*the leaf's own name, e.g. "
                                       r"targets=\['w1', 'w2'\].*w1: float32\[4, 4\]"):
    peftjax.lora.apply(params, rank=2)
  tuned = peftjax.lora.apply(params, rank=2, targets=["w1", "w2", "b"])
  assert peftjax.is_node(tuned["w1"]) and peftjax.is_node(tuned["w2"])
  assert not peftjax.is_node(tuned["b"])  # a 1-D leaf is not a kernel, whatever its name
  # module names still take that module's kernel only
  tree = {"q": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4), "extra": jnp.ones((4, 4))}}
  chosen = [p for p, _ in targeting.select(tree, ["q"])]
  assert chosen == ["q/kernel"]
