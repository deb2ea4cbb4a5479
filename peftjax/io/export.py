"""Merged export: fold every adapter into its base weight and write a Hugging Face model directory.

The result is an ordinary model (no PEFT needed to serve it): ``W + s * A @ B`` for LoRA, the
dequantized weight for quantized bases (QLoRA), and so on for every node type, through
:func:`peftjax.merge`. The directory is written by :func:`peftjax.io.save_pretrained`
(``config.json`` + safetensors) and loads with ``transformers.AutoModel*.from_pretrained``.
Methods that add model inputs instead of weights (a soft prompt, prefixes: the ``prompt`` or
``prefix`` of a :class:`peftjax.Tuned`) have no merged form and are refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from peftjax._src import targeting
from peftjax._src.nodes import is_node
from peftjax._src.partition import merge
from peftjax._src.tuned import as_tuned

__all__ = ["merged_params", "export_merged"]


def merged_params(tuned, *, dtype=None):
  """``tuned`` with every node folded into a plain array (and the ``{"params": ...}`` wrapper off).

  Args:
    tuned: a parameter tree with peftjax nodes, in any shape :func:`peftjax.as_tuned` accepts
      (``params``, ``{"params": params}``, a :class:`peftjax.Tuned` without prompt or prefix).
    dtype: cast floating leaves to this dtype (default: keep each leaf's dtype).

  Returns:
    A plain parameter tree.

  Raises:
    ValueError: the tree has a ``prompt`` or ``prefix`` (named): no weight holds it.

  >>> import jax.numpy as jnp, peftjax
  >>> t = peftjax.lora.apply({"params": {"d": {"kernel": jnp.ones((4, 4))}}}, rank=2)
  >>> merged_params(t, dtype=jnp.bfloat16)["d"]["kernel"].dtype
  dtype(bfloat16)
  """
  t = as_tuned(tuned)
  slot = next(iter(t.slots()), None)
  if slot is not None:
    raise ValueError(f"the tree has a {slot} (Tuned.{slot}), a model input that no weight holds: "
                     f"a merged model cannot include it. Export the {slot} method as a Hugging "
                     f"Face PEFT adapter (peftjax.io.save_hf_peft) instead")
  plain = merge(t.params)
  left = [p for p, leaf in targeting.leaves_with_paths(plain) if is_node(leaf)]
  if left:  # pragma: no cover - merge materializes every node
    raise ValueError(f"could not merge the node at {left[0]}")
  if dtype is not None:
    dtype = jnp.dtype(dtype)
    plain = jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, plain)
  return plain


def export_merged(tuned, model_or_config: Any, path: str | os.PathLike, *, dtype=None,
                  tokenizer: Any = None, max_shard_size: int | str = "5GB") -> Path:
  """Merges the adapters of ``tuned`` and writes a Hugging Face model directory.

  Args:
    tuned: parameter tree of a reference model with adapters (``params``, ``{"params": params}``
      or a :class:`peftjax.Tuned` without prompt or prefix; per-layer or layer-stacked).
    model_or_config: the reference model (:class:`~peftjax.models.LlamaForCausalLM`, a BERT
      model) or its config.
    path: output directory (created).
    dtype: dtype of the written weights (default: each parameter's own).
    tokenizer: a ``transformers`` tokenizer saved alongside.
    max_shard_size: shard larger checkpoints (see :func:`peftjax.io.save_pretrained`).

  Returns:
    The directory.

  Raises:
    ValueError: a prompt or prefix (named; no weight holds it), parameters the model's layout
      does not have (named), unsupported configs.

  Example (files, so not run here)::

    export_merged(tuned, model, "merged/")
    transformers.AutoModelForCausalLM.from_pretrained("merged/")
  """
  from peftjax.io.hf import save_pretrained
  plain = merged_params(tuned, dtype=dtype)
  return save_pretrained(plain, model_or_config, path, tokenizer=tokenizer, dtype=dtype,
                         max_shard_size=max_shard_size)
