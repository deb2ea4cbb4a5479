"""Hugging Face PEFT adapters, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`load_hf_peft` puts an adapter saved by HF PEFT (PyTorch) onto a peftjax parameter tree (the
base from :func:`peftjax.io.from_pretrained`): LoRA becomes ``LoraWeight`` nodes, IA3
``IA3Weight`` nodes, prompt tuning ``Tuned(params, prompt=SoftPrompt)`` and prefix tuning
``Tuned(params, prefix=Prefix)`` -- the trees ``peftjax.lora/ia3/prompt/prefix`` build.
:func:`save_hf_peft` writes such a tree as a directory that ``peft.PeftModel.from_pretrained``
loads. :func:`read_hf_peft` returns the raw config and tensors of any adapter.

The package is cut along those jobs:

* :mod:`~peftjax.io.hf_peft.names`: file names, safe adapter names, the peftjax path <-> HF module
  name tables per model family (:func:`hf_module_name`, :func:`detect_family`) and HF PEFT's rules
  for matching module names against config fields;
* :mod:`~peftjax.io.hf_peft.load`: :func:`read_hf_peft`, :func:`load_hf_peft` (config checks,
  strict tensor names and shapes) and the prompt/prefix arrays of an adapter;
* :mod:`~peftjax.io.hf_peft.save`: :func:`save_hf_peft` and the configs it writes; the method of a
  tree is what its node types declare (``hf_peft_type``).

Safety: only JSON and safetensors are read (never pickle); adapter names are single path
components checked by :func:`safe_name`, so no name can read or write outside the given directory.
"""

from peftjax.io.hf_peft.load import (HfPeftAdapter, load_hf_peft, prefix_tuning_from_hf,
                                     prompt_tuning_from_hf, read_hf_peft)
from peftjax.io.hf_peft.names import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, FAMILIES, KEY_PREFIX,
                                      PROMPT_KEY_PREFIX, PROMPT_LEARNING,
                                      SUPPORTED_METHODS, detect_family, hf_module_name, safe_join,
                                      safe_name)
from peftjax.io.hf_peft.save import save_hf_peft

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "KEY_PREFIX", "PROMPT_KEY_PREFIX", "PROMPT_LEARNING",
    "FAMILIES", "HfPeftAdapter",
    "SUPPORTED_METHODS", "safe_name", "safe_join", "hf_module_name", "detect_family",
    "read_hf_peft", "load_hf_peft", "save_hf_peft", "prompt_tuning_from_hf",
    "prefix_tuning_from_hf",
]
