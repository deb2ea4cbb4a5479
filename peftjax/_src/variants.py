"""Machinery shared by the LoRA-family variants (DoRA, VeRA, LoHa, LoKr, OFT).

Each variant is a node on a kernel ``[*batch, *in, *out]`` (the layout of
:class:`peftjax.lora.LoraWeight`: ``n_in`` input axes, leading layer axes derived from the
leaves). Their math is written once per node on *one layer's matrix*: ``x [..., K] -> y [..., N]``
with ``K = prod(in)``, ``N = prod(out)``. This module supplies the rest:

* :func:`plain_dot`: runs such a per-layer rule for a ``dot_general`` that uses the kernel as
  ``x @ W`` (any axis order of ``x``, layer axes batched), vmapping it over layer axes; anything
  else returns None and the node materializes;
* :func:`base_dot`: ``x [..., K] @ w`` for the frozen base (an array or a quantized node);
* :func:`rewrite_kernels`: the shared part of every ``apply`` (target selection, kernel checks,
  layouts, per-layer keys);
* the Hugging Face PEFT side of the general mechanism: a variant node type declares
  ``hf_peft_type`` and implements ``hf_peft_tensors`` (per layer: ``{suffix: array}`` in HF's
  layout), ``hf_peft_config`` (the config of a set of nodes) and ``from_hf_peft`` (a node from
  per-layer tensors); :mod:`peftjax.io.hf_peft` calls those and never branches on the method.
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peftjax._src import nodes as nodes_lib
from peftjax._src import targeting
from peftjax._src.nodes import is_node

__all__ = ["plain_dot", "base_dot", "per_layer", "rewrite_kernels", "Kernel", "flat",
           "kaiming_uniform", "rank_alpha_config", "rank_alpha_of"]


# ------------------------------------------------------------------------------------------------
# shapes
# ------------------------------------------------------------------------------------------------

def flat(x, n_batch: int, n_in: int):
  """``[*batch, *in, *out]`` -> ``[*batch, K, N]``."""
  shape = x.shape
  return x.reshape(*shape[:n_batch], math.prod(shape[n_batch:n_batch + n_in]),
                   math.prod(shape[n_batch + n_in:]))


def base_dot(x, w, n_in: int, precision=None, preferred_element_type=None):
  """``x [..., K] @ w`` for one layer's kernel ``w [*in, *out]`` (an array or a node).

  Returns ``[..., N]``.
  """
  in_shape = tuple(w.shape[:n_in])
  lead = x.shape[:-1]
  xs = x.reshape(*lead, *in_shape)
  nl = len(lead)
  y = nodes_lib.dot_general(xs, w, ((tuple(range(nl, nl + n_in)), tuple(range(n_in))), ((), ())),
                            precision=precision, preferred_element_type=preferred_element_type)
  return y.reshape(*lead, -1)


def plain_dot(node, x, dimension_numbers, rule: Callable) -> Optional[jax.Array]:
  """``dot_general(x, node, dimension_numbers)`` through a per-layer rule, or None.

  Args:
    node: a variant node with ``n_batch``, ``n_in`` and ``shape``.
    x: the left operand.
    dimension_numbers: must contract exactly the node's input axes and batch exactly its layer
      axes (else None is returned: the caller materializes).
    rule: ``rule(x2, layer_node) -> y2`` with ``x2 [..., K]`` (the contracted axes last, in the
      kernel's order, flattened) and ``layer_node`` the node of one layer; returns ``[..., N]``.

  Returns:
    The result in ``dot_general``'s layout (batch axes, ``x``'s free axes, the output axes).
  """
  (lc, rc), (lb, rb) = dimension_numbers
  nb, ni = node.n_batch, node.n_in
  if tuple(sorted(rc)) != tuple(range(nb, nb + ni)) or tuple(sorted(rb)) != tuple(range(nb)):
    return None
  order_b = sorted(range(nb), key=lambda i: rb[i])
  order_c = sorted(range(ni), key=lambda i: rc[i])
  used = set(lc) | set(lb)
  x_free = [d for d in range(x.ndim) if d not in used]
  perm = [lb[i] for i in order_b] + x_free + [lc[i] for i in order_c]
  xt = x if perm == list(range(x.ndim)) else jnp.transpose(x, perm)
  shape = tuple(node.shape)
  bshape, out_shape = shape[:nb], shape[nb + ni:]
  free_shape = tuple(x.shape[d] for d in x_free)
  xt = xt.reshape(*bshape, *free_shape, math.prod(shape[nb:nb + ni]))
  f = rule
  for _ in range(nb):
    f = jax.vmap(f)
  y = f(xt, node).reshape(*bshape, *free_shape, *out_shape)
  if order_b != list(range(nb)):  # dot_general orders batch axes as the (lb, rb) pairs are listed
    y = jnp.transpose(y, [*np.argsort(order_b), *range(nb, y.ndim)])
  return y


def per_layer(fn: Callable, n_batch: int, *args):
  """``fn(*args)`` on one layer's leaves, vmapped over ``n_batch`` leading layer axes."""
  for _ in range(n_batch):
    fn = jax.vmap(fn)
  return fn(*args)


