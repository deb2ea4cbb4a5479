"""Adapter pools (peftjax.multi): the pooled forward equals each adapter's own forward row by row
(scanned or not, f32 and bf16, QLoRA bases, IA3), in KV-cache generation too; training the pool
equals training each adapter alone; hot-swapping adapters does not recompile."""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
from peftjax import multi
from peftjax.lora import LoraWeight
from peftjax.models import LlamaConfig, LlamaForCausalLM, generate

TINY = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, rope_theta=10000.0, eos_token_id=2,
                   pad_token_id=0)
TOK = jnp.asarray(np.random.RandomState(0).randint(3, 96, (4, 6)), jnp.int32)


@functools.lru_cache(maxsize=None)
def llama(scan: bool = False, dtype=jnp.float32):
  """The tiny Llama: two scanned layers, or one unscanned (``layers_0``; fewer ops to compile,
  and every kernel is its own pool node either way)."""
  cfg = TINY if scan else dataclasses.replace(TINY, num_layers=1)
  model = LlamaForCausalLM(cfg, scan_layers=scan, dtype=dtype)
  params = jax.jit(model.init)(jax.random.key(1), jnp.ones((1, 4), jnp.int32))["params"]
  # sharpen the random model a little so greedy choices are not near-ties
  params = jax.tree_util.tree_map(lambda x: x * 3.0 if x.ndim >= 2 else x, params)
  return model, params


def acting(tree, seed, scale=0.3):
  """``tree`` with every LoRA ``b`` random (it starts at zero) and IA3 vectors away from ones."""
  def f(path, x):
    k = jax.random.fold_in(jax.random.key(seed), len(jax.tree_util.keystr(path)))
    if isinstance(x, LoraWeight):
      return x.replace(b=jax.random.normal(k, x.b.shape, x.b.dtype) * scale)
    if isinstance(x, peftjax.ia3.IA3Weight):
      return x.replace(vector=1.0 + jax.random.normal(k, x.vector.shape, x.vector.dtype) * scale)
    return x
  return jax.tree_util.tree_map_with_path(f, tree, is_leaf=peftjax.is_node)


@functools.lru_cache(maxsize=None)
def adapters(scan: bool = False):
  """Three LoRA adapters of different ranks, scales and targets on the tiny Llama."""
  _, params = llama(scan)
  return {
      "summarize": acting(peftjax.lora.apply(params, rank=2, alpha=4.0, key=jax.random.key(1)), 1),
      "translate": acting(peftjax.lora.apply(params, rank=4, alpha=2.0, key=jax.random.key(2),
                                             targets=["q_proj", "v_proj"]), 2),
      "code": acting(peftjax.lora.apply(params, rank=3, key=jax.random.key(3), rslora=True,
                                        targets=["q_proj", "down_proj", "up_proj"]), 3),
  }


@functools.lru_cache(maxsize=None)
def lifted(model):
  """``jit(lift(model.apply))``, one per model (compiled once per tree structure)."""
  return jax.jit(peftjax.lift(model.apply))


@functools.lru_cache(maxsize=None)
def plain(model):
  return jax.jit(model.apply)


@functools.lru_cache(maxsize=None)
def twins(scan: bool = False, n: int = 3):
  """``n`` LoRA adapters of one structure (rank, scale, targets), different values: their own
  forward passes share one compiled program."""
  _, params = llama(scan)
  return {f"t{i}": acting(peftjax.lora.apply(params, rank=2, key=jax.random.key(10 + i)), 10 + i)
          for i in range(1, n + 1)}


def own_logits(model, tree, tokens=TOK):
  return lifted(model)({"params": tree}, tokens)


