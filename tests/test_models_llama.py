"""Llama-family model: parity with transformers (PyTorch), hooks, KV cache, generation, sharding."""

import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _model_fixtures import (LLAMA_VARIANTS, make_hf_llama, padded_batch, positions,
                             torch_or_skip)
from peftjax.io import from_pretrained
from peftjax.models import (LlamaConfig, LlamaForCausalLM, generate, init_cache,
                            logical_axes, param_specs, sample_logits)

TINY = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, rope_theta=10000.0, eos_token_id=2,
                   pad_token_id=0)


@pytest.fixture(scope="module")
def tiny():
  model = LlamaForCausalLM(TINY)
  params = jax.jit(model.init)(jax.random.key(1), jnp.ones((1, 4), jnp.int32))["params"]
  # sharpen the random model a little so greedy choices are not near-ties
  params = jax.tree_util.tree_map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
  return model, params


_JITTED = {}


def fwd(model):
  """``jax.jit(model.apply)``, one per model (tests call it many times)."""
  if model not in _JITTED:
    _JITTED[model] = jax.jit(model.apply)
  return _JITTED[model]


# ------------------------------------------------------------------------------------------------
# parity with transformers
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """Each variant built in PyTorch transformers and saved with save_pretrained (once)."""
  torch_or_skip()
  out = {}
  for name in LLAMA_VARIANTS:
    model = make_hf_llama(name)
    d = tmp_path_factory.mktemp(name)
    model.save_pretrained(d)
    out[name] = (d, model)
  return out


@pytest.mark.parametrize("variant,scan", [(v, False) for v in LLAMA_VARIANTS] + [
    (v, True) for v in ("llama_gqa_untied", "qwen2_bias_tied", "llama3_rope", "mistral_window")])
def test_logits_match_transformers(hf_dirs, variant, scan):
  torch = torch_or_skip()
  path, hf = hf_dirs[variant]
  model, params, _ = from_pretrained(path, scan_layers=scan, tokenizer=False)
  assert ("layers" in params) == scan and ("layers_0" in params) != scan
  ids, mask = padded_batch(np.random.RandomState(0), [12, 7, 10], 96)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(positions(mask))).logits.numpy()
  out = np.asarray(jax.jit(model.apply)({"params": params}, ids, attention_mask=mask))
  real = mask.astype(bool)
  diff = np.abs(out[real] - ref[real]).max()
  print(f"{variant} scan={scan}: max |logits - torch| = {diff:.2e}")
  assert diff <= 1e-4
  # without padding, the default (arange) positions agree with transformers' defaults too
  with torch.no_grad():
    ref1 = hf(input_ids=torch.tensor(ids[:1], dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(out[:1], ref1, atol=1e-4, rtol=0)  # row 0 has no padding


def test_config_round_trip_and_fields(hf_dirs):
  import transformers
  for name, (path, hf) in hf_dirs.items():
    cfg = LlamaConfig.from_hf(transformers.AutoConfig.from_pretrained(path))
    assert cfg.num_kv_heads == hf.config.num_key_value_heads
    back = LlamaConfig.from_hf(transformers.AutoConfig.for_model(**cfg.to_hf_dict()))
    assert back == cfg, name
  assert LlamaConfig.from_hf(hf_dirs["qwen2_bias_tied"][1].config).qkv_bias
  assert LlamaConfig.from_hf(hf_dirs["mistral_window"][1].config).sliding_window == 4
  assert LlamaConfig.from_hf(hf_dirs["llama3_rope"][1].config).rope_scaling_dict["rope_type"] == \
      "llama3"


def test_param_names_follow_the_lora_targets(tiny):
  model, params = tiny
  paths = {jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in
           jax.tree_util.tree_leaves_with_path(params)}
  for want in ["embed_tokens/embedding", "layers_0/self_attn/q_proj/kernel",
               "layers_1/mlp/down_proj/kernel", "layers_0/input_layernorm/scale", "norm/scale",
               "lm_head/kernel"]:
    assert want in paths
  assert params["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (64, 32)  # [in, out], GQA


def test_bf16_compute_is_close_to_f32(tiny):
  model, params = tiny
  ids, mask = padded_batch(np.random.RandomState(1), [9, 5], 96)
  f32 = fwd(model)({"params": params}, ids, attention_mask=mask)
  m16 = LlamaForCausalLM(TINY, dtype=jnp.bfloat16)
  b16 = jax.jit(m16.apply)({"params": params}, ids, attention_mask=mask)
  assert b16.dtype == jnp.float32 and params["norm"]["scale"].dtype == jnp.float32
  real = mask.astype(bool)
  err = float(jnp.abs(b16 - f32)[real].max() / jnp.abs(f32)[real].max())
  print(f"bf16 compute: max rel err {err:.3f}")
  assert err < 0.05


def test_remat_and_scan_give_same_loss_and_grads(tiny):
  _, params = tiny
  ids, mask = padded_batch(np.random.RandomState(2), [8, 6], 96)
  stacked = {k: v for k, v in params.items() if not k.startswith("layers_")}
  stacked["layers"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), params["layers_0"],
                                             params["layers_1"])

  def loss(model, p):
    logits = model.apply({"params": p}, ids, attention_mask=mask)
    logp = jax.nn.log_softmax(logits[:, :-1])
    tgt = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    return -(tgt * mask[:, 1:]).sum() / mask[:, 1:].sum()

  l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(LlamaForCausalLM(TINY), p)))(params)
  for remat in [True]:
    m = LlamaForCausalLM(TINY, scan_layers=True, remat=remat)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p, m=m: loss(m, p)))(stacked)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    np.testing.assert_allclose(g1["layers"]["mlp"]["up_proj"]["kernel"][1],
                               g0["layers_1"]["mlp"]["up_proj"]["kernel"], atol=1e-6)
  with pytest.raises(ValueError, match="unknown remat policy"):
    jax.eval_shape(lambda: LlamaForCausalLM(TINY, remat="bogus").init(jax.random.key(0), ids))


