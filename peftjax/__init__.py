"""peftjax: parameter-efficient fine-tuning for JAX, as pure transforms over parameter pytrees.

Methods are modules with an ``apply(params, ...)`` that rewrites the tree:
``peftjax.lora``, ``qlora``, ``quant``, ``dora``, ``vera``,
``loha``, ``lokr``, ``oft`` (reparameterization); ``adapters``, ``ia3``, ``prompt``,
``prefix``, ``ptuning`` (additive); ``bitfit``, ``partial``, ``diff_pruning``, ``auto``
(selective); ``full``; ``compose`` combines them; ``multi`` pools many adapters on one base. Each method module exports its ``METHOD``
record; ``peftjax.methods`` is the registry. ``lift`` runs any JAX function on the rewritten tree;
``split``/``combine``/``optimizer``/``trainable_mask`` partition it; ``merge`` folds it back.

>>> import jax, jax.numpy as jnp, optax, peftjax
>>> params = {"mlp": {"up": {"kernel": jnp.ones((8, 8))}}}
>>> tuned = peftjax.lora.apply(params, rank=2)
>>> forward = peftjax.lift(lambda p, x: x @ p["mlp"]["up"]["kernel"])
>>> forward(tuned, jnp.ones((1, 8))).shape
(1, 8)
"""

import importlib

from peftjax import lora, methods
from peftjax.compose import compose, to_config as compose_config
from peftjax._src.additive import finalize
from peftjax._src.lift import lift
from peftjax._src.method import Method, Option
from peftjax._src.nodes import Node, is_node, node_dataclass, set_rng, static_field
from peftjax._src.partition import (Summary, combine, merge, optimizer, split, summary,
                                    trainable_mask)
from peftjax._src.tuned import Tuned, as_tuned, forward, generate
from peftjax.merging import merge_adapters

__version__ = "0.1.0"

# Submodules imported on first attribute access, so `import peftjax` stays light.
_SUBMODULES = ("qlora", "quant", "dora", "vera", "loha", "lokr", "oft", "adapters", "ia3",
               "prompt", "prefix", "ptuning", "bitfit", "partial", "diff_pruning", "full", "auto",
               "multi", "losses", "models", "io", "train", "data", "tasks", "testing", "cli")

__all__ = ["lora", "methods", *_SUBMODULES, "compose", "compose_config", "lift", "merge", "split",
           "combine", "optimizer", "trainable_mask", "summary", "Summary", "Node", "is_node",
           "node_dataclass", "static_field", "set_rng", "Method", "Option", "Tuned", "as_tuned",
           "forward", "generate", "finalize", "merge_adapters"]


def __getattr__(name):
  if name in _SUBMODULES:
    return importlib.import_module(f"peftjax.{name}")
  raise AttributeError(f"module 'peftjax' has no attribute {name!r}")
