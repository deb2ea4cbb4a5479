"""Training-state checkpoints for exact resumption (orbax ``CheckpointManager``).

:class:`TrainCheckpointer` saves, per step, the adapter (as
:func:`peftjax.io.checkpoint.save_adapter` stores it: trainable leaves, frozen adapter data and the
manifest), the optimizer state, the step, the PRNG key and a JSON data position, with keep-N and
asynchronous saving; :meth:`TrainCheckpointer.restore` returns a :class:`Checkpoint`. Restored
arrays are bit-identical, so a resumed run continues exactly as an uninterrupted one would (given
the same base weights and the same data order from the restored position). Orbax writes each
checkpoint into a temporary directory and renames it only when it is complete, so a process killed
mid-save leaves the previous checkpoint intact; leftovers are removed when the next
:class:`TrainCheckpointer` opens the directory. :func:`peftjax.train.train` uses it for
``TrainConfig.checkpoint_dir``; ``peftjax.io.checkpoint.TrainCheckpointer`` is the same class.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from peftjax.io.checkpoint import (CorruptCheckpoint, _abstract_adapter, _check_base,
                                   _check_manifest, _fill, _global_adapter, _read_checked,
                                   _template, _version, adapter_manifest)

__all__ = ["Checkpoint", "CorruptCheckpoint", "TrainCheckpointer"]


class Checkpoint(NamedTuple):
  """What :meth:`TrainCheckpointer.restore` returns.

  Attributes:
    params: the tuned tree (restored adapter leaves, base from the target).
    opt_state: the optimizer state (structure of the template given to ``restore``), or None.
    step: the restored step.
    rng: the PRNG key (typed if it was saved typed), or None.
    data_position: the JSON value saved as the data position (an int, a dict, ...), or None.
  """
  params: Any
  opt_state: Any
  step: int
  rng: Any
  data_position: Any


def _leaf_specs(tree) -> list:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [{"path": jax.tree_util.keystr(p), "shape": list(np.shape(x)),
           "dtype": jnp.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype).name}
          for p, x in flat]


class TrainCheckpointer:
  """Training-state checkpoints in one directory (``orbax.checkpoint.CheckpointManager``).

  Each step directory holds the adapter (as :func:`peftjax.io.checkpoint.save_adapter` stores
  it), the optimizer state's leaves, the PRNG key's data (orbax arrays) and a JSON record: step,
  data position, key kind, the adapter manifest and the optimizer state's leaf specs (checked on
  restore).

  Args:
    directory: where the step directories live (created).
    max_to_keep: keep the newest N checkpoints (None: all).
    save_interval_steps: :meth:`save` skips steps that are not multiples (unless ``force``).
    async_save: write in a background thread; :meth:`save` returns once the arrays are copied.
    keep_period: also keep every checkpoint whose step is a multiple of this.

  Use it as a context manager, or call :meth:`close` (which waits for pending saves).

  Example (files, in a temporary directory)::

    >>> import tempfile, jax, jax.numpy as jnp, optax, peftjax
    >>> tuned = peftjax.lora.apply({"d": {"kernel": jnp.ones((8, 8))}}, rank=2)
    >>> tx = peftjax.optimizer(optax.adam(1e-3), tuned)
    >>> with tempfile.TemporaryDirectory() as tmp, TrainCheckpointer(tmp) as ckpt:
    ...   _ = ckpt.save(10, tuned, tx.init(tuned), rng=jax.random.key(1), data_position=640)
    ...   ckpt.wait_until_finished()
    ...   state = ckpt.restore(tuned, tx.init(tuned))
    >>> state.step, state.data_position
    (10, 640)
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: Optional[int] = 3,
               save_interval_steps: int = 1, async_save: bool = True,
               keep_period: Optional[int] = None):
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or max_to_keep < 1):
      raise ValueError(f"max_to_keep must be a positive integer or None, got {max_to_keep!r}")
    if isinstance(save_interval_steps, bool) or save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be a positive integer, got "
                       f"{save_interval_steps!r}")
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
        keep_period=keep_period, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  # -- context manager ---------------------------------------------------------------------------
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def close(self):
    """Waits for pending saves and releases the manager."""
    self._manager.close()

  def wait_until_finished(self):
    """Blocks until every asynchronous save has been committed."""
    self._manager.wait_until_finished()

  def latest_step(self) -> Optional[int]:
    """The newest committed step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every committed step, ascending."""
    return sorted(self._manager.all_steps())

  def set_aside(self, step: int) -> Path:
    """Renames the step directory of ``step`` to ``<step>.corrupt`` (``.corrupt-2``, ... if that
    exists), so that it no longer counts as a checkpoint and nothing is deleted; returns the new
    path."""
    from peftjax.train import distributed as dist
    self._manager.wait_until_finished()
    src = self.directory / str(step)
    dst, n = self.directory / f"{step}.corrupt", 1
    while dst.exists():
      n += 1
      dst = self.directory / f"{step}.corrupt-{n}"
    if dist.is_main():  # several processes: one renames, the others wait for it
      src.rename(dst)
    dist.sync(f"peftjax_set_aside_{step}")
    self._manager.reload()
    return dst

  # -- save / restore ----------------------------------------------------------------------------
  def save(self, step: int, params, opt_state=None, *, rng=None, data_position: Any = None,
           force: bool = False) -> bool:
    """Saves the training state at ``step`` (asynchronously if so configured).

    Args:
      step: the number of completed optimizer steps (a non-negative int).
      params: the tuned tree; only its adapter (trainable leaves, frozen adapter data) is
        written.
      opt_state: the optimizer state (any pytree of arrays), or None.
      rng: the PRNG key to continue with (typed or raw uint32), or None.
      data_position: where the data pipeline is (any JSON value: a sample index, a dict of
        shard offsets, ...), or None.
      force: save even if ``step`` is not a multiple of ``save_interval_steps``.

    Returns:
      Whether a checkpoint was started.

    Raises:
      ValueError: a negative or non-int step, a data position that is not JSON, a step that
        already exists.
    """
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise ValueError(f"step must be a non-negative integer, got {step!r}")
    step = int(step)
    try:
      json.dumps(data_position)
    except (TypeError, ValueError) as e:
      raise ValueError(f"data_position must be JSON-serializable (int, str, list, dict); got "
                       f"{type(data_position).__name__}: {e}") from None
    if step in self._manager.all_steps():
      raise ValueError(f"{self.directory}: step {step} is already saved")
    manifest = adapter_manifest(params)
    state = {"adapter": _global_adapter(params, manifest, where=f"{self.directory} step {step}")}
    rng_meta = None
    if rng is not None:
      if jnp.issubdtype(getattr(rng, "dtype", np.float32), jax.dtypes.prng_key):
        rng_meta = {"typed": True, "impl": str(jax.random.key_impl(rng))}
        state["rng"] = jax.random.key_data(rng)
      else:
        rng_meta = {"typed": False}
        state["rng"] = jnp.asarray(rng)
      rng_meta.update(shape=list(state["rng"].shape), dtype=jnp.dtype(state["rng"].dtype).name)
    opt_specs = None
    if opt_state is not None:
      state["opt_state"] = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(opt_state)]
      opt_specs = _leaf_specs(opt_state)
    from peftjax.train import distributed as dist
    if dist.multi_process():  # values every process holds whole: one global copy
      state = dist.replicate(state)
    meta = {"step": step, "data_position": data_position, "rng": rng_meta,
            "opt_state": opt_specs, "manifest": manifest, "peftjax_version": _version()}
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, params, opt_state=None, *, step: Optional[int] = None,
              sharding=None) -> Checkpoint:
    """Restores the state saved at ``step`` (default: the latest).

    Args:
      params: the base parameters or a tuned template (as for
        :func:`peftjax.io.checkpoint.restore_adapter`): its frozen leaves are used as they are,
        so pass the same base weights to continue exactly.
      opt_state: a template with the optimizer state's structure (e.g. ``tx.init(params)``), or
        None to skip it.
      step: which step; default :meth:`latest_step`.
      sharding: for leaves without a template array (default: the first device).

    Returns:
      :class:`Checkpoint`.

    Raises:
      ValueError: no checkpoint, an unknown step, a different base model, an optimizer state
        template whose leaves differ from the saved ones (naming the leaf).
      CorruptCheckpoint: the step's files do not read completely (truncated, corrupt); a
        ``ValueError`` naming the step directory.
    """
    self._manager.wait_until_finished()
    steps = self._manager.all_steps()
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise ValueError(f"{self.directory}: no checkpoint to restore")
    elif step not in steps:
      raise ValueError(f"{self.directory}: no checkpoint for step {step}; have {sorted(steps)}")
    where = f"{self.directory} step {step}"
    step_dir = self.directory / str(step)
    meta = _read_checked(step_dir, "checkpoint record", lambda: self._manager.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
    if not isinstance(meta, dict) or not {"manifest", "opt_state", "rng", "step"} <= set(meta):
      raise CorruptCheckpoint(f"{step_dir}: the checkpoint record is incomplete")
    manifest = meta["manifest"]
    _check_manifest(manifest, where)
    _check_base(manifest, params, where)
    template = _template(manifest, params, where)
    default = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = {"adapter": _abstract_adapter(manifest, template, where, sharding)}
    treedef = None
    if opt_state is not None:
      if meta["opt_state"] is None:
        raise ValueError(f"{where}: no optimizer state was saved; pass opt_state=None")
      saved = meta["opt_state"]
      leaves, treedef = jax.tree_util.tree_flatten(opt_state)
      have = _leaf_specs(opt_state)
      if len(have) != len(saved):
        raise ValueError(f"{where}: the optimizer state template has {len(have)} leaves, the "
                         f"checkpoint {len(saved)} (another optimizer or adapter set?)")
      for h, s in zip(have, saved):
        if (h["shape"], h["dtype"]) != (s["shape"], s["dtype"]):
          raise ValueError(f"{where}: optimizer state leaf {s['path']}: checkpoint "
                           f"{s['dtype']}{s['shape']}, template {h['dtype']}{h['shape']} "
                           f"(at {h['path']})")
      abstract["opt_state"] = [
          jax.ShapeDtypeStruct(tuple(s["shape"]), jnp.dtype(s["dtype"]),
                               sharding=x.sharding if isinstance(x, jax.Array) else default)
          for x, s in zip(leaves, saved)]
    elif meta["opt_state"] is not None:
      # Orbax restores a saved item whole: read the optimizer state's leaves and drop them.
      abstract["opt_state"] = [jax.ShapeDtypeStruct(tuple(s["shape"]), jnp.dtype(s["dtype"]),
                                                    sharding=default)
                               for s in meta["opt_state"]]
    if meta["rng"] is not None:
      r = meta["rng"]
      abstract["rng"] = jax.ShapeDtypeStruct(tuple(r["shape"]), jnp.dtype(r["dtype"]),
                                             sharding=default)
    out = _read_checked(step_dir, "training state", lambda: self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"])
    params_out = _fill(template, out["adapter"])
    opt_out = (jax.tree_util.tree_unflatten(treedef, out["opt_state"])
               if opt_state is not None else None)
    rng = None
    if meta["rng"] is not None:
      rng = out["rng"]
      if meta["rng"]["typed"]:
        rng = jax.random.wrap_key_data(rng, impl=meta["rng"]["impl"])
    return Checkpoint(params_out, opt_out, int(meta["step"]), rng, meta["data_position"])
