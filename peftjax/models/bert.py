"""BERT-family encoder (BERT, RoBERTa, XLM-RoBERTa, MiniLM) in Flax linen.

Linen, not NNX, for the reason given in :mod:`peftjax.models.llama`: parameters are a plain dict
that peftjax transforms rewrite and ``peftjax.lift(model.apply)`` consumes unchanged.

Parameter layout (``scan_layers=False``; with ``scan_layers=True`` ``layers_i`` becomes one
``layers`` subtree stacked on axis 0). Names follow Hugging Face's so LoRA targets read the same::

  embeddings/{word,position,token_type}_embeddings/embedding
  embeddings/LayerNorm/{scale,bias}
  layers_i/attention/self/{query,key,value}/{kernel,bias}   [hidden, hidden]
  layers_i/attention/output/dense/{kernel,bias}             [hidden, hidden]
  layers_i/attention/output/LayerNorm/{scale,bias}
  layers_i/intermediate/dense/{kernel,bias}                 [hidden, intermediate]
  layers_i/output/dense/{kernel,bias}                       [intermediate, hidden]
  layers_i/output/LayerNorm/{scale,bias}
  pooler/dense/{kernel,bias}                                (BERT pooler: tanh(dense(h[:, 0])))
  classifier/{kernel,bias}                                  (BERT sequence classification)
  classifier/{dense,out_proj}/{kernel,bias}                 (RoBERTa classification head)

Hooks for additive methods: ``inputs_embeds`` (word embeddings replaced; position and token-type
embeddings still added) and ``prefix`` keys/values ``[layers, 2, batch, n_prefix, heads, head_dim]``
visible to every token.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn

from peftjax.models import common
from peftjax.models.common import constrain

Array = jax.Array
Dtype = Any

__all__ = ["BertConfig", "BertModel", "BertForSequenceClassification", "BertOutput", "mean_pool",
           "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")

_ARCH = {"bert": "Bert", "roberta": "Roberta", "xlm-roberta": "XLMRoberta"}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT-family encoder (hashable).

  ``position_offset`` is 0 for BERT; RoBERTa numbers real tokens from ``pad_token_id + 1``.
  ``id2label`` is a tuple of label names (index = class id).
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pad_token_id: int = 0
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  classifier_dropout: Optional[float] = None
  num_labels: int = 2
  id2label: Optional[tuple] = None
  initializer_range: float = 0.02
  model_type: str = "bert"
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[int] = None

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported model_type {self.model_type!r} for BertConfig; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                       f"{self.num_heads}")
    if self.hidden_act not in common.ACTIVATIONS:
      raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; supported: "
                       f"{sorted(common.ACTIVATIONS)}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def is_roberta(self) -> bool:
    return self.model_type in ("roberta", "xlm-roberta")

  @property
  def position_offset(self) -> int:
    return self.pad_token_id + 1 if self.is_roberta else 0

  @classmethod
  def from_hf(cls, hf, num_labels: Optional[int] = None) -> "BertConfig":
    """From a ``transformers`` config object or dict; ``num_labels`` overrides the config's."""
    get = (lambda k, d=None: hf.get(k, d)) if isinstance(hf, dict) else \
        (lambda k, d=None: getattr(hf, k, d))
    model_type = get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
      raise ValueError(f"unsupported model_type {model_type!r} for the BERT family; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if get("position_embedding_type", "absolute") not in ("absolute", None):
      raise ValueError(f"position_embedding_type {get('position_embedding_type')!r} is not "
                       "supported (only 'absolute')")
    id2label = get("id2label")
    labels = None
    if id2label:
      labels = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    n = num_labels if num_labels is not None else (len(labels) if labels else
                                                    get("num_labels", 2))
    if labels is not None and len(labels) != n:
      labels = None
    return cls(
        vocab_size=get("vocab_size"), hidden_size=get("hidden_size"),
        num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
        intermediate_size=get("intermediate_size"), hidden_act=get("hidden_act", "gelu"),
        max_position_embeddings=get("max_position_embeddings", 512),
        type_vocab_size=get("type_vocab_size", 2), layer_norm_eps=get("layer_norm_eps", 1e-12),
        pad_token_id=get("pad_token_id") if get("pad_token_id") is not None else 0,
        hidden_dropout=get("hidden_dropout_prob", 0.1),
        attention_dropout=get("attention_probs_dropout_prob", 0.1),
        classifier_dropout=get("classifier_dropout"), num_labels=n, id2label=labels,
        initializer_range=get("initializer_range", 0.02), model_type=model_type,
        bos_token_id=get("bos_token_id"), eos_token_id=get("eos_token_id"))

  def to_hf_dict(self, architecture: str = "Model") -> dict:
    """``config.json`` contents (``architecture``: ``"Model"``/``"ForSequenceClassification"``)."""
    d = dict(model_type=self.model_type, architectures=[_ARCH[self.model_type] + architecture],
             vocab_size=self.vocab_size, hidden_size=self.hidden_size,
             num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
             intermediate_size=self.intermediate_size, hidden_act=self.hidden_act,
             max_position_embeddings=self.max_position_embeddings,
             type_vocab_size=self.type_vocab_size, layer_norm_eps=self.layer_norm_eps,
             pad_token_id=self.pad_token_id, hidden_dropout_prob=self.hidden_dropout,
             attention_probs_dropout_prob=self.attention_dropout,
             classifier_dropout=self.classifier_dropout,
             initializer_range=self.initializer_range, position_embedding_type="absolute",
             bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id)
    labels = self.id2label or tuple(f"LABEL_{i}" for i in range(self.num_labels))
    d["id2label"] = {str(i): l for i, l in enumerate(labels)}
    d["label2id"] = {l: i for i, l in enumerate(labels)}
    return d


class BertOutput(NamedTuple):
  """Encoder outputs.

  Attributes:
    last_hidden_state: ``[batch, seq, hidden]``.
    pooler_output: ``[batch, hidden]`` (``tanh(dense(h[:, 0]))``) or None without a pooler.
  """
  last_hidden_state: Array
  pooler_output: Optional[Array]


def mean_pool(hidden: Array, attention_mask: Optional[Array] = None) -> Array:
  """Mean of ``hidden [batch, seq, hidden]`` over real tokens (sentence-transformers pooling).

  Args:
    hidden: token states.
    attention_mask: ``[batch, seq]``, 1 for real tokens; None means all tokens.

  Returns:
    ``[batch, hidden]`` float32.
  """
  h = hidden.astype(jnp.float32)
  if attention_mask is None:
    return h.mean(axis=1)
  m = attention_mask.astype(jnp.float32)[..., None]
  return (h * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


def _dense(features, cfg, dtype, param_dtype, name):
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.initializers.normal(cfg.initializer_range), name=name)


def _layer_norm(cfg, dtype, param_dtype, name):
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype,
                      name=name)