# ------------------------------------------------------------------------------------------------
# apply
# ------------------------------------------------------------------------------------------------

class Kernel:
  """What ``rewrite_kernels`` tells a variant's constructor about one target kernel."""

  def __init__(self, path, w, n_batch, n_in, key, dtype):
    self.path, self.w, self.n_batch, self.n_in = path, w, n_batch, n_in
    shape = tuple(w.shape)
    self.batch_shape = shape[:n_batch]
    self.in_shape = shape[n_batch:n_batch + n_in]
    self.out_shape = shape[n_batch + n_in:]
    self.fan_in, self.fan_out = math.prod(self.in_shape), math.prod(self.out_shape)
    self.key, self.dtype = key, dtype

  def layer_keys(self):
    """One PRNG key per layer (``[prod(batch)]``; one key for an unstacked kernel)."""
    n = math.prod(self.batch_shape)
    return jax.random.split(self.key, n) if self.n_batch else self.key[None]

  def stack(self, arrays):
    """Per-layer arrays (a list of ``prod(batch)``) stacked into ``[*batch, ...]``."""
    a = jnp.stack(arrays)
    return a.reshape(*self.batch_shape, *a.shape[1:])


def rewrite_kernels(params, targets, key, dtype, layout, node_types: tuple, method: str,
                    make: Callable[[Kernel], Any], check: Optional[Callable] = None):
  """The shared part of a variant's ``apply``: rewrites each target kernel with ``make(kernel)``.

  Args:
    params: the parameter tree.
    targets: a target spec (:mod:`peftjax._src.targeting`).
    key: PRNG key (None: key 0); each kernel's is ``fold_in(key, crc32(path))``.
    dtype: the adapters' dtype (None: the kernel's; float32 for node bases).
    layout: ``(path, shape) -> (n_batch, n_in)`` or None (:func:`peftjax.lora.default_layout`).
    node_types: the variant's node types (a kernel that already has one is an error).
    method: the method's name, for errors.
    make: ``Kernel -> node``.
    check: ``(list[Kernel]) -> None``, checks across all targets (raising ValueError).

  Raises:
    ValueError: a target spec that matches nothing, a target that is not a kernel (an embedding
      table included), a kernel that already has the method, a bad layout.
  """
  from peftjax.lora import checked_layout, default_layout
  from peftjax._src.additive import as_key
  key = as_key(key)
  layout = layout or default_layout
  chosen = targeting.select(params, targets)
  kernels = []
  for path, leaf in chosen:
    if isinstance(leaf, node_types):
      raise ValueError(f"{path} already has {method} ({type(leaf).__name__}); apply {method} once "
                       "per kernel, or merge first with peftjax.merge")
    if path.rsplit("/", 1)[-1] == "embedding":
      raise ValueError(f"{method} does not support embedding tables: {path} is one (its rows are "
                       "gathered, not multiplied); narrow `targets` to linear kernels")
    ok = (is_node(leaf) and getattr(type(leaf), "wrappable", False) and leaf.ndim >= 2) or \
        targeting.is_kernel_like(leaf)
    if not ok:
      raise ValueError(f"target {path} is not a kernel (a floating array with ndim >= 2, or a "
                       f"quantized kernel): got {targeting.describe_leaf(leaf)}; narrow `targets`")
    n_batch, n_in = checked_layout(layout, path, tuple(leaf.shape))
    adt = jnp.dtype(dtype) if dtype is not None else (
        jnp.dtype(leaf.dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) and not is_node(leaf)
        else jnp.dtype(jnp.float32))
    kernels.append(Kernel(path, leaf, n_batch, n_in, targeting.path_key(key, path), adt))
  if check is not None:
    check(kernels)
  by_path = {k.path: k for k in kernels}
  return targeting.map_selected(lambda p, w: make(by_path[p]), params, set(by_path))


