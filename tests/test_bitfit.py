"""peftjax.bitfit: exactly the biases train (all, or the paper's query/intermediate subset)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peftjax
import peftjax.bitfit
from peftjax._src.selective import Trainable
from peftjax._src.targeting import leaves_with_paths
from peftjax.models.bert import BertConfig, BertForSequenceClassification
from peftjax.testing import TinyNNX, TinyTransformer
from _checks import check_lift_vs_merge

IDS = jax.random.randint(jax.random.key(1), (2, 6), 0, 64)
LABELS = jnp.array([0, 2])


@pytest.fixture(scope="module")
def bert():
  cfg = BertConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                   num_labels=3, max_position_embeddings=16)
  m = BertForSequenceClassification(cfg)
  return m, jax.jit(m.init)(jax.random.key(0), IDS)


def trained_paths(tree):
  return sorted(p for p, x in leaves_with_paths(tree) if isinstance(x, Trainable))


def xent(logits):
  return optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()


def test_bert_trains_exactly_the_biases(bert):
  _, v = bert
  biases = [(p, x) for p, x in leaves_with_paths(v) if p.endswith("/bias")]
  # 2 layers x (q, k, v, attn-out, attn LN, intermediate, out, out LN) + embeddings LN + pooler
  # + classifier
  assert len(biases) == 2 * 8 + 3
  tuned = peftjax.bitfit.apply(v)
  assert trained_paths(tuned) == sorted(p for p, _ in biases)
  s = peftjax.summary(tuned)
  assert s.trainable == sum(x.size for _, x in biases)
  assert s.total == sum(x.size for x in jax.tree.leaves(v))
  mask = jax.tree.leaves(peftjax.trainable_mask(tuned))
  assert sum(mask) == len(biases)
  assert peftjax.bitfit.bias_paths(v) == [p for p, _ in biases]


def test_paper_subset(bert):
  tuned = peftjax.bitfit.apply(bert[1], which="paper")
  assert trained_paths(tuned) == [f"params/layers_{i}/{m}/bias" for i in range(2)
                                  for m in ("attention/self/query", "intermediate/dense")]
  # Llama-like names: TinyTransformer has a bias only on up_proj (the SwiGLU intermediate)
  v = jax.eval_shape(TinyTransformer().init, jax.random.key(0), IDS)
  assert trained_paths(peftjax.bitfit.apply(v, which="paper")) == [
      "params/layers_0/up_proj/bias", "params/layers_1/up_proj/bias"]
  # a regex, module names, a callable, and a further `targets` restriction
  assert len(trained_paths(peftjax.bitfit.apply(bert[1], which=r".*/LayerNorm/bias"))) == 5
  assert len(trained_paths(peftjax.bitfit.apply(bert[1], which=["key", "value"]))) == 4
  assert len(trained_paths(peftjax.bitfit.apply(bert[1], which=lambda p, x: x.size == 3))) == 1
  assert trained_paths(peftjax.bitfit.apply(bert[1], which="paper", targets=r".*layers_1/.*")) == [
      "params/layers_1/attention/self/query/bias", "params/layers_1/intermediate/dense/bias"]


def test_nnx_state():
  _, state = nnx.split(TinyNNX(rngs=nnx.Rngs(0)))
  tuned = peftjax.bitfit.apply(state)
  assert peftjax.summary(tuned).trainable == 64 + 32 + 64


def _bump(tree):
  return jax.tree.map(lambda x: Trainable(x.value + 0.1) if isinstance(x, Trainable) else x,
                      tree, is_leaf=peftjax.is_node)


def test_lift_matches_merge_jit_bert(bert):
  m, v = bert
  tuned = _bump(peftjax.bitfit.apply(v))
  assert float(jnp.max(jnp.abs(m.apply(peftjax.merge(tuned), IDS) - m.apply(v, IDS)))) > 1e-3
  g = check_lift_vs_merge(m.apply, tuned, (IDS,), xent, use_jit=True)
  assert len(jax.tree.leaves(g)) == 19


def test_lift_matches_merge_no_jit():
  k1, k2 = jax.random.split(jax.random.key(0))
  params = {"fc1": {"kernel": jax.random.normal(k1, (6, 8)), "bias": jnp.zeros(8)},
            "ln": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
            "fc2": {"kernel": jax.random.normal(k2, (8, 3)), "bias": jnp.zeros(3)}}

  def fn(p, x):
    h = jnp.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"][None])
    h = (h - h.mean(-1, keepdims=True)) * p["ln"]["scale"][None] + p["ln"]["bias"][None]
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"][None]
  g = check_lift_vs_merge(fn, _bump(peftjax.bitfit.apply(params)), (jnp.ones((2, 6)),),
                           lambda y: jnp.sum(jnp.sin(y)), use_jit=False)
  assert len(jax.tree.leaves(g)) == 3


@pytest.mark.standard_promotion  # steps an optax optimizer (Adam: float ** int32 count)
def test_training_changes_only_biases(bert):
  m, v = bert
  tuned = peftjax.bitfit.apply(v)
  tx = peftjax.optimizer(optax.adam(1e-2), tuned)
  tr, fr = peftjax.split(tuned)
  state = tx.init(tr)

  @jax.jit
  def step(tr, state):
    loss, g = jax.value_and_grad(
        lambda t: xent(peftjax.lift(m.apply)(peftjax.combine(t, fr), IDS)))(tr)
    u, state = tx.update(g, state, tr)
    return optax.apply_updates(tr, u), state, loss

  losses = []
  for _ in range(5):
    tr, state, loss = step(tr, state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  after = dict(leaves_with_paths(peftjax.merge(peftjax.combine(tr, fr))))
  for p, x in leaves_with_paths(v):
    if p.endswith("/bias"):
      assert not np.array_equal(after[p], x), p
    else:
      np.testing.assert_array_equal(after[p], x)


# -- bad input -----------------------------------------------------------------------------------

def test_model_without_biases_suggests_alternatives():
  params = {"layers_0": {"q_proj": {"kernel": jnp.ones((4, 4))}}, "norm": {"scale": jnp.ones(4)}}
  with pytest.raises(ValueError, match=r"(?s)no bias parameters.*peftjax.lora.apply.*IA3.*"
                                       r"peftjax.partial.apply.*layers_0/q_proj/kernel"):
    peftjax.bitfit.apply(params)


def test_paper_subset_missing():
  params = {"attn": {"key": {"bias": jnp.zeros(4)}}}
  with pytest.raises(ValueError, match=r"(?s)which='paper' matched none of the model's 1 biases.*"
                                       r"PAPER_MODULES.*attn/key/bias"):
    peftjax.bitfit.apply(params, which="paper")


@pytest.mark.parametrize("which,err,msg", [
    ("(", ValueError, r"which='\(' is neither 'all', 'paper' nor a valid regular expression"),
    (3, TypeError, "which must be 'all', 'paper'"),
    ([], TypeError, "which must be 'all', 'paper'"),
])
def test_bad_which(which, err, msg):
  with pytest.raises(err, match=msg):
    peftjax.bitfit.apply({"d": {"bias": jnp.zeros(2)}}, which=which)


def test_bias_already_rewritten_names_path():
  params = {"d": {"bias": jnp.zeros(2)}}
  with pytest.raises(ValueError, match=r"bitfit: d/bias is already rewritten by another method "
                                       r"\(Trainable\[2\]\)"):
    peftjax.bitfit.apply(peftjax.bitfit.apply(params))


def test_bias_that_is_not_an_array():
  with pytest.raises(TypeError, match=r"bitfit: d/bias is not an array: float 0.5"):
    peftjax.bitfit.apply({"d": {"bias": 0.5}})


def test_integer_bias():
  with pytest.raises(TypeError, match=r"bitfit: d/bias is not a floating array \(int32\[2\]\)"):
    peftjax.bitfit.apply({"d": {"bias": jnp.zeros(2, jnp.int32)}})