class _SelfAttention(nn.Module):
  config: BertConfig
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, prefix_kv):
    cfg = self.config
    b, t, _ = x.shape
    h, hd = cfg.num_heads, cfg.head_dim
    q = _dense(cfg.hidden_size, cfg, self.dtype, self.param_dtype, "query")(x).reshape(b, t, h, hd)
    k = _dense(cfg.hidden_size, cfg, self.dtype, self.param_dtype, "key")(x).reshape(b, t, h, hd)
    v = _dense(cfg.hidden_size, cfg, self.dtype, self.param_dtype, "value")(x).reshape(b, t, h, hd)
    if prefix_kv is not None:
      k = jnp.concatenate([prefix_kv[0].astype(self.dtype), k], axis=1)
      v = jnp.concatenate([prefix_kv[1].astype(self.dtype), v], axis=1)
    drop = None
    if cfg.attention_dropout > 0 and not self.deterministic:
      drop = nn.Dropout(cfg.attention_dropout, deterministic=False)
    return common.attention(q, k, v, mask, dropout=drop)


class _DenseOutput(nn.Module):
  """``LayerNorm(x_residual + dropout(dense(h)))`` (BertSelfOutput / BertOutput)."""
  config: BertConfig
  features: int
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, residual):
    cfg = self.config
    h = _dense(self.features, cfg, self.dtype, self.param_dtype, "dense")(h)
    h = nn.Dropout(cfg.hidden_dropout, deterministic=self.deterministic)(h)
    return _layer_norm(cfg, self.dtype, self.param_dtype, "LayerNorm")(h + residual)


class _Attention(nn.Module):
  config: BertConfig
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, prefix_kv):
    kw = dict(deterministic=self.deterministic, dtype=self.dtype, param_dtype=self.param_dtype)
    h = _SelfAttention(self.config, name="self", **kw)(x, mask, prefix_kv)
    return _DenseOutput(self.config, self.config.hidden_size, name="output", **kw)(h, x)


class _Intermediate(nn.Module):
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    h = _dense(cfg.intermediate_size, cfg, self.dtype, self.param_dtype, "dense")(x)
    return constrain(common.ACTIVATIONS[cfg.hidden_act](h), ("batch", "length", "mlp"))


