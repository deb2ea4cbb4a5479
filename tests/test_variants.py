"""The LoRA-family variants (DoRA, VeRA, LoHa, LoKr, OFT): formulas, HF PEFT parity, training.

``tests/test_node_contract.py`` checks every node type's ``lift == merge`` (values and gradients,
jit, f32/bf16, scan, checkpoints); here each variant's merged kernel is compared with a NumPy
transcription of HF PEFT's definition (on HF's ``[out, in]`` tensors), its parameter count with
the paper's formula, and its adapters with PyTorch + HF PEFT both ways on the tiny Llama fixture.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
from peftjax.io import from_pretrained
from peftjax.io.hf_peft import ADAPTER_CONFIG, load_hf_peft, read_hf_peft, save_hf_peft

FIX = Path(__file__).resolve().parent / "fixtures" / "hf_peft_tiny_llama"
METHODS = ["dora", "vera", "loha", "lokr", "oft"]
KW = {"dora": dict(rank=2, alpha=4), "vera": dict(rank=6), "loha": dict(rank=2, alpha=3),
      "lokr": dict(rank=1, alpha=3), "oft": dict(block_size=4)}
rs = np.random.RandomState(0)


def _perturbed(tree, seed=0, scale=0.3):
  """The tree with every trainable leaf moved by noise (the adapters act)."""
  r = np.random.RandomState(seed)
  tr, fr = peftjax.split(tree)
  tr = jax.tree.map(lambda a: a + jnp.asarray(scale * r.normal(size=a.shape), a.dtype), tr)
  return peftjax.combine(tr, fr)


# ------------------------------------------------------------------------------------------------
# formulas (HF PEFT's, in NumPy on HF's [out, in] layout) and parameter counts
# ------------------------------------------------------------------------------------------------

def _hf_weight(name, node, W):
  """HF PEFT's merged ``[out, in]`` weight from the node's HF tensors (``hf_peft_tensors``)."""
  Wt = W.T.astype(np.float64)
  if name == "dora":
    A, B = np.asarray(node.a, np.float64).T, np.asarray(node.b, np.float64).T
    V = Wt + node.scale * B @ A
    return np.asarray(node.magnitude, np.float64)[:, None] * V / np.linalg.norm(V, axis=1,
                                                                                keepdims=True)
  t = {k: np.asarray(v, np.float64) for k, v in node.hf_peft_tensors()[0].items()}
  if name == "vera":
    a, b = np.asarray(node.a, np.float64).T, np.asarray(node.b, np.float64).T   # [r, in], [out, r]
    return Wt + (t["vera_lambda_b"][:, None] * b) @ (t["vera_lambda_d"][:, None] * a)
  if name == "loha":
    return Wt + (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * node.scale
  if name == "lokr":
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    return Wt + np.kron(t["lokr_w1"], w2) * node.scale
  # OFT: Neumann-series Cayley of the skew blocks, x -> x @ blockdiag(R) -> @ W^T
  q, b = t["oft_R.weight"], node.block_size
  blocks = []
  for vec in q:
    s = np.zeros((b, b))
    s[np.triu_indices(b, 1)] = vec
    Q = s - s.T
    R = np.eye(b) + 2 * Q + 2 * Q @ Q + 2 * Q @ Q @ Q + Q @ Q @ Q @ Q
    blocks.append(R)
  n = W.shape[0] // b
  big = np.zeros((W.shape[0], W.shape[0]))
  for i in range(n):
    big[i * b:(i + 1) * b, i * b:(i + 1) * b] = blocks[i if len(blocks) > 1 else 0]
  return (big @ Wt.T).T


@pytest.mark.parametrize("name", METHODS)
def test_merged_kernel_is_hf_peft_formula_and_counts_match_the_paper(name):
  W = rs.normal(size=(16, 8)).astype(np.float32)
  tree = getattr(peftjax, name).apply({"up_proj": {"kernel": jnp.asarray(W)}}, **KW[name])
  init = tree["up_proj"]["kernel"]
  np.testing.assert_allclose(peftjax.merge(init), W, rtol=1e-6, atol=1e-6)    # identity at init
  node = _perturbed(tree)["up_proj"]["kernel"]
  want = _hf_weight(name, node, W).T
  np.testing.assert_allclose(np.asarray(peftjax.merge(node)), want, rtol=1e-5, atol=1e-5)
  x = rs.normal(size=(3, 16)).astype(np.float32)
  for f in (peftjax.lift(lambda w, x: x @ w), jax.jit(peftjax.lift(lambda w, x: x @ w))):
    np.testing.assert_allclose(f(node, x), x @ want, rtol=1e-4, atol=1e-4)
  d_in, d_out = W.shape
  r = KW[name].get("rank", 0)
  count = {"dora": r * (d_in + d_out) + d_out,                # LoRA + a magnitude per output
           "vera": r + d_out,                                 # lambda_d + lambda_b
           "loha": 2 * r * (d_in + d_out),                    # two rank-r pairs
           "lokr": 4 * 2 + r * (4 + 4),                       # 16 = 4*4, 8 = 2*4: W1 [4, 2], A2 B2
           "oft": d_in * (4 - 1) // 2}[name]                  # (d_in / b) blocks of b(b-1)/2
  assert peftjax.summary(tree).trainable == count


@pytest.mark.parametrize("name", ["dora", "lokr", "oft"])
def test_quantized_base(name):
  """QLoRA-style: the variant wraps a 4-bit kernel; lift (values, gradients) == the merged form.
  One per base-kernel code path: DoRA dequantizes for its norm, LoKr (as VeRA, LoHa) adds to
  the quantized ``x @ W``, OFT feeds rotated activations to it."""
  from peftjax._src.quant.core import quantize_array
  wq = quantize_array(jnp.asarray(rs.normal(size=(16, 8)), jnp.float32), block_size=8)
  tree = _perturbed(getattr(peftjax, name).apply({"up_proj": {"kernel": wq}}, **KW[name]))
  assert type(tree["up_proj"]["kernel"].w) is type(wq)
  x = jnp.asarray(rs.normal(size=(3, 16)), jnp.float32)
  f = lambda t: jnp.sum(jnp.tanh(x @ t["up_proj"]["kernel"]))
  trainable, frozen = peftjax.split(tree)
  got = jax.value_and_grad(lambda t: peftjax.lift(f)(peftjax.combine(t, frozen)))(trainable)
  want = jax.value_and_grad(lambda t: f(peftjax.merge(peftjax.combine(t, frozen))))(trainable)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  init = getattr(peftjax, name).apply({"up_proj": {"kernel": wq}}, **KW[name])
  np.testing.assert_allclose(peftjax.lift(f)(init), f({"up_proj": {"kernel": wq.materialize()}}),
                             rtol=1e-6, atol=1e-6)   # identity at init on the dequantized base


def test_dora_norm_is_a_constant_in_the_backward_pass():
  """The paper's section 4.3 (and HF PEFT): d/dB goes through the direction only."""
  W = jnp.asarray(rs.normal(size=(6, 5)), jnp.float32)
  node = _perturbed(peftjax.dora.apply({"q_proj": {"kernel": W}}, rank=2))["q_proj"]["kernel"]
  x = jnp.asarray(rs.normal(size=(4, 6)), jnp.float32)

  def reference(b):  # NumPy-style formula with the norm detached by hand
    V = W + node.scale * node.a @ b
    n = jax.lax.stop_gradient(jnp.linalg.norm(V, axis=0))
    return jnp.sum(jnp.sin(x @ (node.magnitude[None] * V / n[None])))

  got = jax.grad(lambda b: jnp.sum(jnp.sin(peftjax.lift(lambda w: x @ w)(node.replace(b=b)))))(
      node.b)
  np.testing.assert_allclose(got, jax.grad(reference)(node.b), rtol=1e-5, atol=1e-5)


