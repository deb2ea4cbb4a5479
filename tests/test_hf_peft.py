"""Hugging Face PEFT format both ways, merged export, bad input and safety.

The committed fixtures (``tests/fixtures/hf_peft_tiny_llama``, made by
``tests/fixtures/make_hf_peft_fixtures.py`` with torch + peft) give the HF -> peftjax direction
without PyTorch; the peftjax -> HF direction loads our files with ``peft`` itself and is skipped
when torch or peft is not installed.
"""

import json
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
from peftjax.io import from_pretrained
from peftjax.io.export import export_merged, merged_params
from peftjax.io.hf import SafetensorsFile, read_safetensors_header, write_safetensors
from peftjax.io.hf_peft import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, KEY_PREFIX, hf_module_name,
                                load_hf_peft, prefix_tuning_from_hf, prompt_tuning_from_hf,
                                read_hf_peft, save_hf_peft)
from peftjax.lora import LoraWeight
import peftjax.prompt
from peftjax.testing import next_token_loss

FIX = Path(__file__).resolve().parent / "fixtures" / "hf_peft_tiny_llama"
Q = "base_model.model.model.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def ref():
  f = SafetensorsFile(FIX / "reference.safetensors")
  return {k: np.array(f.get(k)) for k in f.keys()}


@pytest.fixture(scope="module")
def base():
  """(model, params) per layout, loaded once."""
  out = {}
  for scan in (False, True):
    model, params, _ = from_pretrained(FIX / "base", scan_layers=scan, tokenizer=False)
    out[scan] = (model, params)
  return out


_FWD = {}


def forward(model, tree, ids):
  if model not in _FWD:
    _FWD[model] = jax.jit(peftjax.lift(model.apply))
  return np.asarray(_FWD[model]({"params": tree}, ids))


# ------------------------------------------------------------------------------------------------
# HF PEFT (PyTorch) -> peftjax
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
def test_hf_adapter_gives_pytorch_logits(base, ref, scan):
  model, params = base[scan]
  ids = ref["input_ids"].astype(np.int32)
  tuned = load_hf_peft(FIX / "lora", params)
  layer = tuned["layers"] if scan else tuned["layers_1"]
  q, down, v = (layer["self_attn"]["q_proj"]["kernel"], layer["mlp"]["down_proj"]["kernel"],
                layer["self_attn"]["v_proj"]["kernel"])
  # r=4, alpha=8, rank_pattern down_proj=2, alpha_pattern v_proj=4, rsLoRA: alpha/sqrt(r)
  assert (q.rank, down.rank, v.rank) == (4, 2, 4)
  np.testing.assert_allclose([q.scale, down.scale, v.scale], [4.0, 8 / np.sqrt(2), 2.0])
  assert q.a.shape == ((2,) if scan else ()) + (64, 4) and q.dropout == 0.05
  out = forward(model, tuned, ids)
  diff = np.abs(out - ref["lora_logits"]).max()
  effect = np.abs(ref["lora_logits"] - ref["base_logits"]).max()
  print(f"HF PEFT -> peftjax (scan={scan}): max |logits - torch| = {diff:.2e} "
        f"(the adapter moves logits by {effect:.2f})")
  assert diff <= 1e-4 and effect > 0.5


def test_round_trip_is_exact(base, tmp_path):
  _, params = base[True]
  tuned = load_hf_peft(FIX / "lora", params)
  out = save_hf_peft(tuned, tmp_path / "rt")
  cfg = json.loads((out / ADAPTER_CONFIG).read_text())
  assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["rank_pattern"] == {"down_proj": 2}
  assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj",
                                                  "gate_proj", "up_proj", "down_proj"])
  orig = read_hf_peft(FIX / "lora").tensors
  back = read_hf_peft(out).tensors
  assert sorted(orig) == sorted(back)
  for k in orig:
    np.testing.assert_array_equal(orig[k], back[k], err_msg=k)
  again = load_hf_peft(out, params)
  for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  for (_, x), (_, y) in zip(*(jax.tree_util.tree_flatten_with_path(t, is_leaf=peftjax.is_node)[0]
                              for t in (tuned, again))):
    if isinstance(x, LoraWeight):
      assert np.isclose(x.scale, y.scale, rtol=1e-12) and x.n_in == y.n_in


