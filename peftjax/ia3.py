"""IA3 (Liu et al., 2022): learned vectors rescaling keys, values and the FFN's hidden activation.

``(IA)^3`` multiplies the keys and values of every attention layer and the feed-forward network's
intermediate activation by trained vectors initialized to ones. Each vector is a node on the kernel
whose output (keys, values) or input (the FFN's down projection reads the intermediate activation)
it scales:

* keys/values: ``x @ W -> (x @ W) * l`` over the output axes, i.e. ``W * l[None, :]``;
* FFN: ``h @ W_down -> (h * l) @ W_down``, i.e. ``W_down * l[:, None]``.

Both are exact merges, so :meth:`IA3Weight.materialize` (and ``peftjax.merge``) folds the vectors
into the kernels and ``lift(fn)(tuned) == fn(merge(tuned))``. Under ``lift`` the rule scales the
activations instead of the kernel, so the gradient of ``l`` needs no weight-gradient matmul.
Parameters: ``d_k + d_v + d_ff`` per layer.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from peftjax._src import additive
from peftjax._src import nodes as nodes_lib
from peftjax._src import targeting
from peftjax._src.nodes import Node, is_node, node_dataclass, static_field
from peftjax.lora import checked_layout, default_layout
from peftjax._src import method as method_lib

__all__ = ["IA3Weight", "apply"]


@node_dataclass
class IA3Weight(Node):
  """``w * vector``, the vector laid along ``w``'s output axes (``side="out"``) or input axes.

  Attributes:
    w: frozen kernel ``[*batch, *in, *out]`` (an array or a node).
    vector: trained ``[*batch, *out]`` (``side="out"``) or ``[*batch, *in]`` (``side="in"``).
    side: ``"out"`` scales the projection's output, ``"in"`` its input.
    n_axes: number of scaled axes (``len(out)`` or ``len(in)``); the layer axes are derived from
      the leaves (``vector.ndim - n_axes``), so ``lax.scan`` slicing gives one layer's node.
  """

  w: Any
  vector: jax.Array
  side: str = static_field(default="out")
  n_axes: int = static_field(default=1)

  type_id = "ia3"
  base_field = "w"
  hf_peft_type = "IA3"
  trainable_fields = ("vector",)


  @property
  def n_batch(self) -> int:
    return self.vector.ndim - self.n_axes

  @property
  def n_in(self) -> int:
    return self.n_axes if self.side == "in" else self.ndim - self.n_batch - self.n_axes

  def _kernel_axes(self) -> tuple[int, ...]:
    nb = self.n_batch
    batch, ins, outs = additive.kernel_axes(nb, self.n_in, self.ndim)
    return batch + (ins if self.side == "in" else outs)

  def materialize(self):
    w = nodes_lib.materialize(self.w)
    v = additive.place_on(self.vector.astype(w.dtype), self._kernel_axes(), w.ndim)
    return (w * v).astype(w.dtype)

  def dot_general(self, x, dimension_numbers, *, precision=None, preferred_element_type=None):
    nb, ni = self.n_batch, self.n_in
    if not additive.plain_use(dimension_numbers, nb, ni, self.ndim):
      return super().dot_general(x, dimension_numbers, precision=precision,
                                 preferred_element_type=preferred_element_type)
    (lc, rc), (lb, rb) = dimension_numbers
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)
    if self.side == "in":
      # (x * l) @ W: kernel axis a is contracted (or batched) with x axis lc/lb at a's position.
      axes = ([lb[list(rb).index(a)] for a in range(nb)] +
              [lc[list(rc).index(a)] for a in range(nb, nb + ni)])
      xs = x * additive.place_on(self.vector.astype(x.dtype), axes, x.ndim)
      return nodes_lib.dot_general(xs, self.w, dimension_numbers, **kw)
    y = nodes_lib.dot_general(x, self.w, dimension_numbers, **kw)
    bpos, opos = additive.out_positions(dimension_numbers, nb, self.n_axes, y.ndim)
    return y * additive.place_on(self.vector.astype(y.dtype), bpos + opos, y.ndim)

  def astype(self, dtype):
    return self.replace(w=self.w.astype(dtype))


def _predicate(spec, default: Callable) -> Callable[[str, Any], bool]:
  if spec is None:
    return default
  if isinstance(spec, (list, tuple)) and len(spec) == 0:
    return lambda p, l: False
  return targeting.compile_targets(spec)


def apply(params, *, targets=None, feedforward=None, dtype=None,
          layout: Callable[[str, tuple], tuple[int, int]] | None = None):
  """Wraps the key, value and FFN-output kernels of ``params`` in :class:`IA3Weight` nodes.

  Args:
    params: any parameter pytree.
    targets: kernels whose *output* is scaled; default every key and value projection
      (``k_proj``/``v_proj``, BERT's ``key``/``value``, ...). A regex over ``"a/b/kernel"`` paths,
      module names, a callable ``(path, leaf) -> bool``, or ``[]`` for none. A kernel also
      chosen by ``feedforward`` is scaled on its input instead (as HF PEFT's
      ``feedforward_modules``, a subset of ``target_modules``: ``targets=["k_proj", "v_proj",
      "down_proj"], feedforward=["down_proj"]``).
    feedforward: kernels whose *input* is scaled; default every FFN output projection
      (``down_proj``, BERT's ``output/dense``, ``fc2``, ...), which reads the intermediate
      activation. Same forms as ``targets``.
    dtype: dtype of the vectors (default: the kernel's, float32 for node bases).
    layout: ``(path, shape) -> (n_batch, n_in)``; default :func:`peftjax.lora.default_layout`.

  Returns:
    ``params`` with the chosen kernels replaced by :class:`IA3Weight` nodes whose vectors are ones
    (the model is unchanged at init): ``d_k + d_v + d_ff`` trainable parameters per layer.

  Raises:
    ValueError: nothing matched, or a ``targets``/``feedforward`` given that matches nothing
      (naming it and showing real paths), a target that is not a kernel or already has IA3.

  >>> import jax.numpy as jnp, peftjax
  >>> params = {"attn": {"k_proj": {"kernel": jnp.ones((4, 2))},
  ...                    "v_proj": {"kernel": jnp.ones((4, 2))}},
  ...           "mlp": {"down_proj": {"kernel": jnp.ones((8, 4))}}}
  >>> tuned = peftjax.ia3.apply(params)
  >>> peftjax.summary(tuned).trainable                     # d_k + d_v + d_ff
  12
  >>> tuned["mlp"]["down_proj"]["kernel"].vector.shape
  (8,)
  """
  out_pred = _predicate(targets, lambda p, l: additive.is_key_proj(p) or additive.is_value_proj(p))
  in_pred = _predicate(feedforward, lambda p, l: additive.is_ffn_output(p))
  layout = layout or default_layout
  pairs = targeting.leaves_with_paths(params)
  out_paths = {p for p, l in pairs if out_pred(p, l)}
  in_paths = {p for p, l in pairs if in_pred(p, l)}
  # A spec the user wrote that matches nothing is an error, never a silent fall back on the
  # other set's default ([] asks for none).
  for name, spec, chosen in (("targets", targets, out_paths), ("feedforward", feedforward,
                                                               in_paths)):
    if spec is not None and not chosen and not (isinstance(spec, (list, tuple)) and not spec):
      raise ValueError(f"IA3 {name}={spec!r} matched no kernel. Some paths of the parameter "
                       f"tree:\n{targeting.describe_paths(pairs)}")
  if not out_paths and not in_paths:
    raise ValueError(f"IA3 targets={targets!r}, feedforward={feedforward!r} matched no kernel. "
                     f"Some paths of the parameter tree:\n{targeting.describe_paths(pairs)}")
  # HF PEFT's feedforward_modules are a subset of target_modules: a kernel in both is scaled on
  # its input, once.
  out_paths -= in_paths
  leaves = dict(pairs)
  for path in sorted(out_paths | in_paths):
    additive.check_kernel(path, leaves[path], (IA3Weight,), "IA3")

  def rewrite(path, w):
    shape = tuple(w.shape)
    n_batch, n_in = checked_layout(layout, path, shape)
    side = "in" if path in in_paths else "out"
    axes = shape[n_batch:n_batch + n_in] if side == "in" else shape[n_batch + n_in:]
    vdt = jnp.dtype(dtype) if dtype is not None else (
        jnp.dtype(w.dtype) if not is_node(w) else jnp.dtype(jnp.float32))
    return IA3Weight(w=w, vector=jnp.ones((*shape[:n_batch], *axes), vdt), side=side,
                     n_axes=len(axes))

  return targeting.map_selected(rewrite, params, out_paths | in_paths)


METHOD = method_lib.Method(
    name="ia3", apply=apply, description="learned scaling of keys, values and the FFN activation",
    options=(method_lib.TARGETS,), hf_peft_type="IA3", learning_rate=3e-3)
