"""peftjax: parameter-efficient fine-tuning for JAX, as pure transforms over parameter pytrees.

>>> import jax, jax.numpy as jnp, optax, peftjax
>>> params = {"mlp": {"up": {"kernel": jnp.ones((8, 8))}}}
>>> tuned = peftjax.lora.apply(params, rank=2)
>>> forward = peftjax.lift(lambda p, x: x @ p["mlp"]["up"]["kernel"])
>>> forward(tuned, jnp.ones((1, 8))).shape
(1, 8)
"""

from peftjax import lora
from peftjax._src.lift import lift
from peftjax._src.nodes import Node, is_node
from peftjax._src.partition import (Summary, combine, merge, optimizer, split, summary,
                                    trainable_mask)

__version__ = "0.1.0"

__all__ = [
    "lora",
    "lift",
    "merge",
    "split",
    "combine",
    "optimizer",
    "trainable_mask",
    "summary",
    "Summary",
    "Node",
    "is_node",
]
