"""Quantize while loading: from_pretrained(quantize=...) and qlora.apply on a quantized tree."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax
from peftjax.io import from_pretrained, save_pretrained
from peftjax.models import LlamaConfig, LlamaForCausalLM
from peftjax.quant import QuantizedWeight

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
is_q = lambda x: isinstance(x, QuantizedWeight)


def _write_llama(path, *, hidden=64, ffn=96, layers=2, vocab=128, seed=0):
  cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                    num_layers=layers, num_heads=4, num_kv_heads=2)
  model = LlamaForCausalLM(cfg)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"]
  save_pretrained(params, cfg, path)
  return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  return _write_llama(tmp_path_factory.mktemp("qload"))


def _leaves(tree):
  return {jax.tree_util.keystr(k): v
          for k, v in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_q)}


@pytest.mark.parametrize("scan,spec", [
    (False, "nf4"),
    (True, {"format": "int4", "symmetric": False, "block_size": 48, "double_quant": False})],
    ids=["loop-nf4", "scan-int4-padded"])
def test_packed_codes_are_bit_identical_to_quantize_of_the_f32_tree(llama_dir, scan, spec):
  _, f32, _ = from_pretrained(llama_dir, tokenizer=False, scan_layers=scan)
  opts = peftjax.quant.quantize_options(spec)
  ref = _leaves(peftjax.quant.quantize(f32, **opts))
  _, got, _ = from_pretrained(llama_dir, tokenizer=False, scan_layers=scan, quantize=spec,
                              dtype=jnp.bfloat16, compute_dtype=jnp.float32)
  got = _leaves(got)
  assert set(got) == set(ref)
  n = 0
  for k, v in got.items():
    r = ref[k]
    if is_q(r):
      n += 1
      assert is_q(v) and (v.format, v.block_size, v.shape, v.dtype_name) == \
          (r.format, r.block_size, r.shape, r.dtype_name)
      for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(r)):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b)), k
    else:  # everything else in the requested dtype
      assert v.dtype == jnp.bfloat16 and np.array_equal(
          np.asarray(v), np.asarray(r.astype(jnp.bfloat16))), k
  assert n == (7 if scan else 14)


def test_qlora_apply_takes_a_quantized_tree(llama_dir):
  model, q, _ = from_pretrained(llama_dir, tokenizer=False, quantize=True)
  tuned = peftjax.qlora.apply(q, rank=4)
  node = tuned["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert type(node).__name__ == "LoraWeight" and node.w is q["layers_0"]["mlp"]["up_proj"]["kernel"]
  # the same tree as qlora.apply on the float32 model: same codes, same adapters
  _, f32, _ = from_pretrained(llama_dir, tokenizer=False)
  ref = peftjax.qlora.apply(f32, rank=4)
  a, b = jax.tree_util.tree_flatten(tuned), jax.tree_util.tree_flatten(ref)
  assert a[1] == b[1]
  for x, y in zip(a[0], b[0]):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # targets given: LoRA on q_proj only; the other quantized kernels stay frozen in 4 bits
  part = peftjax.qlora.apply(q, rank=4, targets=["q_proj"])
  assert type(part["layers_1"]["self_attn"]["q_proj"]["kernel"]).__name__ == "LoraWeight"
  assert is_q(part["layers_1"]["self_attn"]["k_proj"]["kernel"])
  # the command line loads a qlora run this way (Method.load), with no f32 model in between
  qlora = peftjax.methods.get("qlora")
  assert qlora.load_kwargs()["quantize"]["format"] == "nf4"
  assert peftjax.methods.get("lora").load_kwargs() == {}
  # an init that needs the full-precision kernel (PiSSA's SVD, LoftQ's loop) loads it
  assert "quantize" not in qlora.load_kwargs({"init": "pissa"})


def test_bad_quantize_arguments_name_the_value(llama_dir, tmp_path):
  load = lambda **kw: from_pretrained(llama_dir, tokenizer=False, **kw)
  with pytest.raises(ValueError, match="format='nf5' is not one of"):
    load(quantize="nf5")
  with pytest.raises(ValueError, match="block_size must be even for 4-bit format 'nf4'.*63"):
    load(quantize={"block_size": 63})
  with pytest.raises(ValueError, match="block_size must be positive; got 0"):
    load(quantize={"format": "int8", "block_size": 0})
  with pytest.raises(ValueError, match="unknown option 'bits'"):
    load(quantize={"bits": 4})
  with pytest.raises(TypeError, match="quantize= must be None, True, a format name"):
    load(quantize=4)
  with pytest.raises(ValueError, match=r"cannot quantize tensor 'model.layers.0.input_layernorm."
                                       r"weight' \(parameter layers_0/input_layernorm/scale\): "
                                       r"it has shape \[64\]"):
    load(quantize={"targets": r".*(q_proj/kernel|layernorm/scale)"})
  with pytest.raises(ValueError, match="matched no parameter"):
    load(quantize={"targets": "nothing"})
  # an integer tensor where a kernel is targeted
  from peftjax.io.safetensors import SafetensorsFile, write_safetensors
  d = tmp_path / "int"
  d.mkdir()
  (d / "config.json").write_text((llama_dir / "config.json").read_text())
  src = SafetensorsFile(llama_dir / "model.safetensors")
  bad = "model.layers.1.self_attn.v_proj.weight"
  entries = []
  for name in src.keys():
    a = src.get(name)
    if name == bad:
      a = np.round(a * 100).astype(np.int32)
    entries.append((name, a.dtype, a.shape, lambda a=a: a))
  write_safetensors(d / "model.safetensors", entries, {"format": "pt"})
  with pytest.raises(ValueError, match=r"cannot quantize tensor 'model.layers.1.self_attn.v_proj."
                                       r"weight' \(parameter layers_1/self_attn/v_proj/kernel\): "
                                       r"it has dtype int32"):
    from_pretrained(d, tokenizer=False, quantize="nf4")


_PEAK = textwrap.dedent("""
  import gc, json, sys
  import jax, jax.numpy as jnp
  from peftjax.io import from_pretrained

  def rss(key):
    with open("/proc/self/status") as f:
      return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))

  def grow(**kw):
    gc.collect()
    before = rss("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")   # resets VmHWM to the current RSS
    out = from_pretrained(sys.argv[1], tokenizer=False, **kw)
    jax.block_until_ready(out.params)
    return rss("VmHWM:") - before, out

  q = dict(quantize="nf4", dtype=jnp.bfloat16, compute_dtype=jnp.float32)
  grow(**q)                  # compiles the quantizer: not what is measured
  g_q, out = grow(**q)
  del out
  g_f32, out = grow()
  size = sum(x.nbytes for x in jax.tree_util.tree_leaves(out.params))
  print(json.dumps({"quantized": g_q, "f32": g_f32, "f32_bytes": size}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
@pytest.mark.newest_only
def test_loading_never_holds_the_f32_model(tmp_path):
  """Peak RSS growth while loading, in a fresh process: quantized loading stays far below the
  float32 model's size (a loader that built the f32 tree first would need all of it), and f32
  loading costs about one copy (reading through a memory map cost two)."""
  d = _write_llama(tmp_path / "m", hidden=384, ffn=1024, layers=6, vocab=1024)
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             MALLOC_MMAP_THRESHOLD_="65536", JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", _PEAK, str(d)], capture_output=True, text=True,
                     env=env, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  r = json.loads(p.stdout.strip().splitlines()[-1])
  f32 = r["f32_bytes"]
  assert f32 > 40e6
  # the packed model is ~0.17x here; the rest is one layer's temporaries and a fixed overhead
  assert r["quantized"] < 0.6 * f32, r
  assert r["f32"] < 1.3 * f32, r


# ------------------------------------------------------------------------------------------------
# GGUF: the file's own 4-bit / 8-bit blocks kept as they are
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def block_gguf(tmp_path_factory, llama_dir):
  """The tiny Llama as a GGUF file whose kernels are Q4_1 (MLP), Q4_0 (q, k: permuted rows),
  Q8_0 (v, o) and, for layer 1's up projection, F32 (so that stack is not one kind)."""
  pytest.importorskip("gguf")
  from types import SimpleNamespace
  from _model_fixtures import write_gguf
  from peftjax.io.safetensors import SafetensorsFile
  cfg = json.loads((llama_dir / "config.json").read_text())
  with SafetensorsFile(llama_dir / "model.safetensors") as f:
    state = {k: f.get(k) for k in f.keys()}
  hf_cfg = SimpleNamespace(**{**cfg, "rope_parameters": cfg.get("rope_parameters") or
                              {"rope_theta": cfg.get("rope_theta", 1e4)}})
  kinds = {}
  for i in range(cfg["num_hidden_layers"]):
    kinds.update({f"blk.{i}.ffn_gate.weight": "Q4_1", f"blk.{i}.ffn_down.weight": "Q4_1",
                  f"blk.{i}.attn_q.weight": "Q4_0", f"blk.{i}.attn_k.weight": "Q4_0",
                  f"blk.{i}.attn_v.weight": "Q8_0", f"blk.{i}.attn_output.weight": "Q8_0"})
  kinds["blk.0.ffn_up.weight"] = "Q4_1"
  path = tmp_path_factory.mktemp("gguf") / "blocks.gguf"
  write_gguf(state, hf_cfg, path, quantize=kinds, tokenizer=False)
  return path


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_gguf_blocks_are_kept_bit_for_bit(block_gguf, scan):
  from peftjax.io import from_gguf
  model, f32, _ = from_gguf(block_gguf, tokenizer=False, scan_layers=scan)
  _, q, _ = from_gguf(block_gguf, tokenizer=False, scan_layers=scan, quantize=True)
  ref = _leaves(f32)
  kinds = {}
  for k, v in _leaves(q).items():
    if not is_q(v):
      continue
    kinds[k] = (v.format, v.block_size, v.mins is not None)
    if v.format != "nf4":   # kept: exactly the weights the file holds (gguf's dequantization)
      assert np.array_equal(np.asarray(v.materialize()), np.asarray(ref[k])), k
  for layer in ((0,) if scan else (0, 1)):
    at = (lambda n: kinds[f"['layers']{n}"]) if scan else (lambda n: kinds[f"['layers_{layer}']{n}"])
    assert at("['mlp']['gate_proj']['kernel']") == ("int4", 32, True)         # Q4_1
    assert at("['self_attn']['q_proj']['kernel']") == ("int4", 32, False)     # Q4_0
    assert at("['self_attn']['v_proj']['kernel']") == ("int8", 32, False)     # Q8_0
  # up_proj: Q4_1 in layer 0, F32 in layer 1: a stack of mixed kinds is quantized (NF4) whole
  up = kinds["['layers']['mlp']['up_proj']['kernel']"] if scan else \
      kinds["['layers_1']['mlp']['up_proj']['kernel']"]
  assert up == ("nf4", 64, False)
  # gguf_blocks=False: every target quantized from float32, as before
  _, nf, _ = from_gguf(block_gguf, tokenizer=False, scan_layers=scan, quantize=True,
                       gguf_blocks=False)
  assert {v.format for v in _leaves(nf).values() if is_q(v)} == {"nf4"}


@pytest.mark.newest_only   # ~20 s; not about the interpreter
def test_kept_gguf_blocks_train_as_qlora_on_the_files_weights(block_gguf):
  """QLoRA on the kept blocks (Q4_1 with offsets, Q4_0, Q8_0; and the one NF4 stack) is LoRA on
  the dequantized base: the same loss and LoRA gradients (f32, jit and not), also through the
  chunked dequantizing matmul."""
  from peftjax._src.quant import matmul
  from peftjax.io import from_gguf
  model, q, _ = from_gguf(block_gguf, tokenizer=False, scan_layers=True, quantize=True)
  key = jax.random.key(3)
  lora = peftjax.lora.apply(peftjax.quant.dequantize(q), rank=4, key=key)
  qlora = peftjax.qlora.apply(q, rank=4, key=key)
  ids = np.random.default_rng(0).integers(0, 128, (2, 9)).astype(np.int32)
  fwd = peftjax.lift(model.apply)

  def loss(tree):
    logits = fwd({"params": tree}, ids[:, :-1])
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

  def lora_grads(tree):
    trainable, frozen = peftjax.split(tree)
    return jax.value_and_grad(lambda t: loss(peftjax.combine(t, frozen)))(trainable)
  want_l, want_g = jax.jit(lora_grads)(lora)
  for jit in (True, False):
    for chunk in (matmul.CHUNK_VALUES, 64):   # 64: every kernel dequantized in chunks
      old, matmul.CHUNK_VALUES = matmul.CHUNK_VALUES, chunk
      try:
        got_l, got_g = (jax.jit(lora_grads) if jit else lora_grads)(qlora)
      finally:
        matmul.CHUNK_VALUES = old
      np.testing.assert_allclose(float(got_l), float(want_l), rtol=1e-5)
      for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
