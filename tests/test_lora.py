"""peftjax.lora.apply: structure, initialization, layouts, dropout, unmerge and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax
from peftjax.lora import LoraWeight, default_layout
from peftjax.testing import TinyTransformer

TOK = jnp.zeros((1, 4), jnp.int32)


@pytest.fixture(scope="module")
def variables():
  return TinyTransformer().init(jax.random.key(0), TOK)


@pytest.fixture(scope="module")
def scanned():
  return TinyTransformer(scan=True, dense_general=True, layers=3).init(jax.random.key(0), TOK)


def nodes(tree):
  return {p: x for p, x in peftjax._src.targeting.leaves_with_paths(tree) if isinstance(x, LoraWeight)}


def test_default_targets_all_linear_layers(variables):
  tuned = peftjax.lora.apply(variables, rank=4)
  got = sorted(nodes(tuned))
  want = sorted(f"params/layers_{i}/{m}/kernel" for i in range(2) for m in
                ["attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "gate_proj",
                 "up_proj", "down_proj"])
  assert got == want  # no embedding, norm, bias or lm_head


def test_shapes_scale_and_init(variables):
  tuned = peftjax.lora.apply(variables, rank=4, alpha=16)
  n = tuned["params"]["layers_0"]["gate_proj"]["kernel"]
  assert n.a.shape == (32, 4) and n.b.shape == (4, 64) and n.scale == 4.0
  assert not np.any(np.asarray(n.b))
  bound = 1 / math.sqrt(32)  # HF PEFT: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))
  assert float(jnp.max(jnp.abs(n.a))) <= bound and float(jnp.std(n.a)) > 0.4 * bound
  assert peftjax.lora.apply(variables, rank=4)["params"]["layers_0"]["gate_proj"]["kernel"].scale == 1.0
  assert peftjax.lora.apply(variables, rank=4, alpha=8, rslora=True)[
      "params"]["layers_0"]["gate_proj"]["kernel"].scale == 4.0
  g = peftjax.lora.apply(variables, rank=4, init="gaussian")["params"]["layers_0"]["gate_proj"]["kernel"]
  assert abs(float(jnp.std(g.a)) - 0.25) < 0.05


def test_parameter_count_formula(variables):
  tuned = peftjax.lora.apply(variables, rank=4)
  s = peftjax.summary(tuned)
  # r * (d_in + d_out) per kernel
  per_layer = 4 * ((32 + 32) * 4 + (32 + 64) * 2 + (64 + 32))
  assert s.trainable == 2 * per_layer
  assert s.total == sum(x.size for x in jax.tree.leaves(variables)) + s.trainable


def test_keys_derive_from_path_not_order(variables):
  t1 = peftjax.lora.apply(variables, rank=4, key=jax.random.key(3))
  sub = {"params": {"layers_1": variables["params"]["layers_1"]}}
  t2 = peftjax.lora.apply(sub, rank=4, key=jax.random.key(3))
  np.testing.assert_array_equal(t1["params"]["layers_1"]["up_proj"]["kernel"].a,
                                t2["params"]["layers_1"]["up_proj"]["kernel"].a)
  assert not np.array_equal(t1["params"]["layers_1"]["up_proj"]["kernel"].a,
                            t1["params"]["layers_0"]["up_proj"]["kernel"].a[:, :4]
                            if False else t1["params"]["layers_0"]["up_proj"]["kernel"].a)


def test_layer_stacked_and_dense_general_layouts(scanned):
  tuned = peftjax.lora.apply(scanned, rank=2)
  q = tuned["params"]["layers"]["attn"]["q_proj"]["kernel"]   # [L, d, H, Dh]
  o = tuned["params"]["layers"]["attn"]["o_proj"]["kernel"]   # [L, H, Dh, d]
  up = tuned["params"]["layers"]["up_proj"]["kernel"]         # [L, d, ffn]
  assert q.w.shape == (3, 32, 4, 8) and q.a.shape == (3, 32, 2) and q.b.shape == (3, 2, 4, 8)
  assert o.a.shape == (3, 4, 8, 2) and o.b.shape == (3, 2, 32)
  assert up.a.shape == (3, 32, 2) and up.n_batch == 1
  # per-layer initialization: layers differ
  assert not np.array_equal(up.a[0], up.a[1])
  assert default_layout("x/kernel", (32, 4, 8)) == (0, 1)
  assert default_layout("x/kernel", (4, 16, 64)) == (0, 2)
  assert default_layout("layers/x/kernel", (6, 64, 64)) == (1, 1)


def test_custom_layout_and_targets(variables):
  tuned = peftjax.lora.apply(variables, rank=2, targets=r".*/(q_proj|v_proj)/kernel")
  assert sorted(p.split("/")[-2] for p in nodes(tuned)) == ["q_proj", "q_proj", "v_proj", "v_proj"]
  tuned = peftjax.lora.apply(variables, rank=2, targets=["down_proj"])
  assert len(nodes(tuned)) == 2
  tuned = peftjax.lora.apply(variables, rank=2,
                             targets=lambda p, x: p.endswith("lm_head/kernel"))
  assert list(nodes(tuned)) == ["params/lm_head/kernel"]


def test_dropout_is_keyed_and_off_without_key(variables):
  m = TinyTransformer()
  tuned = peftjax.lora.apply(variables, rank=4, dropout=0.5)
  tuned = jax.tree.map(lambda x: x.replace(b=jnp.ones_like(x.b)) if isinstance(x, LoraWeight) else x,
                       tuned, is_leaf=peftjax.is_node)
  tok = jnp.arange(8)[None] % 64
  f = peftjax.lift(m.apply)
  ref = m.apply(peftjax.merge(tuned), tok)
  np.testing.assert_allclose(f(tuned, tok), ref, rtol=2e-5, atol=2e-5)  # no key: evaluation mode
  k1 = peftjax.lora.set_dropout_key(tuned, jax.random.key(1))
  k1b = peftjax.lora.set_dropout_key(tuned, jax.random.key(1))
  k2 = peftjax.lora.set_dropout_key(tuned, jax.random.key(2))
  y1, y1b, y2 = f(k1, tok), f(k1b, tok), f(k2, tok)
  np.testing.assert_array_equal(y1, y1b)
  assert float(jnp.max(jnp.abs(y1 - ref))) > 1e-3 and float(jnp.max(jnp.abs(y1 - y2))) > 1e-3
  # dropout keys are frozen, not trained
  mask = peftjax.trainable_mask(k1)["params"]["layers_0"]["up_proj"]["kernel"]
  assert mask.dropout_key is False or not np.any(mask.dropout_key)
  back = peftjax.lora.set_dropout_key(k1, None)
  np.testing.assert_allclose(f(back, tok), ref, rtol=2e-5, atol=2e-5)


def test_unmerge_round_trip(variables):
  tuned = peftjax.lora.apply(variables, rank=4)
  tuned = jax.tree.map(lambda x: x.replace(b=jnp.full_like(x.b, 0.1)) if isinstance(x, LoraWeight)
                       else x, tuned, is_leaf=peftjax.is_node)
  merged = peftjax.merge(tuned)
  back = peftjax.lora.unmerge(merged, tuned)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tuned)):
    np.testing.assert_allclose(a, b, atol=1e-6)


# -- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [0, -1, 2.5, True])
def test_bad_rank(variables, rank):
  with pytest.raises(ValueError, match="rank must be a positive integer"):
    peftjax.lora.apply(variables, rank=rank)


def test_rank_too_large_names_path(variables):
  with pytest.raises(ValueError, match=r"rank=33 is larger than params/layers_0/attn/[qkvo]_proj/kernel allows.*rank <= 32"):
    peftjax.lora.apply(variables, rank=33)


def test_pattern_matching_nothing_shows_paths(variables):
  with pytest.raises(ValueError, match=r"(?s)matched no leaf.*params/embed/embedding"):
    peftjax.lora.apply(variables, rank=2, targets=r".*/query/kernel")


def test_target_not_a_kernel(variables):
  with pytest.raises(ValueError, match=r"target params/layers_0/up_proj/bias is not a kernel"):
    peftjax.lora.apply(variables, rank=2, targets=r".*/up_proj/bias")


def test_lora_twice(variables):
  tuned = peftjax.lora.apply(variables, rank=2)
  with pytest.raises(ValueError, match=r"params/layers_0/attn/[qkvo]_proj/kernel already has LoRA"):
    peftjax.lora.apply(tuned, rank=2)


@pytest.mark.parametrize("kw,msg", [(dict(alpha=float("nan")), "alpha must be"),
                                    (dict(dropout=1.0), "dropout must be"),
                                    (dict(init="xavier"), "init='xavier' is not supported")])
def test_bad_options(variables, kw, msg):
  with pytest.raises(ValueError, match=msg):
    peftjax.lora.apply(variables, rank=2, **kw)


def test_bad_layout(variables):
  with pytest.raises(ValueError, match="layout for params/layers_0"):
    peftjax.lora.apply(variables, rank=2, layout=lambda p, s: (0, 2))


def test_unmerge_shape_mismatch(variables):
  tuned = peftjax.lora.apply(variables, rank=2, targets=["up_proj"])
  merged = peftjax.merge(tuned)
  merged["params"]["layers_0"]["up_proj"]["kernel"] = jnp.zeros((3, 3))
  with pytest.raises(ValueError, match="merged kernel shape"):
    peftjax.lora.unmerge(merged, tuned)
