"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2021; He et al., 2022).

An adapter is a small residual MLP, ``y + s * up(f(down(y) + b_down) + b_up)``, trained while the
model stays frozen. Here it is a **node on a projection's kernel**: :class:`BottleneckAdapter`'s
matmul rule computes the projection ``y = x @ W`` (through the base kernel's own rule, so an adapter
over a LoRA or quantized kernel works) and then the adapter, so ``peftjax.lift(model.apply)`` runs
adapters on any model -- the reference models, a generic Flax model -- with no model change.

Placements (which kernels get an adapter, chosen by path; override with ``targets=``):

* ``"houlsby"``: after the attention output projection and after the feed-forward output
  projection of every layer (two adapters per layer);
* ``"pfeiffer"``: after the feed-forward output projection only;
* ``"parallel"``: He et al.'s parallel adapter, an adapter *beside* a projection: it reads the
  projection's input and adds to its output, ``x @ W + s * up(f(down(x)))``. Realized on the
  feed-forward output projection, whose input is the FFN's hidden activation ``h``. He et al.'s
  adapter reads the block input instead; no single kernel sees both the block input and the block
  output in a Llama or BERT FFN, so that exact form needs a model hook (a parallel-adapter slot in
  the block). Their reported scale ``s = 4`` is a good choice for it.

Semantics to know:

* The adapter acts on ``x @ W`` before the projection's bias is added. The paper's form
  ``(xW + b) + up(f(down(xW + b)))`` is the same function class: it equals ours with
  ``b_down' = b_down + b @ W_down`` -- a reparameterization of a trained bias.
* Init is the identity: ``up`` and both biases are zero, ``down`` is ``U(+-1/sqrt(fan_in))``, so
  the model is unchanged (bit for bit) until the first update and ``up`` gets a nonzero gradient.
* A bottleneck adapter is **not mergeable**: its output is not ``x @ W'`` for any ``W'``.
  ``materialize`` (hence ``peftjax.merge``) raises a ``TypeError`` that says so; run the model
  with ``peftjax.lift``, which only ever calls the adapter's matmul rule for a kernel used as
  ``x @ W`` (every ``Dense``/``DenseGeneral``, scanned or not, in the reference models).
  :func:`remove` gives the base model back.

Layer-stacked kernels ``[L, ...]`` (``nn.scan``) get ``[L, ...]`` adapters, initialized per layer;
every leaf carries the layer axis first and the node derives it from leaf ranks, so ``lax.scan``
slices it to one layer's adapter.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from peftjax._src import additive
from peftjax._src import nodes as nodes_lib
from peftjax._src import targeting
from peftjax._src.nodes import Node, is_node, node_dataclass, static_field
from peftjax.lora import checked_layout, default_layout
from peftjax._src import method as method_lib

__all__ = ["BottleneckAdapter", "apply", "remove", "PLACEMENTS"]

#: Placement name -> default kernels (by path) that get an adapter.
PLACEMENTS: dict[str, Callable[[str, Any], bool]] = {
    "houlsby": lambda p, l: additive.is_attention_output(p) or additive.is_ffn_output(p),
    "pfeiffer": additive.is_ffn_output,
    "parallel": additive.is_ffn_output,
}


