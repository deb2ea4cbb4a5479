"""peftjax.auto: importance-based selection under a budget and AdaLoRA-style rank allocation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
import peftjax.auto as auto
from peftjax._src.selective import SliceTrainable, SparseDelta, Trainable
from peftjax.lora import LoraWeight

RNG = np.random.default_rng(0)
D, H, C = 32, 64, 8


def arr(*shape, scale=1.0):
  return jnp.asarray(scale * RNG.normal(size=shape), jnp.float32)


def test_importance_fisher_and_grad_weight():
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5), "step": jnp.array(3)}
  loss = lambda p, x: jnp.sum(p["w"] * x) + p["b"] * x[0]
  batches = [jnp.array([1.0, 0.0]), jnp.array([3.0, 2.0])]
  s = auto.importance(loss, params, batches)
  np.testing.assert_allclose(s["w"], [(1 + 9) / 2, (0 + 4) / 2])     # mean g^2
  np.testing.assert_allclose(s["b"], (1 + 9) / 2)
  assert s["step"] is None                                           # ints are not candidates
  s = auto.importance(loss, params, iter(batches), kind="grad_weight", targets=["w"])
  np.testing.assert_allclose(s["w"], [2.0, 2.0])                     # |w * mean g|
  assert s["b"] is None


def test_select_units_budget_and_identity():
  params = {"k": arr(4, 6), "b": arr(6), "e": arr(3, 2, 5)}
  scores = jax.tree.map(lambda x: jnp.abs(x), params)
  t = auto.select(params, scores, budget=17)
  assert peftjax.summary(t).trainable == 17
  nodes = [x for x in jax.tree.leaves(t, is_leaf=peftjax.is_node) if peftjax.is_node(x)]
  assert nodes and all(isinstance(x, SparseDelta) for x in nodes)
  flat = np.concatenate([np.abs(np.asarray(params[k])).ravel() for k in ("b", "e", "k")])
  chosen = np.concatenate([np.abs(np.asarray(params[k])).ravel()[np.asarray(t[k].indices)]
                           for k in ("b", "e", "k") if k in t and isinstance(t[k], SparseDelta)])
  assert chosen.min() >= np.sort(flat)[-17]                      # the 17 largest scores
  rows = auto.select(params, scores, budget=17, unit="row")
  s = peftjax.summary(rows)
  assert 17 - 6 < s.trainable <= 17
  assert any(isinstance(x, SliceTrainable) for x in jax.tree.leaves(rows, is_leaf=peftjax.is_node))
  leaves = auto.select(params, scores, budget=30, unit="leaf")
  assert all(isinstance(x, Trainable) for x in jax.tree.leaves(leaves, is_leaf=peftjax.is_node)
             if peftjax.is_node(x))
  assert peftjax.summary(leaves).trainable in (6, 24, 30)
  for t in (t, rows, leaves):
    for a, b in zip(jax.tree.leaves(peftjax.merge(t)), jax.tree.leaves(params)):
      np.testing.assert_array_equal(a, b)


def test_random_scores_deterministic_and_path_keyed():
  params = {"a": jnp.zeros((4, 4)), "b": jnp.zeros(8)}
  s1 = auto.random_scores(params, jax.random.key(1))
  s2 = auto.random_scores({"b": jnp.zeros(8)}, jax.random.key(1))
  np.testing.assert_array_equal(s1["b"], s2["b"])
  t1 = auto.select(params, s1, 5)
  t2 = auto.select(params, auto.random_scores(params, jax.random.key(1)), 5)
  t3 = auto.select(params, auto.random_scores(params, jax.random.key(2)), 5)
  idx = lambda t: [np.asarray(x.indices).tolist() for x in jax.tree.leaves(t, is_leaf=peftjax.is_node)
                   if isinstance(x, SparseDelta)]
  assert idx(t1) == idx(t2) != idx(t3)


def test_row_nodes_lift_matches_merge():
  params = {"emb": arr(10, 4), "stack": arr(3, 4, 4, scale=0.5)}
  scores = {"emb": jnp.zeros((10, 4)).at[3].set(1.0).at[7].set(2.0),
            "stack": jnp.zeros((3, 4, 4)).at[1, 2].set(3.0)}
  t = auto.select(params, scores, budget=12, unit="row")
  assert t["emb"].index == (3, 7) and t["stack"].index == (6,) and t["stack"].n_lead == 2
  t = jax.tree.map(lambda x: x.replace(value=x.value + 1.0) if isinstance(x, SliceTrainable) else x,
                   t, is_leaf=peftjax.is_node)
  fn = lambda p, tok: jnp.einsum("bd,lde->lbe", p["emb"][tok], p["stack"])
  tok = jnp.array([3, 7, 1])
  for use_jit in (False, True):
    lifted = jax.jit(peftjax.lift(fn)) if use_jit else peftjax.lift(fn)
    np.testing.assert_allclose(lifted(t, tok), fn(peftjax.merge(t), tok), atol=1e-5)
    tr, fr = peftjax.split(t)
    g1 = jax.grad(lambda a: jnp.sum(jnp.sin(lifted(peftjax.combine(a, fr), tok))))(tr)
    g2 = jax.grad(lambda a: jnp.sum(jnp.sin(fn(peftjax.merge(peftjax.combine(a, fr)), tok))))(tr)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
      np.testing.assert_allclose(a, b, atol=1e-5)


# -- automatic selection beats random selection of the same budget -------------------------------

def mlp_init(key):
  ks = jax.random.split(key, 3)
  dense = lambda k, i, o, s: {"kernel": s * jax.random.normal(k, (i, o)) / np.sqrt(i),
                              "bias": jnp.zeros(o)}
  return {"fc1": dense(ks[0], D, H, 1.5), "fc2": dense(ks[1], H, H, 1.5),
          "out": dense(ks[2], H, C, 4.0)}


def mlp(p, x):
  h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  h = jnp.tanh(h @ p["fc2"]["kernel"] + p["fc2"]["bias"])
  return h @ p["out"]["kernel"] + p["out"]["bias"]


def xent(logits, y):
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


PERM = np.concatenate([np.roll(np.arange(4), 1), np.arange(4, D)])  # 4 input features remapped


@jax.jit
def task_data(teacher, key):
  """The new task: the pretrained teacher's labels for inputs with 4 features remapped."""
  x = jax.random.normal(key, (64, D))
  return x, jnp.argmax(mlp(teacher, x[:, PERM]), -1)