# ------------------------------------------------------------------------------------------------
# peftjax -> HF PEFT (PyTorch), and merged export -> transformers
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(base, ref):
  """A LoRA adapter trained in peftjax (layer-stacked; two ranks, rsLoRA on the MLP)."""
  model, params = base[True]
  tuned = peftjax.lora.apply(params, rank=8, alpha=16, targets=["q_proj", "v_proj"],
                             key=jax.random.key(1))
  tuned = peftjax.lora.apply(tuned, rank=4, alpha=4, rslora=True, key=jax.random.key(2),
                             targets=["gate_proj", "up_proj", "down_proj"])
  tx = peftjax.optimizer(optax.adam(3e-2), tuned)
  fwd = peftjax.lift(model.apply)
  tokens = jnp.asarray(np.random.RandomState(0).randint(3, 96, (4, 12)), jnp.int32)

  @jax.jit
  def step(tuned, opt):
    trainable, frozen = peftjax.split(tuned)
    loss = lambda t: next_token_loss(fwd({"params": peftjax.combine(t, frozen)}, tokens), tokens)
    g = jax.grad(loss)(trainable)
    upd, opt = tx.update(g, opt, trainable)
    return peftjax.combine(optax.apply_updates(trainable, upd), frozen), opt

  opt = tx.init(tuned)
  for _ in range(2):
    tuned, opt = step(tuned, opt)
  assert float(jnp.abs(tuned["layers"]["self_attn"]["q_proj"]["kernel"].b).max()) > 1e-3
  ids = ref["input_ids"].astype(np.int32)
  return model, tuned, forward(model, tuned, ids)


def test_peftjax_adapter_loads_in_hf_peft(trained, ref, tmp_path):
  torch = pytest.importorskip("torch", reason="PyTorch (the reference) is not installed")
  peft = pytest.importorskip("peft", reason="HF PEFT (the reference) is not installed")
  import transformers
  model, tuned, ours = trained
  out = save_hf_peft(tuned, tmp_path / "adapter")
  cfg = json.loads((out / ADAPTER_CONFIG).read_text())
  # 6 MLP modules at r=4 outnumber 4 attention modules at r=8; scales 16/8 and 4/sqrt(4)
  assert cfg["r"] == 4 and cfg["rank_pattern"] == {"q_proj": 8, "v_proj": 8}
  assert cfg["lora_alpha"] == 8 and cfg["alpha_pattern"] == {"q_proj": 16, "v_proj": 16}
  hf = transformers.AutoModelForCausalLM.from_pretrained(FIX / "base", attn_implementation="eager")
  pm = peft.PeftModel.from_pretrained(hf, out).eval()
  n_lora = sum(1 for n, _ in pm.named_parameters() if "lora_" in n)
  assert n_lora == 2 * 5 * 2  # 5 modules x 2 layers, A and B
  with torch.no_grad():
    theirs = pm(input_ids=torch.tensor(ref["input_ids"])).logits.numpy()
  diff = np.abs(theirs - ours).max()
  print(f"peftjax -> HF PEFT: max |logits - peftjax| = {diff:.2e}")
  assert diff <= 1e-4


@pytest.mark.parametrize("slot", ["prompt", "prefix"])
def test_peftjax_prompt_and_prefix_load_in_hf_peft(base, ref, tmp_path, slot):
  """A Tuned with a soft prompt (a finalized prefix MLP) saved: PyTorch gives peftjax's logits."""
  torch = pytest.importorskip("torch", reason="PyTorch (the reference) is not installed")
  peft = pytest.importorskip("peft", reason="HF PEFT (the reference) is not installed")
  import transformers
  import peftjax.prefix
  model, params = base[True]
  ids = ref["input_ids"].astype(np.int32)
  if slot == "prompt":
    tree = peftjax.prompt.apply(params, 4, key=jax.random.key(3))
    ours = np.asarray(peftjax.forward(model, strip_outputs=False)(tree, ids))  # [2, 4 + 12, 96]
    real = ours[:, 4:]
  else:
    tree = peftjax.finalize(peftjax.prefix.apply(params, model.config, 3, hidden=16,
                                                 key=jax.random.key(3)))
    pos = jnp.broadcast_to(jnp.arange(12) + 3, (2, 12))  # HF shifts the real tokens' positions
    ours = real = np.asarray(peftjax.forward(model)(tree, ids, position_ids=pos))
  assert type(tree) is peftjax.Tuned and getattr(tree, slot) is not None
  out = save_hf_peft(tree, tmp_path / slot)
  hf = transformers.AutoModelForCausalLM.from_pretrained(FIX / "base", attn_implementation="eager")
  pm = peft.PeftModel.from_pretrained(hf, out).eval()
  with torch.no_grad():
    theirs = pm(input_ids=torch.tensor(ref["input_ids"])).logits.numpy()
  assert theirs.shape == ours.shape
  diff = np.abs(theirs - ours).max()
  effect = np.abs(real - ref["base_logits"]).max()
  print(f"peftjax {slot} -> HF PEFT: max |logits - peftjax| = {diff:.2e} (effect {effect:.2f})")
  assert diff <= 1e-4 and effect > 0.05


