"""peftjax.compose: several methods on one tree; optimizer, summary and merge cover them."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
import peftjax.bitfit
import peftjax.partial
from peftjax._src.selective import SliceTrainable, Trainable
from peftjax._src.targeting import leaves_with_paths
from peftjax.compose import compose, to_config
from peftjax.lora import LoraWeight
from peftjax.testing import TinyTransformer, next_token_loss

TOK = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
SPEC = [("lora", {"rank": 2, "targets": ["q_proj", "v_proj"], "key": 3}),
        ("bitfit", {}),
        ("partial", {"targets": ["lm_head"]})]


@pytest.fixture(scope="module")
def model():
  m = TinyTransformer()
  return m, jax.jit(m.init)(jax.random.key(0), TOK)


def kinds(tree):
  return {p: type(x).__name__ for p, x in leaves_with_paths(tree) if peftjax.is_node(x)}


def assert_same(a, b):
  assert jax.tree.structure(a, is_leaf=peftjax.is_node) == jax.tree.structure(b, is_leaf=peftjax.is_node)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_lora_bitfit_partial_in_one_tree(model):
  m, v = model
  tuned = compose(v, SPEC)
  k = kinds(tuned)
  assert sorted(set(k.values())) == ["LoraWeight", "Trainable"]
  assert sum(t == "LoraWeight" for t in k.values()) == 4          # q, v in 2 layers
  assert k["params/layers_0/up_proj/bias"] == "Trainable" and k["params/lm_head/kernel"] == "Trainable"
  # The trainable count is the sum of the parts.
  parts = [peftjax.summary(peftjax.lora.apply(v, rank=2, targets=["q_proj", "v_proj"])).trainable,
           peftjax.summary(peftjax.bitfit.apply(v)).trainable,
           peftjax.summary(peftjax.partial.apply(v, targets=["lm_head"])).trainable]
  s = peftjax.summary(tuned)
  assert s.trainable == sum(parts) == 4 * 2 * (32 + 32) + 2 * 64 + 32 * 64
  assert {r[1] for r in s.rows} >= {"LoraWeight", "Trainable", "float32"}
  # Chaining apply calls gives the same tree.
  chained = peftjax.partial.apply(
      peftjax.bitfit.apply(peftjax.lora.apply(v, rank=2, targets=["q_proj", "v_proj"],
                                              key=jax.random.key(3))), targets=["lm_head"])
  assert_same(tuned, chained)
  # The mask marks exactly LoRA's a/b and the Trainable values.
  mask = peftjax.trainable_mask(tuned)
  n = sum(int(np.prod(x.shape)) for mk, x in zip(jax.tree.leaves(mask), jax.tree.leaves(tuned)) if mk)
  assert n == s.trainable


def test_config_round_trips_through_json(model):
  _, v = model
  cfg = to_config(SPEC)
  text = json.dumps(cfg)
  assert json.loads(text) == cfg and cfg["version"] == 1
  assert_same(compose(v, json.loads(text)), compose(v, SPEC))
  # dict items and bare names are accepted too
  assert_same(compose(v, [{"method": "bitfit"}]), compose(v, ["bitfit"]))


@pytest.mark.parametrize("use_jit", [False, True])
def test_lift_matches_merge_and_training_freezes_the_rest(model, use_jit):
  m, v = model
  tuned = compose(v, SPEC)
  tuned = jax.tree.map(lambda x: x.replace(b=jnp.full_like(x.b, 0.05)) if isinstance(x, LoraWeight)
                       else Trainable(x.value * 1.1) if isinstance(x, Trainable) else x,
                       tuned, is_leaf=peftjax.is_node)
  if not use_jit:   # eager: forward only (the jit case checks gradients and training)
    np.testing.assert_allclose(peftjax.lift(m.apply)(tuned, TOK), m.apply(peftjax.merge(tuned), TOK),
                               atol=1e-5, rtol=1e-5)
    return
  lifted = peftjax.lift(m.apply)
  vg = lambda f: jax.jit(jax.value_and_grad(lambda p: (lambda y: (next_token_loss(y, TOK), y))(
      f(p, TOK)), has_aux=True))
  lift_vg = vg(lifted)
  (l1, y1), g1 = lift_vg(tuned)
  (l2, y2), g2 = vg(lambda p, t: m.apply(peftjax.merge(p), t))(tuned)
  np.testing.assert_allclose(y1, y2, atol=1e-5, rtol=1e-5)
  mask = peftjax.trainable_mask(tuned)
  for mk, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(g1), jax.tree.leaves(g2)):
    if mk:
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
  # optax through peftjax.optimizer: every non-trainable leaf stays bit-identical
  tx = peftjax.optimizer(optax.adam(1e-2), tuned)
  state = tx.init(tuned)
  update = jax.jit(tx.update)
  p = tuned
  losses = []
  for _ in range(4):
    (loss, _), g = lift_vg(p)
    losses.append(float(loss))
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
  for mk, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(tuned), jax.tree.leaves(p)):
    if not mk:
      np.testing.assert_array_equal(a, b)
  assert losses[-1] < losses[0]


def test_scanned_model_with_layer_slices():
  """LoRA on attention + layer 1 of the MLP fully + BitFit, on layer-stacked parameters."""
  m = TinyTransformer(scan=True, layers=3)
  v = jax.jit(m.init)(jax.random.key(0), TOK)
  tuned = compose(v, [("lora", {"rank": 2, "targets": ["q_proj"]}),
                      ("partial", {"layers": [1], "targets": r".*/(gate|down)_proj/kernel"}),
                      ("bitfit", {})])
  k = kinds(tuned)
  assert k["params/layers/gate_proj/kernel"] == "SliceTrainable"
  assert k["params/layers/up_proj/bias"] == "Trainable"
  tuned = jax.tree.map(lambda x: x.replace(value=x.value * 1.2) if isinstance(x, SliceTrainable)
                       else x, tuned, is_leaf=peftjax.is_node)
  np.testing.assert_allclose(jax.jit(peftjax.lift(m.apply))(tuned, TOK),
                             m.apply(peftjax.merge(tuned), TOK), atol=1e-5, rtol=1e-5)


def test_marks_on_one_leaf_combine_by_union(model):
  _, v = model
  # BitFit, then "the top layer fully": the top layer's bias is trained once, not twice.
  tuned = compose(v, [("bitfit", {}), ("partial", {"layers": -1})])
  top = sum(x.size for x in jax.tree.leaves(v["params"]["layers_1"]))
  assert peftjax.summary(tuned).trainable == top + 64
  # Two layer-slice marks on one stacked leaf: the union of the slices.
  stacked = {"layers": {"w": jnp.arange(12.0).reshape(3, 4)}}
  t = compose(stacked, [("partial", {"layers": [0]}), ("partial", {"layers": [2]})])
  node = t["layers"]["w"]
  assert isinstance(node, SliceTrainable) and node.index == (0, 2)
  np.testing.assert_array_equal(node.value, stacked["layers"]["w"][np.array([0, 2])])


def test_wrapper_methods_add_entries(model):
  pytest.importorskip("peftjax.prompt")
  _, v = model
  out = compose(v["params"], [("lora", {"rank": 2, "targets": ["q_proj"]}),
                              ("prompt", {"n_tokens": 3})])
  assert isinstance(out, peftjax.Tuned) and set(out.slots()) == {"prompt"}
  assert kinds(out.params)["layers_0/attn/q_proj/kernel"] == "LoraWeight"


# -- bad input -----------------------------------------------------------------------------------

def test_conflicting_methods_on_one_leaf_name_both(model):
  _, v = model
  with pytest.raises(ValueError, match=r"compose: params/layers_0/attn/q_proj/kernel is rewritten "
                                       r"by both lora \(LoraWeight\[32, 32\]\) and diff_pruning "
                                       r"\(DiffPruningWeight\[32, 32\]\); two methods on one leaf "
                                       r"have no defined order"):
    compose(v, [("lora", {"rank": 2, "targets": ["q_proj"]}),
                ("diff_pruning", {"targets": r".*q_proj/kernel"})])
  with pytest.raises(ValueError, match=r"lm_head/kernel is rewritten by both partial .* and lora"):
    compose(v, [("partial", {"targets": ["lm_head"]}),
                ("lora", {"rank": 2, "targets": r".*lm_head/kernel"})])
  pre = peftjax.lora.apply(v, rank=2, targets=["q_proj"])
  with pytest.raises(ValueError, match="rewritten by both a method applied before compose"):
    compose(pre, [("lora", {"rank": 2, "targets": ["q_proj"]})])


@pytest.mark.parametrize("spec,err,msg", [
    ([("no_such_method", {})], ValueError, "unknown method 'no_such_method'; known methods: lora"),
    (["lora.x"], ValueError, "unknown method .lora.x.; known methods: lora, qlora"),
    ([(3, {})], TypeError, "a method is a name"),
    ([], ValueError, "spec lists no method"),
    ("lora", TypeError, "spec must be a list"),
    ({"methods": ["bitfit"], "version": 2}, ValueError, "config version 2 is not supported"),
    ({"steps": []}, ValueError, "a config dict needs a 'methods' list"),
    ({"methods": ["bitfit"], "extra": 1}, ValueError, r"unknown config keys \['extra'\]"),
    ([{"rank": 2}], ValueError, "has no 'method' key"),
    ([("lora", 2)], TypeError, r"spec item 0 must be a method name"),
])
def test_bad_spec(model, spec, err, msg):
  with pytest.raises(err, match=msg):
    compose(model[1], spec)


def test_two_methods_adding_the_same_entry(model):
  pytest.importorskip("peftjax.prompt")
  with pytest.raises(ValueError, match="compose: prompt and prompt both add a 'prompt' to the tree"):
    compose(model[1]["params"], [("prompt", {"n_tokens": 2}), ("prompt", {"n_tokens": 3})])


def test_method_that_changes_structure(model):
  with pytest.raises(ValueError, match="changed the tree's structure"):
    compose(model[1], [lambda p: {**p, "extra": jnp.ones(2)}])


def test_to_config_rejects_what_json_cannot_hold():
  with pytest.raises(TypeError, match=r"(?s)to_config: lora.key=.* cannot be stored in JSON \(give "
                                      r"PRNG keys as an int seed"):
    to_config([("lora", {"key": jax.random.key(0)})])
  with pytest.raises(TypeError, match="to_config: lora.targets=.* cannot be stored in JSON"):
    to_config([("lora", {"targets": lambda p, x: True})])
  with pytest.raises(TypeError, match="only named methods"):
    to_config([lambda p: p])
