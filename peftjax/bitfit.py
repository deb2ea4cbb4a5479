"""BitFit (Ben Zaken et al., 2022): fine-tune only the bias terms.

``apply`` wraps the chosen bias leaves in :class:`~peftjax._src.selective.Trainable` nodes; every
other leaf stays a plain (frozen) array, so ``peftjax.optimizer``/``split``/``summary`` train and
count exactly the biases, and ``peftjax.merge`` returns the plain tree again.

A *bias* is a floating leaf whose last path component is ``bias`` (Flax ``nn.Dense``,
``nn.LayerNorm``, NNX ``Linear``; layer-stacked ``[L, d]`` biases count as one leaf).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence, Union


from peftjax._src import targeting
from peftjax._src.selective import Trainable, check_plain_float, leaf_predicate
from peftjax._src import method as method_lib

__all__ = ["apply", "bias_paths", "PAPER_MODULES", "Trainable"]

#: Modules whose biases form the paper's subset: the query projection and the first
#: (intermediate) feed-forward layer, under BERT, Llama/Mistral/Qwen, GPT-style, T5 and generic
#: names. SwiGLU's intermediate is ``gate_proj`` and ``up_proj`` (both).
PAPER_MODULES = frozenset({
    # query
    "query", "q_proj", "q", "wq", "q_lin", "query_proj",
    # feed-forward intermediate (first layer)
    "intermediate", "up_proj", "gate_proj", "fc1", "fc_in", "c_fc", "wi", "wi_0", "wi_1", "w1",
    "w3", "lin1", "dense_h_to_4h", "gate_up_proj",
})

Which = Union[str, Sequence[str], Callable[[str, Any], bool]]


def _is_bias(path: str, leaf) -> bool:
  return path.rsplit("/", 1)[-1] == "bias"


def bias_paths(params) -> list[str]:
  """Paths of every bias leaf (plain array or node) of ``params``, in flatten order.

  >>> import jax.numpy as jnp
  >>> bias_paths({"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}})
  ['dense/bias']
  """
  return [p for p, leaf in targeting.leaves_with_paths(params) if _is_bias(p, leaf)]


def _which_predicate(which: Which) -> Callable[[str, Any], bool]:
  if isinstance(which, str):
    if which == "all":
      return lambda p, x: True
    if which == "paper":
      return lambda p, x: bool(PAPER_MODULES.intersection(p.split("/")[:-1]))
    try:
      rx = re.compile(which)
    except re.error as e:
      raise ValueError(f"which={which!r} is neither 'all', 'paper' nor a valid regular "
                       f"expression: {e}") from None
    return lambda p, x: rx.fullmatch(p) is not None
  if callable(which):
    return which
  if isinstance(which, (list, tuple)) and which and all(isinstance(n, str) for n in which):
    names = set(which)
    return lambda p, x: bool(names.intersection(p.split("/")[:-1]))
  raise TypeError(f"which must be 'all', 'paper', a regex over bias paths, a non-empty list of "
                  f"module names or a callable (path, leaf) -> bool; got {which!r}")


def apply(params, which: Which = "all", *, targets=None):
  """Makes the chosen bias leaves trainable (wraps them in ``Trainable`` nodes).

  Args:
    params: any parameter pytree (linen ``variables``/``params``, NNX ``State``, dicts).
    which: ``"all"`` (every bias), ``"paper"`` (the paper's subset: query and
      feed-forward-intermediate biases, see :data:`PAPER_MODULES`), a regex that must match the
      whole bias path, a list of module names (a bias under one of them), or a callable
      ``(path, leaf) -> bool``.
    targets: optionally restrict further (e.g. to some layers): a regex over paths, a list of
      path components (``["layers_11"]``) or a callable; combined with ``which`` by "and".

  Returns:
    ``params`` with each chosen bias ``[d]`` (or stacked ``[L, d]``) replaced by
    ``Trainable(value=bias)``; every other leaf is unchanged (and frozen).

  Raises:
    ValueError: the model has no biases (the message suggests LoRA, IA3 or partial tuning), the
      choice matches no bias (showing the model's bias paths), or a chosen bias is already a
      node of another method.
    TypeError: a bad ``which``/``targets`` or a chosen bias that is not a floating array.

  >>> import jax.numpy as jnp, peftjax
  >>> params = {"attention": {"query": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)},
  ...                         "key": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}},
  ...           "intermediate": {"dense": {"kernel": jnp.ones((4, 8)), "bias": jnp.zeros(8)}}}
  >>> peftjax.summary(peftjax.bitfit.apply(params)).trainable
  16
  >>> tuned = peftjax.bitfit.apply(params, which="paper")
  >>> [type(tuned[m]["query" if m == "attention" else "dense"]["bias"]).__name__
  ...  for m in ("attention", "intermediate")], type(tuned["attention"]["key"]["bias"]).__name__
  (['Trainable', 'Trainable'], 'ArrayImpl')
  """
  pred = _which_predicate(which)
  extra = None if targets is None else leaf_predicate(targets)
  pairs = targeting.leaves_with_paths(params)
  biases = [(p, x) for p, x in pairs if _is_bias(p, x)]
  if not biases:
    raise ValueError(
        "BitFit found no bias parameters in this model (no leaf named 'bias'; models such as "
        "Llama, Mistral or T5 have none), so there is nothing to train. Use another method: "
        "peftjax.lora.apply (low-rank updates of the kernels), IA3/adapters, or "
        "peftjax.partial.apply (fine-tune chosen leaves or the top layers). Some of its paths:\n"
        + targeting.describe_paths(pairs))
  chosen = [(p, x) for p, x in biases if pred(p, x) and (extra is None or extra(p, x))]
  if not chosen:
    hint = (" (which='paper' selects biases under the modules in peftjax.bitfit.PAPER_MODULES: "
            "query and feed-forward-intermediate projections)" if which == "paper" else "")
    raise ValueError(
        f"which={which!r}{'' if targets is None else f' with targets={targets!r}'} matched none "
        f"of the model's {len(biases)} biases{hint}; use which='all', a regex over these paths "
        f"or a list of module names. Its biases:\n{targeting.describe_paths(biases)}")
  for p, x in chosen:
    check_plain_float(p, x, "bitfit")
  return targeting.map_selected(lambda p, x: Trainable(x), params, {p for p, _ in chosen})


METHOD = method_lib.Method(
    name="bitfit", apply=apply, description="train the bias terms only",
    options=(method_lib.Option("bitfit_which", "all", "all | paper | regex of bias paths",
                               kwarg="which"),))