def assert_same_adapter(got, want, tol=None):
  """Same nodes and arrays (to ``tol``, else exactly); LoRA scales to float32 precision (a pool
  keeps them as a float32 array)."""
  def norm(t):
    return jax.tree_util.tree_map(
        lambda x: x.replace(scale=round(float(np.float32(x.scale)), 5))
        if isinstance(x, LoraWeight) else x, t, is_leaf=peftjax.is_node)
  got, want = norm(got), norm(want)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    assert a.dtype == b.dtype
    if tol is None:
      assert np.array_equal(np.asarray(a), np.asarray(b))
    else:
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), **tol)


IDS = [1, 3, 0, 2]   # rows: summarize, code, the base, translate


def check_rows(model, pooled_logits, ads, ids, tol, merged=False):
  """Row ``i`` of the pooled logits == row ``i`` of adapter ``ids[i]``'s own forward (slot 0:
  the base model). ``merged``: the adapters' own forward on their merged kernels
  (``fn(merge(tree))``, lift's reference; one compiled program for all)."""
  names = [None, *ads]
  for row, k in enumerate(ids):
    if k == 0:
      want = plain(model)({"params": llama(model.scan_layers, model.dtype)[1]}, TOK)
    elif merged:
      want = plain(model)({"params": peftjax.merge(ads[names[k]])}, TOK)
    else:
      want = own_logits(model, ads[names[k]])
    want = want[row]
    np.testing.assert_allclose(np.asarray(pooled_logits[row], np.float32),
                               np.asarray(want, np.float32), **tol)


@pytest.fixture(params=["one_hot", "gather"])
def pool_path(request, monkeypatch):
  """Each of the two ways a LoRA pool computes its update (``multi.ONE_HOT_MAX`` picks one by
  shape; a test using this traces afresh)."""
  monkeypatch.setattr(multi, "ONE_HOT_MAX", 10**9 if request.param == "one_hot" else 0)
  return request.param


# ------------------------------------------------------------------------------------------------
# the forward pass
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan", [False, True], ids=["layers", "scan"])
def test_pooled_forward_equals_each_adapter_row_by_row(scan, pool_path):
  model, params = llama(scan)
  ads = adapters(scan)
  if scan:   # two of them (different ranks, scales and targets): fewer programs to compile
    ads = {n: ads[n] for n in ("translate", "code")}
  pool = multi.stack(ads)
  assert multi.slot_names(pool) == (None, *ads)
  q = pool["layers" if scan else "layers_0"]["self_attn"]["q_proj"]["kernel"]
  n, lead = len(ads) + 1, (TINY.num_layers,) if scan else ()
  assert isinstance(q, multi.LoraPool) and q.a.shape == (*lead, n, 64, 4)
  assert q.b.shape == (*lead, n, 4, 64) and q.scales.shape == (*lead, n)
  scales = {"summarize": 2.0, "translate": 0.5, "code": np.sqrt(3.0)}   # alpha/r, rsLoRA
  np.testing.assert_allclose(np.asarray(q.scales).reshape(-1, n)[0],
                             [0.0, *(scales[k] for k in ads)], rtol=1e-6)
  ids = IDS if not scan else [1, 2, 0, 2]
  got = jax.jit(peftjax.lift(model.apply))({"params": multi.route(pool, ids)}, TOK)
  check_rows(model, got, ads, ids, dict(atol=1e-5, rtol=1e-5))
  # ... and one token per row, as in decoding, where the one-hot form is chosen
  one = jax.jit(peftjax.lift(model.apply))({"params": multi.route(pool, ids)}, TOK[:, :1])
  np.testing.assert_allclose(np.asarray(one[:, 0]), np.asarray(got[:, 0]), atol=1e-5, rtol=1e-5)


def test_bf16_model():
  model, params = llama(False, jnp.bfloat16)
  ads = twins(False, 2)
  ids = [1, 2, 0, 1]
  routed = multi.route(multi.stack(ads, max_rank=3), ids)
  got = lifted(model)({"params": routed}, TOK)
  assert got.dtype == jnp.float32   # the model's logits
  check_rows(model, got, ads, ids, dict(atol=5e-2, rtol=5e-2), merged=True)