def test_merged_export_loads_in_transformers(trained, ref, tmp_path):
  torch = pytest.importorskip("torch", reason="PyTorch (the reference) is not installed")
  import transformers
  model, tuned, ours = trained
  out = export_merged({"params": tuned}, model, tmp_path / "merged")
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ref["input_ids"])).logits.numpy()
  diff = np.abs(theirs - ours).max()
  print(f"merged export -> transformers: max |logits - peftjax| = {diff:.2e}")
  assert diff <= 1e-4
  assert not any(peftjax.is_node(x) for x in jax.tree.leaves(merged_params(tuned),
                                                               is_leaf=peftjax.is_node))


# ------------------------------------------------------------------------------------------------
# name tables agree with the models' checkpoint layouts
# ------------------------------------------------------------------------------------------------

def test_name_tables_match_model_checkpoint_layouts():
  from peftjax.models import BertConfig, LlamaConfig
  from peftjax.models import bert as _bert
  from peftjax.models import llama as _llama
  llama = _llama.hf_tensor_map(LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                                           num_layers=2, num_heads=2, num_kv_heads=2))
  bert = _bert.hf_tensor_map(BertConfig(vocab_size=8, hidden_size=8, num_layers=2, num_heads=2,
                                        intermediate_size=8), pooler=True, classifier=True)
  checked = 0
  for family, specs, prefix in (("llama", llama, "model."), ("bert", bert, "bert.")):
    for spec in specs:
      if spec.kind != "linear":
        continue
      for i in (0, 1):
        flax = ("layers_%d" % i,) + spec.path[:-1] if spec.layer else spec.path[:-1]
        want = spec.hf_name.format(p=prefix, i=i)[:-len(".weight")]
        assert hf_module_name(flax, family, hf_prefix="bert.") == want
        if spec.layer:
          assert hf_module_name(("layers",) + spec.path[:-1], family, layer=i,
                                hf_prefix="bert.") == want
        checked += 1
  assert checked > 20