def task_loss(p, b):
  return xent(mlp(p, b[0]), b[1])


def finetune(budget, unit, seed, steps=100):
  """Fine-tunes the pretrained MLP (the teacher) on the shifted task, auto vs random selection."""
  kt, kd, kr = jax.random.split(jax.random.key(seed), 3)
  teacher = jax.jit(mlp_init)(kt)
  batches = [task_data(teacher, jax.random.fold_in(kd, i)) for i in range(steps)]
  test = jax.tree.map(lambda *a: jnp.concatenate(a),
                      *[task_data(teacher, jax.random.fold_in(kd, 10**6 + j)) for j in range(32)])
  out = {}
  for name, scores in (("auto", auto.importance(task_loss, teacher, batches[:4])),
                       ("random", auto.random_scores(teacher, kr))):
    tuned = auto.select(teacher, scores, budget, unit=unit)
    lifted = peftjax.lift(mlp)
    tx = peftjax.optimizer(optax.adam(2e-2), tuned)
    tr, fr = peftjax.split(tuned)
    state = jax.jit(tx.init)(tr)

    @jax.jit
    def step(tr, state, b):
      g = jax.grad(lambda t: xent(lifted(peftjax.combine(t, fr), b[0]), b[1]))(tr)
      u, state = tx.update(g, state, tr)
      return optax.apply_updates(tr, u), state

    for b in batches:
      tr, state = step(tr, state, b)
    logits = jax.jit(lifted)(peftjax.combine(tr, fr), test[0])
    out[name] = (float(xent(logits, test[1])), float((logits.argmax(-1) == test[1]).mean()),
                 peftjax.summary(tuned).trainable)
  base = mlp(teacher, test[0])
  out["base"] = (float(xent(base, test[1])), float((base.argmax(-1) == test[1]).mean()))
  return out


