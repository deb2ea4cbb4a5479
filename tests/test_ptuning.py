"""peftjax.ptuning: prompt encoders (MLP, LSTM) vs hand-written references, counts, finalize,
gradients, training, generation; P-tuning v2 deep prompts; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
import peftjax.prefix
import peftjax.prompt
import peftjax.ptuning
from peftjax.models import BertConfig, LlamaConfig, LlamaForCausalLM
from peftjax.prefix import Prefix
from peftjax.prompt import SoftPrompt
from peftjax.ptuning import PromptEncoder

LLAMA = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, eos_token_id=2, pad_token_id=0)
IDS = np.random.RandomState(0).randint(3, 48, (2, 7)).astype(np.int32)
P, HID = 4, 6


def random_params(model, seed):
  """Random parameters without compiling ``model.init`` (shapes from ``eval_shape``)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), IDS)["params"]
  r = np.random.RandomState(seed)

  def fill(path, s):
    near_one = jax.tree_util.keystr(path).endswith("['scale']")
    return jnp.asarray((1.0 if near_one else 0.0) + 0.08 * r.randn(*s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def jitted_update(tx):
  @jax.jit
  def update(g, state, t):
    u, state = tx.update(g, state, t)
    return optax.apply_updates(t, u), state
  return update


def xent(logits, ids):
  logp = jax.nn.log_softmax(logits[:, :-1], -1)
  return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()


@pytest.fixture(scope="module")
def llama():
  model = LlamaForCausalLM(LLAMA)
  return model, random_params(model, 1)


@pytest.fixture(scope="module")
def lstm_tree(llama):
  return peftjax.ptuning.apply(llama[1], P, encoder="lstm", hidden=HID, lstm_layers=1,
                               key=jax.random.key(3))


@pytest.fixture(scope="module")
def mlp_tree(llama):
  return peftjax.ptuning.apply(llama[1], P, encoder="mlp", hidden=HID, key=jax.random.key(4))


# -- hand-written encoders -----------------------------------------------------------------------

def ref_lstm_direction(np, x, p, reverse):
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  h = c = np.zeros(p["w_hh"].shape[0])
  out = [None] * len(x)
  for t in (reversed(range(len(x))) if reverse else range(len(x))):
    i, f, g, o = np.split(x[t] @ p["w_ih"] + h @ p["w_hh"] + p["b"], 4)
    c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
    h = sigmoid(o) * np.tanh(c)
    out[t] = h
  return np.stack(out)


def ref_encoder(node, np=np):
  """The P-tuning prompt encoder written out with Python loops, in NumPy (float64) or ``jnp``."""
  if np is not jnp:
    node = jax.tree.map(lambda a: np.asarray(a, np.float64), node)
  p, x = node.params, node.embedding
  lin = lambda x, n: x @ p[f"{n}_w"] + p[f"{n}_b"]
  if node.kind == "mlp":
    return lin(np.maximum(lin(np.maximum(lin(x, "mlp0"), 0), "mlp1"), 0), "mlp2")
  for layer in p["lstm"]:
    x = np.concatenate([ref_lstm_direction(np, x, layer["fw"], False),
                        ref_lstm_direction(np, x, layer["bw"], True)], -1)
  return lin(np.maximum(lin(x, "head0"), 0), "head1")


def test_encoders_match_reference_and_counts(llama, lstm_tree, mlp_tree):
  _, params = llama
  d, h = 32, HID
  mlp = mlp_tree
  assert isinstance(mlp.prompt, PromptEncoder) and mlp.prompt.shape == (P, d)
  assert peftjax.summary(mlp).trainable == P * d + (d * h + h) + (h * h + h) + (h * d + d)
  head = (2 * h * 2 * h + 2 * h) + (2 * h * d + d)
  assert peftjax.summary(lstm_tree).trainable == P * d + 2 * (d * 4 * h + h * 4 * h + 4 * h) + head
  two = peftjax.ptuning.apply(params, P, encoder="lstm", hidden=h)        # 2 layers by default
  assert peftjax.summary(two).trainable == (P * d + 2 * (d * 4 * h + h * 4 * h + 4 * h) +
                                            2 * (2 * h * 4 * h + h * 4 * h + 4 * h) + head)
  for tree in (mlp, lstm_tree):
    np.testing.assert_allclose(tree.prompt.materialize(), ref_encoder(tree.prompt),
                               rtol=1e-5, atol=1e-6)
    fin = peftjax.ptuning.finalize(tree)
    assert isinstance(fin.prompt, SoftPrompt)
    assert peftjax.summary(fin).trainable == P * d


def test_lstm_encoder_gradients_without_jit(lstm_tree):
  node = lstm_tree.prompt
  w = jnp.asarray(np.random.RandomState(2).randn(P, 32), jnp.float32)
  g = jax.grad(lambda n: jnp.sum(jnp.sin(n.materialize()) * w))(node)
  gr = jax.grad(lambda n: jnp.sum(jnp.sin(ref_encoder(n, jnp)) * w))(node)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_forward_gradients_training_and_finalize(llama, mlp_tree):
  model, params = llama
  tree = mlp_tree
  fwd = peftjax.prompt.forward(model)
  vg = jax.jit(jax.value_and_grad(lambda t, f: xent(fwd(peftjax.combine(t, f), IDS), IDS)))
  trainable, frozen = peftjax.split(tree)
  # gradients (jit) equal those of a hand-built input: encoder -> [soft; embeddings] -> model
  table = params["embed_tokens"]["embedding"]

  def ref(t):
    soft = peftjax.ptuning.finalize(peftjax.combine(t, frozen)).prompt.tokens
    emb = jnp.concatenate([jnp.broadcast_to(soft, (2, P, 32)), table[IDS]], 1)
    return xent(model.apply({"params": params}, inputs_embeds=emb)[:, P:], IDS)

  (l0, g), (lr, gr) = vg(trainable, frozen), jax.jit(jax.value_and_grad(ref))(trainable)
  np.testing.assert_allclose(l0, lr, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # without jit: the encoder's gradient through lift equals the direct one
  w = jnp.asarray(np.random.RandomState(2).randn(32), jnp.float32)
  small = lambda t: jnp.sum(jnp.sin(peftjax.prompt.prepend(t.prompt, table[IDS])[
      "inputs_embeds"] @ w))
  gl = jax.grad(lambda t: peftjax.lift(small)(peftjax.combine(t, frozen)))(trainable)
  ge = jax.grad(lambda t: small(peftjax.merge(peftjax.combine(t, frozen))))(trainable)
  for a, b in zip(jax.tree.leaves(gl), jax.tree.leaves(ge)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # trains
  tx = peftjax.optimizer(optax.adam(3e-2), tree)
  update, state, losses = jitted_update(tx), tx.init(trainable), []
  for _ in range(8):
    l, g = vg(trainable, frozen)
    trainable, state = update(g, state, trainable)
    losses.append(float(l))
  assert losses[-1] < losses[0] - 0.1, losses
  new = peftjax.combine(trainable, frozen)
  for a, b in zip(jax.tree.leaves(peftjax.split(new)[1]), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, b)
  # finalize: same outputs without the encoder; generation is the prompt-tuning path
  fin = peftjax.ptuning.finalize(new)
  np.testing.assert_array_equal(fin.prompt.tokens, new.prompt.materialize())
  out_enc = peftjax.prompt.generate(model, new, IDS, max_new_tokens=4, stop_tokens=())
  out_fin = peftjax.prompt.generate(model, fin, IDS, max_new_tokens=4, stop_tokens=())
  np.testing.assert_array_equal(out_enc.tokens, out_fin.tokens)


def test_ptuning_v2_deep_prompts_train(llama):
  model, params = llama
  tree = peftjax.ptuning.apply_v2(params, LLAMA, P, init_std=0.5, key=jax.random.key(7))
  assert isinstance(tree.prefix, Prefix) and tree.prefix.shape == (2, 2, P, 2, 8)
  assert peftjax.summary(tree).trainable == 2 * 2 * P * 16          # 2 * L * p * d
  fwd = peftjax.prefix.forward(model)
  vg = jax.jit(jax.value_and_grad(lambda t, f: xent(fwd(peftjax.combine(t, f), IDS), IDS)))
  trainable, frozen = peftjax.split(tree)
  ref = lambda t: xent(model.apply({"params": params}, IDS, prefix=t.prefix.kv), IDS)
  (l0, g), (lr, gr) = vg(trainable, frozen), jax.jit(jax.value_and_grad(ref))(trainable)
  np.testing.assert_allclose(l0, lr, rtol=1e-5)
  np.testing.assert_allclose(g.prefix.kv, gr.prefix.kv, rtol=1e-4, atol=1e-6)
  tx = peftjax.optimizer(optax.adam(5e-2), tree)
  update, state, losses = jitted_update(tx), tx.init(trainable), []
  for _ in range(8):
    l, g = vg(trainable, frozen)
    trainable, state = update(g, state, trainable)
    losses.append(float(l))
  assert losses[-1] < losses[0] - 0.1, losses


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(n_tokens=0), "n_tokens must be a positive integer, got 0"),
    (dict(n_tokens=2, encoder="gru"), r"encoder='gru' is not one of \('mlp', 'lstm'\)"),
    (dict(n_tokens=2, hidden=0), "hidden must be a positive integer, got 0"),
    (dict(n_tokens=2, encoder="lstm", lstm_layers=0), "lstm_layers must be a positive integer"),
])
def test_bad_options(llama, kw, msg):
  with pytest.raises(ValueError, match=msg):
    peftjax.ptuning.apply(llama[1], **kw)


def test_bad_v2():
  cfg = BertConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16)
  with pytest.raises(ValueError, match="n_tokens must be a positive integer, got -1"):
    peftjax.ptuning.apply_v2({}, cfg, -1)
  with pytest.raises(TypeError, match="config must describe the attention layout"):
    peftjax.ptuning.apply_v2({}, {"num_layers": 2}, 3)
