"""peftjax.prefix: counts (training and finalized), the MLP vs a hand-written reference, scanned
layers, padding and causal masks, gradients, training, KV-cache generation and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
import peftjax.prefix
from peftjax.models import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
from peftjax.prefix import Prefix, PrefixMLP
from peftjax.testing import TinyTransformer
import _additive_helpers
from _additive_helpers import jitted_update


def random_params(model, seed):
  return _additive_helpers.random_params(model, seed, IDS)


LLAMA = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, eos_token_id=2, pad_token_id=0)
BERT = BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48)
IDS = np.random.RandomState(0).randint(3, 48, (2, 7)).astype(np.int32)
P, H = 3, 8


@pytest.fixture(scope="module")
def llama():
  model = LlamaForCausalLM(LLAMA)
  params = random_params(model, 1)
  tree = peftjax.prefix.apply(params, LLAMA, P, hidden=H, key=jax.random.key(4))
  return model, params, tree, jax.jit(peftjax.prefix.forward(model))


@pytest.fixture(scope="module")
def value_and_grad(llama):
  """The LM loss through ``prefix.forward``, differentiated and jitted once: ``vg(trainable, frozen)``."""
  fwd = peftjax.prefix.forward(llama[0])
  return jax.jit(jax.value_and_grad(lambda t, f: xent(fwd(peftjax.combine(t, f), IDS), IDS)))


@pytest.fixture(scope="module")
def bert():
  model = BertModel(BERT)
  params = random_params(model, 2)
  return model, params, peftjax.prefix.apply(params, BERT, P, hidden=H, key=jax.random.key(5))


def hand_prefix(n):
  """Li & Liang's MLP written out: [L, 2, p, kv_heads, head_dim]."""
  h = jnp.tanh(n.embedding @ n.w1 + n.b1[None]) @ n.w2 + n.b2[None]              # [p, L*2*kvh*hd]
  return h.reshape(P, n.layers, 2, n.kv_heads, n.head_dim).transpose(1, 2, 0, 3, 4)


def xent(logits, ids):
  logp = jax.nn.log_softmax(logits[:, :-1], -1)
  return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()