def test_qlora_base_and_ia3():
  model, params = llama(False)
  q = functools.partial(peftjax.qlora.apply, params, block_size=32, rank=2)
  ads = {"a": acting(q(key=jax.random.key(4)), 4), "b": acting(q(key=jax.random.key(5)), 5)}
  pool = multi.stack(ads, slots=5)
  node = pool["layers_0"]["self_attn"]["v_proj"]["kernel"]
  assert isinstance(node.w, peftjax.quant.QuantizedWeight)   # the quantized base, held once
  ids = [2, 1, 1, 2]   # (slot 0, the base, is checked by the float tests)
  got = lifted(model)({"params": multi.route(pool, ids)}, TOK)
  check_rows(model, got, ads, ids, dict(atol=1e-5, rtol=1e-5))
  # IA3 (keys, values, FFN input) pools the same way
  ia = {"x": acting(peftjax.ia3.apply(params), 6), "y": acting(peftjax.ia3.apply(params), 7)}
  ipool = multi.stack(ia)
  assert isinstance(ipool["layers_0"]["mlp"]["down_proj"]["kernel"], multi.IA3Pool)
  ids = [1, 2, 2, 0]
  got = lifted(model)({"params": multi.route(ipool, ids)}, TOK)
  check_rows(model, got, ia, ids, dict(atol=1e-5, rtol=1e-5))
  assert multi.unstack(ipool, "y")["layers_0"]["mlp"]["down_proj"]["kernel"].side == "in"


def test_flattened_rows_and_routing_errors():
  w = jnp.asarray(np.random.RandomState(0).randn(8, 5), jnp.float32)
  one = acting({"d": {"kernel": LoraWeight(w, jnp.ones((8, 2)), jnp.zeros((2, 5)))}}, 1)
  two = acting({"d": {"kernel": LoraWeight(w, jnp.ones((8, 3)) * 0.5, jnp.zeros((3, 5)))}}, 2)
  pool = multi.stack({"one": one, "two": two})
  f = peftjax.lift(lambda p, x: x @ p["d"]["kernel"])
  x = jnp.asarray(np.random.RandomState(1).randn(2, 3, 8), jnp.float32)
  want = jnp.stack([f(two, x[0]), f(one, x[1])])
  np.testing.assert_allclose(f(multi.route(pool, ["two", "one"]), x), want, atol=1e-5)
  # [rows * seq, d] (tokens flattened row-major): each id covers seq consecutive entries
  np.testing.assert_allclose(f(multi.route(pool, [2, 1]), x.reshape(6, 8)), want.reshape(6, 5),
                             atol=1e-5)
  # ids are traced data: a jitted function re-routes without recompiling
  g = jax.jit(lambda p, ids, x: f(multi.route(p, ids), x))
  np.testing.assert_allclose(g(pool, jnp.asarray([2, 1]), x), want, atol=1e-5)
  np.testing.assert_allclose(g(pool, jnp.asarray([1, 2]), x)[1], f(two, x[1]), atol=1e-5)
  assert g._cache_size() == 1
  # the BGMV form: no kernel-sized array per row or per slot is ever formed, no loop over slots
  text = str(jax.make_jaxpr(f)(multi.route(pool, [2, 1]), x))
  assert not re.findall(r"\[\d+,8,5\]", text) and "gather" in text and "dot_general" in text
  assert not re.findall(r"\b(scan|while)\[", text)
  with pytest.raises(ValueError, match="has no routing"):
    f(pool, x)
  with pytest.raises(ValueError, match="routed for 4 rows.*has 2 entries"):
    f(multi.route(pool, [1, 1, 2, 2]), x)
  with pytest.raises(ValueError, match=r"slots in \[0, 3\)"):
    multi.route(pool, [0, 3])
  with pytest.raises(ValueError, match="no adapter called 'three'.*'one', 'two'"):
    multi.route(pool, ["one", "three"])
  with pytest.raises(ValueError, match="one slot per batch row"):
    multi.route(pool, np.zeros((2, 2), np.int32))
  with pytest.raises(TypeError, match="no merged form"):
    peftjax.merge(pool)
  with pytest.raises(ValueError, match="no adapter pool"):
    multi.route(one, [0])


