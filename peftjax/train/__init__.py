"""A jitted training loop for PEFT: differentiates only the trainable part of the tree.

The loop is generic: give it a loss ``loss_fn(params, batch, key) -> (loss, metrics)`` where
``params`` is the full (node-containing) tree — call ``peftjax.lift(model.apply)`` inside — and
it trains ``split(params)[0]`` with ``peftjax.optimizer``, keeping the frozen part out of the
gradient by construction. Features: gradient accumulation (``lax.scan`` over micro-batches),
optax schedules (warmup + cosine/linear/constant) and global-norm clipping, evaluation every N
steps, a progress bar (loss, tokens/s, ETA), metrics as JSON lines (and TensorBoard scalars when
``tensorboardX``, ``torch.utils.tensorboard`` or ``tensorflow`` is installed), checkpoints that
resume exactly (trainable state, optimizer state, PRNG key, step and the data loader's position,
through :class:`peftjax.train.checkpoint.TrainCheckpointer`), and sharding over all visible devices:
data parallel (``sharding="dp"``: the batch split over devices, parameters replicated), FSDP
(``"fsdp"``: parameters and optimizer state split by :mod:`peftjax.models.sharding`'s rules too),
or any ``(data, fsdp, tensor)`` mesh (``"data=2,fsdp=-1,tensor=2"``: tensor parallelism on heads,
MLP and vocabulary as well).

>>> import jax, jax.numpy as jnp, numpy as np, peftjax
>>> from peftjax.train import TrainConfig, train
>>> params = peftjax.lora.apply({"d": {"kernel": jnp.zeros((4, 4))}}, rank=2)
>>> f = peftjax.lift(lambda p, x: x @ p["d"]["kernel"])
>>> loss = lambda p, b, key: (jnp.mean((f(p, b["x"]) - b["y"]) ** 2), {})
>>> data = iter(lambda: {"x": np.eye(4, dtype=np.float32), "y": np.ones((4, 4), np.float32)}, None)
>>> out = train(loss, params, data, TrainConfig(steps=50, learning_rate=0.1, progress=False))
>>> out.history[-1]["loss"] < out.history[0]["loss"]
True
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from peftjax._src.partition import combine, optimizer, split
from peftjax.train import distributed as dist

__all__ = ["TrainConfig", "TrainState", "TrainResult", "TrainInterrupted", "make_optimizer",
           "make_train_step", "train", "evaluate", "distributed"]

distributed = dist


@dataclasses.dataclass
class TrainConfig:
  """Hyperparameters of :func:`train` (all JSON-serializable)."""
  steps: int = 200
  learning_rate: float = 1e-3
  schedule: str = "cosine"           # "cosine" | "linear" | "constant"
  warmup_steps: int = 0
  weight_decay: float = 0.0
  max_grad_norm: Optional[float] = 1.0
  grad_accum: int = 1
  eval_every: int = 0                # 0: evaluate only at the end (if eval data is given)
  log_every: int = 10
  seed: int = 0
  out_dir: Optional[str] = None      # metrics.jsonl (and TensorBoard events) go here
  progress: bool = True
  # "dp" | "fsdp" | a mesh "data=D,fsdp=F,tensor=T" | None (dp when there are several devices)
  sharding: Optional[str] = None
  checkpoint_dir: Optional[str] = None  # save here; resume from the latest checkpoint here
  save_every: int = 100              # checkpoint every N steps (and at the last step)
  keep_checkpoints: int = 2
  tensorboard: bool = True           # write scalars to out_dir when a writer is importable
  # learning-rate multipliers of node fields, {"type_id.field": factor} (peftjax.optimizer)
  field_lr_scales: Optional[dict] = None
  handle_signals: bool = False       # SIGINT/SIGTERM: finish the step, checkpoint, raise
                                     # TrainInterrupted (main thread only)
  label: str = "train"               # the progress bar's label

  def __post_init__(self):
    for name in ("steps", "grad_accum", "log_every", "save_every", "keep_checkpoints"):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
    if self.schedule not in ("cosine", "linear", "constant"):
      raise ValueError(f"TrainConfig.schedule must be 'cosine', 'linear' or 'constant', got "
                       f"{self.schedule!r}")
    if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
      raise ValueError(f"TrainConfig.learning_rate must be positive, got {self.learning_rate!r}")
    if self.warmup_steps < 0 or self.warmup_steps >= self.steps and self.warmup_steps:
      raise ValueError(f"TrainConfig.warmup_steps must be in [0, steps), got {self.warmup_steps}")
    if self.sharding not in (None, "dp", "fsdp"):
      from peftjax.models.sharding import mesh_shape
      if not isinstance(self.sharding, str):
        raise ValueError(f"TrainConfig.sharding must be 'dp', 'fsdp', a mesh such as "
                         f"'data=2,fsdp=-1,tensor=2', or None; got {self.sharding!r}")
      try:
        mesh_shape(self.sharding)
      except ValueError as e:
        raise ValueError(f"TrainConfig.sharding: {e}") from None


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
  decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
  if cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, alpha=0.1)
  elif cfg.schedule == "linear":
    decay = optax.linear_schedule(cfg.learning_rate, 0.1 * cfg.learning_rate, decay_steps)
  else:
    decay = optax.constant_schedule(cfg.learning_rate)
  if not cfg.warmup_steps:
    return decay
  warm = optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
  return optax.join_schedules([warm, decay], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
  """AdamW with the config's schedule and clipping, masked to the trainable leaves of ``params``."""
  parts = []
  if cfg.max_grad_norm:
    parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
  parts.append(optax.adamw(make_schedule(cfg), weight_decay=cfg.weight_decay))
  return optimizer(optax.chain(*parts), params, field_lr_scales=cfg.field_lr_scales)


