"""BERT-family encoder: parity with transformers (PyTorch), real all-MiniLM-L6-v2, hooks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from _model_fixtures import make_hf_bert, minilm, padded_batch, torch_or_skip
from peftjax.io import from_pretrained
from peftjax.models import (BertConfig, BertForSequenceClassification, BertModel, logical_axes,
                            mean_pool)

TINY = BertConfig(vocab_size=99, hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96,
                  max_position_embeddings=40, num_labels=3)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  torch_or_skip()
  out = {}
  for kind in ("bert", "roberta"):
    for head in ("model", "cls"):
      model = make_hf_bert(kind, head, seed=len(out))
      d = tmp_path_factory.mktemp(f"{kind}_{head}")
      model.save_pretrained(d)
      out[kind, head] = (d, model)
  return out


@pytest.mark.parametrize("kind,head,scan", [
    ("bert", "model", False), ("bert", "cls", False), ("roberta", "model", False),
    ("roberta", "cls", False), ("bert", "model", True), ("roberta", "cls", True)])
def test_outputs_match_transformers(hf_dirs, kind, head, scan):
  torch = torch_or_skip()
  path, hf = hf_dirs[kind, head]
  model, params, _ = from_pretrained(path, scan_layers=scan, tokenizer=False)
  assert isinstance(model, BertModel if head == "model" else BertForSequenceClassification)
  pad = hf.config.pad_token_id
  rs = np.random.RandomState(0)
  ids, mask = padded_batch(rs, [11, 6, 9], 99, pad=pad, side="right")
  tt = (rs.rand(*ids.shape) < 0.3).astype(np.int32) * mask if kind == "bert" else \
      np.zeros_like(ids)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
             token_type_ids=torch.tensor(tt, dtype=torch.long))
  out = jax.jit(model.apply)({"params": params}, ids, attention_mask=mask, token_type_ids=tt)
  if head == "model":
    real = mask.astype(bool)
    hidden = np.asarray(out.last_hidden_state)
    d_h = np.abs(hidden[real] - ref.last_hidden_state.numpy()[real]).max()
    d_p = np.abs(np.asarray(out.pooler_output) - ref.pooler_output.numpy()).max()
    print(f"{kind} {head} scan={scan}: hidden {d_h:.2e}, pooler {d_p:.2e}")
    assert d_h <= 1e-4 and d_p <= 1e-4
  else:
    d = np.abs(np.asarray(out) - ref.logits.numpy()).max()
    print(f"{kind} {head} scan={scan}: logits {d:.2e}")
    assert out.shape == (3, 3) and d <= 1e-4


def test_classification_head_is_initialized_when_missing(hf_dirs):
  path, _ = hf_dirs["bert", "model"]
  model, params, _ = from_pretrained(path, task="sequence-classification", num_labels=5,
                                     tokenizer=False)
  assert params["classifier"]["kernel"].shape == (48, 5)
  assert float(jnp.abs(params["classifier"]["bias"]).max()) == 0.0
  assert jax.eval_shape(model.apply, {"params": params}, np.ones((2, 4), np.int32)).shape == (2, 5)
  # the encoder of a classification checkpoint loads too (its head is skipped)
  enc, eparams, _ = from_pretrained(hf_dirs["bert", "cls"][0], task="encoder", tokenizer=False)
  assert isinstance(enc, BertModel) and "classifier" not in eparams


@pytest.mark.slow
def test_minilm_sentence_embeddings_match_torch_and_make_sense():
  torch = torch_or_skip()
  import transformers
  path, (model, params, tok) = minilm()
  sents = ["A man is playing a guitar.", "Someone is playing an acoustic guitar.",
           "The central bank raised interest rates again.", "How do I bake sourdough bread?"]
  batch = tok(sents, padding=True, return_tensors="np")
  out = jax.jit(model.apply)({"params": params}, batch["input_ids"],
                             attention_mask=batch["attention_mask"],
                             token_type_ids=batch["token_type_ids"])
  emb = np.asarray(mean_pool(out.last_hidden_state, batch["attention_mask"]))
  hf = transformers.AutoModel.from_pretrained(path).eval()
  with torch.no_grad():
    ref = hf(**{k: torch.tensor(v) for k, v in batch.items()}).last_hidden_state.numpy()
  m = batch["attention_mask"][..., None]
  ref_emb = (ref * m).sum(1) / m.sum(1)
  diff = np.abs(emb - ref_emb).max()
  real = batch["attention_mask"].astype(bool)
  dh = np.abs(np.asarray(out.last_hidden_state)[real] - ref[real]).max()
  e = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  cos = e @ e.T
  print(f"MiniLM: max |emb - torch| = {diff:.2e}, max |hidden - torch| = {dh:.2e}; cosines: "
        f"paraphrase {cos[0, 1]:.3f}, unrelated {cos[0, 2]:.3f} {cos[0, 3]:.3f} {cos[2, 3]:.3f}")
  assert diff <= 1e-4 and dh <= 1e-4
  assert cos[0, 1] > 0.7
  assert max(cos[0, 2], cos[0, 3], cos[1, 2], cos[2, 3]) < 0.2
  assert params["layers"]["attention"]["self"]["query"]["kernel"].shape == (6, 384, 384)


# ------------------------------------------------------------------------------------------------
# hooks and options
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_layer():
  cfg = BertConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4,
                   intermediate_size=64, max_position_embeddings=32)
  model = BertModel(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
  return model, params


def test_inputs_embeds_and_prefix(one_layer):
  model, params = one_layer
  rs = np.random.RandomState(1)
  x = rs.randint(0, 50, (1, 4)).astype(np.int32)
  y = rs.randint(0, 50, (1, 6)).astype(np.int32)
  apply = jax.jit(model.apply)
  emb = params["embeddings"]["word_embeddings"]["embedding"][y]
  np.testing.assert_allclose(apply({"params": params}, inputs_embeds=emb).last_hidden_state,
                             apply({"params": params}, y).last_hidden_state, atol=1e-6)
  # prefix = the layer-0 keys/values of tokens x: with one layer, encoding y with that prefix
  # equals encoding [x; y] jointly, at y's positions.
  e = params["embeddings"]
  h = (e["word_embeddings"]["embedding"][x] + e["position_embeddings"]["embedding"][:4] +
       e["token_type_embeddings"]["embedding"][0])
  mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  h = (h - mu) / jnp.sqrt(var + 1e-12) * e["LayerNorm"]["scale"] + e["LayerNorm"]["bias"]
  sa = params["layers_0"]["attention"]["self"]
  k = (h @ sa["key"]["kernel"] + sa["key"]["bias"]).reshape(1, 4, 4, 8)
  v = (h @ sa["value"]["kernel"] + sa["value"]["bias"]).reshape(1, 4, 4, 8)
  prefix = jnp.stack([k, v])[None]  # [layers=1, 2, batch=1, n_prefix=4, heads=4, head_dim=8]
  joint = apply({"params": params}, np.concatenate([x, y], 1)).last_hidden_state[:, 4:]
  got = apply({"params": params}, y, prefix=prefix,
              position_ids=4 + np.arange(6)[None]).last_hidden_state
  np.testing.assert_allclose(got, joint, atol=1e-5)
  # padding stays invisible with a prefix: a padded row equals the unpadded one
  ids = np.concatenate([y, np.zeros((1, 3), np.int32)], 1)
  mask = np.concatenate([np.ones((1, 6)), np.zeros((1, 3))], 1).astype(np.int32)
  padded = apply({"params": params}, ids, attention_mask=mask, prefix=prefix,
                 position_ids=4 + np.arange(9)[None]).last_hidden_state[:, :6]
  np.testing.assert_allclose(padded, got, atol=1e-5)


def test_dropout_only_when_not_deterministic(one_layer):
  model, params = one_layer
  ids = np.arange(8, dtype=np.int32)[None] % 50
  apply = jax.jit(model.apply, static_argnames="deterministic")
  a = apply({"params": params}, ids).last_hidden_state
  b = apply({"params": params}, ids, deterministic=False,
            rngs={"dropout": jax.random.key(0)}).last_hidden_state
  c = apply({"params": params}, ids, deterministic=False,
            rngs={"dropout": jax.random.key(0)}).last_hidden_state
  assert float(jnp.abs(a - b).max()) > 1e-3
  np.testing.assert_array_equal(b, c)


def test_mean_pool():
  h = jnp.arange(12.0).reshape(1, 4, 3)
  np.testing.assert_allclose(mean_pool(h, np.array([[1, 1, 0, 0]])), [[1.5, 2.5, 3.5]])
  np.testing.assert_allclose(mean_pool(h), [[4.5, 5.5, 6.5]])


def test_scan_params_and_logical_axes():
  model = BertForSequenceClassification(TINY, scan_layers=True)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.ones((1, 3), jnp.int32)))
  params = params["params"]
  assert params["layers"]["intermediate"]["dense"]["kernel"].shape == (2, 48, 96)
  axes = logical_axes(params)
  assert axes["layers"]["attention"]["self"]["query"]["kernel"] == ("layers", "embed", "heads")
  assert axes["layers"]["attention"]["output"]["dense"]["kernel"] == ("layers", "heads", "embed")
  assert axes["layers"]["intermediate"]["dense"]["kernel"] == ("layers", "embed", "mlp")
  assert axes["layers"]["output"]["dense"]["kernel"] == ("layers", "mlp", "embed")
  assert axes["layers"]["output"]["LayerNorm"]["scale"] == (None, None)
  assert axes["classifier"]["kernel"] == ("embed", None)


def test_config_errors():
  with pytest.raises(ValueError, match="unsupported model_type 'distilbert'.*bert, roberta"):
    BertConfig.from_hf({"model_type": "distilbert"})
  with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
    BertConfig.from_hf({"model_type": "bert", "position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="not divisible by num_heads"):
    BertConfig(hidden_size=50, num_heads=4)
  model = BertModel(TINY)
  with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
    model.init(jax.random.key(0))
