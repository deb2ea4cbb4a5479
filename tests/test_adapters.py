"""peftjax.adapters: placements, counts, identity init, a hand-written reference, training,
generation and bad input, on the reference Llama and BERT models."""

import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import peftjax
import peftjax.adapters
from peftjax._src.additive import ACTIVATIONS
from peftjax._src.targeting import leaves_with_paths
from peftjax.adapters import BottleneckAdapter
from peftjax.models import (BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, generate)
import _additive_helpers
from _additive_helpers import jitted_update


def random_params(model, seed):
  return _additive_helpers.random_params(model, seed, IDS)


LLAMA = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, eos_token_id=2, pad_token_id=0)
BERT = BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48)
IDS = np.random.RandomState(0).randint(3, 48, (2, 7)).astype(np.int32)


@pytest.fixture(scope="module")
def llama():
  model = LlamaForCausalLM(LLAMA)
  return model, random_params(model, 1)


@pytest.fixture(scope="module")
def bert():
  model = BertModel(BERT)
  return model, random_params(model, 2)


@pytest.fixture(scope="module")
def houlsby(llama):
  """Houlsby adapters with nonzero weights, and a jitted value-and-grad of the LM loss."""
  model, params = llama
  tuned = randomize(peftjax.adapters.apply(params, 4, placement="houlsby", activation="silu"))
  lifted = peftjax.lift(model.apply)
  vg = jax.jit(jax.value_and_grad(
      lambda t, f: xent(lifted({"params": peftjax.combine(t, f)}, IDS), IDS)))
  return tuned, vg


def stack_layers(params, n):
  """No-scan params (layers_i) -> scan params (layers, stacked on axis 0); works on nodes too."""
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(n)])
  return out


def randomize(tree, scale=0.3):
  """Nonzero adapter weights (biases too), keyed by path (NumPy: no per-shape compiles)."""
  def visit(path, x):
    if not isinstance(x, BottleneckAdapter):
      return x
    r = np.random.RandomState(zlib.crc32(jax.tree_util.keystr(path).encode()))
    rand = lambda a: jnp.asarray(r.randn(*a.shape) * scale, a.dtype)
    return x.replace(up=rand(x.up), up_bias=rand(x.up_bias), down_bias=rand(x.down_bias))
  return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=peftjax.is_node)


def adapters_by_module(tree):
  """{("layers_0", "mlp", "down_proj"): node} for a no-scan tree."""
  return {tuple(p.split("/")[:-1]): x for p, x in leaves_with_paths(tree)
          if isinstance(x, BottleneckAdapter)}


def reference_adapter(node, x, y):
  """The adapter written out by hand: serial on y = x @ W, parallel on x."""
  f = ACTIVATIONS[node.activation]
  z = (x if node.parallel else y) @ node.down
  h = f(z + node.down_bias.reshape((1,) * (z.ndim - 1) + (-1,)))
  u = h @ node.up
  return y + node.scale * (u + node.up_bias.reshape((1,) * (u.ndim - 1) + (-1,)))


def reference_apply(model, tree, *args, **kwargs):
  """``model.apply`` on the base kernels with the adapters added by a Flax interceptor around
  each adapted ``nn.Dense`` (no peftjax machinery)."""
  nodes = adapters_by_module(tree)
  base = peftjax.adapters.remove(tree)

  def interceptor(next_fun, args_, kwargs_, context):
    mod = context.module
    if (isinstance(mod, nn.Dense) and context.method_name == "__call__"
        and mod.path in nodes):
      (x,) = args_
      v = mod.variables["params"]
      out = reference_adapter(nodes[mod.path], x, x @ v["kernel"])
      return (out + v["bias"].reshape((1,) * (out.ndim - 1) + (-1,)) if "bias" in v
              else out)
    return next_fun(*args_, **kwargs_)

  with nn.intercept_methods(interceptor):
    return model.apply({"params": base}, *args, **kwargs)


def xent(logits, ids):
  logp = jax.nn.log_softmax(logits[:, :-1], -1)
  return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()


# -- structure and counts -------------------------------------------------------------------------

def test_placements_and_parameter_counts(llama, bert):
  m = 4
  for (model, params), cfg, attn, ffn in [
      (llama, LLAMA, "self_attn/o_proj", "mlp/down_proj"),
      (bert, BERT, "attention/output/dense", "output/dense")]:
    d, d_ff, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    hou = peftjax.adapters.apply(params, m, placement="houlsby")
    assert sorted(adapters_by_module(hou)) == sorted(
        (f"layers_{i}", *s.split("/")) for i in range(L) for s in (attn, ffn))
    assert peftjax.summary(hou).trainable == 2 * L * (2 * m * d + m + d)
    pf = peftjax.adapters.apply(params, m, placement="pfeiffer")
    assert sorted(adapters_by_module(pf)) == sorted((f"layers_{i}", *ffn.split("/"))
                                                    for i in range(L))
    assert peftjax.summary(pf).trainable == L * (2 * m * d + m + d)
    par = peftjax.adapters.apply(params, m, placement="parallel")
    node = par[f"layers_0"][ffn.split("/")[0]][ffn.split("/")[1]]["kernel"]
    assert node.parallel and node.down.shape == (d_ff, m) and node.up.shape == (m, d)
    assert peftjax.summary(par).trainable == L * (d_ff * m + m + m * d + d)
    s = peftjax.summary(hou)
    assert s.total == sum(x.size for x in jax.tree.leaves(params)) + s.trainable
    assert "BottleneckAdapter" in str(s)


