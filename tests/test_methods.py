"""The method registry: every record builds, trains one step and agrees with the tree it builds.

A method's capabilities are declared in its record (``mergeable``, ``hf_peft_type``, ``forward``,
``step_hook``, ``penalty``) and, for the nodes it makes, on the node types. These tests build every
registered method on a small Llama with biases and check that the two agree, so the command line
(which reads only the records) cannot promise what the tree cannot do.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
from peftjax import methods
from peftjax.models import LlamaConfig, LlamaForCausalLM

CFG = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                  num_kv_heads=1, qkv_bias=True, o_bias=True, mlp_bias=True)
IDS = jnp.asarray(np.random.RandomState(0).randint(0, 32, (2, 6)), jnp.int32)


@pytest.fixture(scope="module")
def llama():
  model = LlamaForCausalLM(CFG)
  params = jax.jit(model.init)(jax.random.key(0), IDS)["params"]
  return model, params


SMALL = {"n_tokens": 3, "prefix_hidden": 8, "bottleneck": 4, "top_layers": 1,
         "encoder_hidden": 8, "block_size": 4}


def _build(method, llama):
  model, params = llama
  opts = {k: v for k, v in SMALL.items() if k in {o.name for o in method.options}}
  return method.build(params, opts, model=model, key=jax.random.key(1))


def test_names_aliases_and_lookup():
  names = methods.names()
  assert names == [m.name for m in methods.all_methods().values()]
  assert len(set(names)) == len(names)
  for name, m in methods.all_methods().items():
    assert methods.get(name) is m and getattr(peftjax, name).METHOD is m
    for alias in m.aliases:
      assert methods.get(alias) is m
  with pytest.raises(ValueError, match="unknown method 'boft'; known methods: lora, qlora"):
    methods.get("boft")


@pytest.mark.parametrize("name", methods.names())
def test_record_agrees_with_the_tree_it_builds(name, llama):
  method = methods.get(name)
  model, params = llama
  tree = _build(method, llama)
  t = peftjax.as_tuned(tree)
  nodes = [x for x in jax.tree_util.tree_leaves(t.params, is_leaf=peftjax.is_node)
           if peftjax.is_node(x)]
  slot_nodes = [x for x in t.slots().values() if peftjax.is_node(x)]
  assert peftjax.summary(tree).trainable > 0
  # mergeable: every weight node folds into an array and nothing lives outside the weights
  assert method.mergeable == (all(type(n).mergeable for n in nodes) and not t.slots())
  # a method that adds model inputs changes the forward pass
  assert (method.forward is not None) == bool(t.slots())
  # the HF PEFT type the CLI promises is the one the nodes carry (after finalize)
  final = method.finalize(tree) if method.finalize else tree
  ft = peftjax.as_tuned(final)
  kinds = {type(n).hf_peft_type for n in
           jax.tree_util.tree_leaves(ft, is_leaf=peftjax.is_node) if peftjax.is_node(n)
           and type(n).trainable_fields} - {None}
  if method.hf_peft_type is None:
    assert not kinds or name == "full"
  else:
    assert kinds == {method.hf_peft_type}
  # a per-step hook is there exactly when a node wants per-step randomness
  wants = any(n.wants_rng() for n in nodes + slot_nodes)
  if wants:
    assert method.step_hook is not None
  del model, params


@pytest.mark.parametrize("name", methods.names())
def test_one_training_step_through_the_record(name, llama):
  """forward, step_hook and penalty from the record: the loss is finite and the trainable leaves
  move (the same path the command line takes)."""
  method = methods.get(name)
  model, _ = llama
  tree = _build(method, llama)
  if name == "lora" or name == "qlora":   # B starts at zero: dropout and both factors in play
    tree = method.build(llama[1], {"lora_dropout": 0.1}, key=jax.random.key(1))
  forward = method.forward(model) if method.forward else peftjax.forward(model)
  penalty = method.bound_penalty({})
  tx = peftjax.optimizer(optax.adam(1e-2), tree)
  trainable, frozen = peftjax.split(tree)

  @jax.jit
  def loss(t, key):
    full = peftjax.combine(t, frozen)
    if method.step_hook is not None:
      full = method.step_hook(full, key)
    logits = forward(full, IDS)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    out = -jnp.take_along_axis(logp, IDS[:, 1:, None], -1).mean()
    return out + (penalty(full) if penalty else 0.0)

  value, grads = jax.value_and_grad(loss)(trainable, jax.random.key(2))
  assert np.isfinite(float(value))
  updates, _ = tx.update(grads, tx.init(trainable), trainable)
  moved = optax.apply_updates(trainable, updates)
  delta = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree_util.tree_leaves(moved), jax.tree_util.tree_leaves(trainable)))
  assert delta > 0


def test_option_values_and_build_errors():
  lora = methods.get("lora")
  assert lora.option_values({"rank": "4"})["rank"] == 4
  with pytest.raises(ValueError, match="lora option rank: expected a positive integer, got '0'"):
    lora.option_values({"rank": "0"})
  with pytest.raises(ValueError, match="lora has no option 'density'"):
    lora.option_values({"density": 0.1})
  with pytest.raises(ValueError, match=r"adapters option placement: expected one of "
                                       r"\['houlsby', 'pfeiffer', 'parallel'\], got 'side'"):
    methods.get("adapter").option_values({"placement": "side"})
  with pytest.raises(TypeError, match="prefix needs the model"):
    methods.get("prefix").build({}, {})


def test_register_a_method_and_refuse_a_taken_name():
  m = peftjax.Method(name="doc_noop_method", apply=lambda params: params, description="no-op")
  try:
    assert methods.register(m) is m and methods.get("doc_noop_method") is m
    with pytest.raises(ValueError, match="method name 'lora' is already taken by lora"):
      methods.register(m._replace(name="lora"))
    with pytest.raises(TypeError, match="register expects a peftjax Method record"):
      methods.register(object())
  finally:
    from peftjax._src import method as method_lib
    method_lib._REGISTERED.pop("doc_noop_method", None)