def test_parameter_counts_training_and_finalized(llama, bert):
  for (_, params, tree), cfg in [(llama[:3], LLAMA), (bert, BERT)]:
    L, e = cfg.num_layers, cfg.hidden_size
    d = getattr(cfg, "num_kv_heads", cfg.num_heads) * cfg.head_dim
    node = tree.prefix
    assert isinstance(node, PrefixMLP) and node.shape == (L, 2, P, d // cfg.head_dim, cfg.head_dim)
    s = peftjax.summary(tree)
    assert s.trainable == P * e + (e * H + H) + (H * 2 * L * d + 2 * L * d)
    assert s.total == sum(x.size for x in jax.tree.leaves(params)) + s.trainable
    fin = peftjax.prefix.finalize(tree)
    assert isinstance(fin.prefix, Prefix)
    assert peftjax.summary(fin).trainable == 2 * L * P * d
    np.testing.assert_allclose(fin.prefix.kv, hand_prefix(node), rtol=1e-6)
    direct = peftjax.prefix.apply(params, cfg, P, projection=False)
    assert peftjax.summary(direct).trainable == 2 * L * P * d


def test_forward_equals_reference_and_finalize_keeps_outputs(llama, bert):
  model, params, tree, fwd = llama
  kv = hand_prefix(tree.prefix)
  ref = jax.jit(model.apply)({"params": params}, IDS, prefix=kv)
  got = fwd(tree, IDS)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  fin = peftjax.prefix.finalize(tree)
  np.testing.assert_allclose(fwd(fin, IDS), got, rtol=1e-5, atol=1e-5)
  # scanned layers: the MLP's leaves have no layer axis, yet the scan sees the right prefix
  smodel = LlamaForCausalLM(LLAMA, scan_layers=True)
  sparams = {k: v for k, v in params.items() if not k.startswith("layers_")}
  sparams["layers"] = jax.tree.map(lambda *x: jnp.stack(x), params["layers_0"], params["layers_1"])
  sout = jax.jit(peftjax.prefix.forward(smodel))({"params": sparams, "prefix": tree.prefix}, IDS)
  np.testing.assert_allclose(sout, got, rtol=1e-5, atol=1e-5)
  model, params, tree = bert
  ref = jax.jit(model.apply)({"params": params}, IDS, prefix=hand_prefix(tree.prefix))
  got = jax.jit(peftjax.prefix.forward(model))(tree, IDS)
  np.testing.assert_allclose(got.last_hidden_state, ref.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_padding_and_causal_mask_are_respected(llama, bert):
  model, params, tree, fwd = llama
  ids, mask = IDS.copy(), np.ones_like(IDS)
  ids[1, :3], mask[1, :3] = 0, 0
  batch = fwd(tree, ids, attention_mask=mask)
  alone = jax.jit(peftjax.prefix.forward(model))(tree, IDS[1:, 3:])
  np.testing.assert_allclose(batch[1, 3:], alone[0], rtol=1e-5, atol=1e-5)
  changed = ids.copy()
  changed[:, -1] = (changed[:, -1] + 1) % 48
  np.testing.assert_allclose(fwd(tree, changed, attention_mask=mask)[:, :-1], batch[:, :-1],
                             rtol=1e-6, atol=1e-6)
  model, params, tree = bert
  mask = np.ones_like(IDS)
  mask[0, 4:] = 0
  f = jax.jit(peftjax.prefix.forward(model))
  out = f(tree, IDS, attention_mask=mask).last_hidden_state
  np.testing.assert_allclose(out[0, :4], f(tree, IDS[:1, :4]).last_hidden_state[0], rtol=1e-5,
                             atol=1e-5)


def test_gradients_jit_and_no_jit(llama, value_and_grad):
  model, params, tree, _ = llama
  trainable, frozen = peftjax.split(tree)
  ref = lambda t: xent(model.apply({"params": params}, IDS, prefix=hand_prefix(t.prefix)), IDS)
  _, g = value_and_grad(trainable, frozen)
  gr = jax.jit(jax.grad(ref))(trainable)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert all(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree.leaves(g))
  # without jit, through lift on a small function of the prefix
  small = lambda t: jnp.sum(jnp.sin(peftjax.prefix.kv(t.prefix, 2)) ** 2)
  gl = jax.grad(lambda t: peftjax.lift(small)(peftjax.combine(t, frozen)))(trainable)
  ge = jax.grad(lambda t: jnp.sum(jnp.sin(hand_prefix(t.prefix)) ** 2) * 2)(trainable)
  for a, b in zip(jax.tree.leaves(gl), jax.tree.leaves(ge)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.standard_promotion  # steps an optax optimizer (Adam: float ** int32 count)
def test_trains_with_optimizer_and_frozen_leaves_stay(llama, value_and_grad):
  model, params, tree, _ = llama
  tx = peftjax.optimizer(optax.adam(1e-2), tree)
  update = jitted_update(tx)
  trainable, frozen = peftjax.split(tree)
  state = tx.init(trainable)
  losses = []
  for _ in range(8):
    l, g = value_and_grad(trainable, frozen)
    trainable, state = update(g, state, trainable)
    losses.append(float(l))
  assert losses[-1] < losses[0] - 0.1, losses
  new = peftjax.combine(trainable, frozen)
  for a, b in zip(jax.tree.leaves(peftjax.split(new)[1]), jax.tree.leaves(peftjax.split(tree)[1])):
    np.testing.assert_array_equal(a, b)
  assert peftjax.summary(peftjax.prefix.finalize(new)).trainable == 2 * 2 * P * 16


def test_generation_equals_recompute(llama):
  model, params, tree, fwd = llama
  ids, mask = IDS.copy(), np.ones_like(IDS)
  ids[0, :2], mask[0, :2] = 0, 0
  out = peftjax.prefix.generate(model, tree, ids, mask, max_new_tokens=5, stop_tokens=())
  full = np.concatenate([ids, np.asarray(out.tokens)], 1)
  fmask = np.concatenate([mask, np.ones_like(out.tokens)], 1)
  logits = jax.jit(peftjax.prefix.forward(model))(tree, full, attention_mask=fmask)
  np.testing.assert_array_equal(np.argmax(logits[:, ids.shape[1] - 1:-1], -1), out.tokens)


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(n_tokens=0), "n_tokens must be a positive integer, got 0"),
    (dict(n_tokens=2, hidden=0), "hidden must be a positive integer, got 0"),
    (dict(n_tokens=2, token_dim=-1), "token_dim must be a positive integer, got -1"),
])
def test_bad_sizes(kw, msg):
  with pytest.raises(ValueError, match=msg):
    peftjax.prefix.init(LLAMA, **kw)


def test_config_without_attention_layout():
  with pytest.raises(TypeError, match="config must describe the attention layout"):
    peftjax.prefix.init(object(), 2)


def test_model_without_prefix_hook():
  with pytest.raises(TypeError, match=r"prefix tuning needs a model that accepts `prefix=`"):
    peftjax.prefix.forward(TinyTransformer())


def test_bad_calls(llama):
  model, params, tree, _ = llama
  with pytest.raises(ValueError, match=r"prefix must be \[layers, 2, n_tokens, kv_heads, "
                                       r"head_dim\], got shape \(2, 3\)"):
    peftjax.prefix.kv(jnp.zeros((2, 3)), 2)
  with pytest.raises(TypeError, match="needs input_ids .* or inputs_embeds="):
    peftjax.prefix.forward(model)(tree)
  with pytest.raises(TypeError, match=r"peftjax.prefix.generate expects a tree with a prefix"):
    peftjax.prefix.generate(model, peftjax.Tuned(params, prompt=tree.prefix), IDS)
