"""DiffPruning (Guo et al., 2021): a learned sparse difference ``W + delta``.

Training. :func:`apply` turns each target into ``DiffPruningWeight(w, delta, log_alpha)``, which
stands for ``w + z * delta`` with a hard-concrete gate ``z`` per entry (the L0 relaxation of
Louizos et al., 2018). ``delta`` and ``log_alpha`` train; ``w`` is frozen. Each step, give the
gates fresh noise with :func:`set_key` and add :func:`penalty` (the expected fraction of nonzero
gates above the target ``density``, differentiable) to the loss::

    tuned = peftjax.diff_pruning.apply(params, targets=r".*/kernel")
    def loss(tuned, batch, key):
      t = peftjax.diff_pruning.set_key(tuned, key)          # stochastic gates (training)
      task = task_loss(peftjax.lift(model.apply)(t, batch), batch)
      return task + 10.0 * peftjax.diff_pruning.penalty(t, density=0.005)

The gate logits need a much larger learning rate than the difference (which trains like full
fine-tuning, ~1e-4): with Adam a logit moves by about the learning rate per step, so at 1e-4 no
gate closes in a few hundred steps. Give them their own through
``peftjax.optimizer(tx, tuned, field_lr_scales={"diff_pruning.log_alpha": gate_lr / lr})``
(``peftjax train --method diff_pruning`` uses ``--gate-lr``, default 0.05).

Projection. :func:`project` keeps the ``k`` largest entries of the gated difference
``z * delta`` over all targets (magnitude pruning to exactly ``k``), giving
``SparseDelta(w, indices, values)`` nodes that store the difference sparsely (int32 indices +
values); their ``values`` can be fine-tuned further with the support fixed (as in the paper:
``peftjax train`` projects after ``1 - --refine-fraction`` of the steps and trains the kept
values for the rest, so its accuracy is the projected model's).
``peftjax.lift`` applies the sparse difference without forming it densely; ``peftjax.merge``
adds it in.

``density`` is the fraction of entries of the difference that are nonzero (sparsity is
``1 - density``; the paper's 0.5% is ``density=0.005``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from peftjax._src import targeting
from peftjax._src import nodes as nodes_lib
from peftjax._src import selective
from peftjax._src.selective import DiffPruningWeight, SparseDelta, check_plain_float
from peftjax.lora import STACKED_PATH
from peftjax._src import method as method_lib

__all__ = ["apply", "set_key", "expected_density", "open_fraction", "penalty", "project",
           "count_nonzero",
           "DiffPruningWeight", "SparseDelta"]


def _check_density(density, name="density"):
  if (isinstance(density, bool) or not isinstance(density, (int, float, np.floating)) or
      not 0.0 < float(density) < 1.0):
    raise ValueError(f"{name} must be a fraction in (0, 1) (the share of nonzero entries of the "
                     f"difference; sparsity = 1 - {name}), got {density!r}")
  return float(density)


def _nodes(tree, cls):
  return [(p, x) for p, x in targeting.leaves_with_paths(tree) if isinstance(x, cls)]


def apply(params, targets=None, *, init_log_alpha: float = 1.0, beta: float = 2.0 / 3.0,
          gamma: float = -0.1, zeta: float = 1.1):
  """Rewrites the target leaves into ``DiffPruningWeight(w, delta=0, log_alpha)`` nodes.

  Args:
    params: any parameter pytree.
    targets: which leaves (see :mod:`peftjax._src.targeting`): ``None`` = every dense kernel of
      attention and MLP blocks; a regex over paths (``r".*"`` for all); module names; a callable.
    init_log_alpha: initial gate logit (1.0: every gate open, ``P(z != 0) ~ 0.93``).
    beta, gamma, zeta: hard-concrete temperature and stretch (Louizos et al.: 2/3, -0.1, 1.1).

  Returns:
    The tree with each target ``w`` replaced by a node standing for ``w + z * delta`` (equal to
    ``w`` at init since ``delta = 0``; ``delta`` in ``w``'s dtype, ``log_alpha`` float32). Trainable: ``delta`` and ``log_alpha`` (twice the
    target's size while training; the projected result is sparse).

  Raises:
    ValueError: bad ``beta``/``gamma``/``zeta``, a target that matches nothing or that already
      belongs to another method.
    TypeError: a target that is not a floating array.

  >>> import jax.numpy as jnp, peftjax
  >>> tuned = peftjax.diff_pruning.apply({"dense": {"kernel": jnp.ones((4, 4))}})
  >>> node = tuned["dense"]["kernel"]
  >>> type(node).__name__, node.delta.shape, peftjax.summary(tuned).trainable
  ('DiffPruningWeight', (4, 4), 32)
  """
  if not (beta > 0 and gamma < 0 and zeta > 1 and math.isfinite(init_log_alpha)):
    raise ValueError(f"need beta > 0, gamma < 0 < 1 < zeta and a finite init_log_alpha; got "
                     f"beta={beta!r}, gamma={gamma!r}, zeta={zeta!r}, "
                     f"init_log_alpha={init_log_alpha!r}")
  chosen = targeting.select(params, targets)
  for p, x in chosen:
    check_plain_float(p, x, "diff_pruning")

  def rewrite(path, w):
    stacked = w.ndim >= 1 and any(STACKED_PATH.fullmatch(c) for c in path.split("/")[:-1])
    return DiffPruningWeight(w=w, delta=jnp.zeros_like(w),
                             log_alpha=jnp.full(w.shape, init_log_alpha, jnp.float32),
                             n_batch=int(stacked), beta=float(beta), gamma=float(gamma),
                             zeta=float(zeta))

  return targeting.map_selected(rewrite, params, {p for p, _ in chosen})


#: Gives every ``DiffPruningWeight`` gate noise from ``key`` (per path, per layer): call once per
#: training step with a fresh key; ``key=None`` restores the deterministic (evaluation) gates.
#: The same function as :func:`peftjax.set_rng`.
set_key = nodes_lib.set_rng


def expected_density(tree) -> jax.Array:
  """Expected fraction of nonzero gates over every ``DiffPruningWeight`` (differentiable).

  Returns:
    float32 scalar ``sum P(z != 0) / number of gated entries``.

  Raises:
    ValueError: if ``tree`` has no ``DiffPruningWeight`` nodes.

  >>> import jax.numpy as jnp, peftjax
  >>> t = peftjax.diff_pruning.apply({"d": {"kernel": jnp.ones((4, 4))}}, init_log_alpha=-1.6)
  >>> round(float(peftjax.diff_pruning.expected_density(t)), 2)
  0.5
  """
  nodes = _nodes(tree, DiffPruningWeight)
  if not nodes:
    raise ValueError("the tree has no DiffPruningWeight nodes; call peftjax.diff_pruning.apply "
                     "first (after project() the difference is fixed-sparse: see count_nonzero)")
  total = sum(math.prod(x.shape) for _, x in nodes)
  return sum(jnp.sum(x.prob_nonzero()) for _, x in nodes) / total


def open_fraction(tree) -> jax.Array:
  """Fraction of entries whose deterministic (evaluation) gate is nonzero.

  A gate is open when ``sigmoid(log_alpha) * (zeta - gamma) + gamma > 0``; this is the density of
  the relaxed model's difference (where ``delta != 0``). Not differentiable.

  >>> import jax.numpy as jnp, peftjax
  >>> t = peftjax.diff_pruning.apply({"d": {"kernel": jnp.ones((4, 4))}})
  >>> float(peftjax.diff_pruning.open_fraction(t))
  1.0
  """
  nodes = _nodes(tree, DiffPruningWeight)
  if not nodes:
    raise ValueError("the tree has no DiffPruningWeight nodes; call peftjax.diff_pruning.apply "
                     "first")
  total = sum(math.prod(x.shape) for _, x in nodes)
  return sum(jnp.sum(x.log_alpha > x.open_logit) for _, x in nodes) / total


def _kth_threshold(values: jax.Array, k: int, iters: int = 40) -> jax.Array:
  """``t`` with ``count(values > t) <= k`` and as few values in ``(t, ...]`` missing as bisection
  allows (40 halvings of the value range; ``O(n)`` per halving, no sort)."""
  lo, hi = jnp.min(values) - 1.0, jnp.max(values)

  def body(_, lh):
    lo, hi = lh
    mid = 0.5 * (lo + hi)
    too_many = jnp.sum(values > mid) > k
    return jnp.where(too_many, mid, lo), jnp.where(too_many, hi, mid)

  return jax.lax.fori_loop(0, iters, body, (lo, hi))[1]


def penalty(tree, density: float | None = None) -> jax.Array:
  """The sparsity term to add to the loss (times a weight, e.g. 10).

  Args:
    tree: a tree with ``DiffPruningWeight`` nodes.
    density: target fraction of nonzero entries in (0, 1). ``None``: the paper's plain expected
      L0 norm (as a fraction of the gated entries), which has no target.

  Returns:
    float32 scalar. With a target: the expected L0 norm of the gates *outside* the top
    ``k = density * entries`` gate logits (a threshold found by bisection, held constant for the
    gradient), divided by ``k``. It pushes those gates shut while the task alone moves the top
    ``k``, which compete for their places by their logits; so the open fraction falls to the
    target and stays there, instead of overshooting as a penalty on all gates does (Adam moves
    all untaught gates in lockstep). Without: the expected density.

  Raises:
    ValueError: ``density`` outside (0, 1), or no ``DiffPruningWeight`` nodes.

  >>> import jax.numpy as jnp, peftjax
  >>> t = peftjax.diff_pruning.apply({"d": {"kernel": jnp.ones((4, 4))}}, init_log_alpha=-1.6)
  >>> t["d"]["kernel"] = t["d"]["kernel"].replace(log_alpha=t["d"]["kernel"].log_alpha.at[0].set(5.0))
  >>> round(float(peftjax.diff_pruning.penalty(t, density=0.25)), 2)  # 12 gates with P=0.5, k=4
  1.5
  """
  if density is not None:
    density = _check_density(density)
  nodes = _nodes(tree, DiffPruningWeight)
  if not nodes:
    raise ValueError("the tree has no DiffPruningWeight nodes; call peftjax.diff_pruning.apply "
                     "first (after project() the difference is fixed-sparse: see count_nonzero)")
  if density is None:
    return expected_density(tree)
  total = sum(math.prod(x.shape) for _, x in nodes)
  k = max(1, int(round(density * total)))
  logits = jnp.concatenate([jnp.ravel(x.log_alpha).astype(jnp.float32) for _, x in nodes])
  tau = jax.lax.stop_gradient(_kth_threshold(jax.lax.stop_gradient(logits), k))
  out = sum(jnp.sum(jnp.where(x.log_alpha <= tau, x.prob_nonzero(), 0.0)) for _, x in nodes)
  return out / k


def project(tree, k: int | None = None, *, density: float | None = None):
  """Keeps exactly ``k`` entries of the gated difference (the largest ``|z * delta|`` overall).

  Args:
    tree: a tree with ``DiffPruningWeight`` nodes (gates are taken deterministically).
    k: number of entries to keep over all nodes; or
    density: the fraction to keep, ``k = round(density * entries)`` (at least 1).

  Returns:
    The tree with each ``DiffPruningWeight`` replaced by ``SparseDelta(w, indices, values)``
    (``values`` = the kept ``z * delta`` entries, in ``delta``'s dtype, trainable; int32
    ``indices`` sorted). A node that keeps nothing becomes its plain ``w``. The result stores
    exactly ``k`` entries in total.

  Raises:
    ValueError: neither or both of ``k``/``density``; ``k`` outside ``[1, entries]``; density
      outside (0, 1); no ``DiffPruningWeight`` nodes.

  >>> import jax.numpy as jnp, peftjax
  >>> t = peftjax.diff_pruning.apply({"d": {"kernel": jnp.zeros((3, 3))}}, init_log_alpha=5.0)
  >>> t["d"]["kernel"] = t["d"]["kernel"].replace(delta=jnp.arange(9.0).reshape(3, 3))
  >>> s = peftjax.diff_pruning.project(t, k=2)["d"]["kernel"]
  >>> s.indices.tolist(), s.values.tolist()
  ([7, 8], [7.0, 8.0])
  """
  nodes = _nodes(tree, DiffPruningWeight)
  if not nodes:
    raise ValueError("project needs DiffPruningWeight nodes (from peftjax.diff_pruning.apply); "
                     "the tree has none")
  total = sum(math.prod(x.shape) for _, x in nodes)
  if (k is None) == (density is None):
    raise ValueError(f"give exactly one of k (entries to keep) and density; got k={k!r}, "
                     f"density={density!r}")
  if density is not None:
    k = max(1, int(round(_check_density(density) * total)))
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= total:
    raise ValueError(f"k must be an integer in [1, {total}] (the number of gated entries), "
                     f"got {k!r}")
  for p, x in nodes:
    if math.prod(x.shape) >= 2**31:
      raise ValueError(f"{p} has {math.prod(x.shape)} entries: int32 indices cannot address it")
  effs = [np.asarray(jax.device_get(x.replace(key=None).effective_delta()), np.float32).ravel()
          for _, x in nodes]
  keep = selective.top_k(np.abs(np.concatenate(effs)), int(k))
  offsets = np.cumsum([0] + [e.size for e in effs])
  new = {}
  for (p, x), eff, lo, hi in zip(nodes, effs, offsets[:-1], offsets[1:]):
    idx = keep[(keep >= lo) & (keep < hi)] - lo
    if idx.size == 0:
      new[p] = x.w
      continue
    new[p] = SparseDelta(w=x.w, indices=jnp.asarray(idx.astype(np.int32)),
                         values=jnp.asarray(eff[idx].astype(x.delta.dtype)))
  return targeting.map_selected(lambda p, x: new[p], tree, set(new))


def count_nonzero(tree) -> int:
  """Nonzero entries of the difference over ``SparseDelta`` and ``DiffPruningWeight`` nodes.

  ``DiffPruningWeight`` counts ``z * delta`` with deterministic gates.

  >>> import jax.numpy as jnp, peftjax
  >>> s = peftjax.diff_pruning.SparseDelta(jnp.zeros(4), jnp.array([0, 2], jnp.int32), jnp.array([1.0, 0.0]))
  >>> peftjax.diff_pruning.count_nonzero({"b": s})
  1
  """
  n = 0
  for _, x in targeting.leaves_with_paths(tree):
    if isinstance(x, SparseDelta):
      n += int(jnp.count_nonzero(x.values))
    elif isinstance(x, DiffPruningWeight):
      n += int(jnp.sum((x.log_alpha > x.open_logit) & (x.delta != 0)))
  return n


def _penalty(tree, options):
  return options["l0_weight"] * penalty(tree, density=options["density"])


def _project(tree, options):
  return project(tree, density=options["density"])


def _gate_lr(options, learning_rate):
  return {"diff_pruning.log_alpha": options["gate_lr"] / learning_rate}


def _report(tree, options):
  if _nodes(tree, DiffPruningWeight):
    return (f"diff_pruning: open gates {100 * float(open_fraction(tree)):.3f}% "
            f"(target {100 * options['density']:.3f}%)")
  kept = count_nonzero(tree)
  return (f"diff_pruning: the projected difference keeps {kept:,} entries, stored sparsely "
          f"(target {100 * options['density']:.3f}% of the targeted weights)")


METHOD = method_lib.Method(
    name="diff_pruning", apply=apply,
    description="sparse difference W + z*delta: L0 (hard-concrete) gates pushed to --density, "
                "then projected onto that many entries, which train on",
    options=(method_lib.Option("density", 0.005, "target fraction of nonzero entries of the "
                               "difference", type=method_lib.fraction, to_apply=False),
             method_lib.Option("l0_weight", 10.0, "weight of the L0 penalty",
                               type=method_lib.nonneg_float, to_apply=False),
             method_lib.Option("gate_lr", 0.05, "learning rate of the gate logits (the "
                               "difference trains at --lr)", type=method_lib.positive_float,
                               to_apply=False),
             method_lib.Option("refine_fraction", 0.3, "fraction of the steps that train the "
                               "projected sparse difference (0: project at the end only)",
                               type=method_lib.rate, to_apply=False),
             method_lib.Option("refine_lr", 1e-3, "learning rate of the kept sparse values "
                               "after the projection", type=method_lib.positive_float,
                               to_apply=False),
             method_lib.TARGETS),
    step_hook=nodes_lib.set_rng, penalty=_penalty, report=_report, aliases=("diffpruning",),
    refine=method_lib.Refine(_project, lambda options: options["refine_fraction"],
                             lambda options: options["refine_lr"]), lr_scales=_gate_lr,
    learning_rate=1e-4)
