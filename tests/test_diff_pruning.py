"""peftjax.diff_pruning: hard-concrete gates reach the target density; projection to exactly k."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import peftjax
import peftjax.diff_pruning as dp
from peftjax._src import selective
from peftjax._src.selective import DiffPruningWeight, SparseDelta
from _checks import check_lift_vs_merge

D, H, C = 32, 64, 8


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


def stacked_fn(p, x):
  """A layer-stacked model: scan over [L, d, d] kernels, then a head."""
  h, _ = lax.scan(lambda h, l: (jnp.tanh(h @ l["kernel"] + l["bias"][None]), None), x, p["layers"])
  return h @ p["head"]["kernel"]


LOSS = lambda y: jnp.sum(jnp.sin(y))
RNG = np.random.default_rng(0)  # numpy: test data without compiling PRNG kernels


def stacked_params():
  return {"layers": {"kernel": jnp.asarray(RNG.normal(size=(3, 8, 8)) / 3, jnp.float32),
                     "bias": jnp.zeros((3, 8))},
          "head": {"kernel": jnp.asarray(RNG.normal(size=(8, 4)), jnp.float32)}}


def randomize(tree):
  def f(x):
    if isinstance(x, DiffPruningWeight):
      return x.replace(delta=jnp.asarray(0.3 * RNG.normal(size=x.shape), x.delta.dtype),
                       log_alpha=jnp.asarray(2.0 * RNG.normal(size=x.shape), jnp.float32))
    return x
  return jax.tree.map(f, tree, is_leaf=peftjax.is_node)


def test_apply_structure_and_identity_at_init():
  p = stacked_params()
  tuned = dp.apply(p, targets=r".*kernel")
  node = tuned["layers"]["kernel"]
  assert isinstance(node, DiffPruningWeight) and node.n_batch == 1
  assert tuned["head"]["kernel"].n_batch == 0
  assert peftjax.summary(tuned).trainable == 2 * (3 * 64 + 32)
  for a, b in zip(jax.tree.leaves(peftjax.merge(tuned)), jax.tree.leaves(p)):
    np.testing.assert_array_equal(a, b)
  keyed = dp.set_key(tuned, jax.random.key(0))
  assert keyed["layers"]["kernel"].key.shape == (3, 2) and keyed["head"]["kernel"].key.shape == (2,)
  assert dp.set_key(keyed, None)["layers"]["kernel"].key is None
  assert not any(jax.tree.leaves(peftjax.trainable_mask(keyed)["layers"]["kernel"].key))


def test_dense_form_lift_matches_merge_in_scan_jit():
  """Training form (stochastic gates, per-layer keys) inside lax.scan: scanned like any xs."""
  tuned = randomize(dp.apply(stacked_params(), targets=r".*"))
  x = jnp.ones((2, 8))
  keyed = dp.set_key(tuned, jax.random.key(3))
  check_lift_vs_merge(stacked_fn, keyed, (x,), LOSS, use_jit=True)        # stochastic gates
  y0, y1 = (peftjax.merge(t)["layers"]["kernel"] for t in (tuned, keyed))
  assert float(jnp.max(jnp.abs(y0 - y1))) > 1e-4                           # the noise is used


def test_dense_form_lift_matches_merge_no_jit():
  params = {"w": jnp.asarray(RNG.normal(size=(6, 5)), jnp.float32)}
  fn = lambda p, x: jnp.tanh(x @ p["w"])
  tuned = randomize(dp.apply(params, targets="w"))
  x = jnp.ones((2, 6))
  check_lift_vs_merge(fn, dp.set_key(tuned, jax.random.key(1)), (x,), LOSS, use_jit=False)
  check_lift_vs_merge(fn, tuned, (x,), LOSS, use_jit=False)


@pytest.mark.standard_promotion  # steps an optax optimizer (Adam: float ** int32 count)
def test_reaches_target_density_then_projects_to_exactly_k():
  kt, kd = jax.random.split(jax.random.key(0))
  teacher = jax.jit(mlp_init)(kt)
  perm = np.arange(D)
  perm[:4] = np.roll(perm[:4], 1)  # the new task: four input features remapped

  @jax.jit
  def data(key):
    x = jax.random.normal(key, (64, D))
    return x, jnp.argmax(mlp(teacher, x[:, perm]), -1)

  target = 0.05
  tuned = dp.apply(teacher, targets=r".*kernel")
  n = sum(x.size for x in jax.tree.leaves(teacher) if x.ndim == 2)
  lifted = peftjax.lift(mlp)
  xent = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def loss(t, batch, key):
    t = dp.set_key(t, key)
    return xent(lifted(t, batch[0]), batch[1]) + 10.0 * dp.penalty(t, density=target)

  tx = peftjax.optimizer(optax.adam(0.05), tuned)
  tr, fr = peftjax.split(tuned)
  state = tx.init(tr)

  @jax.jit
  def step(tr, state, batch, key):
    g = jax.grad(lambda t: loss(peftjax.combine(t, fr), batch, key))(tr)
    u, state = tx.update(g, state, tr)
    return optax.apply_updates(tr, u), state

  for i in range(150):
    tr, state = step(tr, state, data(jax.random.fold_in(kd, i)), jax.random.fold_in(kd, 10**6 + i))
  trained = peftjax.combine(tr, fr)
  density = float(dp.open_fraction(trained))
  print(f"diff_pruning: open fraction {density:.4f} (target {target}), expected density "
        f"{float(dp.expected_density(trained)):.4f}, nonzeros {dp.count_nonzero(trained)}/{n}")
  assert abs(density - target) <= 0.1 * target

  k = int(round(target * n))
  sparse = dp.project(trained, k=k)
  nodes = [x for x in jax.tree.leaves(sparse, is_leaf=peftjax.is_node) if isinstance(x, SparseDelta)]
  assert sum(x.k for x in nodes) == k
  assert dp.count_nonzero(sparse) == k
  merged = peftjax.merge(sparse)
  assert sum(int(jnp.count_nonzero(merged[m]["kernel"] - teacher[m]["kernel"]))
             for m in ("fc1", "fc2", "out")) == k
  assert dp.project(trained, density=target)["fc1"]["kernel"].k == sparse["fc1"]["kernel"].k
  # The projection keeps the k largest gated entries: the relaxed model's behaviour.
  test = jax.tree.map(lambda *a: jnp.concatenate(a), *[data(jax.random.fold_in(kd, 10**7 + j)) for j in range(16)])
  acc = lambda t: float((jax.jit(lifted)(t, test[0]).argmax(-1) == test[1]).mean())
  base, relaxed, projected = acc(teacher), acc(trained), acc(sparse)
  print(f"diff_pruning accuracy: base {base:.3f}, relaxed {relaxed:.3f}, projected {projected:.3f}")
  assert projected > base + 0.03 and abs(projected - relaxed) < 0.03


def _sparse_node(shape, k):
  idx = np.sort(RNG.choice(int(np.prod(shape)), k, replace=False)).astype(np.int32)
  return SparseDelta(jnp.asarray(RNG.normal(size=shape), jnp.float32), jnp.asarray(idx),
                     jnp.asarray(RNG.normal(size=k), jnp.float32))


SPARSE_FNS = {
    # node on the right, on the left (transposed), contracted over its output axis
    "2d_uses": (lambda w, x: jnp.concatenate([x @ w, (w.T @ x.T).T, (x @ w) @ w.T], -1),
                (6, 5), (3, 6)),
    "dense_general_in": (lambda w, x: jnp.einsum("btd,dhk->bthk", x, w), (6, 2, 3), (2, 3, 6)),
    "dense_general_out": (lambda w, x: jnp.einsum("bhk,hkd->bd", x, w), (2, 3, 6), (4, 2, 3)),
    "batched_dot": (lambda w, x: lax.dot_general(x, w, (((2,), (1,)), ((0,), (0,)))), (3, 6, 5),
                    (3, 2, 6)),
    "elementwise": (lambda w, x: x @ jnp.tanh(w), (6, 5), (3, 6)),   # materializes
}


@pytest.mark.parametrize("name", list(SPARSE_FNS))
def test_sparse_form_rules(name):
  fn, wshape, xshape = SPARSE_FNS[name]
  node = _sparse_node(wshape, k=4)
  x = jnp.asarray(RNG.normal(size=xshape), jnp.float32)
  dense = node.w + node.dense_delta()
  np.testing.assert_allclose(node.materialize(), dense, atol=1e-6)
  want = fn(dense, x)
  np.testing.assert_allclose(jax.jit(peftjax.lift(fn))(node, x), want, atol=1e-4, rtol=1e-4)
  loss = lambda f: (lambda v, x: jnp.sum(jnp.sin(f(node.replace(values=v), x))))
  g1 = jax.jit(jax.grad(loss(peftjax.lift(fn)), argnums=(0, 1)))(node.values, x)
  g2 = jax.jit(jax.grad(loss(lambda n, x: fn(n.materialize(), x)), argnums=(0, 1)))(node.values, x)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_sparse_rule_forms_no_dense_delta(monkeypatch):
  """Few tokens x k below the kernel's size: no scatter into a kernel-sized array."""
  node = _sparse_node((64, 32), k=8)
  x = jnp.ones((2, 64))
  jaxpr = str(jax.make_jaxpr(peftjax.lift(lambda w, x: x @ w))(node, x))
  assert "f32[2048]" not in jaxpr and "f32[2,8] = gather" in jaxpr   # gathers x[:, rows]
  monkeypatch.setattr(selective, "SPARSE_DOT_MAX_RATIO", 0.0)   # forces materialization
  jaxpr = str(jax.make_jaxpr(peftjax.lift(lambda w, x: x @ w))(node, x))
  assert "f32[2048]" in jaxpr


