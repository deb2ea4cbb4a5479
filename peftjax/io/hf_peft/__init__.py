"""Hugging Face PEFT adapters, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

:func:`load_hf_peft` puts an adapter saved by HF PEFT (PyTorch) onto a peftjax parameter tree (the
base from :func:`peftjax.io.from_pretrained`): LoRA becomes ``LoraWeight`` nodes (``DoraWeight``
with ``use_dora``), IA3 ``IA3Weight`` nodes, VeRA/LoHa/LoKr/OFT their variant nodes, prompt
tuning ``Tuned(params, prompt=SoftPrompt)`` and prefix tuning ``Tuned(params, prefix=Prefix)`` --
the trees ``peftjax.lora/dora/ia3/vera/loha/lokr/oft/prompt/prefix`` build.
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

The LoRA-family variants (VeRA, LoHa, LoKr, OFT) need no code here of their own: each node type
declares its HF tensor names (``hf_peft_parts``, shared tensors in ``hf_peft_shared``), its
config fields, and the conversions both ways (``hf_peft_tensors``/``hf_peft_settings``/
``hf_peft_config`` to write, ``check_hf_peft_config``/``hf_peft_parts_for``/``from_hf_peft`` to
read); see :mod:`peftjax._src.variants`. DoRA is a LoRA adapter with ``use_dora`` (its node
declares ``hf_peft_flags`` and the extra ``lora_magnitude_vector`` tensors).

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