def test_bert_keys_and_round_trip(tmp_path):
  from peftjax.models import BertConfig, BertForSequenceClassification
  cfg = BertConfig(vocab_size=30, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                   max_position_embeddings=16, type_vocab_size=2, num_labels=3)
  model = BertForSequenceClassification(cfg, scan_layers=True)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32)))
  params = jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), shapes["params"])
  tuned = peftjax.lora.apply(params, rank=2, targets=["query", "value"])
  out = save_hf_peft(tuned, tmp_path / "bert")
  keys = sorted(read_hf_peft(out).tensors)
  assert keys[0] == "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
  # 2 layers x (query, value) x (A, B), and the classifier: HF PEFT's SEQ_CLS wrapper restores it
  assert len(keys) == 10 and "base_model.model.classifier.weight" in keys
  config = read_hf_peft(out).config
  assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
  with pytest.warns(UserWarning, match="modules_to_save"):
    back = load_hf_peft(out, params)
  for a, b in zip(jax.tree.leaves(tuned), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# IA3, prompt tuning, prefix tuning
# ------------------------------------------------------------------------------------------------

def test_ia3_prompt_prefix_give_pytorch_logits(base, ref):
  from peftjax.ia3 import IA3Weight
  model, params = base[True]
  ids = ref["input_ids"].astype(np.int32)
  diffs = {}
  ia3 = load_hf_peft(FIX / "ia3", params)
  down = ia3["layers"]["mlp"]["down_proj"]["kernel"]
  k = ia3["layers"]["self_attn"]["k_proj"]["kernel"]
  assert isinstance(down, IA3Weight) and (down.side, k.side) == ("in", "out")
  assert down.vector.shape == (2, 128) and k.vector.shape == (2, 32)
  diffs["ia3"] = np.abs(forward(model, ia3, ids) - ref["ia3_logits"]).max()

  apply = jax.jit(model.apply)
  tree = load_hf_peft(FIX / "prompt_tuning", params)
  tokens = tree.prompt.tokens                     # [5, 64]; HF returns the virtual positions too
  x = jnp.concatenate([jnp.broadcast_to(tokens, (2, *tokens.shape)),
                       peftjax.prompt.embed(tree.params, ids)], axis=1)
  diffs["prompt_tuning"] = np.abs(np.asarray(apply({"params": tree.params}, inputs_embeds=x))
                                  - ref["prompt_tuning_logits"]).max()

  tree = load_hf_peft(FIX / "prefix_tuning", params)
  kv = tree.prefix.kv                             # [layers, 2, 3, kv_heads, head_dim]
  assert kv.shape == (2, 2, 3, 2, 16)
  pos = jnp.broadcast_to(jnp.arange(12) + kv.shape[2], (2, 12))  # HF shifts real tokens' positions
  out = apply({"params": tree.params}, ids, prefix=kv[:, :, None], position_ids=pos)
  diffs["prefix_tuning"] = np.abs(np.asarray(out) - ref["prefix_tuning_logits"]).max()
  print("HF PEFT -> peftjax, max |logits - torch|: " +
        ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
  assert max(diffs.values()) <= 1e-4


@pytest.mark.parametrize("name", ["lora", "ia3", "prompt_tuning", "prefix_tuning"])
def test_every_method_round_trips_to_hf_tensors(base, tmp_path, name):
  tree = load_hf_peft(FIX / name, base[True][1])
  out = save_hf_peft(tree, tmp_path / name)
  orig, back = read_hf_peft(FIX / name), read_hf_peft(out)
  assert back.peft_type == orig.peft_type and sorted(orig.tensors) == sorted(back.tensors)
  for key in orig.tensors:
    np.testing.assert_array_equal(orig.tensors[key], back.tensors[key], err_msg=key)
  for field in ("feedforward_modules", "num_virtual_tokens", "token_dim", "num_layers"):
    if field in orig.config and orig.config[field] is not None:
      want = orig.config[field]
      assert sorted(back.config[field]) == sorted(want) if isinstance(want, list) else \
          back.config[field] == want


def test_prefix_layout():
  raw = read_hf_peft(FIX / "prefix_tuning")
  prefix = prefix_tuning_from_hf(raw)
  # HF: [nvt, L*2*kvh*hd] viewed [nvt, L*2, kvh, hd]; layer 1's values are row 3
  np.testing.assert_array_equal(prefix[1, 1, :, 1], raw.tensors["prompt_embeddings"].reshape(
      3, 4, 2, 16)[:, 3, 1])
  assert prompt_tuning_from_hf(read_hf_peft(FIX / "prompt_tuning")).shape == (5, 64)


def test_save_refuses_mixed_or_unmapped_methods(base, tmp_path):
  import peftjax.diff_pruning
  import peftjax.ia3
  params = base[False][1]
  mixed = peftjax.ia3.apply(peftjax.lora.apply(params, rank=2, targets=["q_proj"]),
                            targets=["k_proj"], feedforward=[])
  with pytest.raises(ValueError, match="mixes methods.*LORA.*IA3|mixes methods.*IA3.*LORA"):
    save_hf_peft(mixed, tmp_path / "x")
  with pytest.raises(ValueError, match=r"^layers_0/self_attn/q_proj/kernel is a DiffPruningWeight "
                                       r"\(node type 'diff_pruning'\), which has no Hugging Face "
                                       r"PEFT format"):
    save_hf_peft(peftjax.diff_pruning.apply(params, targets=["q_proj"]), tmp_path / "y")
  with pytest.raises(ValueError, match=r"no node to save: none of DoraWeight \(LORA\), LoraWeight "
                                       r"\(LORA\), IA3Weight \(IA3\), SoftPrompt "
                                       r"\(PROMPT_TUNING\), Prefix .*VeraWeight \(VERA\)"):
    save_hf_peft(params, tmp_path / "z")
  assert not any((tmp_path / d).exists() for d in "xyz")


def _same_adapter(a, b):
  """Two saved adapter directories hold the same config and tensors."""
  ra, rb = read_hf_peft(a), read_hf_peft(b)
  assert ra.config == rb.config and sorted(ra.tensors) == sorted(rb.tensors)
  for k in ra.tensors:
    np.testing.assert_array_equal(ra.tensors[k], rb.tensors[k], err_msg=k)


def test_prompt_and_prefix_load_as_tuned(base):
  from peftjax._src.additive import Prefix, SoftPrompt
  params = base[True][1]
  for given in (params, {"params": params}, peftjax.Tuned(params)):
    tree = load_hf_peft(FIX / "prompt_tuning", given)
    assert type(tree) is peftjax.Tuned and tree.params is params and tree.prefix is None
    assert isinstance(tree.prompt, SoftPrompt) and tree.prompt.tokens.shape == (5, 64)
    tree = load_hf_peft(FIX / "prefix_tuning", given)
    assert type(tree) is peftjax.Tuned and tree.params is params and tree.prompt is None
    assert isinstance(tree.prefix, Prefix) and tree.prefix.kv.shape == (2, 2, 3, 2, 16)
  with pytest.raises(ValueError, match="the tree already has a prefix; load the PREFIX_TUNING"):
    load_hf_peft(FIX / "prefix_tuning", tree)
  both = load_hf_peft(FIX / "prompt_tuning", tree)  # a prompt beside the prefix: both kept
  assert both.prefix is tree.prefix and isinstance(both.prompt, SoftPrompt)


def test_lora_and_ia3_load_keep_the_tree_shape(base):
  from peftjax.ia3 import IA3Weight
  params = base[False][1]
  q = lambda t: t["layers_1"]["self_attn"]["q_proj"]["kernel"]
  plain = load_hf_peft(FIX / "lora", params)
  flax = load_hf_peft(FIX / "lora", {"params": params})
  tuned = load_hf_peft(FIX / "lora", peftjax.Tuned(params))
  assert isinstance(q(plain), LoraWeight) and "params" not in plain
  assert list(flax) == ["params"] and isinstance(q(flax["params"]), LoraWeight)
  assert type(tuned) is peftjax.Tuned and isinstance(q(tuned.params), LoraWeight)
  for t in (flax["params"], tuned.params):
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(t)):
      np.testing.assert_array_equal(a, b)
  prompt = jnp.zeros((2, 64))
  ia3 = load_hf_peft(FIX / "ia3", peftjax.Tuned(params, prompt=prompt))  # other slots are kept
  assert ia3.prompt is prompt
  assert isinstance(ia3.params["layers_0"]["self_attn"]["k_proj"]["kernel"], IA3Weight)


def test_tuned_and_older_shapes_save_the_same(base, tmp_path):
  params = base[True][1]
  for name, slot in (("prompt_tuning", "prompt"), ("prefix_tuning", "prefix")):
    tree = load_hf_peft(FIX / name, params)
    assert isinstance(tree, peftjax.Tuned)
    a = save_hf_peft(tree, tmp_path / f"{name}_tuned")
    b = save_hf_peft({"params": tree.params, slot: getattr(tree, slot)}, tmp_path / f"{name}_0.1")
    _same_adapter(a, b)
    assert read_hf_peft(a).peft_type == name.upper()
  lora = peftjax.lora.apply(params, rank=2, targets=["q_proj"])
  a = save_hf_peft(lora, tmp_path / "plain")
  for i, given in enumerate((peftjax.Tuned(lora), {"params": lora})):
    _same_adapter(a, save_hf_peft(given, tmp_path / f"lora{i}"))


def test_save_dispatches_on_node_declarations(base, tmp_path):
  import peftjax.adapters
  import peftjax.prefix
  import peftjax.ptuning
  model, params = base[True]
  with pytest.raises(ValueError, match=r"layers/self_attn/o_proj/kernel is a BottleneckAdapter "
                                       r"\(node type 'bottleneck_adapter'\), which has no Hugging "
                                       r"Face PEFT format \(node types with one: DoraWeight "
                                       r"\(LORA\), LoraWeight \(LORA\), IA3Weight \(IA3\)"):
    save_hf_peft(peftjax.adapters.apply(params, 4, targets=["o_proj"]), tmp_path / "a")
  tree = peftjax.prefix.apply(params, model.config, 3, hidden=8)
  with pytest.raises(ValueError, match=r"^prefix is a PrefixMLP \(node type 'prefix_mlp'\), a "
                                       r"training-time reparameterization; call "
                                       r"peftjax.finalize\(tree\) first"):
    save_hf_peft(tree, tmp_path / "b")
  out = save_hf_peft(peftjax.finalize(tree), tmp_path / "b")
  assert read_hf_peft(out).peft_type == "PREFIX_TUNING"
  tree = peftjax.ptuning.apply(params, 4)
  with pytest.raises(ValueError, match=r"^prompt is a PromptEncoder .*call peftjax.finalize"):
    save_hf_peft(tree, tmp_path / "c")
  assert read_hf_peft(save_hf_peft(peftjax.finalize(tree), tmp_path / "c")).config[
      "num_virtual_tokens"] == 4
  assert not (tmp_path / "a").exists()


def test_save_refuses_slots_the_method_cannot_hold(base, tmp_path):
  params = base[True][1]
  lora = peftjax.lora.apply(params, rank=2, targets=["q_proj"])
  soft = peftjax.prompt.apply(params, 3).prompt
  with pytest.raises(ValueError, match="the tree has a prompt .*which a LORA adapter cannot hold"):
    save_hf_peft(peftjax.Tuned(lora, prompt=jnp.zeros((3, 64))), tmp_path / "x")
  with pytest.raises(ValueError, match=r"mixes methods \(LORA at layers/self_attn/q_proj/kernel, "
                                       r"PROMPT_TUNING at prompt\)"):
    save_hf_peft(peftjax.Tuned(lora, prompt=soft), tmp_path / "x")
  with pytest.raises(ValueError, match=r"^extra: a PROMPT_TUNING node is saved from the tree's "
                                       r"prompt itself"):
    save_hf_peft(peftjax.Tuned({**params, "extra": soft}), tmp_path / "x")
  with pytest.raises(ValueError, match=r"^prompt/nested: a PROMPT_TUNING node is saved from"):
    save_hf_peft(peftjax.Tuned(params, prompt={"nested": soft}), tmp_path / "x")
  assert not (tmp_path / "x").exists()


def test_merged_export_refuses_prompts_and_prefixes(base, tmp_path):
  model, params = base[True]
  lora = peftjax.lora.apply(params, rank=2, targets=["q_proj"])
  assert not any(peftjax.is_node(x) for x in jax.tree.leaves(
      merged_params(peftjax.Tuned(lora)), is_leaf=peftjax.is_node))
  for tree, slot in ((peftjax.prompt.apply(lora, 3), "prompt"),
                     ({"params": lora, "prefix": jnp.zeros((2, 2, 3, 2, 16))}, "prefix")):
    with pytest.raises(ValueError, match=rf"the tree has a {slot} \(Tuned.{slot}\), a model "
                                         "input that no weight holds"):
      export_merged(tree, model, tmp_path / "m")
  assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------------
# bad input: each a ValueError naming the problem
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def adapter_copy(tmp_path):
  d = tmp_path / "adapter"
  shutil.copytree(FIX / "lora", d)
  return d


def _tensors(d):
  f = SafetensorsFile(d / ADAPTER_WEIGHTS)
  return {k: np.array(f.get(k)) for k in f.keys()}


def _write(d, tensors):
  write_safetensors(d / ADAPTER_WEIGHTS, [(k, v.dtype, v.shape, lambda v=v: v)
                                          for k, v in tensors.items()])


def _edit_config(d, **changes):
  cfg = json.loads((d / ADAPTER_CONFIG).read_text())
  cfg.update(changes)
  (d / ADAPTER_CONFIG).write_text(json.dumps(cfg))


def test_truncated_safetensors(base, adapter_copy):
  f = adapter_copy / ADAPTER_WEIGHTS
  header, _, _ = read_safetensors_header(f)
  last = max(header, key=lambda k: header[k][2])  # the tensor stored last gets cut short
  f.write_bytes(f.read_bytes()[:-100])
  with pytest.raises(ValueError, match=rf"tensor '{last}'.*truncated"):
    load_hf_peft(adapter_copy, base[False][1])


def test_corrupt_safetensors(base, adapter_copy):
  f = adapter_copy / ADAPTER_WEIGHTS
  data = bytearray(f.read_bytes())
  data[8:40] = b"\xff" * 32  # garbage in the JSON header
  f.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="corrupt safetensors.*not valid JSON"):
    load_hf_peft(adapter_copy, base[False][1])
  f.write_bytes(b"\x01\x02")
  with pytest.raises(ValueError, match="not a safetensors file"):
    load_hf_peft(adapter_copy, base[False][1])