# ------------------------------------------------------------------------------------------------
# hooks: inputs_embeds, prefix
# ------------------------------------------------------------------------------------------------

def test_inputs_embeds_equals_ids(tiny):
  model, params = tiny
  ids, mask = padded_batch(np.random.RandomState(3), [7, 4], 96)
  emb = params["embed_tokens"]["embedding"][ids]
  a = fwd(model)({"params": params}, ids, attention_mask=mask)
  b = fwd(model)({"params": params}, inputs_embeds=emb, attention_mask=mask)
  np.testing.assert_allclose(a, b, atol=1e-6)
  with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
    model.apply({"params": params}, ids, inputs_embeds=emb)
  with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
    model.apply({"params": params})
  with pytest.raises(ValueError, match="attention_mask must have shape"):
    model.apply({"params": params}, ids, attention_mask=mask[:, :3])


def _prefix_from_tokens(model, params, prefix_ids):
  """Per-layer keys/values of ``prefix_ids`` ([1, P]) as a prefix array [L, 2, 1, P, kvh, hd]."""
  p = prefix_ids.shape[1]
  _, cache = fwd(model)({"params": params}, prefix_ids, cache=init_cache(model.config, 1, p))
  return jnp.swapaxes(jnp.stack([cache.k, cache.v], axis=1), 3, 4)  # cache: heads before positions


