"""peftjax.partial: top-k layers and chosen leaves, per-slice tuning of layer-stacked arrays."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
import peftjax.partial
from peftjax._src.selective import SliceTrainable, Trainable
from peftjax.testing import TinyTransformer, next_token_loss
from _checks import check_lift_vs_merge

TOK = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)


@pytest.fixture(scope="module")
def scanned():
  m = TinyTransformer(scan=True, layers=3)
  return m, jax.jit(m.init)(jax.random.key(0), TOK)


@pytest.fixture(scope="module")
def unrolled():
  """Shapes only (``jax.eval_shape``): enough for selection and counting, no compile."""
  m = TinyTransformer(layers=3)
  return m, jax.eval_shape(m.init, jax.random.key(0), TOK)


def kinds(tree):
  return {p: type(x).__name__ for p, x in peftjax._src.targeting.leaves_with_paths(tree)
          if peftjax.is_node(x)}


def test_layer_groups():
  groups = peftjax.partial.layer_groups
  assert [(g.prefix, g.stacked, g.n_layers) for g in
          groups({"enc": {"layers": {"0": {"w": jnp.ones(2)}, "1": {"w": jnp.ones(2)}}}})] == [
              ("enc/layers/", False, 2)]
  assert [(g.prefix, g.n_layers) for g in groups({"h_0": {"w": jnp.ones(1)}, "h_1": {"w": jnp.ones(1)},
                                                 "Dense_0": {"w": jnp.ones(1)}})] == [("h_", 2)]
  assert groups({"fc1": {"w": jnp.ones(1)}}) == []


def test_top_layers_unrolled(unrolled):
  _, v = unrolled
  tuned = peftjax.partial.apply(v, layers=-1)
  k = kinds(tuned)
  assert k and all(p.startswith("params/layers_2/") and t == "Trainable" for p, t in k.items())
  size = sum(x.size for x in jax.tree.leaves(v["params"]["layers_2"]))
  assert peftjax.summary(tuned).trainable == size
  # int i >= 0 means layers i..L-1; a list picks layers (negative from the top)
  assert {p.split("/")[1] for p in kinds(peftjax.partial.apply(v, layers=1))} == {"layers_1", "layers_2"}
  assert {p.split("/")[1] for p in kinds(peftjax.partial.apply(v, layers=[0, -1]))} == {"layers_0", "layers_2"}
  # layers and targets combine
  k = kinds(peftjax.partial.apply(v, layers=-2, targets=["attn"]))
  assert len(k) == 8 and all("/attn/" in p for p in k)
  # targets alone: any leaf, anywhere
  assert kinds(peftjax.partial.apply(v, targets=["lm_head"])) == {"params/lm_head/kernel": "Trainable"}


def test_scanned_layer_slice_structure(scanned):
  _, v = scanned
  tuned = peftjax.partial.apply(v, layers=[1])
  node = tuned["params"]["layers"]["up_proj"]["kernel"]
  assert isinstance(node, SliceTrainable) and node.index == (1,) and node.value.shape == (1, 32, 64)
  s = peftjax.summary(tuned)
  per_layer = sum(x.size for x in jax.tree.leaves(v["params"]["layers"])) // 3
  assert s.trainable == per_layer
  # every layer chosen: a whole-leaf Trainable
  assert isinstance(peftjax.partial.apply(v, layers=0)["params"]["layers"]["up_proj"]["kernel"],
                    Trainable)
  np.testing.assert_array_equal(peftjax.merge(tuned)["params"]["layers"]["up_proj"]["kernel"],
                                v["params"]["layers"]["up_proj"]["kernel"])


def _perturb(tree):
  """Moves the trainable slices so the model differs from the base."""
  return jax.tree.map(lambda x: x.replace(value=x.value * 1.5 + 0.01)
                      if isinstance(x, (SliceTrainable, Trainable)) else x,
                      tree, is_leaf=peftjax.is_node)


def test_lift_matches_merge_no_jit():
  """Eager (op-by-op) on a small layer-stacked function: scan over [L, d, d] with a slice node."""
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"layers": {"w": jax.random.normal(k1, (3, 8, 8)) / 3, "b": jnp.zeros((3, 8))},
            "head": {"kernel": jax.random.normal(k2, (8, 4))}}

  def fn(p, x):
    h, _ = jax.lax.scan(lambda h, l: (jnp.tanh(h @ l["w"] + l["b"][None]), None), x, p["layers"])
    return h @ p["head"]["kernel"]
  x = jnp.ones((2, 8))
  for tuned in (peftjax.partial.apply(params, layers=[1]),
                peftjax.partial.apply(params, targets=r"head/kernel|layers/b")):
    check_lift_vs_merge(fn, _perturb(tuned), (x,), lambda y: jnp.sum(y ** 2), use_jit=False)


@pytest.mark.standard_promotion  # steps an optax optimizer (Adam: float ** int32 count)
def test_scanned_layer_1_trains_alone_and_lift_matches_merge(scanned):
  """jit: lift == merge (logits and gradients); optax steps change slice 1 only."""
  m, v = scanned
  tuned = _perturb(peftjax.partial.apply(v, layers=[1]))
  lifted = peftjax.lift(m.apply)

  def loss_and_grad(apply):
    f = lambda p: (lambda y: (next_token_loss(y, TOK), y))(apply(p, TOK))
    return jax.jit(jax.value_and_grad(f, has_aux=True))
  lift_vg = loss_and_grad(lifted)
  (l1, y1), g1 = lift_vg(tuned)
  (l2, y2), g2 = loss_and_grad(lambda p, t: m.apply(peftjax.merge(p), t))(tuned)
  assert float(jnp.max(jnp.abs(y2 - m.apply(v, TOK)))) > 1e-3
  np.testing.assert_allclose(y1, y2, atol=1e-5, rtol=1e-5)
  mask = peftjax.trainable_mask(tuned)
  checked = 0
  for mk, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(g1), jax.tree.leaves(g2)):
    if mk:
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
      checked += 1
  assert checked == len(jax.tree.leaves(v["params"]["layers"]))

  tuned = peftjax.partial.apply(v, layers=[1])
  tx = peftjax.optimizer(optax.adamw(1e-2, weight_decay=0.1), tuned)
  state = tx.init(tuned)
  update = jax.jit(tx.update)
  p, losses = tuned, []
  for _ in range(4):
    (loss, _), g = lift_vg(p)
    u, state = update(g, state, p)
    p = optax.apply_updates(p, u)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  before, after = v["params"], peftjax.merge(p)["params"]
  for (path, b), a in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
    b, a = np.asarray(b), np.asarray(a)
    if path[0].key != "layers":
      np.testing.assert_array_equal(a, b)
      continue
    np.testing.assert_array_equal(a[[0, 2]], b[[0, 2]])     # other slices bit-identical
    assert not np.array_equal(a[1], b[1]), jax.tree_util.keystr(path)


# -- bad input -----------------------------------------------------------------------------------

def test_needs_layers_or_targets(unrolled):
  with pytest.raises(ValueError, match="needs `layers`"):
    peftjax.partial.apply(unrolled[1])


@pytest.mark.parametrize("layers,err,msg", [
    (3, ValueError, r"layers=3 is out of range for params/layers_ with 3 layers"),
    (-4, ValueError, r"layers=-4 is out of range"),
    ([5], ValueError, r"layer index 5 is out of range for params/layers_ with 3 layers"),
    ([], ValueError, r"layers=\[\] selects nothing"),
    (True, TypeError, "layers must be an int"),
    ([1.0], TypeError, "layers must contain ints"),
    ("top", TypeError, "layers must be an int"),
])
def test_bad_layers(unrolled, layers, err, msg):
  with pytest.raises(err, match=msg):
    peftjax.partial.apply(unrolled[1], layers=layers)


def test_no_layers_in_tree():
  with pytest.raises(ValueError, match=r"(?s)found no layers.*fc/kernel"):
    peftjax.partial.apply({"fc": {"kernel": jnp.ones((2, 2))}}, layers=-1)


def test_stacked_without_common_axis():
  with pytest.raises(ValueError, match="blocks looks layer-stacked"):
    peftjax.partial.apply({"blocks": {"a": jnp.ones((2, 3)), "b": jnp.ones((4,))}}, layers=-1)


def test_selects_nothing(unrolled):
  with pytest.raises(ValueError, match="selected no leaf"):
    peftjax.partial.apply(unrolled[1], layers=-1, targets=["no_such_module"])


def test_conflict_with_another_method_names_path(unrolled):
  tuned = peftjax.lora.apply(unrolled[1], rank=2, targets=["q_proj"])
  with pytest.raises(ValueError, match=r"partial: params/layers_2/attn/q_proj/kernel is already "
                                       r"rewritten by another method \(LoraWeight"):
    peftjax.partial.apply(tuned, layers=-1)


def test_non_floating_target():
  with pytest.raises(TypeError, match="partial: step is not a floating array"):
    peftjax.partial.apply({"step": jnp.zeros((), jnp.int32), "w": jnp.ones(2)}, targets=["step"])


def test_bad_targets_type(unrolled):
  with pytest.raises(TypeError, match="targets must be"):
    peftjax.partial.apply(unrolled[1], targets=[1, 2])