@pytest.mark.parametrize("use_jit", [False, True])
def test_sparse_form_lift_matches_merge_and_dense_delta(use_jit):
  tuned = randomize(dp.apply(stacked_params(), targets=r".*"))
  sparse = dp.project(tuned, density=0.2)
  assert isinstance(sparse["layers"]["kernel"], SparseDelta)
  check_lift_vs_merge(stacked_fn, sparse, (jnp.ones((2, 8)),), LOSS, use_jit)
  # w + the dense difference gives the same model
  dense = jax.tree.map(lambda s: s.w + s.dense_delta() if isinstance(s, SparseDelta) else s,
                       sparse, is_leaf=peftjax.is_node)
  np.testing.assert_allclose(peftjax.lift(stacked_fn)(sparse, jnp.ones((2, 8))),
                             stacked_fn(dense, jnp.ones((2, 8))), atol=1e-5)


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("density", [0.0, 1.0, -0.1, 1.5, True, "0.1"])
def test_density_outside_unit_interval(density):
  tuned = dp.apply({"d": {"kernel": jnp.ones((4, 4))}})
  with pytest.raises(ValueError, match=rf"density must be a fraction in \(0, 1\).*got {density!r}"):
    dp.penalty(tuned, density)
  with pytest.raises(ValueError, match="density must be a fraction"):
    dp.project(tuned, density=density)