def test_config_for_another_method(base, adapter_copy):
  with pytest.raises(ValueError, match="this is a IA3 adapter, not LORA"):
    load_hf_peft(FIX / "ia3", base[False][1], method="lora")
  with pytest.raises(ValueError, match="PROMPT_TUNING adapter, not PREFIX_TUNING"):
    prefix_tuning_from_hf(read_hf_peft(FIX / "prompt_tuning"))
  _edit_config(adapter_copy, peft_type="BOFT")
  with pytest.raises(ValueError, match="peft_type 'BOFT' is not supported; supported: LORA, IA3"):
    load_hf_peft(adapter_copy, base[False][1])


def test_missing_key(base, adapter_copy):
  t = _tensors(adapter_copy)
  del t[Q + ".lora_B.weight"]
  _write(adapter_copy, t)
  with pytest.raises(ValueError, match=rf"missing key '{Q}.lora_B.weight'"):
    load_hf_peft(adapter_copy, base[False][1])


def test_extra_keys(base, adapter_copy):
  t = _tensors(adapter_copy)
  t[KEY_PREFIX + "model.layers.0.self_attn.rotary.lora_A.weight"] = np.zeros((4, 64), np.float32)
  _write(adapter_copy, t)
  with pytest.raises(ValueError, match=r"extra key '.*layers\.0\.self_attn\.rotary\.lora_A"):
    load_hf_peft(adapter_copy, base[False][1])
  t = _tensors(FIX / "lora")
  t[KEY_PREFIX + "model.norm.weight"] = np.ones(64, np.float32)  # not under modules_to_save
  _write(adapter_copy, t)
  with pytest.raises(ValueError, match=r"extra key 'base_model.model.model.norm.weight'"):
    load_hf_peft(adapter_copy, base[False][1])
  t = _tensors(FIX / "lora")
  t["lm_head.weight"] = np.ones((96, 64), np.float32)
  _write(adapter_copy, t)
  with pytest.raises(ValueError, match=r"unexpected key 'lm_head.weight'"):
    load_hf_peft(adapter_copy, base[False][1])


