"""peftjax.ia3: targets, counts, identity init, exact merge (lift == fn(merge)), gradients,
nesting over LoRA, training, generation and bad input."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import peftjax
import peftjax.ia3
from peftjax._src.targeting import leaves_with_paths
from peftjax.ia3 import IA3Weight
from peftjax.lora import LoraWeight
from peftjax.models import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, generate
import _additive_helpers
from _additive_helpers import jitted_update, jitted


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


def stack_layers(params, n):
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layers_{i}"] for i in range(n)])
  return out


def randomize(tree, scale=0.5):
  """IA3 vectors ``1 + noise`` and LoRA ``b`` noise, keyed by path (NumPy)."""
  def visit(path, x):
    r = np.random.RandomState(zlib.crc32(jax.tree_util.keystr(path).encode()))
    if isinstance(x, IA3Weight):
      w = visit(path + (jax.tree_util.GetAttrKey("w"),), x.w)
      return x.replace(w=w, vector=jnp.asarray(1 + scale * r.randn(*x.vector.shape), jnp.float32))
    if isinstance(x, LoraWeight):
      return x.replace(b=jnp.asarray(scale * r.randn(*x.b.shape), jnp.float32))
    return x
  return jax.tree_util.tree_map_with_path(visit, tree, is_leaf=peftjax.is_node)


def ia3_nodes(tree):
  return {p: x for p, x in leaves_with_paths(tree) if isinstance(x, IA3Weight)}


def xent(logits, ids):
  logp = jax.nn.log_softmax(logits[:, :-1], -1)
  return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()


def test_targets_and_parameter_counts(llama, bert):
  for (model, params), cfg, names in [
      (llama, LLAMA, {"self_attn/k_proj": "out", "self_attn/v_proj": "out", "mlp/down_proj": "in"}),
      (bert, BERT, {"attention/self/key": "out", "attention/self/value": "out",
                    "output/dense": "in"})]:
    tuned = peftjax.ia3.apply(params)
    got = {p: x.side for p, x in ia3_nodes(tuned).items()}
    assert got == {f"layers_{i}/{n}/kernel": side for i in range(cfg.num_layers)
                   for n, side in names.items()}
    d_kv = getattr(cfg, "num_kv_heads", cfg.num_heads) * cfg.head_dim
    assert peftjax.summary(tuned).trainable == cfg.num_layers * (d_kv + d_kv +
                                                                cfg.intermediate_size)
    for x in ia3_nodes(tuned).values():
      assert not np.any(np.asarray(x.vector) != 1)
    for a, b in zip(jax.tree.leaves(peftjax.merge(tuned)), jax.tree.leaves(params)):
      np.testing.assert_array_equal(a, b)   # merge at init is exactly the base


def test_merge_is_the_scaled_kernel(llama):
  tuned = randomize(peftjax.ia3.apply(llama[1]))
  k = tuned["layers_0"]["self_attn"]["k_proj"]["kernel"]
  d = tuned["layers_0"]["mlp"]["down_proj"]["kernel"]
  np.testing.assert_allclose(k.materialize(), k.w * k.vector[None, :], rtol=1e-6)
  np.testing.assert_allclose(d.materialize(), d.w * d.vector[:, None], rtol=1e-6)
  st = randomize(peftjax.ia3.apply(stack_layers(llama[1], 2)))
  sd = st["layers"]["mlp"]["down_proj"]["kernel"]
  assert sd.n_batch == 1 and sd.vector.shape == (2, 48)
  np.testing.assert_allclose(sd.materialize(), sd.w * sd.vector[:, :, None], rtol=1e-6)


@pytest.fixture(scope="module")
def tuned_llama(llama):
  """IA3 vectors away from one, and the jitted value-and-grad of the LM loss through lift."""
  model, params = llama
  lifted = peftjax.lift(model.apply)
  vg = jax.jit(jax.value_and_grad(
      lambda t, f: xent(lifted({"params": peftjax.combine(t, f)}, IDS), IDS)))
  return randomize(peftjax.ia3.apply(params)), vg


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_lift_equals_merged_model(llama, bert, which):
  model, params = llama if which == "llama" else bert
  tuned = peftjax.ia3.apply(params)
  f = jitted(peftjax.lift(model.apply), "lift", which)
  plain = jitted(model.apply, "plain", which)
  for a, b in zip(jax.tree.leaves(f({"params": tuned}, IDS)),
                  jax.tree.leaves(plain({"params": params}, IDS))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # the identity at init
  tuned = randomize(tuned)
  ref = plain({"params": peftjax.merge(tuned)}, IDS)
  out = f({"params": tuned}, IDS)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  if which == "llama":   # layer-stacked (nn.scan) model, same vectors
    smodel = LlamaForCausalLM(LLAMA, scan_layers=True)
    sout = jax.jit(peftjax.lift(smodel.apply))({"params": stack_layers(tuned, 2)}, IDS)
    np.testing.assert_allclose(sout, ref, rtol=2e-5, atol=2e-5)


def test_gradients_equal_merged_reference_jit(llama, tuned_llama):
  model, _ = llama
  tuned, vg = tuned_llama
  trainable, frozen = peftjax.split(tuned)
  ref_loss = lambda t: xent(model.apply({"params": peftjax.merge(peftjax.combine(t, frozen))},
                                        IDS), IDS)
  (l, g), (lr, gr) = vg(trainable, frozen), jax.jit(jax.value_and_grad(ref_loss))(trainable)
  np.testing.assert_allclose(l, lr, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert all(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree.leaves(g))


def test_nested_over_lora_stacked_batched_no_jit():
  """IA3 over a LoRA kernel, over a stacked kernel in a batched dot_general; values and
  gradients equal the merged reference without jit."""
  rng = np.random.RandomState(0)
  params = {"layers": {"attn": {"k_proj": {"kernel": jnp.asarray(rng.randn(2, 6, 4), jnp.float32)}}},
            "attn": {"v_proj": {"kernel": jnp.asarray(rng.randn(6, 4), jnp.float32)}},
            "mlp": {"down_proj": {"kernel": jnp.asarray(rng.randn(4, 6), jnp.float32)}}}
  tuned = peftjax.lora.apply(params, rank=2, targets=["v_proj"])
  tuned = randomize(peftjax.ia3.apply(tuned))
  v = tuned["attn"]["v_proj"]["kernel"]
  assert isinstance(v, IA3Weight) and isinstance(v.w, LoraWeight) and v.side == "out"
  assert tuned["layers"]["attn"]["k_proj"]["kernel"].n_batch == 1

  def f(p, x):                                                         # x [2, 3, 6]
    k = lax.dot_general(x, p["layers"]["attn"]["k_proj"]["kernel"], (((2,), (1,)), ((0,), (0,))))
    h = jnp.tanh(k[0] * (x[1] @ p["attn"]["v_proj"]["kernel"]))
    return h @ p["mlp"]["down_proj"]["kernel"]

  x = jnp.asarray(rng.randn(2, 3, 6), jnp.float32)
  np.testing.assert_allclose(peftjax.lift(f)(tuned, x), f(peftjax.merge(tuned), x), rtol=1e-5,
                             atol=1e-5)
  trainable, frozen = peftjax.split(tuned)
  g = jax.grad(lambda t: jnp.sum(peftjax.lift(f)(peftjax.combine(t, frozen), x) ** 2))(trainable)
  gr = jax.grad(lambda t: jnp.sum(f(peftjax.merge(peftjax.combine(t, frozen)), x) ** 2))(trainable)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gr)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.standard_promotion  # steps an optax optimizer (Adam: float ** int32 count)
def test_trains_with_optimizer_and_frozen_leaves_stay(tuned_llama):
  tuned, vg = tuned_llama
  tx = peftjax.optimizer(optax.adam(5e-2), tuned)
  update = jitted_update(tx)
  trainable, frozen = peftjax.split(tuned)
  state = tx.init(trainable)
  losses = []
  for _ in range(8):
    l, g = vg(trainable, frozen)
    trainable, state = update(g, state, trainable)
    losses.append(float(l))
  assert losses[-1] < losses[0] - 0.1, losses
  new = peftjax.combine(trainable, frozen)
  for a, b in zip(jax.tree.leaves(peftjax.split(new)[1]), jax.tree.leaves(peftjax.split(tuned)[1])):
    np.testing.assert_array_equal(a, b)
  assert peftjax.summary(new).trainable == 2 * (16 + 16 + 48)


def test_generation_uses_lift_and_equals_merged_recompute(llama, tuned_llama):
  model, params = llama
  tuned = tuned_llama[0]
  ids, mask = IDS.copy(), np.ones_like(IDS)
  ids[0, :2], mask[0, :2] = 0, 0
  out = generate(model, tuned, ids, mask, max_new_tokens=5, stop_tokens=())
  full = np.concatenate([ids, np.asarray(out.tokens)], 1)
  fmask = np.concatenate([mask, np.ones_like(out.tokens)], 1)
  logits = jax.jit(model.apply)({"params": peftjax.merge(tuned)}, full, attention_mask=fmask)
  np.testing.assert_array_equal(np.argmax(logits[:, ids.shape[1] - 1:-1], -1), out.tokens)


# -- bad input ------------------------------------------------------------------------------------

def test_nothing_matched_shows_paths():
  with pytest.raises(ValueError, match=r"(?s)IA3 targets=None, feedforward=None matched no kernel"
                                       r".*enc/fc/kernel"):
    peftjax.ia3.apply({"enc": {"fc": {"kernel": jnp.ones((4, 4))}}})


def test_targets_that_match_nothing_raise_instead_of_falling_back(llama):
  for kw in (dict(targets=["nonexistent"]), dict(feedforward=["nonexistent"]),
             dict(targets=r".*/nope/kernel", feedforward=[])):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"(?s)IA3 {name}=.*matched no kernel.*layers_0/"):
      peftjax.ia3.apply(llama[1], **kw)


def test_feedforward_is_a_subset_of_targets_as_in_hf_peft(llama):
  """HF PEFT's convention: feedforward_modules inside target_modules; those scale their input."""
  tuned = peftjax.ia3.apply(llama[1], targets=["k_proj", "v_proj", "down_proj"],
                            feedforward=["down_proj"])
  layer = tuned["layers_0"]
  assert layer["mlp"]["down_proj"]["kernel"].side == "in"
  assert layer["self_attn"]["k_proj"]["kernel"].side == "out"
  assert not peftjax.is_node(layer["mlp"]["up_proj"]["kernel"])
  # a kernel in both (here by the default feedforward) gets one vector, on its input
  tuned = peftjax.ia3.apply(llama[1], targets=r".*/(k_proj|down_proj)/kernel")
  assert tuned["layers_0"]["mlp"]["down_proj"]["kernel"].side == "in"


def test_twice_not_a_kernel_and_layout(llama):
  tuned = peftjax.ia3.apply(llama[1])
  with pytest.raises(ValueError, match=r"layers_0/mlp/down_proj/kernel already has IA3"):
    peftjax.ia3.apply(tuned, targets=[])
  with pytest.raises(ValueError, match=r"target layers_0/input_layernorm/scale is not a kernel"):
    peftjax.ia3.apply(llama[1], targets=r".*/input_layernorm/scale", feedforward=[])
  with pytest.raises(ValueError, match=r"layout for layers_0/.* gave n_batch=1, n_in=1"):
    peftjax.ia3.apply(llama[1], layout=lambda p, s: (1, 1))
