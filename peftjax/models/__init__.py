"""Reference Flax models that load Hugging Face checkpoints: the Llama family and the BERT family.

Parameters are plain nested dicts (Flax linen), the form every peftjax method rewrites::

  from peftjax.io import from_pretrained
  model, params, tokenizer = from_pretrained("path/to/hf_dir")
  logits = model.apply({"params": params}, ids)

See ``docs/models.md``.
"""

from peftjax.models.bert import (BertConfig, BertForSequenceClassification, BertModel, BertOutput,
                                 mean_pool)
from peftjax.models.generate import GenerateOutput, generate, sample_logits
from peftjax.models.llama import KVCache, LlamaConfig, LlamaForCausalLM, init_cache
from peftjax.models.sharding import (DEFAULT_RULES, axis_rules, batch_sharding, logical_axes,
                                     make_mesh, param_shardings, param_specs, shard_params)

__all__ = [
    "LlamaConfig", "LlamaForCausalLM", "KVCache", "init_cache",
    "BertConfig", "BertModel", "BertForSequenceClassification", "BertOutput", "mean_pool",
    "generate", "GenerateOutput", "sample_logits",
    "DEFAULT_RULES", "axis_rules", "logical_axes", "param_specs", "param_shardings",
    "shard_params", "make_mesh", "batch_sharding",
]