class TrainState(NamedTuple):
  step: jax.Array
  trainable: Any
  opt_state: Any
  key: jax.Array


class TrainResult(NamedTuple):
  params: Any            # the full tree (trainable + frozen)
  state: TrainState
  history: list          # one dict per logged step
  eval_metrics: dict     # last evaluation
  start_step: int = 0    # the step this call started from (> 0 when resumed)


class TrainInterrupted(KeyboardInterrupt):
  """SIGINT or SIGTERM stopped :func:`train` (``TrainConfig.handle_signals``) after a step.

  The step in progress was finished and, with ``TrainConfig.checkpoint_dir``, a checkpoint of it
  written (committed before this is raised), so the same ``train`` call resumes from it. A
  ``KeyboardInterrupt``: code that does not know it stops as on Ctrl-C.

  Attributes:
    signum: the signal (``signal.SIGINT``, ``signal.SIGTERM``).
    step: the steps completed.
    result: a :class:`TrainResult` of the training so far (no evaluation).
    checkpoint: the checkpoint's step directory, or None without ``checkpoint_dir``.
  """

  def __init__(self, signum: int, step: int, result: "TrainResult", checkpoint=None):
    super().__init__(f"signal {signum} at step {step}")
    self.signum, self.step, self.result, self.checkpoint = signum, step, result, checkpoint


class _Signals:
  """While active, SIGINT/SIGTERM set ``self.signum`` instead of interrupting; a second signal
  interrupts as usual (``KeyboardInterrupt``). Only in the main thread (elsewhere: inactive)."""

  def __init__(self, active: bool):
    import signal
    import threading
    self.signum, self._old = None, {}
    if not active or threading.current_thread() is not threading.main_thread():
      return
    for sig in (signal.SIGINT, signal.SIGTERM):
      self._old[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.signum is not None:
      self.restore()
      raise KeyboardInterrupt
    self.signum = signum
    print(f"\n{_signal_name(signum)}: finishing the current step, then saving", file=sys.stderr)

  def agree(self):
    """Several processes: ``signum`` becomes the signal any of them received (a collective that
    every process calls at the same points; :func:`distributed.agreed_signal`)."""
    if self._old and dist.multi_process():
      self.signum = dist.agreed_signal(self.signum)

  def restore(self):
    import signal
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}


