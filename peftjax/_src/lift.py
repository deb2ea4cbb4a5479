"""``lift``: run any JAX function on parameter trees that contain nodes.

``lift(fn)(*args)`` traces ``fn`` once per input structure with every node replaced by the
abstract value of the array it stands for, then evaluates the resulting jaxpr with an environment
whose values may be nodes:

* an equation with no node input is bound unchanged;
* ``dot_general`` with a node operand runs the node's rule (:func:`peftjax._src.nodes.dot_general`),
  e.g. LoRA's ``x@W + s*(x@A)@B`` without ever forming ``W + s*A@B``;
* ``convert_element_type`` of a node casts the node (``node.astype``), so mixed-precision models
  (Flax's ``promote_dtype`` of the kernel) keep the factored form;
* ``jit``/``pjit`` calls are inlined; ``scan``, ``while``, ``cond`` and ``remat`` are rebuilt with
  the interpreter running inside their bodies (a layer-stacked node's leaves are scanned like any
  ``xs``); ``custom_jvp``/``custom_vjp`` functions run their primal through the interpreter while
  their derivative rules see the materialized arrays, so the user's rule is kept;
* any other primitive with a node input gets the materialized array (computed once per node).

The trace is cached by tree structure, static arguments and abstract values (as ``jit`` does), so
under ``jax.jit`` the interpreter runs only while tracing and costs nothing per step. ``lift``
composes with ``jit``, ``grad``, ``vmap`` and sharding because it only ever calls ``bind``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from peftjax._src import jax_compat
from peftjax._src import nodes as nodes_lib
from peftjax._src.nodes import is_node

__all__ = ["lift"]

_Literal = jex_core.Literal
_DropVar = jex_core.DropVar


def _is_dynamic(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or is_node(x)


class _Env:
  """Variable environment of one jaxpr evaluation, with a per-node materialization cache."""

  def __init__(self):
    self.vals: dict = {}
    self._mat: dict[int, tuple[Any, Any]] = {}

  def read(self, v):
    return v.val if isinstance(v, _Literal) else self.vals[v]

  def write(self, v, val):
    if not isinstance(v, _DropVar):
      self.vals[v] = val

  def materialize(self, x):
    if not is_node(x):
      return x
    hit = self._mat.get(id(x))
    if hit is None:
      hit = (x, x.materialize())
      self._mat[id(x)] = hit
    return hit[1]


def eval_jaxpr(closed_jaxpr, args, *, keep_nodes: bool = False) -> list:
  """Evaluates ``closed_jaxpr`` on ``args`` (which may contain nodes).

  Outputs that are nodes stay nodes if ``keep_nodes`` (inlined calls), else are materialized.
  """
  jaxpr = closed_jaxpr.jaxpr
  env = _Env()
  for v, c in zip(jaxpr.constvars, closed_jaxpr.consts):
    env.write(v, c)
  for v, a in zip(jaxpr.invars, args):
    env.write(v, a)
  for eqn in jaxpr.eqns:
    invals = [env.read(v) for v in eqn.invars]
    with jax_compat.source_context(eqn):
      if any(is_node(x) for x in invals):
        rule = _RULES.get(eqn.primitive.name, _materialize_rule)
        outvals = rule(eqn, invals, env)
      else:
        outvals = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    if not eqn.primitive.multiple_results:
      outvals = [outvals]
    for v, val in zip(eqn.outvars, outvals):
      env.write(v, val)
  outs = [env.read(v) for v in jaxpr.outvars]
  return outs if keep_nodes else [env.materialize(o) for o in outs]


# -- rules for equations with a node input ------------------------------------------------------

def _materialize_rule(eqn, invals, env):
  invals = [env.materialize(x) for x in invals]
  return eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))


def _dot_general_rule(eqn, invals, env):
  lhs, rhs = invals
  out = nodes_lib.dot_general(lhs, rhs, **eqn.params)
  want = eqn.outvars[0].aval.dtype
  return out if out.dtype == want else out.astype(want)


def _convert_element_type_rule(eqn, invals, env):
  (x,) = invals
  return x.astype(eqn.params["new_dtype"])


def _inline_call_rule(eqn, invals, env):
  return eval_jaxpr(eqn.params["jaxpr"], invals, keep_nodes=True)


def _call_interpreted(closed_jaxpr, leading_consts=()):
  """A Python function evaluating ``closed_jaxpr`` with the interpreter (nodes allowed)."""
  def fn(*args):
    return eval_jaxpr(closed_jaxpr, [*leading_consts, *args])
  return fn


def _scan_rule(eqn, invals, env):
  p = eqn.params
  nc, ncarry = jax_compat.scan_counts(p)
  consts, carry, xs = invals[:nc], invals[nc:nc + ncarry], invals[nc + ncarry:]
  carry = [env.materialize(c) for c in carry]  # the carry's type must be stable: plain arrays
  xs = [env.materialize(x) if is_node(x) and not type(x).scan_slices_leaves else x for x in xs]
  body = p["jaxpr"]

  def step(carry, x):
    outs = eval_jaxpr(body, [*consts, *carry, *x])
    return outs[:ncarry], outs[ncarry:]

  carry_out, ys = lax.scan(step, carry, xs, length=p["length"], reverse=p["reverse"],
                           unroll=p["unroll"])
  return [*carry_out, *ys]


def _while_rule(eqn, invals, env):
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cconsts, bconsts, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  init = [env.materialize(c) for c in init]
  out = lax.while_loop(lambda c: eval_jaxpr(p["cond_jaxpr"], [*cconsts, *c])[0],
                       lambda c: eval_jaxpr(p["body_jaxpr"], [*bconsts, *c]),
                       init)
  return list(out)


def _cond_rule(eqn, invals, env):
  index, *ops = invals
  index = env.materialize(index)
  branches = [_call_interpreted(br) for br in eqn.params["branches"]]
  return list(lax.switch(index, branches, *ops))


def _remat_rule(eqn, invals, env):
  p = eqn.params
  inner = jex_core.ClosedJaxpr(p["jaxpr"], ())
  fn = jax.checkpoint(_call_interpreted(inner), prevent_cse=p["prevent_cse"], policy=p["policy"])
  return list(fn(*invals))


def _materialize_all(tree_def, flat):
  vals = jax.tree_util.tree_unflatten(tree_def, flat)
  return [nodes_lib.materialize(v) for v in vals]


def _custom_jvp_rule(eqn, invals, env):
  """Primal through the interpreter; tangents through the user's rule on materialized values."""
  flat, tree_def = jax.tree_util.tree_flatten(invals)
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  original = lambda *vals: eqn.primitive.bind(*vals, **bind_params)

  @jax.custom_jvp
  def call(*flat):
    return eval_jaxpr(eqn.params["call_jaxpr"], jax.tree_util.tree_unflatten(tree_def, flat))

  @call.defjvp
  def call_jvp(primals, tangents):
    vals, dvals = jax.jvp(lambda *f: _materialize_all(tree_def, f), primals, tangents)
    return jax.jvp(original, vals, dvals)

  return list(call(*flat))