def test_module_not_in_target_modules_is_extra(base, adapter_copy):
  _edit_config(adapter_copy, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                             "up_proj"])
  with pytest.raises(ValueError, match=r"extra key '.*down_proj.lora_A.weight'.*not selected"):
    load_hf_peft(adapter_copy, base[False][1])


def test_mismatched_shapes(base, adapter_copy):
  t = _tensors(adapter_copy)
  t[Q + ".lora_A.weight"] = np.zeros((4, 60), np.float32)
  _write(adapter_copy, t)
  with pytest.raises(ValueError, match=rf"key '{Q}.lora_A.weight' has shape \[4, 60\], "
                                       r"expected \[4, 64\]"):
    load_hf_peft(adapter_copy, base[False][1])
  _write(adapter_copy, _tensors(FIX / "lora"))
  _edit_config(adapter_copy, r=8)  # the tensors say 4
  with pytest.raises(ValueError, match=r"lora_A.weight' has shape \[4, 64\], expected \[8, 64\]"):
    load_hf_peft(adapter_copy, base[False][1])


def test_wrong_base_model_shapes(adapter_copy):
  from peftjax.models import LlamaConfig, LlamaForCausalLM
  cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=128, num_layers=2,
                    num_heads=4, num_kv_heads=2)
  shapes = jax.eval_shape(lambda: LlamaForCausalLM(cfg).init(jax.random.key(0),
                                                             jnp.ones((1, 2), jnp.int32)))
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["params"])
  with pytest.raises(ValueError, match=r"key 'base_model\.model\.model\.layers\.0\.\S+\.lora_[AB]"
                                       r"\.weight' has shape \[\d+, \d+\], expected \[\d+, \d+\]"):
    load_hf_peft(adapter_copy, params)