def kaiming_uniform(key, shape, fan_in: int, dtype, gain: float = 1.0):
  """``U(+-gain/sqrt(fan_in))``: torch's ``kaiming_uniform_(a=sqrt(5))`` (HF PEFT's default
  init) for ``gain=1``."""
  bound = gain / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def check_rank(rank, name: str = "rank") -> int:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
    raise ValueError(f"{name} must be a positive integer, got {rank!r}")
  return int(rank)


def check_number(value, name: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or \
      not math.isfinite(float(value)):
    raise ValueError(f"{name} must be a finite number, got {value!r}")
  return float(value)


# ------------------------------------------------------------------------------------------------
# Hugging Face PEFT: rank/alpha patterns
# ------------------------------------------------------------------------------------------------

def _num(x: float):
  x = float(x)
  return int(x) if x.is_integer() else x


def _patterns(special: dict, values: dict) -> dict:
  out = {}
  by_leaf = collections.defaultdict(set)
  for m, v in values.items():
    by_leaf[m.rsplit(".", 1)[-1]].add(v)
  for m, v in sorted(special.items()):
    leaf = m.rsplit(".", 1)[-1]
    out[leaf if len(by_leaf[leaf]) == 1 else m] = v
  return out


def rank_alpha_config(ranks: dict, alphas: dict, r_key: str = "r",
                      alpha_key: str = "alpha") -> dict:
  """``{r, alpha, rank_pattern, alpha_pattern}`` for per-module ranks and alphas: the most common
  values and the exceptions (keyed by module name where that is unambiguous)."""
  r0 = collections.Counter(ranks.values()).most_common(1)[0][0]
  a0 = collections.Counter(round(v, 9) for v in alphas.values()).most_common(1)[0][0]
  rp = _patterns({m: r for m, r in ranks.items() if r != r0}, ranks)
  ap = _patterns({m: _num(a) for m, a in alphas.items() if not math.isclose(a, a0, rel_tol=1e-12)},
                 {m: _num(a) for m, a in alphas.items()})
  return {r_key: r0, alpha_key: _num(a0), "rank_pattern": rp, "alpha_pattern": ap}


def rank_alpha_of(cfg: dict, module: str, r_key: str = "r", alpha_key: str = "alpha",
                  alpha_default: float = 8.0) -> tuple[int, float]:
  """The rank and alpha HF PEFT gives ``module`` (``rank_pattern``/``alpha_pattern`` applied)."""
  from peftjax.io.hf_peft.names import _pattern_key
  rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
  kr, ka = _pattern_key(rp, module), _pattern_key(ap, module)
  r = rp[kr] if kr is not None else cfg.get(r_key)
  alpha = ap[ka] if ka is not None else cfg.get(alpha_key, alpha_default)
  return r, alpha


def check_lycoris_config(cfg: dict, cfg_path, alpha_key: str = "alpha"):
  """``r``, ``alpha`` and the patterns of a LoHa/LoKr config (HF PEFT's LyCORIS family)."""
  r = cfg.get("r")
  if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
    raise ValueError(f"{cfg_path}: 'r' must be a positive integer, got {r!r}")
  alpha = cfg.get(alpha_key, 8)
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
    raise ValueError(f"{cfg_path}: {alpha_key!r} must be a number, got {alpha!r}")
  for field, typ in (("rank_pattern", int), ("alpha_pattern", (int, float))):
    pat = cfg.get(field) or {}
    if not isinstance(pat, dict) or not all(
        isinstance(k, str) and isinstance(v, typ) and not isinstance(v, bool)
        for k, v in pat.items()):
      raise ValueError(f"{cfg_path}: {field!r} must map module patterns to numbers, got {pat!r}")


def np_(x) -> np.ndarray:
  return np.asarray(jax.device_get(x))


def layer(x, i, n_batch: int):
  """Layer ``i`` of a stacked leaf (the leaf itself when not stacked)."""
  return x[i] if n_batch else x


def same_over_layers(values, what: str, where: str, modules: list):
  """The one value of a per-layer list; an error when the layers of a stacked kernel differ."""
  vals = set(values)
  if len(vals) > 1:
    raise ValueError(f"{where}: the layer-stacked kernel of {modules[0]} .. {modules[-1]} has "
                     f"different {what} {sorted(vals)} per layer; load the adapter with "
                     "scan_layers=False")
  return vals.pop()


def expect_shape(where, key, arr, shape, why: str = ""):
  if tuple(arr.shape) != tuple(shape):
    raise ValueError(f"{where}: key {key!r} has shape {list(arr.shape)}, expected {list(shape)}"
                     + (f" ({why})" if why else ""))