def _custom_vjp_rule(eqn, invals, env):
  """Primal through the interpreter; cotangents through the user's rule on materialized values."""
  flat, tree_def = jax.tree_util.tree_flatten(invals)
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  original = lambda *vals: eqn.primitive.bind(*vals, **bind_params)

  @jax.custom_vjp
  def call(*flat):
    return eval_jaxpr(eqn.params["call_jaxpr"], jax.tree_util.tree_unflatten(tree_def, flat))

  def call_fwd(*flat):
    vals, mat_vjp = jax.vjp(lambda *f: _materialize_all(tree_def, f), *flat)
    out, orig_vjp = jax.vjp(original, *vals)
    return out, (mat_vjp, orig_vjp)

  def call_bwd(res, cts):
    mat_vjp, orig_vjp = res
    return tuple(mat_vjp(list(orig_vjp(cts))))

  call.defvjp(call_fwd, call_bwd)
  return list(call(*flat))


_RULES: dict[str, Callable] = {
    "dot_general": _dot_general_rule,
    "convert_element_type": _convert_element_type_rule,
    "jit": _inline_call_rule,
    "pjit": _inline_call_rule,
    "closed_call": _inline_call_rule,
    "core_call": _inline_call_rule,
    "scan": _scan_rule,
    "while": _while_rule,
    "cond": _cond_rule,
    "remat2": _remat_rule,
    "checkpoint": _remat_rule,
    "custom_jvp_call": _custom_jvp_rule,
    "custom_vjp_call": _custom_vjp_rule,
    "custom_vjp_call_jaxpr": _custom_vjp_rule,
}


# -- the public wrapper -------------------------------------------------------------------------

def lift(fn: Callable) -> Callable:
  """Makes ``fn`` accept parameter trees that contain nodes (LoRA, quantized, adapters, ...).

  ``lift(fn)(*args, **kwargs)`` equals ``fn(*merge(args), **merge(kwargs))`` but computes every
  matmul with a node through the node's rule (factored LoRA, dequantizing matmul, ...). Array
  arguments (and nodes) are traced; every other argument (Python numbers, strings, ``None``,
  flags) is static, as with ``jit``'s ``static_argnums``, and part of the cache key.

  Args:
    fn: any JAX-traceable function, e.g. ``model.apply``.

  Returns:
    A function with the signature of ``fn``.

  >>> import jax, jax.numpy as jnp, peftjax
  >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
  >>> tuned = peftjax.lora.apply(params, rank=2)
  >>> f = lambda p, x: x @ p["dense"]["kernel"]
  >>> bool(jnp.allclose(peftjax.lift(f)(tuned, jnp.ones((2, 4))), f(peftjax.merge(tuned), jnp.ones((2, 4)))))
  True
  """
  cache: dict = {}

  @functools.wraps(fn)
  def lifted(*args, **kwargs):
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs), is_leaf=is_node)
    dyn_idx = [i for i, x in enumerate(leaves) if _is_dynamic(x)]
    dyn_set = set(dyn_idx)
    avals = tuple(nodes_lib.shape_dtype(leaves[i]) for i in dyn_idx)
    static = tuple((i, x) for i, x in enumerate(leaves) if i not in dyn_set)
    key = (treedef, static, avals)
    try:
      hash(key)
    except TypeError:
      key = None
    entry = cache.get(key) if key is not None else None
    if entry is None:
      out_tree_box = []

      def flat_fn(*dyn):
        full = list(leaves)
        for i, d in zip(dyn_idx, dyn):
          full[i] = d
        a, k = jax.tree_util.tree_unflatten(treedef, full)
        out_flat, out_tree = jax.tree_util.tree_flatten(fn(*a, **k))
        out_tree_box.append(out_tree)
        return out_flat

      closed = jax.make_jaxpr(flat_fn)(*avals)
      entry = (closed, out_tree_box[0])
      # A jaxpr that captured tracers of an enclosing trace must not outlive that trace.
      if key is not None and not any(isinstance(c, jax.core.Tracer) for c in closed.consts):
        cache[key] = entry
    closed, out_tree = entry
    outs = eval_jaxpr(closed, [leaves[i] for i in dyn_idx])
    return jax.tree_util.tree_unflatten(out_tree, outs)

  return lifted


@functools.lru_cache(maxsize=32)
def lifted_apply(model):
  """``lift(model.apply)``, one per (hashable) model, so repeated calls reuse traces."""
  return lift(model.apply)