def test_stack_errors():
  w = jnp.ones((8, 5))
  lora = {"d": {"kernel": LoraWeight(w, jnp.ones((8, 2)), jnp.zeros((2, 5)))}}
  ia3 = {"d": {"kernel": peftjax.ia3.IA3Weight(w, jnp.ones(5))}}
  with pytest.raises(ValueError, match="LoRA in some adapters and IA3 in others"):
    multi.stack({"l": lora, "i": ia3})
  with pytest.raises(ValueError, match="rank 2, above the pool's maximum rank 1"):
    multi.stack({"l": lora}, max_rank=1)
  with pytest.raises(ValueError, match="need slots >= 3"):
    multi.stack({"l": lora, "m": lora}, slots=2)
  with pytest.raises(ValueError, match="non-empty"):
    multi.stack({})
  with pytest.raises(ValueError, match="longer than 48"):
    multi.stack({"x" * 49: lora})
  other = {"d": {"kernel": LoraWeight(jnp.ones((8, 5), jnp.bfloat16), jnp.ones((8, 2)),
                                      jnp.zeros((2, 5)))}}
  with pytest.raises(ValueError, match="share one base model"):
    multi.stack({"l": lora, "o": other})
  adapter = peftjax.adapters.apply({"attn": {"out_proj": {"kernel": w}}}, bottleneck=2,
                                   targets=["out_proj"])
  with pytest.raises(TypeError, match="BottleneckAdapter.*only LoRA, QLoRA and IA3"):
    multi.stack({"a": adapter})
  with pytest.raises(ValueError, match="no LoRA or IA3 node"):
    multi.stack({"plain": {"d": {"kernel": w}}})


# ------------------------------------------------------------------------------------------------
# generation
# ------------------------------------------------------------------------------------------------

def test_greedy_generation_per_row_equals_one_adapter_generation():
  model, params = llama(False)
  ads = twins(False, 2)
  pool = multi.stack(ads, slots=4, max_rank=3)
  ids = [1, 2, 2]
  prompts = np.asarray(TOK)[[0, 0, 1]]   # rows 0 and 1: one prompt, two adapters
  mask = np.ones_like(prompts)
  mask[2, :2] = 0   # left padding in one row
  gen = functools.partial(generate, model, input_ids=prompts, attention_mask=mask,
                          max_new_tokens=6, stop_tokens=())
  got = gen(multi.route(pool, ids)).tokens.tolist()
  names = [None, *ads]
  for row, k in enumerate(ids):
    assert got[row] == gen(ads[names[k]]).tokens[row].tolist()
  assert got[0] != got[1]   # the adapters act differently


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------

def row_losses(logits, tokens):
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0].mean(axis=1)