@node_dataclass
class BottleneckAdapter(Node):
  """A kernel ``W`` whose projection output passes through a residual bottleneck MLP.

  Serial (``parallel=False``): ``x @ W  ->  y + scale * (f(y @ down + down_bias) @ up + up_bias)``
  with ``y = x @ W``. Parallel: ``x @ W + scale * (f(x @ down + down_bias) @ up + up_bias)``.

  Attributes:
    w: frozen base kernel ``[*batch, *in, *out]`` (an array or a node).
    down: ``[*batch, *out, m]`` (serial) or ``[*batch, *in, m]`` (parallel).
    down_bias: ``[*batch, m]``.
    up: ``[*batch, m, *out]``.
    up_bias: ``[*batch, *out]``.
    activation: name in :data:`peftjax._src.additive.ACTIVATIONS`.
    n_in: number of input axes of ``w``; the layer axes are derived from the leaves
      (``down_bias.ndim - 1``), so ``lax.scan`` slicing every leaf gives one layer's node.
    scale: ``s``, the adapter output's multiplier.
    parallel: read the projection's input (He et al.) instead of its output.
  """

  w: Any
  down: jax.Array
  down_bias: jax.Array
  up: jax.Array
  up_bias: jax.Array
  activation: str = static_field(default="relu")
  n_in: int = static_field(default=1)
  scale: float = static_field(default=1.0)
  parallel: bool = static_field(default=False)

  type_id = "bottleneck_adapter"
  base_field = "w"
  mergeable = False  # y + up(f(down(y))) is not x @ W' for any W'
  trainable_fields = ("down", "down_bias", "up", "up_bias")


  @property
  def n_batch(self) -> int:
    return self.down_bias.ndim - 1

  @property
  def n_out(self) -> int:
    return self.ndim - self.n_batch - self.n_in

  @property
  def bottleneck(self) -> int:
    return self.down_bias.shape[-1]

  def _not_mergeable(self, why: str):
    kind = "parallel" if self.parallel else "serial"
    return TypeError(
        f"a {kind} BottleneckAdapter (bottleneck {self.bottleneck}) on a {list(self.shape)} kernel "
        f"{why}: it computes y + up(f(down(.))), which is not x @ W' for any array W', so it has "
        f"no merged form. Run the model with peftjax.lift(fn), which calls only the adapter's "
        f"matmul rule for kernels used as x @ W; peftjax.adapters.remove(tree) gives the base "
        f"model back.")

  def materialize(self):
    raise self._not_mergeable("cannot be materialized (peftjax.merge, or a use other than x @ W)")

  def dot_general(self, x, dimension_numbers, *, precision=None, preferred_element_type=None):
    nb, ni, no = self.n_batch, self.n_in, self.n_out
    if not additive.plain_use(dimension_numbers, nb, ni, self.ndim):
      raise self._not_mergeable(f"is used by a dot_general {dimension_numbers} that does not "
                                f"contract exactly its input axes")
    (lc, rc), (lb, rb) = dimension_numbers
    dot = lambda u, v, dims: lax.dot_general(u, v, dims, precision=precision,
                                             preferred_element_type=preferred_element_type)
    base = nodes_lib.dot_general(x, self.w, dimension_numbers, precision=precision,
                                 preferred_element_type=preferred_element_type)
    rb = tuple(rb)
    f = additive.ACTIVATIONS[self.activation]
    if self.parallel:
      cdt = x.dtype
      # down has w's axis layout with m in place of the outputs: contract like w.
      h = dot(x, self.down.astype(cdt), ((lc, rc), (lb, rb)))          # [B (rb order), free, m]
      h_batch = tuple(range(nb))                            # h axis k <-> node axis rb[k]
      bias_axes = tuple(rb.index(a) for a in range(nb))
    else:
      cdt = base.dtype
      bpos, opos = additive.out_positions(dimension_numbers, nb, no, base.ndim)
      h = dot(base, self.down.astype(cdt), ((opos, tuple(range(nb, nb + no))),
                                            (bpos, tuple(range(nb)))))  # [B (node order), free, m]
      h_batch = rb                                          # h axis a <-> node axis a
      bias_axes = tuple(range(nb))
    h = h + additive.place_on(self.down_bias.astype(cdt), bias_axes + (h.ndim - 1,), h.ndim)
    h = f(h)
    z = dot(h, self.up.astype(cdt), (((h.ndim - 1,), (nb,)), (h_batch, rb)))  # base's layout
    bpos, opos = additive.out_positions(dimension_numbers, nb, no, z.ndim)
    z = z + additive.place_on(self.up_bias.astype(cdt), bpos + opos, z.ndim)
    return base + (self.scale * z).astype(base.dtype)

  def astype(self, dtype):
    # Only the base is cast; the rule computes the adapter in the activations' dtype.
    return self.replace(w=self.w.astype(dtype))