class BertLayer(nn.Module):
  """Post-LN encoder layer, scannable: ``layer(x, prefix_kv, mask) -> (x, None)``."""
  config: BertConfig
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, prefix_kv, mask):
    kw = dict(deterministic=self.deterministic, dtype=self.dtype, param_dtype=self.param_dtype)
    x = _Attention(self.config, name="attention", **kw)(x, mask, prefix_kv)
    h = _Intermediate(self.config, self.dtype, self.param_dtype, name="intermediate")(x)
    x = _DenseOutput(self.config, self.config.hidden_size, name="output", **kw)(h, x)
    return constrain(x, ("batch", "length", "embed")), None


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, then LayerNorm and dropout."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, inputs_embeds, token_type_ids, position_ids, deterministic):
    cfg = self.config

    def embed(n, name):
      return common.Embed(n, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                      embedding_init=nn.initializers.normal(cfg.initializer_range), name=name)

    words = embed(cfg.vocab_size, "word_embeddings")
    if inputs_embeds is None:
      x = words(input_ids)
    else:
      if self.is_initializing():
        words(jnp.zeros((1, 1), jnp.int32))  # create the table even when it is bypassed
      x = inputs_embeds.astype(self.dtype)
    x = x + embed(cfg.max_position_embeddings, "position_embeddings")(position_ids)
    x = x + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
    x = _layer_norm(cfg, self.dtype, self.param_dtype, "LayerNorm")(x)
    return nn.Dropout(cfg.hidden_dropout, deterministic=deterministic)(x)


def _encode(module, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
            prefix, deterministic, add_pooling_layer) -> BertOutput:
  """Embeddings, layers and pooler, created in ``module``'s (compact) scope."""
  cfg = module.config
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("pass exactly one of input_ids and inputs_embeds")
  b, t = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  if attention_mask.shape != (b, t):
    raise ValueError(f"attention_mask must have shape {(b, t)}, got {tuple(attention_mask.shape)}")
  if position_ids is None:
    if cfg.is_roberta:
      real = (input_ids != cfg.pad_token_id) if input_ids is not None else jnp.ones((b, t), bool)
      position_ids = jnp.cumsum(real.astype(jnp.int32), axis=1) * real + cfg.pad_token_id
    else:
      position_ids = jnp.broadcast_to(jnp.arange(t), (b, t))
  if token_type_ids is None:
    token_type_ids = jnp.zeros((b, t), jnp.int32)
  kw = dict(dtype=module.dtype, param_dtype=module.param_dtype)
  x = BertEmbeddings(cfg, name="embeddings", **kw)(input_ids, inputs_embeds, token_type_ids,
                                                   position_ids, deterministic)
  x = constrain(x, ("batch", "length", "embed"))
  prefix = common.expand_prefix(prefix, cfg.num_layers, b, cfg.num_heads, cfg.head_dim)
  mask = attention_mask.astype(bool)[:, None, :]  # [b, 1, t]: padding keys are never visible
  if prefix is not None:
    mask = jnp.concatenate([jnp.ones((b, 1, prefix.shape[3]), bool), mask], axis=-1)
  x, _ = common.layer_stack(
      BertLayer, num_layers=cfg.num_layers, scan=module.scan_layers, remat=module.remat,
      block_kwargs=dict(config=cfg, deterministic=deterministic, **kw), x=x, xs=prefix, ctx=mask)
  pooled = None
  if add_pooling_layer:
    pooled = BertPooler(cfg, name="pooler", **kw)(x)
  return BertOutput(x, pooled)


class BertPooler(nn.Module):
  """``tanh(dense(h[:, 0]))``."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    return jnp.tanh(_dense(cfg.hidden_size, cfg, self.dtype, self.param_dtype, "dense")(x[:, 0]))


class RobertaClassificationHead(nn.Module):
  """``out_proj(dropout(tanh(dense(dropout(h[:, 0])))))``."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic):
    cfg = self.config
    p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout
    x = nn.Dropout(p, deterministic=deterministic)(x[:, 0])
    x = jnp.tanh(_dense(cfg.hidden_size, cfg, self.dtype, self.param_dtype, "dense")(x))
    x = nn.Dropout(p, deterministic=deterministic)(x)
    return _dense(cfg.num_labels, cfg, self.dtype, self.param_dtype, "out_proj")(x)