@pytest.mark.parametrize("scan", [True], ids=["scan"])  # the loop path's xs: KV-cache tests
def test_prefix_matches_prepended_tokens_and_respects_padding(tiny, scan):
  model, params = tiny
  if scan:
    model = LlamaForCausalLM(TINY, scan_layers=True)
    params = {**{k: v for k, v in params.items() if not k.startswith("layers_")},
              "layers": jax.tree_util.tree_map(lambda *a: jnp.stack(a), params["layers_0"],
                                               params["layers_1"])}
  rs = np.random.RandomState(4)
  pre = rs.randint(3, 96, (1, 3)).astype(np.int32)
  x = rs.randint(3, 96, (1, 6)).astype(np.int32)
  prefix = _prefix_from_tokens(model, params, pre)
  assert prefix.shape == (2, 2, 1, 3, 2, 16)
  full = fwd(model)({"params": params}, np.concatenate([pre, x], 1))[:, 3:]
  # the prefix is used as given; the real tokens continue the positions of the prefixed run
  got = fwd(model)({"params": params}, x, prefix=prefix, position_ids=3 + np.arange(6)[None])
  np.testing.assert_allclose(got, full, atol=1e-5)
  # default positions of the real tokens are 0.. regardless of the prefix
  np.testing.assert_allclose(fwd(model)({"params": params}, x, prefix=prefix),
                             fwd(model)({"params": params}, x, prefix=prefix,
                                         position_ids=np.arange(6)[None]), atol=1e-6)
  # left padding: padded rows see neither padding nor shifted positions; prefix broadcasts
  ids = np.zeros((2, 8), np.int32)
  mask = np.zeros((2, 8), np.int32)
  ids[0, 2:], mask[0, 2:] = x[0], 1
  ids[1], mask[1] = np.concatenate([x[0, :2], x[0]]), 1
  out = fwd(model)({"params": params}, ids, attention_mask=mask, prefix=prefix)
  alone = fwd(model)({"params": params}, x, prefix=prefix)
  np.testing.assert_allclose(out[0, 2:], alone[0], atol=1e-5)
  with pytest.raises(ValueError, match="prefix has shape"):
    model.apply({"params": params}, x, prefix=prefix[:1])


# ------------------------------------------------------------------------------------------------
# KV cache and generation
# ------------------------------------------------------------------------------------------------

def test_kv_cache_steps_equal_full_forward(tiny):
  model, params = tiny
  ids, mask = padded_batch(np.random.RandomState(5), [9, 6], 96)
  full = fwd(model)({"params": params}, ids, attention_mask=mask)
  cache = init_cache(TINY, 2, 12)
  fmask = np.concatenate([mask, np.ones((2, 3), np.int32)], 1)
  step = jax.jit(model.apply)
  logits, cache = step({"params": params}, ids[:, :5], attention_mask=fmask, cache=cache)
  outs = [logits]
  for t in range(5, 9):
    logits, cache = step({"params": params}, ids[:, t:t + 1], attention_mask=fmask, cache=cache)
    outs.append(logits)
  assert int(cache.index) == 9
  got = np.concatenate(outs, 1)
  real = mask.astype(bool)
  np.testing.assert_allclose(got[real], np.asarray(full)[real], atol=1e-5)
  with pytest.raises(ValueError, match="must cover the cache"):
    model.apply({"params": params}, ids, attention_mask=mask, cache=init_cache(TINY, 2, 12))


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("per_row", [False, True], ids=["one_index", "per_row"])
def test_a_decoding_step_writes_the_donated_kv_cache_in_place(scan, per_row):
  """No copy or transpose of the cache (or of one layer's part of it) in a decoding step: each
  costs a pass over the whole cache at every step, which was most of a step at serving lengths
  (the cache copied, re-stacked, and transposed for the attention's dots). Head dim 64 and 512
  positions, as real models and servers have: XLA:CPU transposes the keys of tiny heads and short
  caches, where that is cheap. (Each layer's slice is still copied out for its dots.)"""
  cfg = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=64)
  model = LlamaForCausalLM(cfg, scan_layers=scan)
  params = jax.jit(model.init)(jax.random.key(1), jnp.ones((1, 4), jnp.int32))["params"]
  cache = init_cache(cfg, 8, 512, per_row=per_row)
  step = jax.jit(lambda p, c, ids: model.apply({"params": p}, ids, cache=c), donate_argnums=1)
  ids = jnp.arange(3, 11, dtype=jnp.int32)[:, None]
  hlo = step.lower(params, cache, ids).compile().as_text()
  # the buffers the program materializes: instructions outside fusions' bodies
  fused = set(re.findall(r"kind=\w+, calls=%([\w.-]+)", hlo))
  bodies = re.split(r"\n(?=\S)", hlo)
  top = "\n".join(b for b in bodies if not any(b.startswith(f"%{f} ") for f in fused))
  layer = int(np.prod(cache.k.shape[1:]))
  ops = re.finditer(r"%(\S+) = f32\[([0-9,]+)\]\S* (\w+)\(", top)
  big = [f"{name} {op} [{dims}]" for name, dims, op in (m.groups() for m in ops)
         if np.prod([int(d) for d in dims.split(",")]) >= layer
         and (op in ("copy", "transpose") or op == "fusion" and re.search(r"transpose|copy_fusion",
                                                                          name))]
  assert not big, big
  # ... and the step computes what the full forward does
  logits, cache = step(params, cache, ids)
  np.testing.assert_allclose(np.asarray(logits),
                             np.asarray(fwd(model)({"params": params}, ids)), atol=1e-5)
  assert np.asarray(cache.index).tolist() == ([1] * 8 if per_row else 1)