def test_layer_stacked_adapters_are_per_layer(llama):
  model, params = llama
  st = peftjax.adapters.apply(stack_layers(params, 2), 4, placement="pfeiffer")
  node = st["layers"]["mlp"]["down_proj"]["kernel"]
  assert node.n_batch == 1 and node.down.shape == (2, 32, 4) and node.up_bias.shape == (2, 32)
  assert not np.array_equal(node.down[0], node.down[1])
  assert float(jnp.max(jnp.abs(node.down))) <= 1 / np.sqrt(32)
  assert not np.any(node.up) and not np.any(node.down_bias) and not np.any(node.up_bias)
  one = jax.tree.map(lambda x: x[0], node)  # what lax.scan hands the body
  assert one.n_batch == 0 and one.n_out == 1 and one.shape == (48, 32)


# -- identity at init, reference, gradients -----------------------------------------------------

@pytest.mark.parametrize("which,placement", [("llama", "houlsby"), ("bert", "parallel")])
def test_identity_at_init_and_hand_written_reference(llama, bert, which, placement):
  model, params = llama if which == "llama" else bert
  tuned = peftjax.adapters.apply(params, 4, placement=placement, activation="gelu",
                                 key=jax.random.key(3))
  f = jax.jit(peftjax.lift(model.apply))
  plain = jax.jit(model.apply)({"params": params}, IDS)
  out = f({"params": tuned}, IDS)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # the identity (up to XLA fusion)
  tuned = randomize(tuned)
  out = f({"params": tuned}, IDS)
  ref = jax.jit(lambda t: reference_apply(model, t, IDS))(tuned)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  assert max(float(jnp.max(jnp.abs(a - b)))
             for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(plain))) > 1e-3
  # the same adapters on the layer-stacked (nn.scan) model
  smodel = type(model)(model.config, scan_layers=True)
  sout = jax.jit(peftjax.lift(smodel.apply))({"params": stack_layers(tuned, 2)}, IDS)
  for a, b in zip(jax.tree.leaves(sout), jax.tree.leaves(out)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_gradients_match_reference_jit(llama, houlsby):
  model, params = llama
  tuned, vg = houlsby
  trainable, frozen = peftjax.split(tuned)
  ref = lambda t: xent(reference_apply(model, peftjax.combine(t, frozen), IDS), IDS)
  _, g = vg(trainable, frozen)
  gr = jax.jit(jax.grad(ref))(trainable)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert all(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree.leaves(g))


def test_rule_layouts_and_gradients_without_jit():
  """Serial and parallel adapters on stacked kernels in a batched dot_general (the layer axis as
  a batch axis) and a serial one on a 3-D DenseGeneral kernel: values and gradients, no jit."""
  rng = np.random.RandomState(0)
  params = {"layers": {"mlp": {"down_proj": {"kernel": jnp.asarray(rng.randn(3, 6, 5), jnp.float32)}},
                       "side": {"kernel": jnp.asarray(rng.randn(3, 6, 5), jnp.float32)}},
            "attn": {"o_proj": {"kernel": jnp.asarray(rng.randn(6, 2, 4), jnp.float32)}}}
  tuned = peftjax.adapters.apply(params, 2, placement="houlsby", activation="tanh")
  tuned = peftjax.adapters.apply(tuned, 2, placement="parallel", targets=["side"],
                                 activation="tanh", scale=2.0)
  assert tuned["layers"]["side"]["kernel"].parallel

  def f(p, x):                                                          # x [L, 4, in]
    dot = lambda k: lax.dot_general(x, k, (((2,), (1,)), ((0,), (0,))))  # [L, 4, out]
    general = jnp.einsum("bd,dhk->bhk", x[0], p["attn"]["o_proj"]["kernel"])
    return dot(p["layers"]["mlp"]["down_proj"]["kernel"]), dot(p["layers"]["side"]["kernel"]), general

  def ref(t, x):
    def stacked(k):
      layer = lambda l: reference_adapter(jax.tree.map(lambda a: a[l], k), x[l], x[l] @ k.w[l])
      return jnp.stack([layer(l) for l in range(3)])
    g = t["attn"]["o_proj"]["kernel"]
    flat = g.replace(w=g.w.reshape(6, 8), down=g.down.reshape(8, 2), up=g.up.reshape(2, 8),
                     up_bias=g.up_bias.reshape(8))
    general = reference_adapter(flat, x[0], x[0] @ flat.w).reshape(4, 2, 4)
    return stacked(t["layers"]["mlp"]["down_proj"]["kernel"]), stacked(t["layers"]["side"]["kernel"]), general

  x = jnp.asarray(rng.randn(3, 4, 6), jnp.float32)
  for a, b in zip(peftjax.lift(f)(tuned, x), f(params, x)):
    np.testing.assert_array_equal(a, b)  # exactly the identity at init
  tuned = randomize(tuned)
  for a, b in zip(peftjax.lift(f)(tuned, x), ref(tuned, x)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  trainable, frozen = peftjax.split(tuned)
  loss = lambda fn: (lambda t: sum(jnp.sum(jnp.sin(o)) for o in fn(peftjax.combine(t, frozen), x)))
  g = jax.grad(loss(peftjax.lift(f)))(trainable)
  gr = jax.grad(loss(ref))(trainable)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# -- training and generation --------------------------------------------------------------------

@pytest.mark.standard_promotion  # steps an optax optimizer (Adam: float ** int32 count)
def test_trains_with_optimizer_and_frozen_leaves_stay(houlsby):
  tuned, vg = houlsby
  tx = peftjax.optimizer(optax.adam(3e-2), tuned)
  update = jitted_update(tx)
  trainable, frozen = peftjax.split(tuned)
  state = tx.init(trainable)
  losses = []
  for _ in range(8):
    l, g = vg(trainable, frozen)
    trainable, state = update(g, state, trainable)
    losses.append(float(l))
  assert losses[-1] < losses[0] - 0.3, losses
  new = peftjax.combine(trainable, frozen)
  for a, b in zip(jax.tree.leaves(peftjax.split(new)[1]), jax.tree.leaves(peftjax.split(tuned)[1])):
    np.testing.assert_array_equal(a, b)   # frozen leaves bit-identical
  assert peftjax.summary(new).trainable == 2 * 2 * (2 * 4 * 32 + 4 + 32)


def test_generation_with_adapters_equals_recompute(llama, houlsby):
  model, params = llama
  tuned = houlsby[0]
  ids = IDS.copy()
  mask = np.ones_like(ids)
  ids[1, :3], mask[1, :3] = 0, 0                      # left padding
  out = generate(model, tuned, ids, mask, max_new_tokens=5, stop_tokens=())
  full = np.concatenate([ids, np.asarray(out.tokens)], 1)
  fmask = np.concatenate([mask, np.ones_like(out.tokens)], 1)
  logits = jax.jit(peftjax.lift(model.apply))({"params": tuned}, full, attention_mask=fmask)
  t0 = ids.shape[1]
  np.testing.assert_array_equal(np.argmax(logits[:, t0 - 1:-1], -1), out.tokens)


# -- semantics and bad input ----------------------------------------------------------------------

def test_not_mergeable_and_remove(llama):
  model, params = llama
  tuned = peftjax.adapters.apply(params, 4)
  with pytest.raises(TypeError, match=r"no merged form.*peftjax.lift"):
    peftjax.merge(tuned)
  back = peftjax.adapters.remove(tuned)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  node = tuned["layers_0"]["mlp"]["down_proj"]["kernel"]
  with pytest.raises(TypeError, match="does not contract exactly its input axes"):
    peftjax.lift(lambda k: k @ jnp.ones((32, 3)))(node)   # W @ x: the output axis contracted


@pytest.mark.parametrize("bottleneck", [0, -2, 2.5, True])
def test_bad_bottleneck(llama, bottleneck):
  with pytest.raises(ValueError, match=f"bottleneck must be a positive integer, got {bottleneck}"):
    peftjax.adapters.apply(llama[1], bottleneck)


@pytest.mark.parametrize("kw,msg", [
    (dict(placement="serial"), r"placement='serial' is not one of \['houlsby', 'parallel', 'pfeiffer'\]"),
    (dict(activation="softmax"), r"activation='softmax' is not supported"),
    (dict(scale=float("inf")), "scale must be a finite number"),
    (dict(targets=r".*/input_layernorm/scale"), r"target .*/input_layernorm/scale is not a kernel"),
    (dict(targets=r".*/nothing/kernel"), r"(?s)matched no leaf.*embed_tokens/embedding"),
    (dict(layout=lambda p, s: (0, 2)), r"layout for layers_0/.* gave n_batch=0, n_in=2"),
])
def test_bad_options(llama, kw, msg):
  with pytest.raises(ValueError, match=msg):
    peftjax.adapters.apply(llama[1], 4, **kw)


def test_placement_matching_nothing_names_it_and_shows_paths():
  with pytest.raises(ValueError, match=r"(?s)placement='pfeiffer' matched no kernel.*enc/fc/kernel"):
    peftjax.adapters.apply({"enc": {"fc": {"kernel": jnp.ones((4, 4))}}}, 2, placement="pfeiffer")


def test_twice_is_an_error(llama):
  tuned = peftjax.adapters.apply(llama[1], 4, placement="pfeiffer")
  with pytest.raises(ValueError, match=r"layers_0/mlp/down_proj/kernel already has a bottleneck"):
    peftjax.adapters.apply(tuned, 4, placement="pfeiffer")