@pytest.mark.newest_only
@pytest.mark.parametrize("unit", ["element"])  # rows and leaves: experiments/auto_select.py
def test_auto_beats_random_selection_of_equal_budget(unit):
  runs = [finetune(256, unit, seed) for seed in range(3)]
  mean = lambda name, i: float(np.mean([r[name][i] for r in runs]))
  print(f"\nauto selection ({unit}, budget 256 of 6,922, 3 seeds): held-out accuracy auto "
        f"{mean('auto', 1):.3f} vs random {mean('random', 1):.3f} (base {mean('base', 1):.3f}); "
        f"loss auto {mean('auto', 0):.3f} vs random {mean('random', 0):.3f}")
  for r in runs:
    if unit == "element":
      assert r["auto"][2] == r["random"][2] == 256
    else:
      assert 256 - H < r["auto"][2] <= 256 and 256 - H < r["random"][2] <= 256
    assert r["auto"][0] < r["random"][0]
  assert mean("auto", 1) > mean("random", 1) + 0.03
  assert mean("auto", 0) < mean("random", 0) - 0.1


# -- rank allocation -----------------------------------------------------------------------------

def lora_tree():
  params = {"q": {"kernel": arr(12, 10)}, "v": {"kernel": arr(12, 10)},
            "layers": {"up": {"kernel": arr(2, 12, 16)}}}
  t = peftjax.lora.apply(params, rank=6, alpha=12, targets=r".*kernel", key=jax.random.key(0))
  # updates of different strength per module (as after a little training)
  scales = {"q": 1.0, "v": 0.05, "layers": 0.3}
  return {k: jax.tree.map(lambda x: x.replace(b=arr(*x.b.shape, scale=scales[k]))
                          if isinstance(x, LoraWeight) else x, v, is_leaf=peftjax.is_node)
          for k, v in t.items()}


def test_allocate_ranks_meets_budget_exactly_and_keeps_top_directions():
  t = lora_tree()
  assert auto.ranks(t) == {"layers/up/kernel": 6, "q/kernel": 6, "v/kernel": 6}
  out = auto.allocate_ranks(t, budget=8)
  r = auto.ranks(out)
  assert sum(r.values()) == 8 and r["q/kernel"] > r.get("v/kernel", 0)
  for p, node in (("q", out["q"]["kernel"]), ("v", out["v"]["kernel"])):
    if not isinstance(node, LoraWeight):
      continue
    old = t[p]["kernel"]
    u, s, vt = np.linalg.svd(np.asarray(old.delta(), np.float64))
    k = node.rank
    best = (u[:, :k] * s[:k]) @ vt[:k]                     # best rank-k approximation
    np.testing.assert_allclose(np.asarray(node.delta()), best, atol=1e-4)
    assert node.scale == old.scale
  # the stacked node keeps one rank for its layers; per layer it is the top directions
  up = out["layers"]["up"]["kernel"]
  assert up.a.shape[0] == 2 and up.a.shape[-1] == r["layers/up/kernel"]
  # parameter budget: greedy, never above
  out = auto.allocate_ranks(t, budget=300, unit="params")
  cost = sum(x.a.size + x.b.size for x in jax.tree.leaves(out, is_leaf=peftjax.is_node)
             if isinstance(x, LoraWeight))
  assert 300 - 22 < cost <= 300                            # within one direction of the budget
  # all budget on q: the other modules drop their adapters (plain frozen kernels again)
  small = auto.allocate_ranks(t, budget=1)
  assert auto.ranks(small) == {"q/kernel": 1}
  np.testing.assert_array_equal(small["v"]["kernel"], t["v"]["kernel"].w)