def _greedy_reference(model, params, prompt, n, stop=()):
  """Greedy decoding by full recompute (no cache): one fixed-size buffer, right-padded."""
  total = len(prompt) + n
  buf = np.zeros((1, total), np.int32)
  buf[0, :len(prompt)] = prompt
  out = []
  for t in range(len(prompt), total):
    mask = (np.arange(total) < t).astype(np.int32)[None]
    logits = fwd(model)({"params": params}, buf, attention_mask=mask)
    tok = int(np.argmax(logits[0, t - 1]))
    out.append(tok)
    buf[0, t] = tok
    if tok in stop:
      break
  return out


def test_greedy_generation_equals_full_recompute(tiny):
  model, params = tiny
  rs = np.random.RandomState(6)
  prompts = [list(rs.randint(3, 96, 7)), list(rs.randint(3, 96, 3)), list(rs.randint(3, 96, 5))]
  ids = np.zeros((3, 7), np.int32)
  mask = np.zeros((3, 7), np.int32)
  for i, p in enumerate(prompts):
    ids[i, 7 - len(p):], mask[i, 7 - len(p):] = p, 1
  out = generate(model, params, ids, mask, max_new_tokens=8, stop_tokens=())
  refs = [_greedy_reference(model, params, p, 8) for p in prompts]
  assert out.tokens.tolist() == refs and out.lengths.tolist() == [8, 8, 8]
  # right padding works as well (positions from the mask, first token at the last real one)
  rids = np.zeros((3, 7), np.int32)
  rmask = np.zeros((3, 7), np.int32)
  for i, p in enumerate(prompts):
    rids[i, :len(p)], rmask[i, :len(p)] = p, 1
  assert generate(model, params, rids, rmask, max_new_tokens=8, stop_tokens=()).tokens.tolist() \
      == refs
  # stop tokens: row 0 stops at its 3rd token, the rest of the row is padding
  stop = refs[0][2]
  out = generate(model, params, ids, mask, max_new_tokens=8, stop_tokens=[stop], pad_token_id=0)
  for i, p in enumerate(prompts):
    ref = _greedy_reference(model, params, p, 8, stop=(stop,))
    assert out.tokens[i, :len(ref)].tolist() == ref
    assert out.tokens[i, len(ref):].tolist() == [0] * (8 - len(ref))
    assert int(out.lengths[i]) == len(ref)