def _signal_name(signum: int) -> str:
  import signal
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, grad_accum: int = 1):
  """``step(state, frozen, batch) -> (state, metrics)``, to be jitted.

  With ``grad_accum > 1`` every array in ``batch`` has a leading axis divisible by it; the
  micro-batches run in a ``lax.scan`` and their gradients are averaged.
  """
  def grads_of(trainable, frozen, batch, key):
    def f(t):
      loss, metrics = loss_fn(combine(t, frozen), batch, key)
      return loss, metrics
    (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(trainable)
    return loss, metrics, g

  def step(state: TrainState, frozen, batch):
    key, sub = jax.random.split(state.key)
    if grad_accum == 1:
      loss, metrics, g = grads_of(state.trainable, frozen, batch, sub)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]),
                           batch)
      keys = jax.random.split(sub, grad_accum)

      def body(acc, inp):
        mb, k = inp
        loss, metrics, g = grads_of(state.trainable, frozen, mb, k)
        acc = jax.tree.map(jnp.add, acc, (loss, metrics, g))
        return acc, None
      zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grads_of(state.trainable, frozen, jax.tree.map(lambda x: x[0], micro), keys[0])))
      (loss, metrics, g), _ = jax.lax.scan(body, zero, (micro, keys))
      loss, metrics, g = jax.tree.map(lambda x: x / grad_accum, (loss, metrics, g))
    updates, opt_state = tx.update(g, state.opt_state, state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    gnorm = optax.global_norm(g)
    return TrainState(state.step + 1, trainable, opt_state, key), {"loss": loss, "grad_norm": gnorm,
                                                                     **metrics}
  return step


class _Placement(NamedTuple):
  mesh: Any
  batch: Any            # NamedSharding of batch-major arrays
  fsdp: bool


def _placement(mode: Optional[str]) -> Optional[_Placement]:
  """The mesh over all devices for ``mode`` (None with one device and a one-device mode).

  ``dp``: ``data`` over all devices; ``fsdp``: ``fsdp`` over all of them; a mesh spec
  (``"data=2,fsdp=-1,tensor=2"``): that ``(data, fsdp, tensor)`` mesh, parameters placed by
  :mod:`peftjax.models.sharding`'s rules (FSDP on the hidden axis, tensor parallelism on heads,
  MLP and vocabulary). The batch is split over ``data`` x ``fsdp`` and repeated along ``tensor``.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P
  from peftjax.models.sharding import make_mesh, mesh_shape
  devices = jax.devices()
  shape = None if mode in (None, "dp", "fsdp") else mesh_shape(mode)
  if len(devices) == 1 and (shape is None or all(v in (1, -1) for v in shape.values())):
    return None
  if shape is None:
    mesh = make_mesh(fsdp=-1) if mode == "fsdp" else make_mesh(data=-1, fsdp=1)
  else:
    try:
      mesh = make_mesh(**shape)
    except ValueError as e:
      raise ValueError(f"TrainConfig.sharding {mode!r}: {e}") from None
    tensor = mesh.shape["tensor"]
    if dist.multi_process() and jax.local_device_count() % tensor:
      raise ValueError(f"TrainConfig.sharding {mode!r}: tensor={tensor} must divide each "
                       f"process's {jax.local_device_count()} devices (tensor-parallel groups "
                       f"stay within a process, which feeds them the same rows)")
  return _Placement(mesh, NamedSharding(mesh, P(("data", "fsdp"))), mode != "dp" and
                    mode is not None)


def _place_params(tree, placement: Optional[_Placement]):
  from peftjax.models.sharding import put_global
  if placement is None:
    return tree
  if placement.fsdp:
    from peftjax.models.sharding import shard_params
    return shard_params(tree, placement.mesh)
  from jax.sharding import NamedSharding, PartitionSpec as P
  return put_global(tree, NamedSharding(placement.mesh, P()))


def _like(tree, template):
  """``tree``'s arrays placed as ``template``'s (same structure)."""
  from peftjax.models.sharding import put_global
  return jax.tree.map(lambda x, t: put_global(x, t.sharding) if isinstance(t, jax.Array)
                      else x, tree, template)


def _local_rows(data) -> bool:
  """Whether ``data`` yields this process's rows of each global batch (it says so with a
  ``process_count`` equal to the number of processes) rather than whole global batches."""
  return dist.multi_process() and getattr(data, "process_count", 1) == jax.process_count()


def _put_batch(batch, sharding, local_rows: bool = False):
  """The batch on the mesh; in a multi-process run each process contributes its rows (taken
  from the global batch unless ``local_rows``)."""
  if sharding is None:
    return jax.tree.map(jnp.asarray, batch)
  n = sharding.mesh.shape["data"] * sharding.mesh.shape["fsdp"]   # repeated along "tensor"
  procs = jax.process_count()
  if procs > 1 and not local_rows:
    batch = dist.process_rows(batch)
  for x in jax.tree.leaves(batch):
    size = np.shape(x)[0] * (procs if procs > 1 else 1)
    if size % n:
      raise ValueError(f"batch size {size} is not divisible by the {n} devices of the mesh's "
                       f"data x fsdp axes")
  return dist.global_batch(batch, sharding)


def _tensorboard(out_dir: str):
  """A ``add_scalar(tag, value, step)``/``close()`` writer, or None if none is importable."""
  import importlib.util
  try:
    from tensorboardX import SummaryWriter
    return SummaryWriter(out_dir)
  except ImportError:
    pass
  if importlib.util.find_spec("tensorboard") is not None:
    try:
      from torch.utils.tensorboard import SummaryWriter
      return SummaryWriter(out_dir)
    except ImportError:
      pass
  if importlib.util.find_spec("tensorflow") is not None:
    try:
      import tensorflow as tf
    except ImportError:
      return None
    writer = tf.summary.create_file_writer(out_dir)

    class _TF:
      def add_scalar(self, tag, value, step):
        with writer.as_default():
          tf.summary.scalar(tag, value, step=step)

      def close(self):
        writer.close()
    return _TF()
  return None


def _data_position(data, step: int):
  if hasattr(data, "state") and hasattr(data, "restore"):
    return {"loader": data.state()}
  return {"batches": step}


def _restore_data(data, position, step: int):
  if isinstance(position, dict) and "loader" in position:
    if not hasattr(data, "restore"):
      raise ValueError("the checkpoint holds a loader position, but the data iterator has no "
                       "restore(); pass the same kind of loader (peftjax.data.*Loader)")
    data.restore(position["loader"])
    return
  n = position.get("batches", step) if isinstance(position, dict) else step
  for _ in range(n):  # a plain iterator: skip what the interrupted run consumed
    next(data)


def evaluate(metric_fn: Callable, params, batches: Iterable[dict], *,
             label: Optional[str] = None) -> dict:
  """Averages ``metric_fn(params, batch) -> dict of (sum, count)`` pairs over ``batches``.

  ``metric_fn`` returns, per metric name, a pair ``(sum, count)`` for the batch; the result is
  ``total_sum / total_count`` per name (so padding and unequal batches are weighted correctly).
  With ``label``, a progress bar so labelled counts the batches (on stderr).
  """
  fn = jax.jit(metric_fn)
  sums: dict = {}
  mesh = dist._global_mesh(params) if dist.multi_process() else None
  if label is not None and dist.is_main():
    from tqdm.auto import tqdm
    batches = tqdm(batches, desc=label, unit="batch", dynamic_ncols=True, file=sys.stderr,
                   leave=False, total=len(batches) if hasattr(batches, "__len__") else None)
  for batch in batches:
    # several processes: every process evaluates the whole batch (replicated over the mesh)
    batch = (dist.replicate(jax.tree.map(np.asarray, batch), mesh) if mesh is not None else
             jax.tree.map(jnp.asarray, batch))
    for k, (s, c) in fn(params, batch).items():
      ps, pc = sums.get(k, (0.0, 0.0))
      sums[k] = (ps + float(s), pc + float(c))
  return {k: s / c for k, (s, c) in sums.items() if c}


def _tokens_in(batch) -> int:
  if "attention_mask" in batch:
    return int(np.asarray(batch["attention_mask"]).sum())
  if "input_ids" in batch:
    return int(np.prod(np.shape(batch["input_ids"])))
  return int(np.shape(jax.tree.leaves(batch)[0])[0])


def train(loss_fn: Callable, params, data: Iterator[dict], config: TrainConfig = TrainConfig(), *,
          eval_fn: Optional[Callable] = None, eval_data: Optional[Callable[[], Iterable]] = None,
          state: Optional[TrainState] = None,
          on_step: Optional[Callable[[TrainState, dict], None]] = None) -> TrainResult:
  """Trains the trainable part of ``params``.

  Args:
    loss_fn: ``(params, batch, key) -> (loss, metrics_dict)``; ``params`` is the full tree.
    params: a tree with nodes (e.g. from ``peftjax.lora.apply``).
    data: an iterator of batches (dicts of arrays with a leading batch axis).
    config: :class:`TrainConfig`.
    eval_fn: ``(params, batch) -> {name: (sum, count)}`` (see :func:`evaluate`).
    eval_data: a callable returning a fresh iterable of evaluation batches.
    state: a :class:`TrainState` to start from (otherwise a fresh one, or the latest checkpoint
      in ``config.checkpoint_dir``).
    on_step: called after every step with the new state and its metrics (host values).

  With ``config.checkpoint_dir``, the training state is saved every ``config.save_every`` steps
  and at the end (:class:`peftjax.train.checkpoint.TrainCheckpointer`: trainable leaves, optimizer
  state, PRNG key, step and the data position: ``data.state()`` for the loaders of
  :mod:`peftjax.data`, else the number of batches taken); if the directory already holds a
  checkpoint, training resumes from it (``data.restore(...)``, or skipping that many batches of a
  plain iterator) and continues exactly as the uninterrupted run would have. A checkpoint whose
  files do not read completely is set aside (``<step>.corrupt``) and the previous one used.

  With ``config.handle_signals`` (main thread), SIGINT/SIGTERM finish the current step, write a
  checkpoint of it (with ``checkpoint_dir``) and raise :class:`TrainInterrupted`; a second signal
  interrupts at once. With several processes, the processes agree after every step on whether any
  of them was signalled (:func:`peftjax.train.distributed.agreed_signal`), so a signal to one
  process stops all of them after the same step, with one checkpoint written together.

  Several processes (after :func:`peftjax.train.distributed.initialize`): every process calls
  ``train`` with the same arguments; the mesh spans all processes' devices, each process puts
  only its rows of every global batch on its devices (``data`` yields global batches, of which
  each process keeps its rows, or, if ``data.process_count`` equals the number of processes,
  this process's rows already), the metrics are the global batch's, only process 0 writes
  ``out_dir`` files, the progress bar and messages, and checkpoints are written by all
  processes together. ``TrainResult.params`` then holds global arrays
  (:func:`peftjax.train.distributed.gather` copies them to the host).

  Returns:
    :class:`TrainResult` with the trained full tree, the final state, the logged history and
    the last evaluation.
  """
  tx, step_fn = _compiled_step(loss_fn, config, params)
  placement = _placement(config.sharding)
  ckpt = None
  if config.checkpoint_dir:
    from peftjax.train.checkpoint import TrainCheckpointer  # orbax: imported when needed
    ckpt = TrainCheckpointer(config.checkpoint_dir, max_to_keep=config.keep_checkpoints)
  try:
    return _train(params, data, config, tx, step_fn, placement, ckpt, eval_fn, eval_data, state,
                  on_step)
  finally:
    if ckpt is not None:
      ckpt.close()


def _restore_latest(ckpt, params, opt_template):
  """The newest checkpoint in ``ckpt`` that reads completely, or None if there is none.

  A checkpoint whose files do not read (truncated, corrupt: :class:`CorruptCheckpoint`) is set
  aside as ``<step>.corrupt`` (kept, not deleted) and the one before it tried; each is reported
  on stderr. Any other error (another base model, another optimizer) propagates.
  """
  from peftjax.io.checkpoint import CorruptCheckpoint
  for step in reversed(ckpt.all_steps()):
    try:
      return ckpt.restore(params, opt_template, step=step)
    except CorruptCheckpoint as e:
      aside = ckpt.set_aside(step)
      print(f"checkpoint {ckpt.directory / str(step)} does not read completely ({e}); moved it "
            f"to {aside.name} and trying the one before", file=sys.stderr)
  return None


#: (loss_fn, optimizer settings, tree structure) -> (tx, jitted step): repeated ``train`` calls
#: with the same loss and tree (a resumed run, a sweep over seeds) reuse the compiled step.
_STEPS: dict = {}
_STEPS_MAX = 8


def _compiled_step(loss_fn, config: TrainConfig, params):
  key = (loss_fn, config.steps, config.learning_rate, config.schedule, config.warmup_steps,
         config.weight_decay, config.max_grad_norm, config.grad_accum,
         tuple(sorted((config.field_lr_scales or {}).items())),
         jax.tree_util.tree_structure(params))
  try:
    hit = _STEPS.get(key)
  except TypeError:  # an unhashable static field somewhere: no caching
    hit, key = None, None
  if hit is None:
    tx = make_optimizer(config, params)
    hit = (tx, jax.jit(make_train_step(loss_fn, tx, config.grad_accum), donate_argnums=(0,)))
    if key is not None:
      if len(_STEPS) >= _STEPS_MAX:
        _STEPS.pop(next(iter(_STEPS)))
      _STEPS[key] = hit
  return hit


def _train(params, data, config, tx, step_fn, placement, ckpt, eval_fn, eval_data, state,
           on_step) -> TrainResult:
  trainable, frozen = split(_place_params(params, placement))
  saved = None
  if state is None and ckpt is not None and ckpt.all_steps():
    template = tx.init(trainable)
    saved = _restore_latest(ckpt, params, template)
  main = dist.is_main()
  if saved is not None:
    trainable = split(_place_params(saved.params, placement))[0]
    state = TrainState(jnp.asarray(saved.step, jnp.int32), trainable,
                       _like(saved.opt_state, template), saved.rng)
    _restore_data(data, saved.data_position, saved.step)
    if main:
      print(f"resuming from step {saved.step} ({ckpt.directory / str(saved.step)})",
            file=sys.stderr)
  elif state is None:
    # The step donates its state; copy so the caller's arrays (shared with other trees) survive.
    trainable = jax.tree.map(jnp.copy, trainable)
    state = TrainState(jnp.asarray(0, jnp.int32), trainable, tx.init(trainable),
                       jax.random.key(config.seed))
  if placement is not None and dist.multi_process():
    # the step, the key and any optimizer state left off the mesh: replicated over it
    state = dist.replicate(state, placement.mesh)
  sharding = placement.batch if placement is not None else None
  local_rows = _local_rows(data)
  history, eval_metrics = [], {}
  log_file = writer = None
  if config.out_dir and main:
    os.makedirs(config.out_dir, exist_ok=True)
    log_file = open(os.path.join(config.out_dir, "metrics.jsonl"), "a", encoding="utf-8")
    if config.tensorboard:
      writer = _tensorboard(config.out_dir)
  bar = None
  start = int(state.step)
  if config.progress and main:
    from tqdm.auto import tqdm
    bar = tqdm(total=config.steps, initial=start, desc=config.label, unit="step",
               dynamic_ncols=True, file=sys.stderr)
  t0, tokens = time.perf_counter(), 0
  saved_step = start if saved is not None else None

  def log(record):
    history.append(record)
    if log_file:
      log_file.write(json.dumps(record) + "\n")
      log_file.flush()
    if writer is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          writer.add_scalar(k if k.startswith("eval_") else f"train/{k}", v, record["step"])

  def save(step):
    nonlocal saved_step
    # Copies: the next step donates the state's buffers while an async save may still read them.
    # Only the donated (trainable) part: copying the frozen base would cost a whole model.
    tree = combine(jax.tree.map(jnp.copy, state.trainable), frozen)
    ckpt.save(step, tree, jax.tree.map(jnp.copy, state.opt_state), rng=jnp.copy(state.key),
              data_position=_data_position(data, step))
    saved_step = step

  def eval_label():
    return f"{config.label} eval" if config.progress else None

  signals = _Signals(config.handle_signals)
  try:
    for i in range(start, config.steps):
      batch = next(data)
      tokens += _tokens_in(batch) * (jax.process_count() if local_rows else 1)
      state, metrics = step_fn(state, frozen, _put_batch(batch, sharding, local_rows))
      step = i + 1
      if ckpt is not None and (step % config.save_every == 0 or step == config.steps):
        save(step)
      if on_step is not None or step % config.log_every == 0 or step == config.steps or step == 1:
        host = {k: float(v) for k, v in metrics.items()}
        elapsed = time.perf_counter() - t0
        record = {"step": step, **host, "tokens_per_s": tokens / max(elapsed, 1e-9),
                  "elapsed_s": elapsed}
        if step % config.log_every == 0 or step == config.steps or step == 1:
          log(record)
        if bar is not None:
          bar.set_postfix(loss=f"{host['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        if on_step is not None:
          on_step(state, host)
      if bar is not None:
        bar.update(1)
      signals.agree()
      if signals.signum is not None:
        break
      if eval_fn is not None and eval_data is not None and config.eval_every and \
          step % config.eval_every == 0 and step != config.steps:
        eval_metrics = evaluate(eval_fn, combine(state.trainable, frozen), eval_data(),
                                label=eval_label())
        log({"step": step, **{f"eval_{k}": v for k, v in eval_metrics.items()}})
    signals.agree()   # a signal after the last step's agreement: every process stops, or none
    signals.restore()
    if bar is not None:  # closed before the evaluation: its rate is the training steps'
      bar.close()
      bar = None
    if signals.signum is not None:
      step = int(state.step)
      where = None
      if ckpt is not None:
        if saved_step != step:
          save(step)
        ckpt.wait_until_finished()
        where = ckpt.directory / str(step)
      raise TrainInterrupted(signals.signum, step, TrainResult(
          combine(state.trainable, frozen), state, history, eval_metrics, start), where)
    if eval_fn is not None and eval_data is not None:
      eval_metrics = evaluate(eval_fn, combine(state.trainable, frozen), eval_data(),
                              label=eval_label())
      log({"step": int(state.step), **{f"eval_{k}": v for k, v in eval_metrics.items()}})
  finally:
    signals.restore()
    if bar is not None:
      bar.close()
    if log_file:
      log_file.close()
    if writer is not None:
      writer.close()
  return TrainResult(combine(state.trainable, frozen), state, history, eval_metrics, start)
