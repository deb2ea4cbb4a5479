"""Where JAX releases differ in what :mod:`peftjax._src.lift` reads, in one place.

peftjax supports jax 0.10.2 (the newest on Python 3.11) through 0.12.x. Each difference is one
function here that detects the form it is given (a primitive's parameters), never the version
number, so a release that changes something fails here, with a clear error, rather than deep in
an interpreter rule.

* source locations: re-binding an equation under its original traceback and name stack (so
  errors and profiles point at the user's code) has no public API; :func:`source_context` uses
  ``jax._src.source_info_util`` when it has what it needs and does nothing otherwise.
* lowering a Pallas kernel for a GPU on a machine without one: jax 0.12's Triton lowering asks
  for the target's device kind through an abstract mesh (:func:`gpu_target`); earlier releases
  need nothing.
* ``scan``: jax <= 0.10 binds ``num_consts`` and ``num_carry``; jax 0.12 binds a flat-tree
  spec ``ft_in`` whose three groups (``ft_in.elts``: consts, carry, xs) have those lengths
  (``len`` of a group is its number of leaves).
"""

from __future__ import annotations

import contextlib

__all__ = ["scan_counts", "source_context", "gpu_target"]


def _source_info_util():
  try:
    from jax._src import source_info_util as siu
  except ImportError:  # pragma: no cover - a JAX without the private module
    return None
  if all(hasattr(siu, f) for f in ("current_name_stack", "user_context")):
    return siu
  return None  # pragma: no cover


_SIU = _source_info_util()


def source_context(eqn):
  """A context in which binding ``eqn``'s primitive records ``eqn``'s own source location."""
  if _SIU is None:  # pragma: no cover
    return contextlib.nullcontext()
  info = eqn.source_info
  return _SIU.user_context(info.traceback, name_stack=_SIU.current_name_stack() + info.name_stack)


def scan_counts(params) -> tuple[int, int]:
  """``(num_consts, num_carry)`` of a ``scan`` equation's parameters.

  Raises:
    NotImplementedError: parameters of a form this peftjax does not know (a newer JAX).
  """
  if "num_consts" in params and "num_carry" in params:
    return int(params["num_consts"]), int(params["num_carry"])
  groups = getattr(params.get("ft_in"), "elts", None)
  if groups is not None and len(groups) == 3:
    consts, carry, _ = groups
    return len(consts), len(carry)
  raise NotImplementedError(f"peftjax.lift does not know this JAX's scan parameters "
                            f"({sorted(params)}); please report the JAX version")


def gpu_target(device_kind: str = "NVIDIA H100"):
  """A context in which ``.lower(lowering_platforms=("cuda",))`` targets ``device_kind`` even
  with no GPU attached (ahead-of-time lowering, e.g. to check a Pallas kernel lowers to Triton).

  Uses ``jax.sharding.use_abstract_mesh`` with an ``AbstractDevice`` where this JAX has them;
  elsewhere lowering needs no target and this does nothing.
  """
  import inspect

  import jax
  sharding = jax.sharding
  device_cls = getattr(sharding, "AbstractDevice", None)
  use = getattr(sharding, "use_abstract_mesh", None)
  mesh_cls = getattr(sharding, "AbstractMesh", None)
  if device_cls is None or use is None or mesh_cls is None or \
      "abstract_device" not in inspect.signature(mesh_cls).parameters:
    return contextlib.nullcontext()  # pragma: no cover - older JAX
  device = device_cls(device_kind=device_kind, num_cores=None, platform="gpu")
  return use(mesh_cls((1,), ("x",), abstract_device=device))