def test_sampling(tiny):
  model, params = tiny
  ids, mask = padded_batch(np.random.RandomState(7), [7, 3, 5], 96)  # shapes of the greedy test
  greedy = generate(model, params, ids, mask, max_new_tokens=8, stop_tokens=())
  key = jax.random.key(3)
  # a vanishing nucleus is greedy; temperature and top_p are traced (one compiled program)
  s = generate(model, params, ids, mask, max_new_tokens=8, stop_tokens=(), temperature=0.7,
               key=key, top_p=1e-6)
  assert s.tokens.tolist() == greedy.tokens.tolist()
  a = generate(model, params, ids, mask, max_new_tokens=8, stop_tokens=(), temperature=1.5,
               key=key, top_p=0.999)
  b = generate(model, params, ids, mask, max_new_tokens=8, stop_tokens=(), temperature=1.5,
               key=key, top_p=0.999)
  c = generate(model, params, ids, mask, max_new_tokens=8, stop_tokens=(), temperature=1.5,
               key=jax.random.key(4), top_p=0.999)
  assert a.tokens.tolist() == b.tokens.tolist() != c.tokens.tolist()
  # top-p keeps the smallest set reaching p: every draw lands in it
  logits = jnp.asarray(np.random.RandomState(8).randn(4, 50) * 3, jnp.float32)
  draws = jax.vmap(lambda k: sample_logits(logits, k, 1.0, top_p=0.6))(
      jax.random.split(jax.random.key(0), 200))
  probs = np.asarray(jax.nn.softmax(logits))
  for r in range(4):
    order = np.argsort(-probs[r])
    n_keep = int(np.searchsorted(np.cumsum(probs[r][order]), 0.6) + 1)
    assert set(np.asarray(draws[:, r]).tolist()) <= set(order[:n_keep].tolist())
  kdraws = jax.vmap(lambda k: sample_logits(logits, k, 1.0, top_k=3))(
      jax.random.split(jax.random.key(1), 100))
  for r in range(4):
    assert set(np.asarray(kdraws[:, r]).tolist()) <= set(np.argsort(-probs[r])[:3].tolist())
  with pytest.raises(ValueError, match="needs a PRNG key"):
    generate(model, params, ids, mask, temperature=1.0)
  with pytest.raises(ValueError, match="top_p"):
    generate(model, params, ids, mask, top_p=0.0)


def test_generation_with_lora_nodes_uses_lift(tiny):
  peftjax = pytest.importorskip("peftjax")
  if not hasattr(peftjax, "lora") or not hasattr(peftjax, "lift"):
    pytest.skip("peftjax.lora / lift not available")
  model, params = tiny
  tuned = peftjax.lora.apply(params, rank=4, key=jax.random.key(0))
  # make the adapters matter
  tuned = jax.tree_util.tree_map(
      lambda n: n.replace(b=0.5 * jax.random.normal(jax.random.key(1), n.b.shape))
      if peftjax.is_node(n) else n, tuned, is_leaf=peftjax.is_node)
  ids, mask = padded_batch(np.random.RandomState(9), [7, 3, 5], 96)  # shapes as in the greedy test
  got = generate(model, tuned, ids, mask, max_new_tokens=8, stop_tokens=())
  ref = generate(model, peftjax.merge(tuned), ids, mask, max_new_tokens=8, stop_tokens=())
  assert got.tokens.tolist() == ref.tokens.tolist()