@pytest.mark.parametrize("kw,msg", [({}, "give exactly one of k"),
                                    (dict(k=2, density=0.1), "give exactly one of k"),
                                    (dict(k=0), r"k must be an integer in \[1, 16\]"),
                                    (dict(k=17), r"k must be an integer in \[1, 16\].*got 17"),
                                    (dict(k=2.0), r"k must be an integer")])
def test_bad_projection(kw, msg):
  with pytest.raises(ValueError, match=msg):
    dp.project(dp.apply({"d": {"kernel": jnp.ones((4, 4))}}), **kw)


def test_projection_needs_int32_addressable_leaves():
  big = jax.ShapeDtypeStruct((2**16, 2**15), jnp.float32)   # 2**31 entries, never allocated
  node = DiffPruningWeight(w=big, delta=big, log_alpha=big)
  with pytest.raises(ValueError, match=r"d/kernel has 2147483648 entries: int32 indices cannot"):
    dp.project({"d": {"kernel": node}}, k=5)


def test_no_diff_pruning_nodes():
  for f in (dp.expected_density, dp.open_fraction, dp.penalty, lambda t: dp.project(t, k=1)):
    with pytest.raises(ValueError, match="DiffPruningWeight nodes"):
      f({"d": {"kernel": jnp.ones((4, 4))}})


def test_conflict_names_path():
  tuned = peftjax.lora.apply({"d": {"kernel": jnp.ones((4, 4))}}, rank=2)
  with pytest.raises(ValueError, match=r"diff_pruning: d/kernel is already rewritten by another "
                                       r"method \(LoraWeight\[4, 4\]\)"):
    dp.apply(tuned)


@pytest.mark.parametrize("kw", [dict(beta=0.0), dict(gamma=0.1), dict(zeta=0.9),
                                dict(init_log_alpha=float("inf"))])
def test_bad_gate_parameters(kw):
  with pytest.raises(ValueError, match="need beta > 0, gamma < 0 < 1 < zeta"):
    dp.apply({"d": {"kernel": jnp.ones((4, 4))}}, **kw)


def test_bad_key():
  with pytest.raises(TypeError, match="key must be a PRNG key"):
    dp.set_key(dp.apply({"d": {"kernel": jnp.ones((4, 4))}}), 0)