class BertModel(nn.Module):
  """BERT-family encoder returning token states and the pooled ``[CLS]`` state.

  Attributes:
    config: the architecture.
    add_pooling_layer: create the ``pooler`` (``tanh(dense(h[:, 0]))``).
    scan_layers, remat, dtype, param_dtype: as for :class:`peftjax.models.LlamaForCausalLM`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
    ...                  intermediate_size=64)
    >>> model = BertModel(cfg)
    >>> ids = jnp.ones((2, 6), jnp.int32)
    >>> params = model.init(jax.random.key(0), ids)["params"]
    >>> out = model.apply({"params": params}, ids)
    >>> out.last_hidden_state.shape, out.pooler_output.shape
    ((2, 6, 32), (2, 32))
  """
  config: BertConfig
  add_pooling_layer: bool = True
  scan_layers: bool = False
  remat: Any = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Optional[Array] = None, *,
               attention_mask: Optional[Array] = None, token_type_ids: Optional[Array] = None,
               position_ids: Optional[Array] = None, inputs_embeds: Optional[Array] = None,
               prefix: Optional[Array] = None, deterministic: bool = True) -> BertOutput:
    """Encodes a batch.

    Args:
      input_ids: int ``[batch, seq]``; or ``inputs_embeds`` ``[batch, seq, hidden]`` (replaces the
        word embeddings; position/token-type embeddings are still added).
      attention_mask: ``[batch, seq]``, 1 real / 0 padding (default all ones).
      token_type_ids: int ``[batch, seq]`` (default zeros).
      position_ids: int ``[batch, seq]`` (default ``arange``; RoBERTa: from ``pad_token_id + 1``,
        padding at ``pad_token_id``).
      prefix: ``[layers, 2, batch (or 1), n_prefix, heads, head_dim]`` extra keys/values.
      deterministic: False enables dropout (needs a ``"dropout"`` rng).

    Returns:
      :class:`BertOutput`.
    """
    return _encode(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                   prefix, deterministic, self.add_pooling_layer)


class BertForSequenceClassification(nn.Module):
  """Encoder + classification head; returns float32 logits ``[batch, num_labels]``.

  BERT: ``classifier(dropout(pooler_output))``. RoBERTa: ``out_proj(tanh(dense(h[:, 0])))`` with
  dropouts, under ``classifier/{dense,out_proj}`` and no pooler.
  """
  config: BertConfig
  scan_layers: bool = False
  remat: Any = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids: Optional[Array] = None, *,
               attention_mask: Optional[Array] = None, token_type_ids: Optional[Array] = None,
               position_ids: Optional[Array] = None, inputs_embeds: Optional[Array] = None,
               prefix: Optional[Array] = None, deterministic: bool = True) -> Array:
    """Class logits ``[batch, num_labels]``; arguments as for :meth:`BertModel.__call__`."""
    cfg = self.config
    out = _encode(self, input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                  prefix, deterministic, not cfg.is_roberta)
    if cfg.is_roberta:
      logits = RobertaClassificationHead(cfg, self.dtype, self.param_dtype, name="classifier")(
          out.last_hidden_state, deterministic)
    else:
      p = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.hidden_dropout
      h = nn.Dropout(p, deterministic=deterministic)(out.pooler_output)
      logits = _dense(cfg.num_labels, cfg, self.dtype, self.param_dtype, "classifier")(h)
    return logits.astype(jnp.float32)


def hf_tensor_map(config: BertConfig, *, pooler: bool, classifier: bool) -> list[common.TensorSpec]:
  """Where each parameter lives in a Hugging Face BERT/RoBERTa checkpoint.

  ``{p}`` is the base prefix: empty for a ``BertModel`` checkpoint, ``bert.``/``roberta.`` for one
  with a task head.
  """
  T = common.TensorSpec
  specs = []
  for n in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    specs.append(T(("embeddings", n, "embedding"), f"{{p}}embeddings.{n}.weight"))
  specs += [T(("embeddings", "LayerNorm", "scale"), "{p}embeddings.LayerNorm.weight"),
            T(("embeddings", "LayerNorm", "bias"), "{p}embeddings.LayerNorm.bias")]
  lp = "{p}encoder.layer.{i}."
  for mod, hf in ((("attention", "self", "query"), "attention.self.query"),
                  (("attention", "self", "key"), "attention.self.key"),
                  (("attention", "self", "value"), "attention.self.value"),
                  (("attention", "output", "dense"), "attention.output.dense"),
                  (("intermediate", "dense"), "intermediate.dense"),
                  (("output", "dense"), "output.dense")):
    specs.append(T(mod + ("kernel",), f"{lp}{hf}.weight", "linear", True))
    specs.append(T(mod + ("bias",), f"{lp}{hf}.bias", "copy", True))
  for mod, hf in ((("attention", "output", "LayerNorm"), "attention.output.LayerNorm"),
                  (("output", "LayerNorm"), "output.LayerNorm")):
    specs.append(T(mod + ("scale",), f"{lp}{hf}.weight", "copy", True))
    specs.append(T(mod + ("bias",), f"{lp}{hf}.bias", "copy", True))
  if pooler:
    specs += [T(("pooler", "dense", "kernel"), "{p}pooler.dense.weight", "linear", head=True),
              T(("pooler", "dense", "bias"), "{p}pooler.dense.bias", head=True)]
  if classifier:
    if config.is_roberta:
      for n in ("dense", "out_proj"):
        specs += [T(("classifier", n, "kernel"), f"classifier.{n}.weight", "linear", head=True),
                  T(("classifier", n, "bias"), f"classifier.{n}.bias", head=True)]
    else:
      specs += [T(("classifier", "kernel"), "classifier.weight", "linear", head=True),
                T(("classifier", "bias"), "classifier.bias", head=True)]
  return specs