def test_config_errors():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    LlamaConfig(num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*llama, mistral, qwen2"):
    LlamaConfig.from_hf({"model_type": "gpt2"})
  with pytest.raises(ValueError, match="unsupported rope scaling 'yarn'"):
    LlamaConfig(hidden_size=64, num_heads=4, num_kv_heads=4,
                rope_scaling={"rope_type": "yarn", "factor": 2.0})
  with pytest.raises(ValueError, match="unsupported hidden_act"):
    LlamaConfig(hidden_act="mish")


# ------------------------------------------------------------------------------------------------
# sharding
# ------------------------------------------------------------------------------------------------

def test_logical_axes_and_lora_node_specs(tiny):
  _, params = tiny
  axes = logical_axes(params)
  assert axes["layers_0"]["self_attn"]["q_proj"]["kernel"] == ("embed", "heads")
  assert axes["layers_0"]["self_attn"]["o_proj"]["kernel"] == ("heads", "embed")
  assert axes["layers_0"]["mlp"]["down_proj"]["kernel"] == ("mlp", "embed")
  assert axes["embed_tokens"]["embedding"] == (None, "embed")
  assert axes["lm_head"]["kernel"] == ("embed", "vocab")
  assert axes["norm"]["scale"] == (None,)
  peftjax = pytest.importorskip("peftjax")
  if not hasattr(peftjax, "lora"):
    pytest.skip("peftjax.lora not available")

  class FakeMesh:
    shape = {"data": 1, "fsdp": 2, "tensor": 4}

  tuned = peftjax.lora.apply(params, rank=4)
  specs = param_specs(tuned, FakeMesh)
  node = specs["layers_0"]["self_attn"]["q_proj"]["kernel"]
  assert tuple(node.w) == ("fsdp", "tensor")
  assert tuple(node.a) == ("fsdp",)           # a [in, r]: follows the kernel's input axis
  assert tuple(node.b) == (None, "tensor")    # b [r, out]: follows its output axis


_SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_default_matmul_precision", "highest")
    from peftjax.models import (LlamaConfig, LlamaForCausalLM, make_mesh, shard_params,
                                batch_sharding)
    assert len(jax.devices()) == 8, jax.devices()
    out = {}
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    rs = np.random.RandomState(0)
    ids = rs.randint(0, 128, (4, 12)).astype(np.int32)
    mask = np.ones((4, 12), np.int32); mask[0, :3] = 0; mask[2, :5] = 0
    def loss_fn(apply):
      def loss(p):
        logits = apply({"params": p}, ids, attention_mask=mask)
        logp = jax.nn.log_softmax(logits[:, :-1])
        tgt = jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
        return -(tgt * mask[:, 1:]).sum() / mask[:, 1:].sum()
      return loss
    for scan in (True,):
      model = LlamaForCausalLM(cfg, scan_layers=scan)
      params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
      ref = jax.jit(model.apply)({"params": params}, ids, attention_mask=mask)
      sp = shard_params(params, mesh)
      specs = {jax.tree_util.keystr(k, simple=True, separator="/"): str(v.sharding.spec)
               for k, v in jax.tree_util.tree_leaves_with_path(sp)}
      sids = jax.device_put(ids, batch_sharding(mesh, shape=ids.shape))
      with jax.set_mesh(mesh):
        got = jax.jit(model.apply)({"params": sp}, sids, attention_mask=mask)
      out[f"llama_scan{scan}"] = dict(fwd=float(jnp.abs(got - ref).max()), specs=specs)
      # loading an HF directory straight onto the mesh gives the same placement and values
      import tempfile
      from peftjax.io import from_pretrained, save_pretrained
      with tempfile.TemporaryDirectory() as d:
        save_pretrained(params, model.config, d)
        _, lp, _ = from_pretrained(d, scan_layers=scan, mesh=mesh, tokenizer=False)
        # quantized while loading, straight onto the mesh (each packed kernel as it is packed)
        _, lq, _ = from_pretrained(d, scan_layers=scan, mesh=mesh, tokenizer=False,
                                   quantize="nf4")
      same = jax.tree_util.tree_map(
          lambda a, b: bool(a.sharding == b.sharding and (np.asarray(a) == np.asarray(b)).all()),
          lp, sp)
      out["mesh_load_same"] = all(jax.tree_util.tree_leaves(same))
      from peftjax import quant
      rq = shard_params(quant.quantize(params, **quant.quantize_options("nf4")), mesh)
      lq_leaves, rq_leaves = jax.tree_util.tree_leaves(lq), jax.tree_util.tree_leaves(rq)
      out["mesh_quant_same"] = len(lq_leaves) == len(rq_leaves) and all(
          a.dtype == b.dtype and a.sharding == b.sharding and
          (np.asarray(a) == np.asarray(b)).all() for a, b in zip(lq_leaves, rq_leaves))
      codes = [x for x in lq_leaves if x.dtype == jnp.uint8 and x.ndim >= 2]
      out["mesh_quant_codes"] = [(x.nbytes, sorted({sh.data.nbytes for sh in x.addressable_shards}))
                                 for x in codes]
    # a LoRA training step: same loss and updated adapters on 8 devices as on one
    try:
      import peftjax
      have_lora = hasattr(peftjax, "lora") and hasattr(peftjax, "lift")
    except Exception:
      have_lora = False
    if have_lora:
      model = LlamaForCausalLM(cfg, scan_layers=True)
      params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
      tuned = peftjax.lora.apply(params, rank=4, key=jax.random.key(2))
      tuned = jax.tree_util.tree_map(
          lambda n: n.replace(b=0.1 * jax.random.normal(jax.random.key(3), n.b.shape))
          if peftjax.is_node(n) else n, tuned, is_leaf=peftjax.is_node)
      fwd = peftjax.lift(model.apply)
      tx = optax.sgd(0.5)
      def step(tuned):
        trainable, frozen = peftjax.split(tuned)
        loss = lambda t: loss_fn(fwd)(peftjax.combine(t, frozen))
        l, g = jax.value_and_grad(loss)(trainable)
        upd, _ = tx.update(g, tx.init(trainable), trainable)
        return l, optax.apply_updates(trainable, upd)
      l0, t0 = jax.jit(step)(tuned)
      st = shard_params(tuned, mesh)
      with jax.set_mesh(mesh):
        l1, t1 = jax.jit(step)(st)
      leaves0 = [x for x in jax.tree_util.tree_leaves(t0) if x is not None]
      leaves1 = [x for x in jax.tree_util.tree_leaves(t1) if x is not None]
      out["lora"] = dict(loss=abs(float(l0) - float(l1)),
                         upd=max(float(jnp.abs(a - b).max()) for a, b in zip(leaves0, leaves1)),
                         n=len(leaves0))
    else:  # plain full-parameter gradients
      model = LlamaForCausalLM(cfg, scan_layers=True)
      params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
      l0, g0 = jax.jit(jax.value_and_grad(loss_fn(model.apply)))(params)
      with jax.set_mesh(mesh):
        l1, g1 = jax.jit(jax.value_and_grad(loss_fn(model.apply)))(shard_params(params, mesh))
      out["grads"] = dict(loss=abs(float(l0) - float(l1)), upd=max(
          float(jnp.abs(a - b).max()) for a, b in
          zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1))), n=1)
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.newest_only
def test_sharded_on_8_devices_equals_single_device():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], capture_output=True, text=True,
                        env=env, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-4000:]
  res = json.loads(proc.stdout.split("RESULT", 1)[1])
  print({k: {kk: vv for kk, vv in v.items() if kk != "specs"} if isinstance(v, dict) else v
         for k, v in res.items()})
  r = res["llama_scanTrue"]
  assert r["fwd"] < 1e-5 and res["mesh_load_same"] and res["mesh_quant_same"]
  # the 7 kernels' packed codes and double-quantized scales (uint8): each split over the mesh
  codes = res["mesh_quant_codes"]
  assert len(codes) == 14 and all(len(per) == 1 and per[0] < total for total, per in codes), codes
  specs = res["llama_scanTrue"]["specs"]
  assert specs["layers/self_attn/q_proj/kernel"] == "P(None, 'fsdp', 'tensor')"
  assert specs["layers/mlp/down_proj/kernel"] == "P(None, 'tensor', 'fsdp')"
  assert specs["embed_tokens/embedding"] == "P(None, 'fsdp')"
  step = res.get("lora", res.get("grads"))
  assert step["loss"] < 1e-5 and step["upd"] < 1e-5 and step["n"] > 0