def test_oft_exact_cayley_is_orthogonal():
  """``cayley_neumann=False``: ``R = (I - Q)(I + Q)^-1`` exactly (HF PEFT's ``linalg.solve``)."""
  from peftjax.oft import rotations
  q = rs.normal(0, 0.3, (3, 6))
  got = np.asarray(rotations(jnp.asarray(q, jnp.float32), 4, neumann=False))
  for vec, R in zip(q, got):
    s = np.zeros((4, 4))
    s[np.triu_indices(4, 1)] = vec
    Q = s - s.T
    np.testing.assert_allclose(R, (np.eye(4) - Q) @ np.linalg.inv(np.eye(4) + Q), atol=1e-5)
    np.testing.assert_allclose(R @ R.T, np.eye(4), atol=1e-5)
  W = jnp.asarray(rs.normal(size=(8, 3)), jnp.float32)
  node = _perturbed(peftjax.oft.apply({"o": {"kernel": W}}, block_size=4, targets=["o"],
                                      cayley_neumann=False))["o"]["kernel"]
  merged = np.asarray(peftjax.merge(node))
  np.testing.assert_allclose(np.linalg.norm(merged, axis=0), np.linalg.norm(W, axis=0), rtol=1e-5)


def test_dora_dropout_is_hf_peft_s():
  """With a key set: ``x W + (f - 1) x_d W + f s (x_d A) B`` (HF PEFT's DoRA in training mode)."""
  W = jnp.asarray(rs.normal(size=(6, 5)), jnp.float32)
  tree = _perturbed(peftjax.dora.apply({"q_proj": {"kernel": W}}, rank=2, dropout=0.5))
  tree = peftjax.set_rng(tree, jax.random.key(4))
  node = tree["q_proj"]["kernel"]
  x = jnp.asarray(rs.normal(size=(4, 6)), jnp.float32)
  keep = jax.random.bernoulli(jax.random.wrap_key_data(node.dropout_key), 0.5, x.shape)
  xd = jnp.where(keep, 2 * x, 0)
  V = W + node.scale * node.a @ node.b
  f = (node.magnitude / jnp.linalg.norm(V, axis=0))[None]
  want = x @ W + (f - 1) * (xd @ W) + f * (node.scale * (xd @ node.a) @ node.b)
  got = peftjax.lift(lambda t: x @ t["q_proj"]["kernel"])(tree)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(got, x @ peftjax.merge(node), atol=1e-3)    # dropout acted
  evaluation = peftjax.set_rng(tree, None)
  np.testing.assert_allclose(peftjax.lift(lambda t: x @ t["q_proj"]["kernel"])(evaluation),
                             x @ peftjax.merge(node), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def test_bad_input_is_a_clear_error():
  params = {"embed_tokens": {"embedding": jnp.ones((10, 8))},
            "up_proj": {"kernel": jnp.ones((6, 8))}, "v_proj": {"kernel": jnp.ones((8, 4))}}
  with pytest.raises(ValueError, match="DoRA does not support embedding tables: embed_tokens"):
    peftjax.dora.apply(params, targets=r".*embedding", rank=2)
  with pytest.raises(ValueError, match="OFT block_size=4 does not divide the 6 inputs of "
                                       "up_proj/kernel"):
    peftjax.oft.apply(params, block_size=4, targets=["up_proj"])
  with pytest.raises(ValueError, match="already has LoHa"):
    peftjax.loha.apply(peftjax.loha.apply(params, targets=["v_proj"]), targets=["v_proj"])
  with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
    peftjax.lokr.apply(params, rank=0, targets=["v_proj"])
  with pytest.raises(ValueError, match=r"target norm/scale is not a kernel"):
    peftjax.vera.apply({**params, "norm": {"scale": jnp.ones(8)}}, targets=r"norm/scale")
  with pytest.raises(ValueError, match=r"rank=5 is larger than v_proj/kernel allows"):
    peftjax.dora.apply(params, rank=5, targets=["v_proj"])
  with pytest.raises(ValueError, match="alpha must be a finite number, got nan"):
    peftjax.loha.apply(params, alpha=float("nan"), targets=["v_proj"])
  with pytest.raises(ValueError, match="block_size must be at least 2"):
    peftjax.oft.apply(params, block_size=1, targets=["v_proj"])
  with pytest.raises(ValueError, match="decompose_factor must be -1 or a positive integer, got 0"):
    peftjax.lokr.apply(params, decompose_factor=0, targets=["v_proj"])
  o4 = peftjax.oft.apply({"q_proj": {"kernel": jnp.ones((8, 4))}}, block_size=4)
  o2 = peftjax.oft.apply({"k_proj": {"kernel": jnp.ones((8, 4))}}, block_size=2)
  with pytest.raises(ValueError, match=r"OFT nodes have different block_size values \[2, 4\]"):
    save_hf_peft({**o4, **o2}, "unused", family="generic")
  # VeRA: nodes that do not share one projection cannot be written as one HF adapter
  a = peftjax.vera.apply({"q_proj": {"kernel": jnp.ones((8, 4))}}, rank=4, key=jax.random.key(1))
  b = peftjax.vera.apply({"k_proj": {"kernel": jnp.ones((8, 4))}}, rank=4, key=jax.random.key(2))
  with pytest.raises(ValueError, match="VeRA nodes do not share one projection A"):
    save_hf_peft({**a, **b}, "unused", family="generic")
  c = peftjax.vera.apply({"k_proj": {"kernel": jnp.ones((8, 4))}}, rank=3)
  with pytest.raises(ValueError, match=r"VeRA nodes have different ranks \[3, 4\]"):
    save_hf_peft({**a, **c}, "unused", family="generic")
  mixed = {**peftjax.dora.apply({"q_proj": {"kernel": jnp.ones((8, 4))}}, rank=2),
           **peftjax.lora.apply({"k_proj": {"kernel": jnp.ones((8, 4))}}, rank=2)}
  with pytest.raises(ValueError, match="the tree mixes LoraWeight .* and DoraWeight|the tree "
                                       "mixes DoraWeight .* and LoraWeight"):
    save_hf_peft(mixed, "unused", family="generic")


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
@pytest.mark.standard_promotion  # steps an optax optimizer (Adam: float ** int32 count)
def test_training_lowers_the_loss_and_keeps_frozen_leaves(name):
  r = np.random.RandomState(1)
  params = {"layers": {"mlp": {"up_proj": {"kernel": jnp.asarray(r.normal(0, .3, (2, 8, 8)),
                                                                 jnp.float32)}}}}
  x = jnp.asarray(r.normal(size=(16, 8)), jnp.float32)
  target = jnp.asarray(r.normal(size=(16, 8)), jnp.float32)

  def model(p, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["layers"]["mlp"]["up_proj"]
                        ["kernel"])[0]

  tree = getattr(peftjax, name).apply(params, **KW[name])
  fwd = peftjax.lift(model)
  trainable, frozen = peftjax.split(tree)
  tx = optax.adam(3e-2)
  loss = lambda t: jnp.mean((fwd(peftjax.combine(t, frozen), x) - target) ** 2)

  @jax.jit
  def step(t, s):
    v, g = jax.value_and_grad(loss)(t)
    u, s = tx.update(g, s, t)
    return optax.apply_updates(t, u), s, v

  state, losses = tx.init(trainable), []
  for _ in range(6):
    trainable, state, v = step(trainable, state)
    losses.append(float(v))
  assert losses[-1] < 0.97 * losses[0], losses
  after = peftjax.split(peftjax.combine(trainable, frozen))[1]
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(frozen)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------------------------
# HF PEFT (PyTorch) both ways
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
  model, params, _ = from_pretrained(FIX / "base", scan_layers=True, tokenizer=False)
  return model, params


def _hf_config(peft, name):
  t = ["q_proj", "v_proj", "down_proj"]
  return {"dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=t, use_dora=True,
                                          init_lora_weights=False, rank_pattern={"down_proj": 2}),
          "vera": lambda: peft.VeraConfig(r=8, target_modules=t, init_weights=False),
          "loha": lambda: peft.LoHaConfig(r=4, alpha=8, target_modules=t, init_weights=False,
                                          alpha_pattern={"v_proj": 4}),
          "lokr": lambda: peft.LoKrConfig(r=4, alpha=8, target_modules=t, init_weights=False),
          "oft": lambda: peft.OFTConfig(r=0, oft_block_size=16, target_modules=t,
                                        init_weights=False)}[name]()