def apply(params, bottleneck: int = 64, *, placement: str = "houlsby", activation: str = "relu",
          targets=None, scale: float = 1.0, key=None, dtype=None,
          layout: Callable[[str, tuple], tuple[int, int]] | None = None):
  """Adds bottleneck adapters to the kernels chosen by ``placement`` (or ``targets``).

  Args:
    params: any parameter pytree (Flax linen params, NNX state, dicts).
    bottleneck: ``m``, the adapter's hidden width (> 0).
    placement: ``"houlsby"`` (after attention and FFN outputs), ``"pfeiffer"`` (after the FFN
      output) or ``"parallel"`` (beside the FFN output projection); see the module docstring.
    activation: the nonlinearity ``f``, a name in :data:`peftjax._src.additive.ACTIVATIONS`.
    targets: which kernels get adapters instead of the placement's default (a regex over
      ``"a/b/kernel"`` paths, module names, or a callable ``(path, leaf) -> bool``).
    scale: ``s``, multiplies the adapter's output (He et al. use 4 for parallel adapters).
    key: PRNG key for ``down``; each kernel's key is ``fold_in(key, crc32(path))`` (stacked
      kernels draw every layer's ``down`` from it, so layers differ).
    dtype: dtype of the adapter's parameters (default: the kernel's, float32 for node bases).
    layout: ``(path, shape) -> (n_batch, n_in)`` of each kernel; default
      :func:`peftjax.lora.default_layout`.

  Returns:
    ``params`` with each chosen kernel ``W [*batch, *in, *out]`` replaced by a
    :class:`BottleneckAdapter` holding ``down [*batch, *out (or *in), m]``, ``down_bias
    [*batch, m]``, ``up [*batch, m, *out]`` (zero) and ``up_bias [*batch, *out]`` (zero).
    Houlsby adds ``2 * (2*m*d + m + d)`` parameters per layer for hidden size ``d``.

  Raises:
    ValueError: ``bottleneck <= 0``, an unknown placement or activation, a placement or target
      that matches no kernel, a target that is not a kernel or already has an adapter.

  >>> import jax, jax.numpy as jnp, peftjax
  >>> params = {"layers_0": {"mlp": {"down_proj": {"kernel": jnp.ones((8, 4))}}}}
  >>> tuned = peftjax.adapters.apply(params, bottleneck=2, placement="pfeiffer")
  >>> node = tuned["layers_0"]["mlp"]["down_proj"]["kernel"]
  >>> node.down.shape, node.up.shape, peftjax.summary(tuned).trainable   # 2*m*d + m + d
  ((4, 2), (2, 4), 22)
  >>> f = lambda p, x: x @ p["layers_0"]["mlp"]["down_proj"]["kernel"]
  >>> bool(jnp.all(peftjax.lift(f)(tuned, jnp.ones((1, 8))) == f(params, jnp.ones((1, 8)))))
  True
  """
  m = additive.check_positive_int(bottleneck, "bottleneck")
  if placement not in PLACEMENTS:
    raise ValueError(f"placement={placement!r} is not one of {sorted(PLACEMENTS)}")
  activation = additive.check_activation(activation)
  if not math.isfinite(float(scale)):
    raise ValueError(f"scale must be a finite number, got {scale!r}")
  key = additive.as_key(key)
  layout = layout or default_layout
  parallel = placement == "parallel"
  if targets is None:
    chosen = additive.select_kernels(params, PLACEMENTS[placement], f"placement={placement!r}")
  else:
    chosen = targeting.select(params, targets)
  for path, leaf in chosen:
    additive.check_kernel(path, leaf, (BottleneckAdapter,), "a bottleneck adapter")

  def rewrite(path, w):
    shape = tuple(w.shape)
    n_batch, n_in = checked_layout(layout, path, shape)
    bshape = shape[:n_batch]
    in_shape, out_shape = shape[n_batch:n_batch + n_in], shape[n_batch + n_in:]
    read = in_shape if parallel else out_shape
    adt = jnp.dtype(dtype) if dtype is not None else (
        jnp.dtype(w.dtype) if not is_node(w) else jnp.dtype(jnp.float32))
    bound = 1.0 / math.sqrt(math.prod(read))
    (down,) = additive.random_arrays(additive.path_key(key, path),
                                     (((*bshape, *read, m), "uniform", bound),), adt)
    return BottleneckAdapter(
        w=w, down=down, down_bias=jnp.zeros((*bshape, m), adt),
        up=jnp.zeros((*bshape, m, *out_shape), adt), up_bias=jnp.zeros((*bshape, *out_shape), adt),
        activation=activation, n_in=n_in, scale=float(scale), parallel=parallel)

  return targeting.map_selected(rewrite, params, {p for p, _ in chosen})


def remove(params):
  """Every :class:`BottleneckAdapter` replaced by its base kernel (the adapters are dropped).

  >>> import jax.numpy as jnp, peftjax
  >>> params = {"mlp": {"down_proj": {"kernel": jnp.ones((8, 4))}}}
  >>> back = peftjax.adapters.remove(peftjax.adapters.apply(params, bottleneck=2))
  >>> bool(jnp.all(back["mlp"]["down_proj"]["kernel"] == 1))
  True
  """
  return jax.tree_util.tree_map(lambda x: x.w if isinstance(x, BottleneckAdapter) else x, params,
                                is_leaf=is_node)


METHOD = method_lib.Method(
    name="adapters", apply=apply, description="bottleneck adapters (Houlsby/Pfeiffer/parallel)",
    options=(method_lib.Option("bottleneck", 64, "adapter hidden width",
                               type=method_lib.positive_int),
             method_lib.Option("placement", "houlsby", "where adapters go",
                               choices=("houlsby", "pfeiffer", "parallel")),
             method_lib.TARGETS),
    mergeable=False, aliases=("adapter",))