@pytest.mark.standard_promotion  # steps an optax optimizer (Adam: float ** int32 count)
def test_one_step_on_the_pool_equals_one_step_of_each_adapter(pool_path):
  model, _ = llama(True)
  ads = twins(True, 3)   # one structure: the three steps alone compile once
  fwd = peftjax.lift(model.apply)
  ids = jnp.asarray([1, 3, 2, 3, 2, 1], jnp.int32)
  tokens = jnp.concatenate([TOK, TOK[:2, ::-1]])
  pool = multi.route(multi.stack(ads, max_rank=4), ids)   # padded ranks train too
  mask = peftjax.trainable_mask(pool)
  m = mask["layers"]["mlp"]["down_proj"]["kernel"]
  assert (m.a, m.b, m.w, m.scales, m.ranks, m.names, m.ids) == (True, True, False, False, False,
                                                                 False, False)
  tx = optax.adamw(1e-2, weight_decay=0.1)

  @jax.jit
  def step(tree, tokens, ids):
    opt = peftjax.optimizer(tx, tree)
    trainable, frozen = peftjax.split(tree)

    def loss(t):
      return multi.per_adapter_mean(row_losses(fwd({"params": peftjax.combine(t, frozen)},
                                                   tokens), tokens), ids)
    grads = jax.grad(loss)(trainable)
    updates, _ = opt.update(grads, opt.init(trainable), trainable)
    return peftjax.combine(optax.apply_updates(trainable, updates), frozen)

  new_pool = step(pool, tokens, ids)
  names = [None, *ads]
  for k in (1, 2, 3):
    rows = np.flatnonzero(np.asarray(ids) == k)
    alone = step(ads[names[k]], tokens[rows], jnp.zeros(len(rows), jnp.int32))
    got = multi.unstack(new_pool, names[k])
    assert_same_adapter(got, alone, dict(atol=1e-5, rtol=1e-4))
    before = jax.tree_util.tree_leaves(ads[names[k]])
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(got), before))
  # slot 0 (no adapter) and the zero padding of ranks 2 -> 4 do not move
  q = new_pool["layers"]["self_attn"]["q_proj"]["kernel"]
  assert float(jnp.abs(q.a[:, 0]).max()) == 0 and float(jnp.abs(q.b[:, 0]).max()) == 0
  assert float(jnp.abs(q.a[..., 2:]).max()) == 0 and float(jnp.abs(q.b[:, :, 2:]).max()) == 0
  assert float(jnp.abs(q.b[:, 1:, :2]).min()) > 0


# ------------------------------------------------------------------------------------------------
# unstack, hot-swap
# ------------------------------------------------------------------------------------------------

def test_unstack_round_trip():
  ads = adapters(False)
  pool = multi.stack(ads, slots=6, max_rank=5)
  for name, tree in ads.items():
    assert_same_adapter(multi.unstack(pool, name), tree)
  with pytest.raises(ValueError, match="no adapter called 'x'"):
    multi.unstack(pool, "x")


def test_hot_swap_does_not_recompile(tmp_path):
  from peftjax.io.checkpoint import save_adapter
  from peftjax.io.hf_peft import save_hf_peft
  model, params = llama(False)
  ads = adapters(False)
  pool = multi.route(multi.stack({"summarize": ads["summarize"]}, slots=3, max_rank=4),
                     [1, 2, 2, 0])
  f = jax.jit(peftjax.lift(model.apply))
  f({"params": pool}, TOK)
  names = (None, "summarize", None)
  assert multi.slot_names(pool) == names
  base_rows = plain(model)({"params": params}, TOK)
  # an empty slot is the base model
  np.testing.assert_allclose(f({"params": pool}, TOK)[1], base_rows[1], atol=1e-5)
  sources = {"tree": ads["code"], "hf": save_hf_peft(ads["code"], tmp_path / "hf"),
             "checkpoint": save_adapter(tmp_path / "ckpt", ads["translate"])}
  wants = {"tree": own_logits(model, ads["code"]), "hf": own_logits(model, ads["code"]),
           "checkpoint": own_logits(model, ads["translate"])}
  for how, src in sources.items():
    pool = multi.load(pool, "new", src)
    assert multi.slot_names(pool) == (None, "summarize", "new")
    got = f({"params": pool}, TOK)
    np.testing.assert_allclose(got[1:3], wants[how][1:3], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[3], base_rows[3], atol=1e-5)
  pool = multi.load(pool, 1, ads["code"], name="code")      # replace by slot number
  np.testing.assert_allclose(f({"params": pool}, TOK)[0], wants["tree"][0], atol=1e-5)
  pool = multi.remove(pool, "new")
  assert multi.slot_names(pool) == (None, "code", None)
  np.testing.assert_allclose(f({"params": pool}, TOK)[1], base_rows[1], atol=1e-5)
  assert f._cache_size() == 1   # every swap reused the one compiled program
  # errors
  full = multi.load(pool, "again", ads["summarize"])
  with pytest.raises(ValueError, match="the pool is full"):
    multi.load(full, "more", ads["summarize"])
  big = peftjax.lora.apply(params, rank=6, targets=["q_proj"])
  with pytest.raises(ValueError, match="rank 6, above the pool's maximum rank 4"):
    multi.load(pool, "big", big)
  head = peftjax.lora.apply(params, rank=2, targets=r".*lm_head/kernel")
  with pytest.raises(ValueError, match="lm_head/kernel: the adapter targets a kernel the pool "
                                       "does not have"):
    multi.load(pool, "head", head)
  with pytest.raises(ValueError, match="no adapter called 'gone'"):
    multi.remove(pool, "gone")
  with pytest.raises(ValueError, match="slot 0 is not an adapter slot"):
    multi.load(pool, 0, ads["code"])
  with pytest.raises(ValueError, match="already used by slot 1"):
    multi.load(pool, 2, ads["code"], name="code")
  with pytest.raises(ValueError, match="no such adapter directory"):
    multi.load(pool, "x", tmp_path / "missing")