def llama_loop():
  model, params, _ = from_pretrained(FIX / "base", scan_layers=False, tokenizer=False)
  return model, params


_FWD = {}


def _logits(model, tree, ids):
  if model not in _FWD:
    _FWD[model] = jax.jit(peftjax.lift(model.apply))
  return np.asarray(_FWD[model]({"params": tree}, ids))


@pytest.mark.parametrize("name", METHODS)
def test_hf_peft_parity_both_ways(name, llama, tmp_path):
  torch = pytest.importorskip("torch", reason="PyTorch (the reference) is not installed")
  peft = pytest.importorskip("peft", reason="HF PEFT (the reference) is not installed")
  import transformers
  model, params = llama
  ids = np.random.RandomState(0).randint(3, 96, (2, 10)).astype(np.int32)
  load = lambda: transformers.AutoModelForCausalLM.from_pretrained(
      FIX / "base", attn_implementation="eager").eval()
  with torch.no_grad():
    base_logits = load()(input_ids=torch.tensor(ids)).logits.numpy()
  # HF PEFT -> peftjax: an adapter made by HF PEFT (random, non-identity weights)
  torch.manual_seed(0)
  pm = peft.get_peft_model(load(), _hf_config(peft, name)).eval()
  with torch.no_grad():
    theirs = pm(input_ids=torch.tensor(ids)).logits.numpy()
  pm.save_pretrained(tmp_path / "hf")
  tuned = load_hf_peft(tmp_path / "hf", params)
  ours = _logits(model, tuned, ids)
  if name == "lokr":   # per-layer trees too (LoKr: the tensors present depend on the shapes)
    loop_model, loop_params = llama_loop()
    np.testing.assert_allclose(_logits(loop_model, load_hf_peft(tmp_path / "hf", loop_params),
                                       ids), ours, rtol=1e-5, atol=1e-5)
  effect = np.abs(theirs - base_logits).max()
  diff = np.abs(ours - theirs).max()
  print(f"{name}: HF PEFT -> peftjax max |logits diff| {diff:.2e} (effect {effect:.4f})")
  assert diff <= 2e-5 and effect > 0.05
  # round trip: peftjax writes back the same tensors
  out = save_hf_peft(tuned, tmp_path / "rt")
  orig, back = read_hf_peft(tmp_path / "hf").tensors, read_hf_peft(out).tensors
  assert sorted(orig) == sorted(back)
  for k in orig:
    np.testing.assert_allclose(orig[k], back[k], rtol=1e-6, atol=1e-7, err_msg=k)
  # peftjax -> HF PEFT: the adapter moved in peftjax (the layouts ``apply`` builds are checked
  # against HF PEFT's formulas above) loads with the same logits
  mine = _perturbed(tuned, seed=3, scale=0.05)
  ours = _logits(model, mine, ids)
  out = save_hf_peft(mine, tmp_path / "ours")
  cfg = json.loads((out / ADAPTER_CONFIG).read_text())
  assert cfg["peft_type"] == getattr(peftjax, name).METHOD.hf_peft_type
  pm2 = peft.PeftModel.from_pretrained(load(), out).eval()
  with torch.no_grad():
    theirs = pm2(input_ids=torch.tensor(ids)).logits.numpy()
  diff = np.abs(ours - theirs).max()
  effect = np.abs(ours - base_logits).max()
  print(f"{name}: peftjax -> HF PEFT max |logits diff| {diff:.2e} (effect {effect:.2f})")
  assert diff <= 2e-5 and effect > 0.05


