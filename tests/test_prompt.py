"""peftjax.prompt: init modes, counts, model inputs vs a hand-built reference, padding and causal
masks, gradients, training, KV-cache generation and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
import peftjax.prompt
from peftjax.models import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
from peftjax.prompt import SoftPrompt
from peftjax.testing import TinyTransformer
import _additive_helpers
from _additive_helpers import jitted_update


def random_params(model, seed):
  return _additive_helpers.random_params(model, seed, IDS)


LLAMA = LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48, num_layers=2,
                    num_heads=4, num_kv_heads=2, eos_token_id=2, pad_token_id=0)
BERT = BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48)
IDS = np.random.RandomState(0).randint(3, 48, (2, 7)).astype(np.int32)
P = 3


@pytest.fixture(scope="module")
def llama():
  model = LlamaForCausalLM(LLAMA)
  params = random_params(model, 1)
  tree = peftjax.prompt.apply(params, P, init="random", key=jax.random.key(5))
  return model, params, tree, jax.jit(peftjax.prompt.forward(model))


@pytest.fixture(scope="module")
def value_and_grad(llama):
  """The LM loss through ``prompt.forward``, differentiated and jitted once: ``vg(trainable, frozen)``."""
  fwd = peftjax.prompt.forward(llama[0])
  return jax.jit(jax.value_and_grad(lambda t, f: xent(fwd(peftjax.combine(t, f), IDS), IDS)))


@pytest.fixture(scope="module")
def bert():
  model = BertModel(BERT)
  params = random_params(model, 2)
  return model, params, peftjax.prompt.apply(params, P, key=jax.random.key(6))


def xent(logits, ids):
  logp = jax.nn.log_softmax(logits[:, :-1], -1)
  return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()


def hand_built(prompt, table, ids, mask):
  """The soft tokens written out: [prompt; table[ids]] and a mask with ones in front."""
  b = ids.shape[0]
  emb = jnp.concatenate([jnp.broadcast_to(prompt[None], (b,) + prompt.shape), table[ids]], 1)
  return emb, jnp.concatenate([jnp.ones((b, prompt.shape[0]), jnp.int32), mask], 1)


def test_init_modes_and_parameter_count(llama):
  _, params, tree, _ = llama
  table = params["embed_tokens"]["embedding"]
  assert isinstance(tree.prompt, SoftPrompt) and tree.prompt.shape == (P, 32)
  assert float(jnp.max(jnp.abs(tree.prompt.tokens))) <= 0.5
  s = peftjax.summary(tree)
  assert s.trainable == P * 32 and s.total == sum(x.size for x in jax.tree.leaves(params)) + P * 32
  voc = peftjax.prompt.init(params, 5, init="vocab", key=jax.random.key(1)).tokens
  assert all(np.any(np.all(np.asarray(table) == np.asarray(row), axis=1)) for row in voc)
  txt = peftjax.prompt.init(params, 5, init="text", text_ids=[7, 9]).tokens
  np.testing.assert_array_equal(txt, table[np.array([7, 9, 7, 9, 7])])
  assert peftjax.prompt.init(params, 2, init="text", text_ids=[7, 9, 11]).tokens.shape == (2, 32)


def test_forward_equals_hand_built_inputs(llama, bert):
  model, params, tree, fwd = llama
  mask = np.ones_like(IDS)
  emb, m = hand_built(tree.prompt.tokens, params["embed_tokens"]["embedding"], IDS, mask)
  ref = jax.jit(model.apply)({"params": params}, inputs_embeds=emb, attention_mask=m)
  got = fwd(tree, IDS, mask)
  assert got.shape == (2, 7, 48)
  np.testing.assert_allclose(got, ref[:, P:], rtol=1e-5, atol=1e-5)
  # BERT: token types extended; the sequence output is stripped, the pooled one is not
  model, params, tree = bert
  types = np.ones_like(IDS)
  emb, m = hand_built(tree.prompt.tokens, params["embeddings"]["word_embeddings"]["embedding"],
                      IDS, mask)
  ref = jax.jit(model.apply)({"params": params}, inputs_embeds=emb, attention_mask=m,
                             token_type_ids=np.concatenate([np.zeros((2, P), np.int32), types], 1))
  got = jax.jit(peftjax.prompt.forward(model))(tree, IDS, mask, token_type_ids=types)
  np.testing.assert_allclose(got.last_hidden_state, ref.last_hidden_state[:, P:], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(got.pooler_output, ref.pooler_output, rtol=1e-5, atol=1e-5)


def test_padding_and_causal_mask_are_respected(llama, bert):
  model, params, tree, fwd = llama
  ids, mask = IDS.copy(), np.ones_like(IDS)
  ids[1, :3], mask[1, :3] = 0, 0                      # left padding of row 1
  batch = fwd(tree, ids, mask)
  alone = jax.jit(peftjax.prompt.forward(model))(tree, IDS[1:, 3:])
  np.testing.assert_allclose(batch[1, 3:], alone[0], rtol=1e-5, atol=1e-5)
  changed = ids.copy()
  changed[:, -1] = (changed[:, -1] + 1) % 48          # a later token changes ...
  np.testing.assert_allclose(fwd(tree, changed, mask)[:, :-1], batch[:, :-1], rtol=1e-6,
                             atol=1e-6)               # ... no earlier output does
  # BERT, right padding: the real tokens do not see the padding
  model, params, tree = bert
  mask = np.ones_like(IDS)
  mask[0, 4:] = 0
  out = jax.jit(peftjax.prompt.forward(model))(tree, IDS, mask).last_hidden_state
  short = jax.jit(peftjax.prompt.forward(model))(tree, IDS[:1, :4]).last_hidden_state
  np.testing.assert_allclose(out[0, :4], short[0], rtol=1e-5, atol=1e-5)


def test_gradients_jit_and_no_jit(llama, value_and_grad):
  model, params, tree, _ = llama
  table = params["embed_tokens"]["embedding"]
  ref = lambda t: xent(model.apply({"params": params}, inputs_embeds=hand_built(
      t.prompt.tokens, table, IDS, np.ones_like(IDS))[0])[:, P:], IDS)
  trainable, frozen = peftjax.split(tree)
  _, g = value_and_grad(trainable, frozen)
  gr = jax.jit(jax.grad(lambda t: ref(peftjax.combine(t, frozen))))(trainable)
  np.testing.assert_allclose(g.prompt.tokens, gr.prompt.tokens, rtol=1e-4, atol=1e-6)
  assert float(jnp.max(jnp.abs(g.prompt.tokens))) > 0
  # without jit, through lift on a small function of the model inputs
  w = jnp.asarray(np.random.RandomState(1).randn(32, 5), jnp.float32)
  small = lambda t: jnp.sum(jnp.tanh(peftjax.prompt.prepend(
      t.prompt, peftjax.prompt.embed(t.params, IDS))["inputs_embeds"] @ w))
  gl = jax.grad(lambda t: peftjax.lift(small)(peftjax.combine(t, frozen)))(trainable)
  ge = jax.grad(lambda t: small(peftjax.merge(peftjax.combine(t, frozen))))(trainable)
  np.testing.assert_allclose(gl.prompt.tokens, ge.prompt.tokens, rtol=1e-5, atol=1e-6)


@pytest.mark.standard_promotion  # steps an optax optimizer (Adam: float ** int32 count)
def test_trains_with_optimizer_and_frozen_leaves_stay(llama, value_and_grad):
  model, params, tree, _ = llama
  tx = peftjax.optimizer(optax.adam(1e-1), tree)
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
  assert peftjax.summary(new).trainable == P * 32


def test_generation_equals_recompute(llama):
  model, params, tree, fwd = llama
  ids, mask = IDS.copy(), np.ones_like(IDS)
  ids[0, :2], mask[0, :2] = 0, 0
  out = peftjax.prompt.generate(model, tree, ids, mask, max_new_tokens=5, stop_tokens=())
  full = np.concatenate([ids, np.asarray(out.tokens)], 1)
  fmask = np.concatenate([mask, np.ones_like(out.tokens)], 1)
  logits = jax.jit(peftjax.prompt.forward(model))(tree, full, fmask)
  np.testing.assert_array_equal(np.argmax(logits[:, ids.shape[1] - 1:-1], -1), out.tokens)
  assert out.tokens.shape == (2, 5) and np.all(out.lengths == 5)


def test_labels_and_strip_helpers():
  lab = peftjax.prompt.extend_labels(jnp.array([[4, 5, 6]]), 2, ignore_index=-1)
  np.testing.assert_array_equal(lab, [[-1, -1, 4, 5, 6]])
  assert peftjax.prompt.strip(jnp.zeros((1, 5, 2)), 2).shape == (1, 3, 2)
  out = peftjax.prompt.prepend(jnp.ones((2, 3)), jnp.zeros((1, 4, 3)),
                               token_type_ids=jnp.ones((1, 4), jnp.int32))
  np.testing.assert_array_equal(out["token_type_ids"], [[0, 0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(out["attention_mask"], [[1] * 6])


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(n_tokens=0), "n_tokens must be a positive integer, got 0"),
    (dict(n_tokens=3, init="zeros"), r"init='zeros' is not one of \('vocab', 'random', 'text'\)"),
    (dict(n_tokens=3, init="text"), "init='text' needs text_ids"),
    (dict(n_tokens=3, init="text", text_ids=[1, 99]), r"text_ids must be integer token ids in "
                                                       r"\[0, 48\)"),
    (dict(n_tokens=3, embedding_path="tok/embedding"), "embedding_path='tok/embedding' is not a "
                                                       "path"),
    (dict(n_tokens=3, embedding_path="norm/scale"), r"embedding_path='norm/scale' is float32\[32\]"),
])
def test_bad_init(llama, kw, msg):
  with pytest.raises(ValueError, match=msg):
    peftjax.prompt.apply(llama[1], **kw)


def test_no_embedding_table():
  with pytest.raises(ValueError, match=r"(?s)found no token embedding table.*enc/fc/kernel"):
    peftjax.prompt.apply({"enc": {"fc": {"kernel": jnp.ones((4, 4))}}}, 2)


def test_model_without_inputs_embeds_hook():
  with pytest.raises(TypeError, match=r"prompt tuning needs a model that accepts `inputs_embeds=`; "
                                      r"TinyTransformer.__call__"):
    peftjax.prompt.forward(TinyTransformer())


@pytest.mark.parametrize("prompt,emb,mask,msg", [
    (jnp.ones((2, 5)), jnp.zeros((1, 4, 3)), None, r"the prompt must be \[n_tokens, 3\]"),
    (jnp.ones((2, 3)), jnp.zeros((4, 3)), None, r"inputs_embeds must be \[batch, seq, hidden\]"),
    (jnp.ones((2, 3)), jnp.zeros((1, 4, 3)), jnp.ones((1, 5)), r"attention_mask must have shape "
                                                               r"\(1, 4\)"),
])
def test_prepend_shape_errors(prompt, emb, mask, msg):
  with pytest.raises(ValueError, match=msg):
    peftjax.prompt.prepend(prompt, emb, mask)


def test_plain_tree_runs_the_base_model_and_generate_needs_a_prompt(llama):
  """peftjax.forward reads every tuned tree: a plain one is the model's own forward pass."""
  model, params, tree, _ = llama
  np.testing.assert_allclose(peftjax.prompt.forward(model)(params, IDS),
                             model.apply({"params": params}, IDS), rtol=1e-6)
  with pytest.raises(TypeError, match=r"peftjax.prompt.generate expects a tree with a prompt"):
    peftjax.prompt.generate(model, params, IDS, max_new_tokens=2)


@pytest.mark.parametrize("kw,err,msg", [
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be a positive integer, got 0"),
    (dict(temperature=-1.0), ValueError, "temperature must be >= 0"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0), ValueError, "sampling .* needs a PRNG key"),
])
def test_bad_generation_options(llama, kw, err, msg):
  model, params, tree, _ = llama
  with pytest.raises(err, match=msg):
    peftjax.prompt.generate(model, tree, IDS, **{"max_new_tokens": 2, **kw})


def test_generation_needs_a_causal_reference_model(bert):
  model, params, tree = bert
  with pytest.raises(TypeError, match="generation needs a peftjax.models.LlamaForCausalLM, got "
                                      "BertModel"):
    peftjax.prompt.generate(model, tree, IDS, max_new_tokens=2)
