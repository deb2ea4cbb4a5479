"""lift(fn)(tuned) == fn(merge(tuned)): forward, gradients, jit, control flow, training."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import peftjax
from peftjax.lora import LoraWeight
from peftjax.testing import TinyNNX, TinyTransformer, next_token_loss

TOK = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)


def randomize_b(tree, seed=3, scale=0.1):
  """LoRA B is zero at init; make it nonzero so the update is exercised."""
  def f(path, x):
    if isinstance(x, LoraWeight):
      k = jax.random.fold_in(jax.random.key(seed), hash(jax.tree_util.keystr(path)) % 2**31)
      return x.replace(b=(jax.random.normal(k, x.b.shape) * scale).astype(x.b.dtype))
    return x
  return jax.tree_util.tree_map_with_path(f, tree, is_leaf=peftjax.is_node)


def linen_case(**kw):
  m = TinyTransformer(**kw)
  v = m.init(jax.random.key(0), TOK)
  return v, m.apply


def nnx_case():
  model = TinyNNX(rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  return state, lambda s, tok: nnx.merge(graphdef, s)(tok)


def plain_case():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"embed": {"embedding": jax.random.normal(k1, (64, 16))},
            "mlp": {"fc_in": {"kernel": jax.random.normal(k2, (16, 32)) / 4},
                    "fc_out": {"kernel": jax.random.normal(k3, (32, 64)) / 6}}}

  def fn(p, tok):
    x = p["embed"]["embedding"][tok]
    return jnp.tanh(x @ p["mlp"]["fc_in"]["kernel"]) @ p["mlp"]["fc_out"]["kernel"]
  return params, fn


CASES = {
    "linen_dense": lambda: linen_case(),
    "linen_dense_general": lambda: linen_case(dense_general=True),
    "linen_scan": lambda: linen_case(scan=True),
    "linen_scan_dense_general_remat": lambda: linen_case(scan=True, dense_general=True, remat=True),
    "nnx": nnx_case,
    "plain": plain_case,
}


@pytest.mark.parametrize("matmul", ["factored", "merged"])
@pytest.mark.parametrize("case", list(CASES))
def test_lift_matches_merge_forward_and_grad(case, matmul):
  params, fn = CASES[case]()
  tuned = peftjax.lora.apply(params, rank=4, key=jax.random.key(7), matmul=matmul)
  lifted = peftjax.lift(fn)
  base = fn(params, TOK)
  # Identity at init (B = 0).
  np.testing.assert_allclose(lifted(tuned, TOK), base, atol=1e-6, rtol=0)
  tuned = randomize_b(tuned)
  want = fn(peftjax.merge(tuned), TOK)
  assert float(jnp.max(jnp.abs(want - base))) > 1e-3  # the update really changes the output
  np.testing.assert_allclose(lifted(tuned, TOK), want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(lifted)(tuned, TOK), want, atol=1e-5, rtol=1e-5)

  trainable, frozen = peftjax.split(tuned)
  loss_lift = lambda t: next_token_loss(lifted(peftjax.combine(t, frozen), TOK), TOK)
  loss_ref = lambda t: next_token_loss(fn(peftjax.merge(peftjax.combine(t, frozen)), TOK), TOK)
  g_jit = jax.jit(jax.grad(loss_lift))(trainable)
  g_ref = jax.jit(jax.grad(loss_ref))(trainable)
  # Eager (no-jit) gradients of whole models are slow on CPU: the factored form, once per kind of
  # model (the layout variants of linen_* run the same rules as their plain case under jit).
  eager = matmul == "factored" and case in ("plain", "nnx", "linen_dense", "linen_scan")
  g_lift = jax.grad(loss_lift)(trainable) if eager else g_jit
  leaves = jax.tree.leaves(g_ref)
  assert leaves and all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
  for a, b, c in zip(jax.tree.leaves(g_lift), jax.tree.leaves(g_jit), leaves):
    np.testing.assert_allclose(a, c, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(b, c, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", list(CASES))
def test_lift_matmul_forms(case):
  """factored: every target runs x@W + s*(x@A)@B (two extra dots, no A@B) with plain autodiff;
  merged: one custom matmul per target; auto: for a single token x@W plus the low-rank product as
  a custom matmul (the same two extra dots), merged for a training batch."""
  params, fn = CASES[case]()
  n_nodes = sum(1 for x in jax.tree.leaves(peftjax.lora.apply(params, rank=4),
                                           is_leaf=peftjax.is_node) if peftjax.is_node(x))
  jaxpr_base = str(jax.make_jaxpr(fn)(params, TOK))
  jaxpr = lambda mode, tok: str(jax.make_jaxpr(peftjax.lift(fn))(
      peftjax.lora.apply(params, rank=4, matmul=mode), tok))
  factored = jaxpr("factored", TOK)
  assert factored.count("dot_general") == jaxpr_base.count("dot_general") + 2 * n_nodes
  assert "custom_vjp_call" not in factored
  assert jaxpr("merged", TOK).count("custom_vjp_call") == n_nodes
  decode = jaxpr("auto", TOK[:1, :1])
  assert decode.count("custom_vjp_call") == n_nodes
  assert decode.count("dot_general") == jaxpr_base.count("dot_general") + 2 * n_nodes
  assert jaxpr("auto", jnp.zeros((8, 64), jnp.int32)).count("custom_vjp_call") == n_nodes


def test_merged_matmul_gradient_wrt_frozen_base_is_exact():
  """Differentiating the whole tree (w included) through the merged rule gives dw = x^T g."""
  node = _node(shape=(6, 5)).replace(matmul="merged")
  x = jax.random.normal(jax.random.key(5), (3, 6))
  f = lambda n: jnp.sum(jnp.sin(peftjax.lift(lambda w, x: x @ w)(n, x)))
  g = jax.grad(f)(node)
  g_ref = jax.grad(lambda w, a, b: jnp.sum(jnp.sin(x @ node.replace(w=w, a=a, b=b).materialize())),
                   argnums=(0, 1, 2))(node.w, node.a, node.b)
  for got, want in zip((g.w, g.a, g.b), g_ref):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.standard_promotion  # the bf16 test model's RMSNorm mixes bf16 and f32
def test_bf16_model_with_f32_adapters():
  m = TinyTransformer(dtype=jnp.bfloat16)
  v = m.init(jax.random.key(0), TOK)
  tuned = randomize_b(peftjax.lora.apply(v, rank=4, dtype=jnp.float32))
  got = peftjax.lift(m.apply)(tuned, TOK)
  want = m.apply(peftjax.merge(tuned), TOK)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=0.1, rtol=0.05)
  # The adapters stay f32 and their gradients are f32.
  trainable, frozen = peftjax.split(tuned)
  g = jax.grad(lambda t: next_token_loss(peftjax.lift(m.apply)(peftjax.combine(t, frozen), TOK),
                                         TOK))(trainable)
  assert {x.dtype for x in jax.tree.leaves(g)} == {jnp.dtype(jnp.float32)}


@pytest.mark.standard_promotion  # the bf16 test model's RMSNorm mixes bf16 and f32
def test_bf16_params_lift_vs_merge():
  m = TinyTransformer()
  v = jax.tree.map(lambda x: x.astype(jnp.bfloat16), m.init(jax.random.key(0), TOK))
  tuned = randomize_b(peftjax.lora.apply(v, rank=4))
  assert tuned["params"]["layers_0"]["attn"]["q_proj"]["kernel"].a.dtype == jnp.bfloat16
  got = peftjax.lift(m.apply)(tuned, TOK)
  want = m.apply(peftjax.merge(tuned), TOK)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=0.1, rtol=0.05)


@pytest.mark.parametrize("case,use_jit", [("linen_dense", True), ("linen_scan", True),
                                          ("nnx", True), ("linen_dense", False), ("nnx", False)])
@pytest.mark.standard_promotion  # steps an optax optimizer (Adam: float ** int32 count)
def test_training_50_steps_freezes_base_and_reduces_loss(case, use_jit):
  params, fn = CASES[case]()
  tuned = peftjax.lora.apply(params, rank=4)
  lifted = peftjax.lift(fn)
  tx = peftjax.optimizer(optax.adam(3e-2), tuned)
  opt_state = tx.init(tuned)
  loss_fn = lambda p: next_token_loss(lifted(p, TOK), TOK)

  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  step = jax.jit(step) if use_jit else step
  p, losses = tuned, []
  for _ in range(50 if use_jit else 3):
    p, opt_state, loss = step(p, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - (0.05 if use_jit else 0.0)
  mask = peftjax.trainable_mask(tuned)
  for m, before, after in zip(jax.tree.leaves(mask), jax.tree.leaves(tuned), jax.tree.leaves(p)):
    if not m:
      np.testing.assert_array_equal(np.asarray(before), np.asarray(after))


def test_jit_and_no_jit_agree_and_trace_is_cached():
  params, fn = plain_case()
  calls = []

  def counted(p, x):
    calls.append(1)
    return fn(p, x)
  lifted = peftjax.lift(counted)
  tuned = randomize_b(peftjax.lora.apply(params, rank=2))
  a = lifted(tuned, TOK)
  b = lifted(tuned, TOK)
  assert len(calls) == 1  # second call reuses the trace
  c = jax.jit(lifted)(tuned, TOK)
  np.testing.assert_allclose(a, b)
  np.testing.assert_allclose(a, c, atol=1e-6)


# -- primitives, one by one, on a single node ---------------------------------------------------

def _node(shape=(6, 5), rank=2, seed=0, batch=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  full = ((batch,) if batch else ()) + shape
  w = jax.random.normal(k1, full)
  a = jax.random.normal(k2, full[:-1] + (rank,))
  b = jax.random.normal(k3, full[:-2] + (rank, full[-1]))
  return LoraWeight(w=w, a=a, b=b, scale=0.5, n_in=1)


FNS = {
    "rhs_matmul": lambda w, x: x @ w,
    "lhs_matmul": lambda w, x: (w.T @ x.T).T,  # W^T on the left: node as lhs operand
    "transposed_use": lambda w, x: (x @ w) @ w.T,  # contracting over the output axis
    "einsum_batch": lambda w, x: jnp.einsum("bi,ij->bj", x, w) + jnp.einsum("ij,bi->bj", w, x),
    "elementwise": lambda w, x: x @ (w * 2.0) + jnp.sum(w),  # materializes
    "jit_inner": lambda w, x: jax.jit(lambda w, x: x @ w)(w, x),
    "cond": lambda w, x: lax.cond(x.sum() > 0, lambda: x @ w, lambda: -(x @ w)),
    "while": lambda w, x: lax.while_loop(lambda c: c[0] < 3,
                                         lambda c: (c[0] + 1, jnp.tanh(c[1] @ w @ w.T)),
                                         (0, x))[1] @ w,
    "fori": lambda w, x: lax.fori_loop(0, 2, lambda i, c: jnp.tanh(c @ w) @ w.T, x) @ w,
    "remat": lambda w, x: jax.checkpoint(lambda x: jnp.sin(x @ w))(x),
    "custom_jvp": lambda w, x: jax.nn.relu(x @ w) + jax.nn.softplus(x @ w),
    "custom_vjp_with_node": lambda w, x: _clip_grad_matmul(x, w),
    "astype_bf16": lambda w, x: (x.astype(jnp.bfloat16) @ w.astype(jnp.bfloat16)).astype(jnp.float32),
    "vmap_inside": lambda w, x: jax.vmap(lambda xi: xi @ w)(x),
}


@jax.custom_vjp
def _clip_grad_matmul(x, w):
  return x @ w


def _cgm_fwd(x, w):
  return x @ w, (x, w)


def _cgm_bwd(res, g):
  x, w = res
  g = jnp.clip(g, -0.1, 0.1)  # a rule that differs from the true derivative: must be kept
  return g @ w.T, x.T @ g


_clip_grad_matmul.defvjp(_cgm_fwd, _cgm_bwd)


@pytest.mark.parametrize("matmul", ["factored", "merged"])
@pytest.mark.parametrize("name", list(FNS))
def test_primitive_rules(name, matmul):
  fn = FNS[name]
  if name == "while" and matmul == "merged":
    pytest.skip("forward-mode AD (needed for while loops) requires matmul='factored'")
  node = _node().replace(matmul=matmul)
  x = jax.random.normal(jax.random.key(5), (3, 6))
  tol = 0.05 if "bf16" in name else 1e-4
  want = fn(node.materialize(), x)
  got = peftjax.lift(fn)(node, x)
  np.testing.assert_allclose(got, want, atol=tol, rtol=tol)
  # gradients w.r.t. a, b and x
  loss = lambda f: (lambda a, b, x: jnp.sum(jnp.sin(f(node.replace(a=a, b=b), x))))
  # while loops only have forward-mode derivatives
  diff = jax.jacfwd if name == "while" else jax.grad
  g_got = diff(loss(peftjax.lift(fn)), argnums=(0, 1, 2))(node.a, node.b, x)
  g_want = diff(loss(lambda n, x: fn(n.materialize(), x)), argnums=(0, 1, 2))(node.a, node.b, x)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, atol=tol * 10, rtol=tol * 10)


def test_vmap_and_grad_compose():
  node = _node()
  xs = jax.random.normal(jax.random.key(5), (4, 3, 6))
  f = peftjax.lift(lambda w, x: jnp.tanh(x @ w).sum())
  got = jax.vmap(f, in_axes=(None, 0))(node, xs)
  want = jax.vmap(lambda x: jnp.tanh(x @ node.materialize()).sum())(xs)
  np.testing.assert_allclose(got, want, atol=1e-5)
  g = jax.vmap(jax.grad(lambda n, x: f(n, x)), in_axes=(None, 0))(node, xs)
  assert g.a.shape == (4,) + node.a.shape


def test_stacked_node_in_scan_and_outside():
  node = _node(shape=(6, 6), batch=3)
  x = jax.random.normal(jax.random.key(5), (2, 6))
  scan_fn = lambda w, x: lax.scan(lambda c, wl: (jnp.tanh(c @ wl), None), x, w)[0]
  np.testing.assert_allclose(peftjax.lift(scan_fn)(node, x), scan_fn(node.materialize(), x),
                             atol=1e-5)
  einsum_fn = lambda w, x: jnp.einsum("bi,lij->lbj", x, w)
  np.testing.assert_allclose(peftjax.lift(einsum_fn)(node, x), einsum_fn(node.materialize(), x),
                             atol=1e-4)
  batched_fn = lambda w, xs: lax.dot_general(xs, w, (((2,), (1,)), ((0,), (0,))))
  xs = jnp.broadcast_to(x, (3, 2, 6))
  np.testing.assert_allclose(peftjax.lift(batched_fn)(node, xs), batched_fn(node.materialize(), xs),
                             atol=1e-4)
  # The batched dot stays factored: 3 dots (base + 2), no materialization.
  assert str(jax.make_jaxpr(peftjax.lift(batched_fn))(node, xs)).count("dot_general") == 3


def test_static_arguments_and_kwargs():
  params, fn = plain_case()
  tuned = randomize_b(peftjax.lora.apply(params, rank=2))

  def g(p, tok, *, negate: bool, scale: float):
    y = fn(p, tok) * scale
    return -y if negate else y
  lifted = peftjax.lift(g)
  for negate in (True, False):
    np.testing.assert_allclose(lifted(tuned, TOK, negate=negate, scale=2.0),
                               g(peftjax.merge(tuned), TOK, negate=negate, scale=2.0), atol=1e-5)


def test_lift_inside_jit_with_closure_over_tracer():
  params, fn = plain_case()
  tuned = randomize_b(peftjax.lora.apply(params, rank=2))

  @jax.jit
  def step(p, tok, s):
    return peftjax.lift(lambda p: fn(p, tok) * s)(p)

  for s in (1.0, 2.0):
    np.testing.assert_allclose(step(tuned, TOK, s), fn(peftjax.merge(tuned), TOK) * s, atol=1e-5)


def test_scan_materializes_nodes_whose_leaves_are_not_stacked():
  """A node standing for a [L, d] array but storing a [d] vector (leaves not stacked) must be
  materialized before lax.scan slices it."""
  from peftjax._src.nodes import Node, node_dataclass, static_field

  @node_dataclass
  class Tiled(Node):
    type_id = "test_tiled"
    v: jax.Array
    n: int = static_field(default=3)
    scan_slices_leaves = False
    trainable_fields = ("v",)

    @property
    def shape(self):
      return (self.n, *self.v.shape)

    @property
    def dtype(self):
      return self.v.dtype

    def materialize(self):
      return jnp.broadcast_to(self.v, self.shape) * jnp.arange(1, self.n + 1,
                                                               dtype=self.v.dtype)[:, None]

  node = Tiled(v=jnp.arange(4.0))
  fn = lambda t, x: lax.scan(lambda c, row: (c + row, c * row), x, t)
  got = peftjax.lift(fn)(node, jnp.ones(4))
  want = fn(node.materialize(), jnp.ones(4))
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b)


@pytest.mark.parametrize("case,dtype", [
    ("plain", jnp.float32), ("nnx", jnp.float32), ("linen_scan_dense_general_remat", jnp.float32),
    ("plain", jnp.bfloat16),
    pytest.param("nnx", jnp.bfloat16, marks=pytest.mark.standard_promotion),  # nnx's norm mixes
])
def test_lowrank_rule_matches_plain_autodiff(case, dtype):
  """The low-rank product's custom backward pass (``matmul="auto"`` on a few tokens, and active
  dropout, which cannot merge) gives plain autodiff's values and gradients (``"factored"``), with
  and without jit, on plain, nnx and scanned + remat linen models (the other linen layouts run
  the same rule); in bf16 too (f32 adapters on a bf16 base)."""
  params, fn = CASES[case]()
  params = jax.tree.map(lambda x: x.astype(dtype), params)
  tok = TOK[:1, :3]   # 3 tokens: x@W + s*(x@A)@B is cheaper than merging for every target
  tol = dict(atol=1e-5, rtol=1e-4) if dtype == jnp.float32 else dict(atol=2e-2, rtol=2e-2)
  for kw in (dict(), dict(dropout=0.3)):
    def tuned(mode):
      t = randomize_b(peftjax.lora.apply(params, rank=4, key=jax.random.key(7), matmul=mode,
                                         dtype=jnp.float32, **kw))
      return peftjax.lora.set_dropout_key(t, jax.random.key(3)) if kw else t
    rule, ref = tuned("auto"), tuned("factored")
    assert str(jax.make_jaxpr(peftjax.lift(fn))(rule, tok)).count("custom_vjp_call") > 0
    lifted = peftjax.lift(fn)
    loss = lambda t, frozen: next_token_loss(lifted(peftjax.combine(t, frozen), tok), tok)
    (tr, fr), (tr_ref, fr_ref) = peftjax.split(rule), peftjax.split(ref)
    np.testing.assert_allclose(np.asarray(jax.jit(lifted)(rule, tok), np.float32),
                               np.asarray(jax.jit(lifted)(ref, tok), np.float32), **tol)
    want = jax.jit(jax.grad(loss))(tr_ref, fr_ref)
    got_jit = jax.jit(jax.grad(loss))(tr, fr)
    got = jax.grad(loss)(tr, fr) if case == "plain" else got_jit   # eager: slow, once
    leaves = jax.tree.leaves(want)
    assert leaves and all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)
    for a, b, c in zip(jax.tree.leaves(got), jax.tree.leaves(got_jit), leaves, strict=True):
      assert a.dtype == c.dtype == jnp.float32
      np.testing.assert_allclose(a, c, **tol)
      np.testing.assert_allclose(b, c, **tol)