def test_more_usage_errors():
  w = jnp.ones((8, 5))
  lora = {"d": {"kernel": LoraWeight(w, jnp.ones((8, 2)), jnp.ones((2, 5)))}}
  pool = multi.route(multi.stack({"l": lora}, slots=3), [1, 0])
  f = peftjax.lift(lambda p, x: x @ p["d"]["kernel"])
  with pytest.raises(ValueError, match="needs an input with a row axis"):
    f(pool, jnp.ones(8))
  g = peftjax.lift(lambda p, x: jax.lax.dot_general(x, p["d"]["kernel"], (((1,), (1,)), ((), ()))))
  with pytest.raises(TypeError, match="does not contract exactly its input axes"):
    g(pool, jnp.ones((2, 5)))
  with pytest.raises(ValueError, match="integer slots"):
    multi.route(pool, np.zeros(2, np.float32))
  with pytest.raises(ValueError, match="non-empty string"):
    multi.stack({"": lora})
  with pytest.raises(ValueError, match="NUL"):
    multi.stack({"a\x00b": lora})
  with pytest.raises(ValueError, match="max_rank must be a positive integer"):
    multi.stack({"l": lora}, max_rank=0)
  with pytest.raises(TypeError, match="soft prompts and prefixes cannot be pooled"):
    multi.stack({"p": peftjax.Tuned(lora, prompt=jnp.zeros((2, 8)))})
  w3 = jnp.ones((4, 2, 5))
  one_in = {"d": {"kernel": LoraWeight(w3, jnp.ones((4, 2)), jnp.ones((2, 2, 5)), n_in=1)}}
  two_in = {"d": {"kernel": LoraWeight(w3, jnp.ones((4, 2, 2)), jnp.ones((2, 5)), n_in=2)}}
  with pytest.raises(ValueError, match="n_in=2.*the pool n_in=1"):
    multi.stack({"one": one_in, "two": two_in})
  out = {"d": {"kernel": peftjax.ia3.IA3Weight(w, jnp.ones(5))}}
  inp = {"d": {"kernel": peftjax.ia3.IA3Weight(w, jnp.ones(8), side="in")}}
  with pytest.raises(ValueError, match="scale different sides"):
    multi.stack({"o": out, "i": inp})
  ipool = multi.stack({"o": out}, slots=3)
  with pytest.raises(ValueError, match="the adapter has LoraWeight, the pool a IA3Pool"):
    multi.load(ipool, "l", lora)
  with pytest.raises(ValueError, match="scales side 'in', the pool's 'out'"):
    multi.load(ipool, "i", inp)
  with pytest.raises(TypeError, match="an adapter name or a slot number"):
    multi.load(pool, 1.5, lora)
  with pytest.raises(ValueError, match="only for a slot given by number"):
    multi.load(pool, "x", lora, name="y")