def test_allocated_tree_lift_matches_merge():
  out = auto.allocate_ranks(lora_tree(), budget=7)
  fn = lambda p, x: jnp.tanh(x @ p["q"]["kernel"]) + x @ p["v"]["kernel"] + \
      jnp.einsum("bi,lio->lbo", x, p["layers"]["up"]["kernel"])[..., :10].sum(0)
  x = arr(3, 12)
  for use_jit in (False, True):
    lifted = jax.jit(peftjax.lift(fn)) if use_jit else peftjax.lift(fn)
    np.testing.assert_allclose(lifted(out, x), fn(peftjax.merge(out), x), atol=1e-4)
    tr, fr = peftjax.split(out)
    g1 = jax.grad(lambda a: jnp.sum(lifted(peftjax.combine(a, fr), x) ** 2))(tr)
    g2 = jax.grad(lambda a: jnp.sum(fn(peftjax.merge(peftjax.combine(a, fr)), x) ** 2))(tr)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
      np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-4)


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("budget,msg", [(0, "budget must be a positive integer"),
                                        (-3, "budget must be a positive integer"),
                                        (2.5, "budget must be a positive integer"),
                                        (True, "budget must be a positive integer"),
                                        (11, "budget=11 is larger than the 10 candidate "
                                             "parameters available")])
def test_bad_select_budget(budget, msg):
  params = {"a": jnp.zeros(10)}
  with pytest.raises(ValueError, match=msg):
    auto.select(params, {"a": jnp.ones(10)}, budget)


@pytest.mark.parametrize("budget,msg", [(0, "budget must be a positive integer"),
                                        (19, "budget=19 is larger than the 18 LoRA ranks")])
def test_bad_rank_budget(budget, msg):
  with pytest.raises(ValueError, match=msg):
    auto.allocate_ranks(lora_tree(), budget)


def test_select_bad_inputs():
  params = {"a": jnp.zeros(10), "i": jnp.zeros(3, jnp.int32)}
  with pytest.raises(ValueError, match="unit must be one of"):
    auto.select(params, {"a": jnp.ones(10), "i": None}, 3, unit="block")
  with pytest.raises(ValueError, match=r"scores at a have shape \[5\], but the leaf is \[10\]"):
    auto.select(params, {"a": jnp.ones(5), "i": None}, 3)
  with pytest.raises(ValueError, match="scores has no scored leaf"):
    auto.select(params, {"a": None, "i": None}, 3)
  with pytest.raises(ValueError, match="scores has a leaf at zzz"):
    auto.select(params, {"a": jnp.ones(10), "zzz": jnp.ones(1)}, 3)
  with pytest.raises(TypeError, match=r"auto.select: i is not a floating array"):
    auto.select(params, {"a": None, "i": jnp.ones(3)}, 2)
  tuned = peftjax.lora.apply({"k": {"kernel": jnp.ones((4, 4))}}, rank=1)
  with pytest.raises(ValueError, match=r"auto.select: k/kernel is already rewritten"):
    auto.select(tuned, {"k": {"kernel": jnp.ones((4, 4))}}, 2)


def test_importance_bad_inputs():
  loss = lambda p, b: jnp.sum(p["w"])
  with pytest.raises(ValueError, match="kind must be one of"):
    auto.importance(loss, {"w": jnp.ones(2)}, [0], kind="hessian")
  with pytest.raises(ValueError, match="at least one batch"):
    auto.importance(loss, {"w": jnp.ones(2)}, [])
  with pytest.raises(ValueError, match=r"(?s)targets='x' matched no plain floating leaf.*w"):
    auto.importance(loss, {"w": jnp.ones(2)}, [0], targets="x")
  with pytest.raises(TypeError, match="key must be a PRNG key"):
    auto.random_scores({"w": jnp.ones(2)}, 0)


def test_allocate_ranks_bad_inputs():
  with pytest.raises(ValueError, match="found no LoraWeight node"):
    auto.allocate_ranks({"w": jnp.ones((2, 2))}, 1)
  with pytest.raises(ValueError, match="unit must be 'rank' or 'params'"):
    auto.allocate_ranks(lora_tree(), 1, unit="flops")