def test_stacked_layers_with_per_layer_ranks(base, adapter_copy):
  t = _tensors(adapter_copy)
  t[Q + ".lora_A.weight"] = t[Q + ".lora_A.weight"][:2]
  t[Q + ".lora_B.weight"] = t[Q + ".lora_B.weight"][:, :2]
  _write(adapter_copy, t)
  _edit_config(adapter_copy, rank_pattern={"down_proj": 2, "model.layers.1.self_attn.q_proj": 2})
  with pytest.raises(ValueError, match="different ranks.*scan_layers=False"):
    load_hf_peft(adapter_copy, base[True][1])
  tuned = load_hf_peft(adapter_copy, base[False][1])  # per-layer trees take it
  assert tuned["layers_1"]["self_attn"]["q_proj"]["kernel"].rank == 2


def test_config_checks(base, adapter_copy):
  params = base[False][1]
  _edit_config(adapter_copy, lora_bias=True)
  with pytest.raises(ValueError, match="lora_bias=True is not supported"):
    load_hf_peft(adapter_copy, params)
  _edit_config(adapter_copy, use_dora=True, lora_bias=False)   # DoRA needs its magnitudes
  with pytest.raises(ValueError, match=r"missing key '.*\.lora_magnitude_vector'"):
    load_hf_peft(adapter_copy, params)
  _edit_config(adapter_copy, use_dora=False, r="4")
  with pytest.raises(ValueError, match="'r' must be a positive integer"):
    load_hf_peft(adapter_copy, params)
  (adapter_copy / ADAPTER_CONFIG).write_text("{not json")
  with pytest.raises(ValueError, match="invalid JSON"):
    load_hf_peft(adapter_copy, params)
  (adapter_copy / ADAPTER_CONFIG).write_text('{"r": 4}')
  with pytest.raises(ValueError, match="'peft_type' is missing"):
    load_hf_peft(adapter_copy, params)