def test_bad_hf_adapters_are_clear_errors(tmp_path):
  """Files HF PEFT could write that peftjax cannot represent, or that do not fit the model."""
  from peftjax.io.hf_peft import ADAPTER_WEIGHTS
  from peftjax.io.safetensors import write_safetensors
  params = {"q_proj": {"kernel": jnp.asarray(rs.normal(size=(8, 4)), jnp.float32)},
            "v_proj": {"kernel": jnp.asarray(rs.normal(size=(8, 6)), jnp.float32)}}

  def saved(name, **kw):
    out = save_hf_peft(getattr(peftjax, name).apply(params, **kw), tmp_path / name,
                       family="generic")
    return out, json.loads((out / ADAPTER_CONFIG).read_text()), read_hf_peft(out).tensors

  def rewrite(out, cfg=None, tensors=None):
    if cfg is not None:
      (out / ADAPTER_CONFIG).write_text(json.dumps(cfg))
    if tensors is not None:
      write_safetensors(out / ADAPTER_WEIGHTS, [(k, v.dtype, v.shape, (lambda v=v: v))
                                                for k, v in tensors.items()], {"format": "pt"})

  out, cfg, t = saved("vera", rank=4)
  assert t["base_model.vera_A"].shape == (4, 8) and t["base_model.vera_B"].shape == (6, 4)
  rewrite(out, {**cfg, "save_projection": False})
  with pytest.raises(ValueError, match="save_projection=False: the shared projection is not in"):
    load_hf_peft(out, params)
  small = {**t, "base_model.vera_B": t["base_model.vera_B"][:4]}   # sized for q_proj only
  rewrite(out, cfg, small)
  with pytest.raises(ValueError, match=r"'base_model.vera_B' has shape \[4, 4\]; v_proj needs "
                                       r"\[>= 6, 4\]"):
    load_hf_peft(out, params)
  out, cfg, t = saved("oft", block_size=2)
  rewrite(out, {**cfg, "oft_block_size": 3})
  with pytest.raises(ValueError, match="oft_block_size 3 .* does not divide the 8 inputs of "
                                       "q_proj"):
    load_hf_peft(out, params)
  rewrite(out, {**cfg, "coft": True})
  with pytest.raises(ValueError, match="coft=True .* is not supported"):
    load_hf_peft(out, params)
  out, cfg, t = saved("lokr", rank=1)
  rewrite(out, {**cfg, "decompose_both": True})
  with pytest.raises(ValueError, match="decompose_both=True .* is not supported"):
    load_hf_peft(out, params)
  rewrite(out, {**cfg, "r": 8})     # r >= max(n, k) / 2: HF would store a full lokr_w2
  with pytest.raises(ValueError, match=r"extra key 'base_model.model.q_proj.lokr_w2_a': "
                                       r"q_proj/kernel is a linear kernel; expected lokr_w1 and "
                                       r"lokr_w2 tensors"):
    load_hf_peft(out, params)
  out, cfg, t = saved("loha", rank=2)
  rewrite(out, {**cfg, "r": 3})
  with pytest.raises(ValueError, match=r"key 'base_model.model.q_proj.hada_w1_a' has shape "
                                       r"\[4, 2\], expected \[4, 3\]"):
    load_hf_peft(out, params)
  rewrite(out, {**cfg, "bias": "all"})
  with pytest.raises(ValueError, match="bias='all' is not supported"):
    load_hf_peft(out, params)
  stacked = {"layers": {"q_proj": {"kernel": jnp.asarray(rs.normal(size=(2, 8, 4)), jnp.float32)}}}
  out = save_hf_peft(peftjax.loha.apply(stacked, rank=2), tmp_path / "stacked", family="generic")
  cfg = json.loads((out / ADAPTER_CONFIG).read_text())
  assert sorted(read_hf_peft(out).tensors)[0] == "base_model.model.layers.0.q_proj.hada_w1_a"
  rewrite(out, {**cfg, "alpha_pattern": {"layers.1.q_proj": 5}})
  with pytest.raises(ValueError, match=r"the layer-stacked kernel of layers.0.q_proj .. "
                                       r"layers.1.q_proj has different scales \[1.0, 2.5\]"):
    load_hf_peft(out, stacked)