def test_expand_prefix_shapes():
  from peftjax.models.common import expand_prefix
  p = jnp.zeros((2, 2, 3, 4, 16))          # batch-shared form
  assert expand_prefix(p, 2, 5, 4, 16).shape == (2, 2, 5, 3, 4, 16)
  assert expand_prefix(p[:, :, None], 2, 5, 4, 16).shape == (2, 2, 5, 3, 4, 16)
  assert expand_prefix(None, 2, 5, 4, 16) is None
  with pytest.raises(ValueError, match="prefix has shape"):
    expand_prefix(jnp.zeros((2, 2, 3, 3, 4, 16)), 2, 5, 4, 16)  # batch 3 vs 5
  with pytest.raises(ValueError, match="prefix must be"):
    expand_prefix(jnp.zeros((2, 3, 4, 16)), 2, 5, 4, 16)


def test_generate_and_mesh_argument_errors(tiny):
  from peftjax.models import BertConfig, BertModel, make_mesh
  model, params = tiny
  ids = np.ones((2, 4), np.int32)
  with pytest.raises(TypeError, match="needs a peftjax.models.LlamaForCausalLM, got"):
    generate(BertModel(BertConfig()), params, ids)
  with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
    generate(model, params, ids, max_new_tokens=0)
  with pytest.raises(ValueError, match="temperature must be >= 0"):
    generate(model, params, ids, temperature=-1.0)
  with pytest.raises(ValueError, match=r"input_ids must be \[batch, prompt_len\]"):
    generate(model, params, ids[0])
  with pytest.raises(ValueError, match="attention_mask shape"):
    generate(model, params, ids, ids[:, :2])
  with pytest.raises(ValueError, match="at most one of data, fsdp, tensor may be -1"):
    make_mesh(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="needs 4 devices"):
    make_mesh(data=2, fsdp=2, tensor=1)
  assert make_mesh().shape == {"data": 1, "fsdp": len(jax.devices()), "tensor": 1}