def test_unknown_config_fields_are_kept_and_warned(base, adapter_copy):
  _edit_config(adapter_copy, shiny_new_option={"x": 1})
  with pytest.warns(UserWarning, match="unknown adapter_config fields.*shiny_new_option"):
    adapter = read_hf_peft(adapter_copy)
  assert adapter.unknown == ("shiny_new_option",)
  assert adapter.config["shiny_new_option"] == {"x": 1}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    tuned = load_hf_peft(adapter_copy, base[False][1])
  assert isinstance(tuned["layers_0"]["self_attn"]["q_proj"]["kernel"], LoraWeight)


# ------------------------------------------------------------------------------------------------
# safety
# ------------------------------------------------------------------------------------------------

def test_pickle_is_never_loaded(base, adapter_copy):
  (adapter_copy / ADAPTER_WEIGHTS).unlink()
  (adapter_copy / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle
  with pytest.raises(ValueError, match="never loads pickle"):
    load_hf_peft(adapter_copy, base[False][1])


@pytest.mark.parametrize("name", ["../evil", "..", "a/b", "/abs", ".hidden", "", "a\\b"])
def test_adapter_names_cannot_escape(base, tmp_path, name):
  tuned = peftjax.lora.apply(base[False][1], rank=2, targets=["q_proj"])
  target = tmp_path / "out"
  with pytest.raises(ValueError, match="is not allowed"):
    save_hf_peft(tuned, target, adapter_name=name)
  with pytest.raises(ValueError, match="is not allowed"):
    read_hf_peft(target, adapter_name=name)
  assert not (tmp_path / "evil").exists() and not target.exists()
  save_hf_peft(tuned, target, adapter_name="ok-name_1.0")
  assert (target / "ok-name_1.0" / ADAPTER_CONFIG).exists()