def test_rope_scalings():
  from peftjax.models.common import rope_inv_freq
  base = rope_inv_freq(16, 10000.0)
  np.testing.assert_allclose(rope_inv_freq(16, 10000.0, {"rope_type": "linear", "factor": 4.0}),
                             base / 4)
  np.testing.assert_allclose(rope_inv_freq(16, 10000.0, {"rope_type": "freq_factors",
                                                         "factors": [2.0] * 8}), base / 2)
  l3 = rope_inv_freq(16, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
  assert l3[0] == base[0] and np.isclose(l3[-1], base[-1] / 8)  # short waves kept, long scaled


@pytest.mark.parametrize("temps,top_ps", [([0.0, 0.0, 0.0, 0.0], [1.0, 0.5, 1.0, 0.9]),
                                          ([0.0, 0.8, 1.3, 0.0], [1.0, 1.0, 1.0, 0.5]),
                                          ([0.7, 0.0, 1.0, 0.5], [0.9, 1.0, 1.0, 0.3])])
def test_slot_sampling_runs_only_what_rows_need_and_equals_each_row_alone(temps, top_ps):
  """``_sample_rows`` skips the sampling (all greedy) and the nucleus (no ``top_p < 1``) by
  ``lax.cond``; every row still equals ``sample_logits`` on that row alone, jitted or not."""
  from peftjax.models.generate import _sample_rows, sample_logits
  logits = jax.random.normal(jax.random.key(3), (4, 50)) * 3
  keys = jax.random.split(jax.random.key(4), 4)
  t, p = jnp.asarray(temps, jnp.float32), jnp.asarray(top_ps, jnp.float32)
  want = [int(jnp.argmax(logits[i])) if temps[i] == 0 else
          int(sample_logits(logits[i][None], keys[i], t[i], p[i])[0]) for i in range(4)]
  for fn in (_sample_rows, jax.jit(_sample_rows)):
    assert np.asarray(fn(logits, keys, t, p)).tolist() == want
